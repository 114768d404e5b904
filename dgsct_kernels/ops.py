"""The registered operator: `torch.ops.dgsct_kernels.forward` and its backward.

Both are `torch.library.custom_op`s with fake implementations, so `torch.compile` sees
one opaque node with known output shapes, and autograd is registered on the forward.
The op is functional: it never writes BatchNorm's running buffers; in training it
returns the batch statistics and the caller updates the buffers (see functional.py).

Parameters travel as one list of the tensors present, in `OP_PARAM_NAMES` order, plus a
`layout` of which optional layers exist (autograd supports lists of tensors, not lists
with holes).

With `keep_state` (set by `call_forward` when autograd will need a backward) the forward
also returns `saved`: small state the backend keeps for its backward instead of
recomputing it (never an [F, N, C] tensor; empty for backends that recompute everything).
A backend keeps state by overriding `Backend.saved_state_shapes` (for the fake
implementation), `forward_saving` and `backward_saved` (dispatch.py; backends/cpu.py).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .config import (BUFFER_NAMES, OP_PARAM_NAMES, OPTIONAL_GROUPS, Hyper, accumulation_dtype,
                     autocast_dtype)
from .dispatch import announce, get_backend
from .reference import RawOutputs

LAYOUT_GROUPS: tuple[str, ...] = tuple(OPTIONAL_GROUPS)  # ln_before, bn, ln_post, gate


def pack_params(params: Mapping[str, Optional[Tensor]]) -> tuple[list[Tensor], list[bool]]:
    layout = [params.get(OPTIONAL_GROUPS[group][0]) is not None for group in LAYOUT_GROUPS]
    return [params[n] for n in _present_names(layout)], layout


def unpack_params(tensors: Sequence[Tensor], layout: Sequence[bool]) -> dict[str, Optional[Tensor]]:
    params: dict[str, Optional[Tensor]] = dict.fromkeys(OP_PARAM_NAMES)
    params.update(zip(_present_names(layout), tensors))
    return params


def _present_names(layout: Sequence[bool]) -> list[str]:
    absent = {n for group, on in zip(LAYOUT_GROUPS, layout) if not on for n in OPTIONAL_GROUPS[group]}
    return [n for n in OP_PARAM_NAMES if n not in absent]


@torch.library.custom_op("dgsct_kernels::forward", mutates_args=())
def dgsct_forward(x: Tensor, g: Tensor, params: list[Tensor], layout: list[bool],
                  hyper: list[float], training: bool, backend: str, keep_state: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(residual, spatial_map, temporal_gate [F], bn1 mean, bn1 var, bn2 mean, bn2 var, saved)."""
    if x.shape[0] == 0:  # an empty eval batch: nothing for a kernel to do
        *out, saved = _forward_fake(x, g, params, layout, hyper, training, backend, keep_state)
        return (*(t.clone() for t in out), [t.clone() for t in saved])
    announce(backend, x.device.type, x.dtype, training)
    chosen, p = get_backend(backend), unpack_params(params, layout)
    if keep_state:
        out, saved = chosen.forward_saving(x, g, p, Hyper(*hyper), training)
    else:
        out, saved = chosen.forward(x, g, p, Hyper(*hyper), training), []
    return (*out, list(saved))


@dgsct_forward.register_fake
def _forward_fake(x, g, params, layout, hyper, training, backend, keep_state=False):
    frames, tokens, dim = x.shape
    p = unpack_params(params, layout)
    if training and p["bn1.weight"] is not None:
        acc = accumulation_dtype(x.dtype)
        hidden, channels = p["bn1.weight"].shape[0], p["bn2.weight"].shape[0]
        stats = [x.new_empty(n, dtype=acc) for n in (hidden, hidden, channels, channels)]
    else:  # eval or no BatchNorm: no statistics
        stats = [x.new_empty(0) for _ in range(4)]
    chosen = get_backend(backend)
    saved = ([x.new_empty(shape, dtype=dtype)
              for shape, dtype in chosen.saved_state_shapes(x, g, p, training)]
             if keep_state else [])
    return (x.new_empty(frames, tokens, dim), x.new_empty(frames, tokens), x.new_empty(frames), *stats,
            saved)


