"""Shapes, parameter names and hyper-parameters of one DG-SCT module, validated once.

Everything that says what a valid call looks like lives here, so backends can assume
valid inputs and every entry point raises the same clear errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dims:
    """Sizes of one module: x is [F, tokens, dim], g is [F, guide_tokens, guide_dim]."""

    tokens: int  # N
    dim: int  # C
    guide_tokens: int  # M
    guide_dim: int  # D
    num_latents: int  # K
    hidden: int  # H = C // reduction
    groups: int  # G

    @property
    def half(self) -> int:
        return self.dim // 2


class Hyper(NamedTuple):
    """Scalars of the forward pass that are not tensors."""

    alpha: float
    beta: float
    gamma: float
    ln_before_eps: float = 1e-5
    bn1_eps: float = 1e-5
    bn2_eps: float = 1e-5
    ln_post_eps: float = 1e-5


def _read_param_slots(path: Path = Path(__file__).with_name("param_slots.def")) -> tuple[str, ...]:
    """The state-dict names of param_slots.def's DGSCT_SLOT(enumerator, "name") lines, in order:
    the one declaration of the op's parameter slots, which the C++ sources expand too."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("//", 1)[0].strip()
        if not line:
            continue
        slot = re.fullmatch(r'DGSCT_SLOT\(\s*(k\w+)\s*,\s*"([^"]+)"\s*\)', line)
        if slot is None:
            raise RuntimeError(f"{path}: cannot read {line!r}; expected DGSCT_SLOT(kName, \"state.dict.name\")")
        names.append(slot.group(2))
    if not names or len(set(names)) != len(names):
        raise RuntimeError(f"{path}: expected unique slot names, got {names}")
    return tuple(names)


# Parameters the forward pass reads, in the op's argument order, with the authors' names,
# declared once in param_slots.def (shared with the C++ sources). gate_tk (stored, unused)
# and num_batches_tracked are module state the op never sees.
OP_PARAM_NAMES: tuple[str, ...] = _read_param_slots()

# Optional layers: all of a group's names are present, or none.
OPTIONAL_GROUPS: dict[str, tuple[str, ...]] = {
    "ln_before": ("ln_before.weight", "ln_before.bias"),
    "bn": ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
           "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"),
    "ln_post": ("ln_post.weight", "ln_post.bias"),
    "gate": ("gate",),
}
BUFFER_NAMES = frozenset(n for n in OP_PARAM_NAMES if "running_" in n)


