"""Two frozen encoders run side by side, with DG-SCT modules between their blocks.

The pairing of blocks is derived from the stage depths (`pair_blocks`); nothing here
knows the AVE numbers. Per paired block (visual block `vb`, audio block `ab`, index i):

    audio_p1[i](a, v), vis_p1[i](v, a)        both read the streams before the block
    v = attention_half(vb, v) + vis residual  visual attention half
    a = ab(a) + audio residual                the whole audio block
    audio_p2[i](a, v), vis_p2[i](v, a)        both read the new streams
    v = mlp_half(vb, v) + vis residual        visual MLP half
    a = a + audio residual

Visual blocks without a partner run plain. After the last stage the visual encoder's
final norm runs (the audio stream gets none), as in the authors' code.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..module import FusedDGSCT
from .encoders.swin_v2 import attention_half, mlp_half

ADAPTER_LISTS = ("audio_adapter_blocks_p1", "vis_adapter_blocks_p1",
                 "audio_adapter_blocks_p2", "vis_adapter_blocks_p2")


@dataclass(frozen=True)
class StagePairing:
    """One stage: for each visual block, the audio block it pairs with (or None)."""

    stage: int
    visual_depth: int
    audio_depth: int
    partners: tuple[int | None, ...]


def pair_blocks(visual_depths: Sequence[int], audio_depths: Sequence[int]) -> tuple[StagePairing, ...]:
    """Zip the stages; pair blocks one to one where depths match.

    Where the visual stage is r times deeper, audio block k pairs with visual block
    r*k + r - 1 (the last of each group of r), the authors' rule for 18 vs 6 (3k + 2).
    """
    visual_depths, audio_depths = tuple(visual_depths), tuple(audio_depths)
    if len(visual_depths) != len(audio_depths):
        raise ValueError(f"visual_depths={visual_depths} and audio_depths={audio_depths}: "
                         "expected the same number of stages")
    out = []
    for stage, (dv, da) in enumerate(zip(visual_depths, audio_depths)):
        if not (isinstance(dv, int) and isinstance(da, int) and dv >= 1 and da >= 1):
            raise ValueError(f"stage {stage}: depths visual={dv!r}, audio={da!r}: expected "
                             "positive integers")
        if dv % da:
            raise ValueError(f"stage {stage}: visual depth {dv} is not a multiple of audio depth "
                             f"{da}; only equal depths or a visual stage r times deeper can pair")
        ratio = dv // da
        partners = tuple((j // ratio) if j % ratio == ratio - 1 else None for j in range(dv))
        out.append(StagePairing(stage, dv, da, partners))
    return tuple(out)


def count_paired_blocks(visual_depths: Sequence[int], audio_depths: Sequence[int]) -> int:
    return sum(sum(p is not None for p in s.partners) for s in pair_blocks(visual_depths,
                                                                           audio_depths))


def count_modules(visual_depths: Sequence[int], audio_depths: Sequence[int]) -> int:
    """DG-SCT modules: p1 and p2, visual and audio, per paired block."""
    return 4 * count_paired_blocks(visual_depths, audio_depths)


@dataclass(frozen=True)
class StageShape:
    depth: int
    grid: tuple[int, int]  # token grid (H, W) of the stage's blocks
    dim: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class PairedBlock:
    """Where paired block `index` sits and the shapes its modules see."""

    index: int
    stage: int
    visual_block: int
    audio_block: int
    visual: StageShape
    audio: StageShape


def paired_blocks(visual: Sequence[StageShape], audio: Sequence[StageShape]) -> tuple[PairedBlock, ...]:
    pairings = pair_blocks([s.depth for s in visual], [s.depth for s in audio])
    out = []
    for pairing, vs, as_ in zip(pairings, visual, audio):
        for vb, ab in enumerate(pairing.partners):
            if ab is not None:
                out.append(PairedBlock(len(out), pairing.stage, vb, ab, vs, as_))
    return tuple(out)


def stage_shapes(swin: nn.Module) -> tuple[StageShape, ...]:
    """Depth, token grid and width of every stage of a timm Swin / Swin-V2 model."""
    shapes = []
    for i, layer in enumerate(swin.layers):
        grid = tuple(int(v) for v in layer.output_resolution)
        dim = layer.blocks[0].norm1.normalized_shape[0]
        if len(grid) != 2:
            raise ValueError(f"stage {i}: output_resolution {grid}: expected (H, W)")
        shapes.append(StageShape(len(layer.blocks), grid, int(dim)))
    return tuple(shapes)


def tile_waveform(wave: Tensor, length: int) -> Tensor:
    """Repeat each row periodically to `length` samples (the authors double and cut)."""
    samples = wave.shape[-1]
    if samples == length:
        return wave
    reps = -(-length // samples)
    return wave.repeat(*([1] * (wave.dim() - 1)), reps)[..., :length]


class TwoStreamOutput(NamedTuple):
    visual: Tensor  # [F, H, W, Cv] after the visual encoder's final norm
    audio: Tensor  # [F, h, w, Ca], no final norm
    visual_map: Tensor  # [F, H*W], spatial map of the last visual p2 module
    audio_map: Tensor  # [F, h*w], spatial map of the last audio p2 module


def _tokens(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])  # NHWC -> [F, N, C], a view


class TwoStreamEncoder(nn.Module):
    """Swin-V2 (visual) and HTS-AT (audio) with DG-SCT modules between paired blocks.

    `visual` is a timm SwinTransformerV2 (`patch_embed`, `layers`, `norm`); `audio` has a
    `frontend` (waveform -> log-mel image) and a `trunk` (timm SwinTransformer). The module
    lists keep the authors' names, index = paired block. Encoder weights are frozen
    (requires_grad False) but gradients flow through them. By default the encoders follow
    `train()`/`eval()` like the authors' (DropPath, SpecAugment and bn0 statistics are live
    in training); `encoders_eval=True` keeps them in eval mode always.
    """

    def __init__(self, visual: nn.Module, audio: nn.Module, *, segments: int,
                 module_kwargs: Mapping[str, object], audio_clip_samples: int | None = None,
                 encoders_eval: bool = False) -> None:
        super().__init__()
        self.visual, self.audio = visual, audio
        self.segments = segments
        self.audio_clip_samples = audio_clip_samples
        self.encoders_eval = encoders_eval
        self.visual_stages, self.audio_stages = stage_shapes(visual), stage_shapes(audio.trunk)
        self.pairings = pair_blocks([s.depth for s in self.visual_stages],
                                    [s.depth for s in self.audio_stages])
        self.paired = paired_blocks(self.visual_stages, self.audio_stages)

        def make(x: StageShape, g: StageShape) -> FusedDGSCT:
            return FusedDGSCT(dim=x.dim, guide_dim=g.dim, tokens=x.tokens, guide_tokens=g.tokens,
                              segments=segments, **module_kwargs)

        # creation order is the authors' (audio p1, vis p1, audio p2, vis p2)
        self.audio_adapter_blocks_p1 = nn.ModuleList(make(p.audio, p.visual) for p in self.paired)
        self.vis_adapter_blocks_p1 = nn.ModuleList(make(p.visual, p.audio) for p in self.paired)
        self.audio_adapter_blocks_p2 = nn.ModuleList(make(p.audio, p.visual) for p in self.paired)
        self.vis_adapter_blocks_p2 = nn.ModuleList(make(p.visual, p.audio) for p in self.paired)
        for p in list(visual.parameters()) + list(audio.parameters()):
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> TwoStreamEncoder:
        super().train(mode)
        if self.encoders_eval:
            self.visual.eval()
            self.audio.eval()
        return self

    def adapter_modules(self) -> list[FusedDGSCT]:
        return [m for name in ADAPTER_LISTS for m in getattr(self, name)]

    def encoder_statistics(self) -> dict[str, Tensor]:
        """BatchNorm buffers of the frozen encoders (HTS-AT's bn0), by state-dict name.

        Frozen weights do not change, but these do whenever the encoders run in train
        mode (the authors' setting), so they belong to what a training run produces.
        """
        out = {}
        for prefix, encoder in (("visual", self.visual), ("audio", self.audio)):
            for name, module in encoder.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for key, value in module.named_buffers(recurse=False):
                        out[".".join(p for p in (prefix, name, key) if p)] = value
        return out

    def forward(self, frames: Tensor, waves: Tensor) -> TwoStreamOutput:
        """frames [F, 3, S, S] and waves [F, samples] (F = B*T) -> TwoStreamOutput."""
        if self.audio_clip_samples is not None:
            waves = tile_waveform(waves, self.audio_clip_samples)
        v = self.visual.patch_embed(frames)
        a = self.audio.trunk.patch_embed(self.audio.frontend(waves))
        index = 0
        v_map = a_map = None
        for pairing, v_stage, a_stage in zip(self.pairings, self.visual.layers,
                                             self.audio.trunk.layers):
            v, a = v_stage.downsample(v), a_stage.downsample(a)
            for v_block, partner in zip(v_stage.blocks, pairing.partners):
                if partner is None:
                    v = v_block(v)
                    continue
                a_res = self.audio_adapter_blocks_p1[index](_tokens(a), _tokens(v)).residual
                v_res = self.vis_adapter_blocks_p1[index](_tokens(v), _tokens(a)).residual
                v = attention_half(v_block, v) + v_res.view(v.shape)
                a = a_stage.blocks[partner](a) + a_res.view(a.shape)
                a_out = self.audio_adapter_blocks_p2[index](_tokens(a), _tokens(v))
                v_out = self.vis_adapter_blocks_p2[index](_tokens(v), _tokens(a))
                v = mlp_half(v_block, v) + v_out.residual.view(v.shape)
                a = a + a_out.residual.view(a.shape)
                v_map, a_map = v_out.spatial_map, a_out.spatial_map
                index += 1
        v = self.visual.norm(v)
        return TwoStreamOutput(v, a, v_map, a_map)


def pool_tokens(tokens: Tensor, spatial_map: Tensor) -> Tensor:
    """[F, H, W, C] tokens weighted by a spatial map [F, H*W] -> [F, C]."""
    flat = _tokens(tokens)
    if spatial_map.shape != flat.shape[:2]:
        raise ValueError(f"spatial_map: shape {tuple(spatial_map.shape)}, expected "
                         f"{tuple(flat.shape[:2])} (the last stage's token count)")
    return torch.bmm(spatial_map.unsqueeze(1).to(flat.dtype), flat).squeeze(1)
