"""A DG-SCT pair as the encoders use it: audio guides vision, vision guides audio.

Runs one training step of both modules at the AVE stage-4 shapes (SPEC.md) on the
CPU and prints what ran. Usage: python python/example.py [--frames 10] [--backend auto]
"""
import argparse
import logging

import torch

import dgsct_kernels
from dgsct_kernels import FusedDGSCT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10, help="B*T frames per call (multiple of 10)")
    parser.add_argument("--backend", default="auto", choices=dgsct_kernels.backend_names())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # AVE stage 4: visual tokens 36 x 1536 (Swin-V2-L), audio tokens 64 x 768 (HTS-AT)
    visual_adapter = FusedDGSCT(dim=1536, guide_dim=768, tokens=36, guide_tokens=64, gamma=0.0,
                                backend=args.backend)
    audio_adapter = FusedDGSCT(dim=768, guide_dim=1536, tokens=64, guide_tokens=36, gamma=0.0,
                               backend=args.backend)
    with torch.no_grad():  # gate and gate_av start at 0 (identity residual); open them
        for adapter in (visual_adapter, audio_adapter):
            adapter.gate.fill_(1.0)
            adapter.gate_av.fill_(0.5)
    video = torch.randn(args.frames, 36, 1536)
    audio = torch.randn(args.frames, 64, 768)

    # both modules read the streams as they were before either residual is added
    v_out = visual_adapter(video, audio)
    a_out = audio_adapter(audio, video)
    video, audio = video + v_out.residual, audio + a_out.residual
    loss = video.pow(2).mean() + audio.pow(2).mean()
    loss.backward()

    print(f"residuals {tuple(v_out.residual.shape)} / {tuple(a_out.residual.shape)}, "
          f"spatial maps {tuple(v_out.spatial_map.shape)}, temporal gates {tuple(v_out.temporal_gate.shape)}")
    print(f"loss {loss.item():.4f}; |grad my_tokens| visual {visual_adapter.my_tokens.grad.norm():.3e}, "
          f"audio {audio_adapter.my_tokens.grad.norm():.3e}")


if __name__ == "__main__":
    main()
