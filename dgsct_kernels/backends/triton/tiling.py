"""Every tile, warp and pipeline-stage choice of the Triton backend, in one place.

`tiles(kernel, shape, dtype, arch)` returns the constexpr block sizes of one kernel plus
`num_warps` and `num_stages`, keyed by the problem's sizes, the dtype and the GPU
architecture (as flash-attention keeps its tile sizes together). Launchers pass the dict
straight to the kernel, so the compile report (`python python/compile_report.py`)
compiles exactly what runs. Each entry says what bounds it: registers (no program holds
more than a [64, 64] float32 accumulator), shared memory (`SHARED_LIMIT`) and `tl.dot`'s
minimum of 16 along every axis. The dict may also carry `maxnreg` (a launch option, like
num_warps; the CPU interpreter ignores all three).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .common import interpreting

# Shared memory one block may opt in to, in bytes (CUDA programming guide, "Compute
# capabilities" table): sm_80 (A100) 163 KB, sm_86 / sm_89 (RTX 30/40, A10, L4, L40S)
# 99 KB, sm_90 (H100/H200) 227 KB.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
ARCHS = (80, 89, 90)  # the architectures the compile report checks
INTERPRETER_ARCH = 80  # tile choices the CPU interpreter runs (any arch computes the same sums)


@dataclass(frozen=True)
class Shape:
    """The sizes a kernel's tiles depend on (SPEC.md's names)."""

    tokens: int  # N
    dim: int  # C
    hidden: int  # H
    groups: int  # G
    latents: int  # K
    guide_tokens: int = 0  # M
    guide_dim: int = 0  # D

    @classmethod
    def of(cls, dims) -> "Shape":
        return cls(dims.tokens, dims.dim, dims.hidden, dims.groups, dims.num_latents, dims.guide_tokens,
                   dims.guide_dim)


def current_arch() -> int:
    """The architecture kernels compile for now: the active driver's target (a real GPU, or
    the compile report's stand-in), or INTERPRETER_ARCH under TRITON_INTERPRET=1."""
    if interpreting():
        return INTERPRETER_ARCH
    target = triton.runtime.driver.active.get_current_target()
    return int(target.arch) if isinstance(target.arch, int) else INTERPRETER_ARCH


def block(extent: int, low: int, high: int) -> int:
    """A power-of-two block size for `extent`, within [low, high] (tl.dot needs >= 16)."""
    return min(high, max(low, triton.next_power_of_2(extent)))


def hidden_block(extent: int, high: int) -> int:
    """A power-of-two block (16 <= block <= high) for a hidden extent taken a block at a time:
    the least padded work plus a 16-wide block's worth per block, the larger on a tie. So
    H/G = 96 takes 3 blocks of 32 (not 2 of 64, a third of them padding) and H/G = 48 one of 64."""
    sizes = [b for b in (16, 32, 64, 128, 256) if b <= high]
    return min(sizes, key=lambda b: (triton.cdiv(extent, b) * (b + 16), -b))


def latents_block(latents: int) -> int:
    return max(16, triton.next_power_of_2(latents))


def tiles(kernel: str, shape: Shape, dtype: torch.dtype, arch: int) -> dict[str, int]:
    """Block sizes, num_warps and num_stages of `kernel` for this shape, dtype and arch."""
    try:
        choose = _CHOOSERS[kernel]
    except KeyError:
        raise ValueError(f"tiles: unknown kernel {kernel!r}; expected one of {sorted(_CHOOSERS)}") from None
    return choose(shape, dtype, arch)


