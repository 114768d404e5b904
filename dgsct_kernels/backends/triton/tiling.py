"""Every tile, warp and pipeline-stage choice of the Triton backend, in one place.

`tiles(kernel, shape, dtype, arch)` returns the constexpr block sizes of one kernel plus
`num_warps` and `num_stages`, keyed by the problem's sizes, the dtype and the GPU
architecture (as flash-attention keeps its tile sizes together). Launchers pass the dict
straight to the kernel, so the compile report (`python -m dgsct_kernels.compile_report`)
compiles exactly what runs. Each entry says what bounds it: registers (no program holds
more than a [64, 64] float32 accumulator), shared memory (`SHARED_LIMIT`) and `tl.dot`'s
minimum of 16 along every axis.
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


def latents_block(latents: int) -> int:
    return max(16, triton.next_power_of_2(latents))


def tiles(kernel: str, shape: Shape, dtype: torch.dtype, arch: int) -> dict[str, int]:
    """Block sizes, num_warps and num_stages of `kernel` for this shape, dtype and arch."""
    try:
        choose = _CHOOSERS[kernel]
    except KeyError:
        raise ValueError(f"tiles: unknown kernel {kernel!r}; expected one of {sorted(_CHOOSERS)}") from None
    return choose(shape, dtype, arch)


# ---------------------------------------------------------------- guide path (guide_pass.py)

def _guide_scores(s: Shape, dtype, arch):
    return {"BM": block(s.guide_tokens, 16, 64), "BD": block(s.guide_dim, 16, 64)}


def _guide_logits(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 64), "BM": block(s.guide_tokens, 16, 64)}


def _guide_apply(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 64), "BM": block(s.guide_tokens, 16, 128),
            "BD": block(s.guide_dim, 16, 64)}


# ---------------------------------------------------------------- forward token passes

def _channel_pass(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 64), "BK": block(s.dim, 16, 64), "BO": block(s.dim, 16, 64)}


def _bottleneck_pass(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 32), "BK": block(s.dim, 16, 64), "BO": block(s.dim // 2, 16, 64),
            "BH": block(s.hidden // s.groups, 16, 256)}


def _moments_pass(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 64), "BH": block(s.hidden // s.groups, 16, 256)}


def _output_pass(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 32), "BO": block(s.dim // s.groups, 16, 64),
            "BH": block(s.hidden // s.groups, 16, 256)}


# ---------------------------------------------------------------- backward token passes

def _output_backward(s: Shape, dtype, arch):
    return _output_pass(s, dtype, arch)


def _modulation_backward(s: Shape, dtype, arch):
    return {"BN": block(s.tokens, 16, 32), "BK": block(s.dim // s.groups, 16, 64),
            "BH": block(s.hidden // s.groups, 16, 256)}


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
}
