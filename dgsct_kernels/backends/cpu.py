"""The `cpu` backend: a thin binding to the fused C++ kernels in `dgsct_kernels._C`.

The kernels (csrc/cpu/) run SPEC.md's forward tile by tile over (frame, token block)
items with at::parallel_for, keeping every [F, N, C] intermediate of steps 3, 5, 6 and 8
in cache, and its analytic backward, which recomputes from x, g and the parameters (the
op saves nothing else). The guide path never forms P and runs in the order
`plan_guide_path` chooses, passed from here. bfloat16/float16 compute in float32.

The ops and their glue are shared with the cuda backend (compiled.py).
"""
from __future__ import annotations

import torch

from ..dispatch import register
from .compiled import CompiledBackend, missing_kernels_reason

_UNAVAILABLE = missing_kernels_reason("CPU")


class CpuBackend(CompiledBackend):
    name = "cpu"
    rank = 10
    devices = ("cpu",)
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    description = ("fused C++ forward and analytic backward (at::parallel_for over frames and token "
                   "blocks, BLAS on tiles; saves only x, g and the parameters)")

    def unavailable_reason(self) -> str | None:
        return _UNAVAILABLE


register(CpuBackend())