# The entries below are checked by python/compile_report.py for sm_80, sm_89 and sm_90, at
# every AVE shape, dtype, mode and layer option: no spill, no stack frame, shared memory
# within SHARED_LIMIT, tensor-core instructions for every tl.dot. What bounds them:
#  - registers: a 3xTF32 product holds both operands twice (TF32 high and low parts) in
#    registers on sm_80/89 (mma.sync gives every warp the whole B operand), and each token
#    pass recomputes x1 = x + gate_av * probs R per chunk, with probs [BN, KP] held across
#    the program. So the token passes keep BN at 16-32 and the inner product axes at 16-32,
#    and take the hidden axis (H/G, up to 96) a block at a time (hidden_block).
#  - pipelining: the token passes' loops are short and nested, with several products each;
#    software pipelining (num_stages > 1) there only adds live registers, so they use 1
#    (2 where the sweep over C is long and the registers allow it).
#  - ptxas 12.9 may cap registers at 168 (4 warps) or 128 (8 warps), trading a few spilled
#    bytes for occupancy; the entries avoid it (more warps, smaller tiles), and where no
#    tile does, set maxnreg=255 (PTX .maxnreg), which makes ptxas use the registers instead.
#  - shared memory: the largest, fp32 guide_apply / guide_scores, take 56-72 KB at 2-3
#    stages, within sm_89's 99 KB.

# ---------------------------------------------------------------- guide path (guide_pass.py)

def _guide_scores(s: Shape, dtype, arch):
    # [KP, BM] accumulator; g tile [BM, BD] split for 3xTF32: 8 warps (4 spilled at 255 registers)
    return {"BM": block(s.guide_tokens, 16, 64), "BD": block(s.guide_dim, 16, 64),
            "num_warps": 8, "num_stages": 3}


def _guide_logits(s: Shape, dtype, arch):
    # [KP, BN] accumulator over BM-wide chunks of Wtok: 8 warps (4 spilled on sm_80/89)
    return {"BN": block(s.tokens, 16, 64), "BM": block(s.guide_tokens, 16, 64),
            "num_warps": 8, "num_stages": 3}


def _guide_apply(s: Shape, dtype, arch):
    # (A Wtok) [KP, BM] then its product with g. BM 128 keeps the written partials
    # [F, M / BM, K, D] small; at 4 warps and 3 stages it spilled and took 128 KB of shared
    # memory, at 8 warps and one stage (the S sweeps gain nothing from pipelining) it fits
    return {"BN": block(s.tokens, 16, 64), "BM": block(s.guide_tokens, 16, 128),
            "BD": block(s.guide_dim, 16, 64), "num_warps": 8, "num_stages": 1}


# ---------------------------------------------------------------- forward token passes

def _channel_pass(s: Shape, dtype, arch):
    # [BN, BO] accumulator, x1 recomputed per [BN, BK] chunk (BN 64 / BK 64 spilled in fp32)
    return {"BN": block(s.tokens, 16, 32), "BK": block(s.dim, 16, 32), "BO": block(s.dim, 16, 64),
            "num_warps": 4, "num_stages": 2}


