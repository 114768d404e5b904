"""`python -m dgsct_kernels.info`: versions, what was built, which backends can run here."""
from __future__ import annotations

import platform
import sys

import torch

import dgsct_kernels
from . import dispatch
from ._extension import extension_status
from .config import Dims
from .precision import LOW_PRECISION_DTYPES, PLAN, describe as describe_precision_plan


def report() -> str:
    lines = [f"dgsct_kernels {dgsct_kernels.__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible"
    lines.append(f"cuda (torch build) {torch.version.cuda or 'none'}; {gpu}")
    status = extension_status()
    built, detail = status["cpu"]
    lines.append("cpu extension: built" if built else f"cpu extension: not built ({detail})")
    if built:
        from .backends.cpu import gemm_provider
        name, reason = gemm_provider()
        lines.append(f"  cpu float32 products: {'oneDNN' if name == 'onednn' else 'BLAS'} ({reason})")
    built, detail = status["cuda"]
    lines.append(f"cuda extension: built ({detail})" if built else f"cuda extension: not built ({detail})")
    if status["info"]:
        info = status["info"]
        lines.append(f"  extension compiled against torch {info['torch_version']} with {info['compiler']}, "
                     f"OpenMP {'on' if info['openmp'] else 'off'}")
    lines.append(f"precision plan (precision_plan.def): {describe_precision_plan()}")
    lines.append("backends (auto prefers the first usable one):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    probe = Dims(tokens=64, dim=96, guide_tokens=64, guide_dim=96, num_latents=32, hidden=12, groups=2)
    for backend in dispatch.registered_backends():
        usable = []
        reasons = set()
        for device in devices:
            for dtype in backend.dtypes:
                why = backend.not_supported_reasons(dispatch.Problem(device, dtype, probe, 10, True, True))
                if why:
                    reasons.update(why)
                else:
                    usable.append(f"{device}/{str(dtype).replace('torch.', '')}")
        state = f"usable on {', '.join(usable)}" if usable else "not usable here"
        lines.append(f"  {backend.name:<10} {state}: {backend.description}")
        if not usable and reasons:
            lines.append(f"             reasons: {'; '.join(sorted(reasons))}")
        if backend.low_precision_products is None:
            lines.append("             bf16/fp16 inputs: every product in the input dtype (eager)")
        elif any(d in LOW_PRECISION_DTYPES.values() for d in backend.dtypes):
            low = [name for name in PLAN if name in backend.low_precision_products]
            lines.append(f"             bf16/fp16 inputs: {', '.join(low) or 'no'} products in the input dtype "
                         "(where the plan lists it), the rest in float32")
    return "\n".join(lines)


def main() -> None:
    print(report())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