def expected_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """SPEC.md's parameter table as shapes."""
    C, h = d.dim, d.half
    return {
        "conv_adapter.weight": (d.tokens, d.guide_tokens, 1, 1),
        "conv_adapter.bias": (d.tokens,),
        "fc.weight": (C, d.guide_dim), "fc.bias": (C,),
        "my_tokens": (d.num_latents, C),
        "gate_av": (1,), "gate_tk": (1,),
        "fc_affine_audio_1.weight": (C, C), "fc_affine_audio_1.bias": (C,),
        "fc_affine_video_1.weight": (C, C), "fc_affine_video_1.bias": (C,),
        "fc_affine_bottleneck.weight": (h, C), "fc_affine_bottleneck.bias": (h,),
        "fc_affine_v_c_att.weight": (C, h), "fc_affine_v_c_att.bias": (C,),
        "fc_affine_video_2.weight": (h, C), "fc_affine_video_2.bias": (h,),
        "fc_affine_audio_2.weight": (h, C), "fc_affine_audio_2.bias": (h,),
        "fc_affine_v_s_att.weight": (1, h), "fc_affine_v_s_att.bias": (1,),
        "temporal_gated.0.weight": (1, C), "temporal_gated.0.bias": (1,),
        "ln_before.weight": (C,), "ln_before.bias": (C,),
        "down_sampler.weight": (d.hidden, C // d.groups, 1, 1),
        "bn1.weight": (d.hidden,), "bn1.bias": (d.hidden,),
        "bn1.running_mean": (d.hidden,), "bn1.running_var": (d.hidden,),
        "up_sampler.weight": (C, d.hidden // d.groups, 1, 1),
        "bn2.weight": (C,), "bn2.bias": (C,),
        "bn2.running_mean": (C,), "bn2.running_var": (C,),
        "ln_post.weight": (C,), "ln_post.bias": (C,),
        "gate": (1,),
    }


def check_dims(d: Dims) -> None:
    """Constructor-level checks, with the constructor's argument names."""
    for name in ("tokens", "dim", "guide_tokens", "guide_dim", "num_latents", "groups"):
        value = getattr(d, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if d.dim < 2:
        raise ValueError(f"dim={d.dim}: expected at least 2 (the attention layers use dim // 2)")
    if d.hidden < 1:
        raise ValueError(f"dim // reduction = {d.hidden}: expected at least 1 hidden channel")
    if d.dim % d.groups or d.hidden % d.groups:
        raise ValueError(
            f"groups={d.groups}: expected it to divide dim={d.dim} and the hidden size "
            f"dim // reduction = {d.hidden}")


def dims_from_params(params: Mapping[str, Optional[Tensor]]) -> Dims:
    """Read the module's sizes off its parameters (for the functional form)."""
    for name in ("conv_adapter.weight", "fc.weight", "my_tokens", "down_sampler.weight"):
        if params.get(name) is None:
            raise ValueError(f"params: missing required parameter {name!r}")
    tok = params["conv_adapter.weight"]
    fc = params["fc.weight"]
    down = params["down_sampler.weight"]
    if tok.dim() != 4 or fc.dim() != 2 or down.dim() != 4 or params["my_tokens"].dim() != 2:
        raise ValueError(
            "params: expected conv_adapter.weight [N, M, 1, 1], fc.weight [C, D], "
            "my_tokens [K, C], down_sampler.weight [H, C/G, 1, 1]; got "
            f"{tuple(tok.shape)}, {tuple(fc.shape)}, {tuple(params['my_tokens'].shape)}, "
            f"{tuple(down.shape)}")
    C = fc.shape[0]
    if down.shape[1] < 1 or C % down.shape[1]:
        raise ValueError(
            f"params: down_sampler.weight has shape {tuple(down.shape)}; expected its second "
            f"size C/G to divide C={C}")
    return Dims(tokens=tok.shape[0], dim=C, guide_tokens=tok.shape[1], guide_dim=fc.shape[1],
                num_latents=params["my_tokens"].shape[0], hidden=down.shape[0],
                groups=C // down.shape[1])


def check_params(params: Mapping[str, Optional[Tensor]], d: Dims, like: Tensor,
                 autocast: Optional[torch.dtype] = None) -> None:
    """Every parameter present has SPEC.md's shape and x's device, and x's dtype unless an
    autocast region casts them all (`autocast`, from `autocast_dtype`)."""
    shapes = expected_shapes(d)
    for name in OP_PARAM_NAMES:
        if name not in params or params[name] is None:
            if not any(name in group for group in OPTIONAL_GROUPS.values()):
                raise ValueError(f"params: missing required parameter {name!r}")
            continue
        p = params[name]
        if tuple(p.shape) != shapes[name]:
            raise ValueError(f"params[{name!r}]: expected shape {shapes[name]}, got {tuple(p.shape)}")
        if autocast is None and p.dtype != like.dtype:
            raise TypeError(f"params[{name!r}]: dtype {p.dtype} differs from x's dtype {like.dtype}; "
                            "cast the module (module.to(dtype)) or the inputs so they match, "
                            "or run under torch.autocast")
        if p.device != like.device:
            raise ValueError(f"params[{name!r}]: on device {p.device} but x is on {like.device}")
    for group, names in OPTIONAL_GROUPS.items():
        present = [n for n in names if params.get(n) is not None]
        if present and len(present) != len(names):
            missing = [n for n in names if params.get(n) is None]
            raise ValueError(f"params: optional layer {group!r} is partly given; missing {missing}")


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_inputs(x: Tensor, g: Tensor, d: Dims, segments: int, training: bool = False,
                 autocast: Optional[torch.dtype] = None) -> None:
    """Shape, dtype and device checks for one call, naming the argument that is wrong.
    Under autocast (`autocast`, from `autocast_dtype`) x and g may differ in dtype."""
    if not isinstance(x, Tensor) or not isinstance(g, Tensor):
        raise TypeError(f"x and g must be tensors, got {type(x).__name__} and {type(g).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x: expected rank 3 [F, N={d.tokens}, C={d.dim}], "
                         f"got rank {x.dim()} with shape {tuple(x.shape)}")
    if g.dim() != 3:
        raise ValueError(f"g: expected rank 3 [F, M={d.guide_tokens}, D={d.guide_dim}], "
                         f"got rank {g.dim()} with shape {tuple(g.shape)}")
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"x and g: frame counts differ, x has F={x.shape[0]} (shape "
                         f"{tuple(x.shape)}) and g has F={g.shape[0]} (shape {tuple(g.shape)})")
    if x.shape[1] != d.tokens or x.shape[2] != d.dim:
        raise ValueError(f"x: expected [F, N={d.tokens}, C={d.dim}] (tokens, dim of the module), "
                         f"got shape {tuple(x.shape)}")
    if g.shape[1] != d.guide_tokens or g.shape[2] != d.guide_dim:
        raise ValueError(f"g: expected [F, M={d.guide_tokens}, D={d.guide_dim}] (guide_tokens, "
                         f"guide_dim of the module), got shape {tuple(g.shape)}")
    if x.shape[0] % segments:
        raise ValueError(f"x: frame count F={x.shape[0]} (shape {tuple(x.shape)}) must be a "
                         f"multiple of segments={segments}")
    if x.shape[0] == 0 and training:
        raise ValueError(f"x: frame count F=0 (shape {tuple(x.shape)}) in training mode; "
                         "BatchNorm and the temporal gate need at least one clip (eval accepts "
                         "an empty batch)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} not supported; expected one of {list(_FLOAT_DTYPES)}")
    if autocast is None and g.dtype != x.dtype:
        raise TypeError(f"g: dtype {g.dtype} differs from x's dtype {x.dtype}; expected the same "
                        "dtype, or run under torch.autocast")
    if g.device != x.device:
        raise ValueError(f"g: on device {g.device} but x is on {x.device}; expected the same device")


AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)


def autocast_dtype(x: Tensor, tensors: Iterable[Optional[Tensor]]) -> Optional[torch.dtype]:
    """The dtype an enabled autocast region runs this call in, or None.

    Autocast applies when it is on for x's device and x and every other tensor given
    (g, the parameters) is float32, bfloat16 or float16: they are all cast to the region's
    dtype once. Like torch's own autocast it leaves float64 alone, so a call with any
    float64 tensor keeps the explicit dtype contract.
    """
    if not isinstance(x, Tensor):  # check_inputs names the wrong argument
        return None
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if x.dtype not in AUTOCAST_ELIGIBLE:
        return None
    for t in tensors:
        if isinstance(t, Tensor) and t.dtype not in AUTOCAST_ELIGIBLE:
            return None
    return torch.get_autocast_dtype(device_type)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every lower precision accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def optional_present(params: Mapping[str, Optional[Tensor]], group: str) -> bool:
    return params.get(OPTIONAL_GROUPS[group][0]) is not None
