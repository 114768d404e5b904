"""The `cuda` backend: a thin binding to the hand-written CUDA kernels in `dgsct_kernels._C`.

The forward runs SPEC.md in four kernel passes, one thread block per (frame, token tile),
with every [F, N, C] intermediate of steps 3, 5, 6 and 8 in shared memory (csrc/cuda/:
kernels.cu launches the tile functions of dgsct_tiles.h); the guide path never forms P
and runs in the order `plan_guide_path` chooses, passed from here like the cpu backend.
The backward recomputes from x, g and the parameters and differentiates SPEC.md by hand
with ATen ops on CUDA tensors (csrc/cuda/portable/driver.cpp; products in cuBLAS).
float32, bfloat16 and float16 compute in float32.

The ops and their glue are shared with the cpu backend (compiled.py); their CUDA kernels
are registered when the extension was built with its CUDA part (DGSCT_FORCE_CUDA=1 or a
CUDA toolkit at build time).
"""
from __future__ import annotations

import torch

from ..dispatch import Problem, register
from ..measured import gpu_auto_reasons
from .compiled import CompiledBackend, missing_kernels_reason

# A thread block holds a tile of tokens in shared memory; one token needs
# (C + K + C/2 + H + 1) floats, and every sm_80+ device gives a block at least 48 KiB.
_SHARED_FLOATS = 48 * 1024 // 4
_UNAVAILABLE = missing_kernels_reason("CUDA")


class CudaBackend(CompiledBackend):
    name = "cuda"
    rank = 15
    devices = ("cuda",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    description = ("hand-written CUDA forward (4 tile passes, intermediates in shared memory); analytic "
                   "backward in ATen on CUDA tensors (saves only x, g and the parameters)")

    def unavailable_reason(self) -> str | None:
        return _UNAVAILABLE

    def shape_reasons(self, problem: Problem) -> list[str]:
        d = problem.dims
        per_token = d.dim + d.num_latents + d.dim // 2 + d.hidden + 1
        if per_token > _SHARED_FLOATS:
            return [(f"dim={d.dim}: a token needs {4 * per_token} bytes of shared memory, more than the "
                     f"{4 * _SHARED_FLOATS} every GPU gives a block")]
        return []

    def auto_reasons(self, problem: Problem) -> list[str]:
        # auto chooses between the GPU backends by measured speed only (measured.py)
        return gpu_auto_reasons(self.name, problem.device_type, problem.dtype, problem.training,
                                problem.dims)


register(CudaBackend())
