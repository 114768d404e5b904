"""Glue shared by the backends whose kernels live in `dgsct_kernels._C` (cpu, cuda).

Both call the ops `torch.ops.dgsct_kernels.fused_forward` / `.fused_backward`, whose
schema is declared once in csrc/ops.cpp; each device registers its own implementation
(csrc/cpu, csrc/cuda), so the dispatcher picks the kernels from the tensors' device.
They run inside the Python custom op `dgsct_kernels::forward`, so torch.compile and
opcheck see the same op for every backend. The guide path's order is chosen here, by
`plan_guide_path`, and passed in: one source of truth for every backend.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .._extension import _C, _load_error
from ..config import OP_PARAM_NAMES, Hyper, dims_from_params
from ..dispatch import Backend
from ..guide_path import plan_guide_path
from ..reference import RawOutputs


def missing_kernels_reason(dispatch_key: str) -> str | None:
    """Why the extension cannot run the fused ops on `dispatch_key` ("CPU", "CUDA"), or None.

    Called once at import: the op registry does not change afterwards, and torch.compile
    cannot trace a dispatcher query made while `auto` chooses during tracing.
    """
    if _C is None:
        return f"the compiled extension dgsct_kernels._C is not available ({_load_error})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("dgsct_kernels::fused_forward", dispatch_key):
        why = dict(_C.build_info()).get("cuda_reason") if dispatch_key == "CUDA" else ""
        return (f"dgsct_kernels._C has no {dispatch_key} kernels{f' ({why})' if why else ''}; "
                "rebuild it (pip install --no-build-isolation -e ., with DGSCT_FORCE_CUDA=1 for CUDA)")
    return None


def _slots(params: Mapping[str, Tensor | None]) -> list[Tensor | None]:
    return [params.get(name) for name in OP_PARAM_NAMES]


def _guide_order(x: Tensor, params: Mapping[str, Tensor | None]) -> str:
    d = dims_from_params(params)
    return plan_guide_path(x.shape[0], x.shape[1], d.guide_tokens, d.guide_dim, x.shape[2],
                           d.num_latents).order


def _call_backward(op, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                   params: Mapping[str, Tensor | None], hyper: Hyper, training: bool,
                   wanted: Sequence[str], saved: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
    """Run a fused backward op (with the forward's kept state where given): the gradients named
    in `wanted`, by name."""
    chosen = set(wanted)
    if not chosen:
        return {}
    names = ["x", "g", *OP_PARAM_NAMES]
    state = () if saved is None else (list(saved),)
    out = op(*grads, x, g, _slots(params), *state, list(hyper), training, _guide_order(x, params),
             [int(n in chosen) for n in names])
    return {n: t for n, t in zip(names, out) if n in chosen}


class CompiledBackend(Backend):
    """A backend that runs the extension's fused ops; subclasses say where they can run."""

    def forward(self, x: Tensor, g: Tensor, params: Mapping[str, Tensor | None], hyper: Hyper,
                training: bool) -> RawOutputs:
        out = torch.ops.dgsct_kernels.fused_forward(x, g, _slots(params), list(hyper), training,
                                                    _guide_order(x, params))
        return RawOutputs(*out)

    def backward(self, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                 params: Mapping[str, Tensor | None], hyper: Hyper, training: bool,
                 wanted: Sequence[str]) -> dict[str, Tensor]:
        return _call_backward(torch.ops.dgsct_kernels.fused_backward, grads, x, g, params, hyper,
                              training, wanted)
