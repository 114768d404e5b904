"""The `cpu` backend: a thin binding to the fused C++ kernels in `dgsct_kernels._C`.

The kernels (csrc/cpu/) run SPEC.md's forward tile by tile over (frame, token block)
items with at::parallel_for, keeping every [F, N, C] intermediate of steps 3, 5, 6 and 8
in cache, and its analytic backward, which recomputes from x, g and the parameters (the
op saves nothing else). The guide path never forms P and runs in the order
`plan_guide_path` chooses, passed from here. bfloat16/float16 compute in float32.

The C++ ops are `torch.ops.dgsct_kernels.fused_forward` / `.fused_backward` (schema in
csrc/ops.cpp); they run inside the Python custom op `dgsct_kernels::forward`, so
torch.compile and opcheck see the same op for every backend.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._extension import _C, _load_error
from ..config import OP_PARAM_NAMES, Hyper, dims_from_params
from ..dispatch import Backend, register
from ..guide_path import plan_guide_path
from ..reference import RawOutputs


def _ops_available() -> Optional[str]:
    if _C is None:
        return f"the compiled extension dgsct_kernels._C is not available ({_load_error})"
    if not hasattr(torch.ops.dgsct_kernels, "fused_forward"):
        return "dgsct_kernels._C was built without the fused CPU kernels (rebuild it)"
    return None


def _slots(params: Mapping[str, Optional[Tensor]]) -> list[Optional[Tensor]]:
    return [params.get(name) for name in OP_PARAM_NAMES]


def _guide_order(x: Tensor, params: Mapping[str, Optional[Tensor]]) -> str:
    d = dims_from_params(params)
    return plan_guide_path(x.shape[0], x.shape[1], d.guide_tokens, d.guide_dim, x.shape[2], d.num_latents).order


class CpuBackend(Backend):
    name = "cpu"
    rank = 10
    devices = ("cpu",)
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    description = ("fused C++ forward and analytic backward (at::parallel_for over frames and token "
                   "blocks, BLAS on tiles; saves only x, g and the parameters)")

    def unavailable_reason(self) -> Optional[str]:
        return _ops_available()

    def forward(self, x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper,
                training: bool) -> RawOutputs:
        out = torch.ops.dgsct_kernels.fused_forward(x, g, _slots(params), list(hyper), training,
                                                    _guide_order(x, params))
        return RawOutputs(*out)

    def backward(self, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                 params: Mapping[str, Optional[Tensor]], hyper: Hyper, training: bool,
                 wanted: Sequence[str]) -> dict[str, Tensor]:
        names = ["x", "g", *OP_PARAM_NAMES]
        chosen = set(wanted)
        if not chosen:
            return {}
        flags = [int(n in chosen) for n in names]
        out = torch.ops.dgsct_kernels.fused_backward(*grads, x, g, _slots(params), list(hyper), training,
                                                     _guide_order(x, params), flags)
        return {n: t for n, t in zip(names, out) if n in chosen}


register(CpuBackend())
