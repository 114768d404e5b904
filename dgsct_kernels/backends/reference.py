"""The `reference` backend: SPEC.md in PyTorch (`reference.py`), runnable anywhere.

It computes in float32 for bfloat16/float16 inputs (float32 accumulation, like the fused
backends) and returns outputs in the input dtype. Its backward recomputes the forward
from x, g and the parameters and differentiates it with `torch.func.vjp`, so the op
saves no activations; the autograd graph of the eager module is what
`benchmarks/run.py` calls "eager".
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..config import Hyper, accumulation_dtype
from ..dispatch import Backend, register
from ..reference import RawOutputs, reference_forward


def forward_in_accumulation_dtype(x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]],
                                  hyper: Hyper, training: bool,
                                  guide_order: Optional[str] = None) -> RawOutputs:
    """`reference_forward` computed in float32 for bf16/fp16 inputs, outputs in x's dtype."""
    compute = accumulation_dtype(x.dtype)
    if compute == x.dtype:
        return reference_forward(x, g, params, hyper, training, guide_order)
    up = {name: t.to(compute) if t is not None else None for name, t in params.items()}
    out = reference_forward(x.to(compute), g.to(compute), up, hyper, training, guide_order)
    stats = [t if t.numel() else x.new_empty(0) for t in out[3:]]
    return RawOutputs(out.residual.to(x.dtype), out.spatial_map.to(x.dtype),
                      out.temporal_gate.to(x.dtype), *stats)


def recompute_backward(forward: Callable[..., RawOutputs], grads: Sequence[Tensor], x: Tensor,
                       g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper,
                       training: bool, wanted: Sequence[str]) -> dict[str, Tensor]:
    """Gradients by recomputing `forward` from x, g and the parameters under torch.func.vjp."""
    names = list(wanted)
    if not names:
        return {}

    def outputs(*tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        chosen = dict(zip(names, tensors))
        p = {**params, **{k: v for k, v in chosen.items() if k not in ("x", "g")}}
        out = forward(chosen.get("x", x), chosen.get("g", g), p, hyper, training)
        return out.residual, out.spatial_map, out.temporal_gate

    primals = [x if n == "x" else g if n == "g" else params[n] for n in names]
    _, pullback = torch.func.vjp(outputs, *primals)
    return dict(zip(names, pullback(tuple(grads))))


class ReferenceBackend(Backend):
    name = "reference"
    rank = 0
    devices = ("cpu", "cuda", "meta")
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    description = "SPEC.md in plain PyTorch (dozens of kernels, recomputing backward)"
    low_precision_products = None  # eager: every product in the input dtype

    def forward(self, x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper,
                training: bool) -> RawOutputs:
        return forward_in_accumulation_dtype(x, g, params, hyper, training)

    def backward(self, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                 params: Mapping[str, Optional[Tensor]], hyper: Hyper, training: bool,
                 wanted: Sequence[str]) -> dict[str, Tensor]:
        return recompute_backward(forward_in_accumulation_dtype, grads, x, g, params, hyper,
                                  training, wanted)


register(ReferenceBackend())
