"""The `cpu` backend: a thin binding to the fused C++ kernels in `dgsct_kernels._C`.

The kernels (csrc/cpu/) run SPEC.md's forward tile by tile over (frame, token block)
items with at::parallel_for, keeping every [F, N, C] intermediate of steps 3, 5, 6 and 8
in cache, and its analytic backward. When the op asks it to keep state, the forward also
returns what is small (the guide path's [F, K, N] / [F, K, M] products, the per-frame
vectors, the batch statistics; never an [F, N, C] tensor), and the backward reads it
instead of re-running the guide path and the channel attention; it still recomputes the
token passes from x. The guide path never forms P and runs in the order
`plan_guide_path` chooses, passed from here. bfloat16/float16 compute in float32.

The ops and their glue are shared with the cuda backend (compiled.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..config import Hyper, accumulation_dtype
from ..dispatch import register
from ..reference import RawOutputs
from .compiled import CompiledBackend, _call_backward, _guide_order, _slots, missing_kernels_reason

_UNAVAILABLE = missing_kernels_reason("CPU")


def gemm_provider() -> tuple[str, str]:
    """("onednn" | "blas", why): the library that runs the cpu backend's float32 products,
    probed once per process (csrc/cpu/products.h; DGSCT_CPU_GEMM=blas|onednn forces it)."""
    from .._extension import _C
    return tuple(_C.cpu_gemm_provider())


class CpuBackend(CompiledBackend):
    name = "cpu"
    rank = 10
    devices = ("cpu",)
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    description = ("fused C++ forward and analytic backward (at::parallel_for over frames and token "
                   "blocks, oneDNN or BLAS products on tiles; keeps the guide path's products and "
                   "per-frame vectors, recomputes the [F, N, C] token passes)")
    # bf16/fp16 inputs: these products (and their gradients) through ATen in the input dtype
    # (oneDNN on the CPU's bf16 units), where precision_plan.def allows it; not spatial, whose
    # result ATen rounds to bf16 too (csrc/cpu/dgsct_cpu.h: cpu_runs_low)
    low_precision_products = frozenset({"channel"})

    def unavailable_reason(self) -> str | None:
        return _UNAVAILABLE

    def path_note(self, problem) -> str:
        if problem.dtype == torch.float64:
            return ""
        name, reason = gemm_provider()
        return f"; float32 products on {'oneDNN' if name == 'onednn' else 'BLAS'} ({reason})"

    # The forward's kept state for the backward (ops.py keep_state; dispatch.Backend's defaults)
    def saved_state_shapes(self, x: Tensor, g: Tensor, params: Mapping[str, Tensor | None],
                           training: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The shapes and dtype of `forward_saving`'s state, in csrc/cpu's order (enum Kept)."""
        F, N, C = x.shape
        M, D = g.shape[1], g.shape[2]
        K = params["my_tokens"].shape[0]
        half = params["fc_affine_video_2.weight"].shape[0]
        bottleneck = params["fc_affine_bottleneck.weight"].shape[0]
        H = params["down_sampler.weight"].shape[0]
        stats = training and params.get("bn1.weight") is not None
        shapes = [(F, K, C), (F, C),  # R, a
                  (F, C), (F, C), (F, half), (F, half), (F,),  # qa1_pre, qa1, qa2_pre, qa2, tg
                  (F, C), (F, C), (F, bottleneck), (F, bottleneck), (F, C),  # colsum, joint, hid_pre, hid, ch
                  *((n if stats else 0,) for n in (H, H, C, C))]  # bn1 mean, var, bn2 mean, var
        mask = (F, N, (C + 7) // 8)  # qv1 > 0 as bits, uint8 (csrc/cpu/fused.h: kKeptMask1)
        if _guide_order(x, params) == "rewritten":
            # A, B = A Wtok (unless over a quarter of x: csrc/cpu guide_keeps_b), B g, A btok, wbar g
            guide = [(F, K, N), *([(F, K, M)] if 4 * K * M <= N * C else []), (F, K, D), (F, K), (F, D)]
        else:  # U [F, N, D] only when smaller than x (csrc/cpu guide_keeps_u), A, A U, mean_n U
            guide = [*([(F, N, D)] if D < C else []), (F, K, N), (F, K, D), (F, D)]
        dtype = accumulation_dtype(x.dtype)
        return ([(shape, dtype) for shape in shapes] + [(mask, torch.uint8)]
                + [(shape, dtype) for shape in guide])

    def forward_saving(self, x: Tensor, g: Tensor, params: Mapping[str, Tensor | None], hyper: Hyper,
                       training: bool) -> tuple[RawOutputs, list[Tensor]]:
        *out, saved = torch.ops.dgsct_kernels.fused_forward_saving(
            x, g, _slots(params), list(hyper), training, _guide_order(x, params))
        return RawOutputs(*out), list(saved)

    def backward_saved(self, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                       params: Mapping[str, Tensor | None], hyper: Hyper, training: bool,
                       wanted: Sequence[str], saved: Sequence[Tensor]) -> dict[str, Tensor]:
        return _call_backward(torch.ops.dgsct_kernels.fused_backward_saved, grads, x, g, params,
                              hyper, training, wanted, saved)


register(CpuBackend())