@torch.library.custom_op("dgsct_kernels::backward", mutates_args=())
def dgsct_backward(grad_residual: Tensor, grad_spatial_map: Tensor, grad_temporal_gate: Tensor,
                   x: Tensor, g: Tensor, params: list[Tensor], layout: list[bool],
                   hyper: list[float], training: bool, backend: str, wanted: list[bool],
                   saved: list[Tensor]) -> list[Tensor]:
    """Gradients for [x, g, *params]; an empty tensor where `wanted` is False. `saved` is
    the forward's kept state (empty: the backend recomputes what it needs)."""
    names = ["x", "g"] + _present_names(layout)
    if x.shape[0] == 0:  # an empty eval batch contributes nothing to any gradient
        return [torch.zeros_like(t, memory_format=torch.contiguous_format) if w else x.new_empty(0)
                for t, w in zip([x, g, *params], wanted)]
    chosen = [n for n, w in zip(names, wanted) if w]
    grads_in = (grad_residual, grad_spatial_map, grad_temporal_gate)
    p, impl = unpack_params(params, layout), get_backend(backend)
    if saved:
        grads = impl.backward_saved(grads_in, x, g, p, Hyper(*hyper), training, chosen, saved)
    else:
        grads = impl.backward(grads_in, x, g, p, Hyper(*hyper), training, chosen)
    return [grads[n].contiguous() if n in grads else x.new_empty(0) for n in names]


@dgsct_backward.register_fake
def _backward_fake(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, params, layout, hyper,
                   training, backend, wanted, saved):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if w else x.new_empty(0)
            for t, w in zip([x, g, *params], wanted)]


def _setup_context(ctx, inputs, output):
    x, g, params, layout, hyper, training, backend, keep_state = inputs
    if training:  # the running buffers are not read, and the caller updates them in place
        params = [x.new_empty(0) if n in BUFFER_NAMES else p
                  for n, p in zip(_present_names(layout), params)]
    saved = output[7]
    ctx.save_for_backward(x, g, *params, *saved)
    ctx.num_params = len(params)
    ctx.layout, ctx.hyper, ctx.training, ctx.backend = layout, hyper, training, backend
    ctx.mark_non_differentiable(*output[3:7], *saved)


def _backward(ctx, grad_residual, grad_spatial_map, grad_temporal_gate, *unused_grads):
    x, g, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.num_params], rest[ctx.num_params:]
    needs_x, needs_g, needs_params = ctx.needs_input_grad[:3]
    wanted = [bool(needs_x), bool(needs_g), *(bool(n) for n in needs_params)]
    if not any(wanted):
        return None, None, None, None, None, None, None, None
    grads = dgsct_backward(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, params,
                           ctx.layout, ctx.hyper, ctx.training, ctx.backend, wanted, saved)
    grads = [gr if w else None for gr, w in zip(grads, wanted)]
    return grads[0], grads[1], grads[2:], None, None, None, None, None


torch.library.register_autograd("dgsct_kernels::forward", _backward, setup_context=_setup_context)


def _autocast_kernel(device_type: str):
    """The op's kernel for `Autocast<device>`: cast x, g and the parameters to the region's
    dtype once, then run the op with autocast off. The casts are ordinary autograd ops, so
    float32 master parameters get float32 gradients; the backward op sees one dtype."""
    autocast_key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(keyset, x, g, params, layout, hyper, training, backend, keep_state=False):
        dtype = autocast_dtype(x, [g, *params])
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(autocast_key)):
            if dtype is not None:
                x, g, params = x.to(dtype), g.to(dtype), [p.to(dtype) for p in params]
            return torch.ops.dgsct_kernels.forward.default(x, g, params, layout, hyper, training, backend,
                                                           keep_state)

    return kernel


_autocast_library = torch.library.Library("dgsct_kernels", "IMPL")
for _device_type in ("cpu", "cuda"):
    _autocast_library.impl("forward", _autocast_kernel(_device_type),
                           "Autocast" + torch._C._dispatch_key_for_device(_device_type),
                           with_keyset=True)


def call_forward(x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper,
                 training: bool, backend: str) -> RawOutputs:
    tensors, layout = pack_params(params)
    keep_state = torch.is_grad_enabled() and any(t.requires_grad for t in (x, g, *tensors))
    *out, _saved = dgsct_forward(x, g, tensors, layout, list(hyper), training, backend, keep_state)
    return RawOutputs(*out)
