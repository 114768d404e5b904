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
from ..guide_path import guide_path_bytes, plan_guide_path
from ..measured import gpu_auto_reasons
from ..roofline import Work
from .compiled import CompiledBackend, missing_kernels_reason

# A thread block holds a tile of tokens in shared memory; one token needs
# (C + K + C/2 + H + 1) floats, and every sm_80+ device gives a block at least 48 KiB.
_SHARED_FLOATS = 48 * 1024 // 4
_KERNEL_SHARED_BYTES = 96 * 1024  # what the launcher asks for at most (kernels.cu, kMaxSharedBytes)
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
        # on GPUs: measured speed, else the roofline estimate among compile-clean backends (measured.py)
        return gpu_auto_reasons(self.name, problem)

    def roofline_works(self, problem: Problem) -> list[Work]:
        return forward_works(problem.frames, problem.dims, problem.dtype, problem.training and problem.use_bn)


def forward_works(frames: int, dims, dtype: torch.dtype, batch_stats: bool) -> list[Work]:
    """The forward's kernels as roofline work. The guide path is ATen in float32 (CUDA-core
    FMA in cuBLAS unless TF32 is allowed); the four tile kernels multiply on tensor cores
    as 3xTF32 for every dtype (their tiles are float32 in shared memory). Weights are read
    through L2 once per call; x is read by two kernels, z written once and read once or twice."""
    F, N, C, K, H, G = frames, dims.tokens, dims.dim, dims.num_latents, dims.hidden, dims.groups
    guide = plan_guide_path(F, N, dims.guide_tokens, dims.guide_dim, C, K)
    itemsize, f32 = dtype.itemsize, 4
    per_token = C + K + C // 2 + H + 1
    rows = max(1, min(64, _KERNEL_SHARED_BYTES // (4 * per_token)))
    tiles = F * -(-N // rows)
    x_bytes, z_bytes = F * N * C * itemsize, F * N * H * f32
    prompts = F * (K + 1) * C * f32  # R and a per frame
    x1_flops = 4 * F * N * C * K  # x R^T and P R, recomputed by both token kernels
    works = [
        Work("guide_path (aten)", guide_path_bytes(guide.order, F, N, dims.guide_tokens, dims.guide_dim, C, K,
                                                  itemsize), fma_flops=guide.flops[guide.order]),
        Work("channel", x_bytes + prompts + C * C * f32 + tiles * C * f32,
             split_flops=x1_flops + 2 * F * N * C * C),
        Work("bottleneck", x_bytes + prompts + (C * C // 2 + C * H // G) * f32 + F * N * f32 + z_bytes,
             split_flops=x1_flops + 2 * F * N * C * (C // 2) + 2 * F * N * C * H // G),
    ]
    if batch_stats:
        works.append(Work("moments", z_bytes + tiles * 2 * C * 8, split_flops=2 * F * N * H // G * C))
    works.append(Work("output", z_bytes + F * N * C * itemsize + C * H // G * f32,
                      split_flops=2 * F * N * H // G * C))
    return works


register(CudaBackend())
