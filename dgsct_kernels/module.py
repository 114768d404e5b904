"""FusedDGSCT: the drop-in module, with the authors' parameter names and initialisation."""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import dispatch
from .config import Dims, Hyper, check_dims
from .functional import DGSCTOutput, apply_dgsct

TEMPORAL_GATE_KEYS = ("temporal_gated.0.weight", "temporal_gated.0.bias")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True,
                     may_miss: Sequence[str] = (),
                     what: str = "load_state_dict") -> None:
    """Raise `RuntimeError` if `module.load_state_dict(state_dict, strict)` would fail.

    It names every problem torch's loader would hit part-way through its copies: missing
    and unexpected keys (when `strict`; `may_miss` may be absent, but only all together),
    values that are not tensors and shape mismatches (always). Checking first is what
    makes a load all or nothing. Like torch, a state dict without version metadata may
    omit BatchNorm's `num_batches_tracked` (torch keeps the module's own counter).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{what}: state_dict is {type(state_dict).__name__}, expected a "
                        "mapping of names to tensors")
    expected = module.state_dict(keep_vars=True)
    versions = getattr(state_dict, "_metadata", None) or {}
    counter_optional = {  # torch fills these in for state dicts older than BatchNorm version 2
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, layer in module.named_modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
        and (versions.get(name, {}).get("version") or 0) < 2}
    absent = [k for k in expected if k not in state_dict and k not in counter_optional]
    lines = []
    if strict:
        missing = [k for k in absent if k not in may_miss]
        unexpected = sorted(set(state_dict) - set(expected))
        gap = [k for k in may_miss if k in absent]
        if gap and len(gap) < len(may_miss):  # half a layer is a damaged state dict
            missing += gap
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if gap and len(gap) < len(may_miss):
            lines.append(f"{list(may_miss)} may be absent only all together")
    not_tensors, mismatched = [], []
    for key, target in expected.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if not torch.overrides.is_tensor_like(value):
            not_tensors.append(f"{key} ({type(value).__name__})")
            continue
        # torch's compatibility rule: a 0-dim tensor loads from a 1-element 1-dim one
        fits = (value.shape == target.shape
                or (target.dim() == 0 and tuple(value.shape) == (1,)))
        if not fits:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs module "
                              f"{tuple(target.shape)}")
        elif getattr(value, "is_meta", False) and not target.is_meta:
            not_tensors.append(f"{key} (a meta tensor, which holds no values)")
    if not_tensors:
        lines.append(f"values that are not loadable tensors ({len(not_tensors)}): {not_tensors}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if lines:
        raise RuntimeError(f"{what} for {type(module).__name__}: nothing was copied, "
                           "refusing a partial load\n  " + "\n  ".join(lines))


class FusedDGSCT(nn.Module):
    """DG-SCT (SPEC.md) on token-major tensors.

    `forward(x, g)` takes x [F, tokens, dim] (the stream being adapted) and g
    [F, guide_tokens, guide_dim] (the other modality) and returns
    `DGSCTOutput(residual [F, N, C], spatial_map [F, N], temporal_gate [F // segments, segments])`.
    The residual is added to x by the caller, as in the authors' encoders.

    Sub-modules are created in the authors' order with PyTorch's default initialisation,
    so under the same seed the parameters equal those of the authors' module, and its
    state dicts load with `strict=True`.
    """

    def __init__(self, dim: int, guide_dim: int, tokens: int, guide_tokens: int,
                 num_latents: int = 32, reduction: int = 8, groups: int = 2, segments: int = 10,
                 alpha: float = 0.3, beta: float = 0.05, gamma: float = 0.05, use_bn: bool = True,
                 use_gate: bool = True, ln_before: bool = True, ln_post: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("reduction", reduction), ("segments", segments)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        self.dims = Dims(tokens=tokens, dim=dim, guide_tokens=guide_tokens, guide_dim=guide_dim,
                         num_latents=num_latents, hidden=dim // reduction, groups=groups)
        check_dims(self.dims)
        self.segments = segments
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.backend = dispatch.check_backend_name(backend)
        C, hidden, half = dim, self.dims.hidden, dim // 2

        self.conv_adapter = nn.Conv2d(guide_tokens, tokens, kernel_size=1)
        self.fc = nn.Linear(guide_dim, C)
        self.fc_affine_audio_1 = nn.Linear(C, C)
        self.fc_affine_video_1 = nn.Linear(C, C)
        self.fc_affine_bottleneck = nn.Linear(C, half)
        self.fc_affine_video_2 = nn.Linear(C, half)
        self.fc_affine_audio_2 = nn.Linear(C, half)
        self.fc_affine_v_s_att = nn.Linear(half, 1)
        self.fc_affine_v_c_att = nn.Linear(half, C)
        self.temporal_gated = nn.Sequential(nn.Linear(C, 1), nn.Sigmoid())
        self.gate = nn.Parameter(torch.zeros(1)) if use_gate else None
        self.my_tokens = nn.Parameter(torch.rand(num_latents, C))
        self.gate_tk = nn.Parameter(torch.ones(1))  # stored by the authors, unused by the forward
        self.gate_av = nn.Parameter(torch.zeros(1))
        self.down_sampler = nn.Conv2d(C, hidden, 1, groups=groups, bias=False)
        self.up_sampler = nn.Conv2d(hidden, C, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden) if use_bn else None
        self.bn2 = nn.BatchNorm2d(C) if use_bn else None
        self.ln_before = nn.LayerNorm(C) if ln_before else None
        self.ln_post = nn.LayerNorm(C) if ln_post else None

    def hyper(self) -> Hyper:
        eps = lambda layer: layer.eps if layer is not None else 1e-5  # noqa: E731
        return Hyper(self.alpha, self.beta, self.gamma, eps(self.ln_before), eps(self.bn1),
                     eps(self.bn2), eps(self.ln_post))

    def op_params(self) -> dict[str, Tensor]:
        """The tensors the operator reads, by their state-dict names."""
        named = dict(self.named_parameters())
        named.update(self.named_buffers())
        return named

    def forward(self, x: Tensor, g: Tensor) -> DGSCTOutput:
        momentum = self.bn1.momentum if self.bn1 is not None else 0.1
        return apply_dgsct(x, g, self.op_params(), self.hyper(), segments=self.segments,
                   training=self.training, momentum=momentum, backend=self.backend)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True,
                        assign: bool = False):
        """`nn.Module.load_state_dict`, all or nothing.

        torch copies every fitting tensor before it raises on a shape mismatch, leaving a
        half-loaded module. Here the key set (when `strict`), every value's type and every
        shape are checked first; any problem raises `RuntimeError` naming the keys and
        shapes, with nothing copied. A shape mismatch refuses even when `strict=False`, as
        torch's does. Returns torch's `(missing_keys, unexpected_keys)`.
        """
        check_state_dict(self, state_dict, strict=strict, what="load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_authors_state_dict(self, state_dict: Mapping[str, Tensor]):
        """Load a state dict of the authors' module, with or without `temporal_gated.*`.

        The authors' AVE/AVVP/AVS/AVQA code has no temporal gate (its gamma is 0); such
        a state dict loads here with the gate left at its initial values, and the
        returned keys list exactly those two as missing. Any other missing or
        unexpected key, only one of the two gate keys, or a shape mismatch raises
        `RuntimeError` naming them, before anything is copied.
        """
        check_state_dict(self, state_dict, strict=True, may_miss=TEMPORAL_GATE_KEYS,
                         what="load_authors_state_dict")
        result = super().load_state_dict(state_dict, strict=False)
        if result.missing_keys and self.gamma != 0:
            warnings.warn(f"the state dict has no temporal_gated layer, as the authors' gamma=0 "
                          f"code; this module uses gamma={self.gamma}, so its untrained temporal "
                          "gate changes the output. Build it with gamma=0 to match the authors.",
                          stacklevel=2)
        return result

    def extra_repr(self) -> str:
        d = self.dims
        return (f"dim={d.dim}, guide_dim={d.guide_dim}, tokens={d.tokens}, "
                f"guide_tokens={d.guide_tokens}, num_latents={d.num_latents}, hidden={d.hidden}, "
                f"groups={d.groups}, segments={self.segments}, alpha={self.alpha}, "
                f"beta={self.beta}, gamma={self.gamma}, backend={self.backend!r}")