def _bottleneck_pass(s: Shape, dtype, arch):
    # [BN, BO] then [BN, BH] accumulators, y recomputed per [BN, BK] chunk; 8 warps (4 met
    # ptxas's 168-register cap)
    return {"BN": block(s.tokens, 16, 32), "BK": block(s.dim, 16, 32), "BO": block(s.dim // 2, 16, 64),
            "BH": hidden_block(s.hidden // s.groups, 64), "num_warps": 8, "num_stages": 1}


def _moments_pass(s: Shape, dtype, arch):
    # one [BH, BH] block of the second-moment matrix per program (BH 64 spilled)
    return {"BN": block(s.tokens, 16, 32), "BH": hidden_block(s.hidden // s.groups, 32),
            "num_warps": 4, "num_stages": 2}


def _output_pass(s: Shape, dtype, arch):
    # [BN, BO] accumulator over BH-wide blocks of the hidden axis
    return {"BN": block(s.tokens, 16, 32), "BO": block(s.dim // s.groups, 16, 64),
            "BH": hidden_block(s.hidden // s.groups, 32), "num_warps": 4, "num_stages": 1}


# ---------------------------------------------------------------- backward token passes

def _output_backward(s: Shape, dtype, arch):
    # the output pass's products with up to eight [BN, BO] float32 tiles live around them
    # (u, bn2 and ln_post values and gradients): BN 16, and maxnreg (ptxas capped at 168)
    return {"BN": block(s.tokens, 16, 16), "BO": block(s.dim // s.groups, 16, 64),
            "BH": hidden_block(s.hidden // s.groups, 32), "num_warps": 4, "num_stages": 1,
            "maxnreg": 255}


def _modulation_backward(s: Shape, dtype, arch):
    # dy = dz W_down per [BN, BK] chunk (inner axis BH) next to x1, xm, y and their
    # gradients: BN 16, BH 16
    return {"BN": block(s.tokens, 16, 16), "BK": block(s.dim // s.groups, 16, 32),
            "BH": hidden_block(s.hidden // s.groups, 16), "num_warps": 4, "num_stages": 1}


# ---------------------------------------------------------------- attention backward (attention_backward_pass.py)
# Their gradient products are 3xTF32 (float32 operands split in TF32 high and low parts,
# both held in registers): on sm_80/89 one [64, 64] x K = 32 such product alone takes 241
# registers per thread (mma.sync keeps the whole B operand in every warp), against 96 for
# one TF32 product. So these tiles keep K (the reduced axis of each product) at 16-32 and
# use 8 warps; on sm_90 a 64-row M lets wgmma read its operands from shared memory.

def _attention_masks(s: Shape, dtype, arch):
    # x1 recomputed per [BN, BK] chunk (probs R, K = latents) and multiplied by W (K = BK);
    # 64 token rows for wgmma on sm_90; 32 on sm_80/89, where 64 takes all 255 registers
    return {"BN": block(s.tokens, 16, 64 if arch >= 90 else 32), "BK": block(s.dim, 16, 32),
            "BO": block(s.dim, 16, 64), "num_warps": 8, "num_stages": 1}


def _spatial_backward(s: Shape, dtype, arch):
    # [BN, BK] accumulator of (mask2 scale) W_video_2 products over K = BO outputs
    return {"BN": block(s.tokens, 16, 64), "BK": block(s.dim, 16, 32), "BO": block(s.dim // 2, 16, 16),
            "num_warps": 8, "num_stages": 1}


def _channel_backward(s: Shape, dtype, arch):
    # as the spatial one, plus the [BN, K] accumulator of dx1 R^T
    return {"BN": block(s.tokens, 16, 64), "BK": block(s.dim, 16, 32), "BO": block(s.dim, 16, 16),
            "num_warps": 8, "num_stages": 1}


def _prompt_backward(s: Shape, dtype, arch):
    # two [K, BK] accumulators over the frame's tokens, K = BN per product
    return {"BN": block(s.tokens, 16, 16), "BK": block(s.dim, 16, 64), "num_warps": 8, "num_stages": 1}


def _attention_weight_grad(s: Shape, dtype, arch):
    # one [BK, BO] accumulator (d W^T) over a split's tokens, K = BN; per frame a K = latents product
    return {"BN": block(s.tokens, 16, 16), "BK": block(s.dim, 16, 64), "BO": block(s.dim // 2, 16, 32),
            "num_warps": 8, "num_stages": 1}


_CHOOSERS = {
    "guide_scores": _guide_scores,
    "guide_logits": _guide_logits,
    "guide_apply": _guide_apply,
    "channel_pass": _channel_pass,
    "bottleneck_pass": _bottleneck_pass,
    "moments_pass": _moments_pass,
    "output_pass": _output_pass,
    "output_backward": _output_backward,
    "modulation_backward": _modulation_backward,
    "attention_masks": _attention_masks,
    "spatial_backward": _spatial_backward,
    "channel_backward": _channel_backward,
    "prompt_backward": _prompt_backward,
    "attention_weight_grad": _attention_weight_grad,
}
