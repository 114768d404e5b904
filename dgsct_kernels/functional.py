"""The functional form `dgsct(x, g, params, ...)` and the one call path every entry uses.

Validation, backend choice, the registered op and the BatchNorm running-stat update
happen here once; `FusedDGSCT.forward` is this function applied to its own parameters.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from . import dispatch
from .config import (OP_PARAM_NAMES, Hyper, autocast_dtype, check_inputs, check_params,
                     dims_from_params, optional_present)
from .ops import call_forward


class DGSCTOutput(NamedTuple):
    residual: Tensor  # [F, N, C], added to x by the caller
    spatial_map: Tensor  # [F, N], softmax over tokens
    temporal_gate: Tensor  # [F // segments, segments]


def dgsct(x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], *, segments: int = 10,
          alpha: float = 0.3, beta: float = 0.05, gamma: float = 0.05, training: bool = False,
          momentum: Optional[float] = 0.1, ln_eps: float = 1e-5, bn_eps: float = 1e-5,
          backend: str = "auto") -> DGSCTOutput:
    """DG-SCT for callers that hold their own parameters.

    `params` maps SPEC.md's names (a `FusedDGSCT.state_dict()` has them) to tensors;
    leave out a whole optional layer (ln_before.*, bn1.*/bn2.*, ln_post.*, gate) to
    disable it. Like `torch.nn.functional.batch_norm`, training mode updates
    `bn*.running_mean` / `bn*.running_var` (and `bn*.num_batches_tracked` if given)
    in place.
    """
    hyper = Hyper(alpha, beta, gamma, ln_eps, bn_eps, bn_eps, ln_eps)
    return apply_dgsct(x, g, params, hyper, segments=segments, training=training,
                       momentum=momentum, backend=backend)


def apply_dgsct(x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper, *,
                segments: int, training: bool, momentum: Optional[float],
                backend: str) -> DGSCTOutput:
    """The one call path: validate, choose a backend, run the op, update BatchNorm buffers."""
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments={segments!r}: expected a positive integer")
    dims = dims_from_params(params)
    # under torch.autocast the op casts x, g and the parameters to this dtype (ops.py)
    autocast = autocast_dtype(x, [g, *(params.get(n) for n in OP_PARAM_NAMES)])
    check_inputs(x, g, dims, segments, training, autocast)
    check_params(params, dims, x, autocast)
    use_bn = optional_present(params, "bn")
    if training and use_bn and x.shape[0] * x.shape[1] < 2:
        raise ValueError(f"x: shape {tuple(x.shape)} has F*N = 1 token; BatchNorm in training "
                         "mode needs more than one value per channel")
    chosen = dispatch.resolve(dispatch.Problem.of(x, dims, training, use_bn, autocast), backend)
    raw = call_forward(x, g, params, hyper, training, chosen.name)
    if training and use_bn:
        tokens = x.shape[0] * x.shape[1]
        _update_running_stats(params, "bn1", raw.bn1_mean, raw.bn1_var, tokens, momentum)
        _update_running_stats(params, "bn2", raw.bn2_mean, raw.bn2_var, tokens, momentum)
    return DGSCTOutput(raw.residual, raw.spatial_map,
                       raw.temporal_gate.view(x.shape[0] // segments, segments))


def _update_running_stats(params: Mapping[str, Optional[Tensor]], prefix: str, mean: Tensor,
                          var: Tensor, tokens: int, momentum: Optional[float]) -> None:
    """PyTorch BatchNorm's update: unbiased variance, momentum or cumulative average."""
    running_mean = params[prefix + ".running_mean"]
    running_var = params[prefix + ".running_var"]
    counter = params.get(prefix + ".num_batches_tracked")
    with torch.no_grad():
        if counter is not None:
            counter.add_(1)
        if momentum is None:
            if counter is None:
                raise ValueError(f"momentum=None (cumulative average) needs "
                                 f"params[{prefix + '.num_batches_tracked'!r}]")
            factor = 1.0 / counter.to(mean.dtype)
        else:
            factor = momentum
        unbiased = var * (tokens / (tokens - 1))
        old_mean, old_var = running_mean.to(mean.dtype), running_var.to(var.dtype)
        # A non-finite batch statistic (NaN/Inf inputs, an fp16 overflow) leaves that
        # channel's running value as it was: torch's BatchNorm would write it in and every
        # later eval call would be NaN. No host sync, so torch.compile traces it.
        running_mean.copy_(torch.where(mean.isfinite(), mean * factor + old_mean * (1 - factor),
                                       old_mean))
        running_var.copy_(torch.where(unbiased.isfinite(),
                                      unbiased * factor + old_var * (1 - factor), old_var))
