"""Shared test helpers: case shapes, random parameters, verbose comparisons."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dgsct_kernels import FusedDGSCT

# SPEC.md "Numerics": max-abs error relative to max-abs of the float64 reference output
SPEC_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float64: 1e-12}


@dataclass(frozen=True)
class Case:
    frames: int
    tokens: int  # N
    dim: int  # C
    guide_tokens: int  # M
    guide_dim: int  # D
    num_latents: int = 4
    reduction: int = 4
    groups: int = 2
    segments: int = 2

    def __str__(self) -> str:
        return (f"F{self.frames}-N{self.tokens}-C{self.dim}-M{self.guide_tokens}-D{self.guide_dim}"
                f"-K{self.num_latents}-r{self.reduction}-G{self.groups}")


SMALL = Case(frames=4, tokens=6, dim=16, guide_tokens=5, guide_dim=8)
ODD_SHAPES = [
    SMALL,
    Case(frames=3, tokens=7, dim=10, guide_tokens=9, guide_dim=6, num_latents=3, reduction=5, segments=3),
    Case(frames=2, tokens=1, dim=12, guide_tokens=4, guide_dim=5, num_latents=2, reduction=3, segments=1),
    Case(frames=4, tokens=5, dim=8, guide_tokens=1, guide_dim=3, num_latents=1, reduction=2, segments=2),
    Case(frames=6, tokens=3, dim=14, guide_tokens=2, guide_dim=7, num_latents=5, reduction=7, groups=1,
         segments=3),
]


# the optional layers, switched off alone and together
OPTION_SETS = {
    "all-on": {},
    "no-bn": {"use_bn": False},
    "no-gate": {"use_gate": False},
    "no-layernorms": {"ln_before": False, "ln_post": False},
    "bare": {"use_bn": False, "use_gate": False, "ln_before": False, "ln_post": False},
}


def make_module(case: Case = SMALL, *, seed: int = 0, dtype=torch.float64, **options) -> FusedDGSCT:
    """A module whose every parameter and buffer is random and O(1), so no term is zero."""
    torch.manual_seed(seed)
    module = FusedDGSCT(case.dim, case.guide_dim, case.tokens, case.guide_tokens,
                        num_latents=case.num_latents, reduction=case.reduction, groups=case.groups,
                        segments=case.segments, **options)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.split(".")[0] in ("ln_before", "ln_post", "bn1", "bn2"):
                p.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(noise / fan_in ** 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))
    return module.to(dtype)


def make_inputs(case: Case = SMALL, *, seed: int = 0, dtype=torch.float64, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed + 100)
    x = scale * torch.randn(case.frames, case.tokens, case.dim, generator=generator, dtype=torch.float64)
    g = torch.randn(case.frames, case.guide_tokens, case.guide_dim, generator=generator, dtype=torch.float64)
    return x.to(dtype), g.to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (SPEC.md's measure), in float64."""
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).abs().max().item()
    return diff / max(expected.abs().max().item(), 1e-30)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str,
                 atol: float = 0.0) -> None:
    """Relative max error within `tolerance` (or absolute error within `atol`, for tensors
    that are zero in exact arithmetic); fails with the worst mismatches listed."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    absolute = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    if not (error <= tolerance or absolute <= atol):  # also catches NaN
        diff = (actual.detach().double() - expected.detach().double()).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        rows = "\n".join(
            f"    at {tuple(torch.unravel_index(i, actual.shape))}: got {actual.flatten()[i].item():.6g}, "
            f"expected {expected.flatten()[i].item():.6g}" for i in worst)
        raise AssertionError(f"{what}: relative max error {error:.3g} > {tolerance:.3g}; "
                             f"max |expected| = {expected.abs().max().item():.3g}\n{rows}")


def runnable_backends(dtype=torch.float32, case: Case = SMALL) -> list[str]:
    """Names of the registered backends that can run a CPU call of `case` in `dtype` here
    (reference, cpu, and triton under TRITON_INTERPRET=1), highest rank first."""
    from dgsct_kernels import dispatch
    from dgsct_kernels.config import Dims

    dims = Dims(tokens=case.tokens, dim=case.dim, guide_tokens=case.guide_tokens, guide_dim=case.guide_dim,
                num_latents=case.num_latents, hidden=case.dim // case.reduction, groups=case.groups)
    probe = dispatch.Problem("cpu", dtype, dims, case.frames, True, True)
    return [b.name for b in dispatch.registered_backends() if b.supports(probe)]


def randomised_tiny_ave_model(seed: int):
    """The tiny AVE model with every trainable tensor random (positive running variances),
    so a load that copies anything is visible."""
    from dgsct_kernels.models import build_dgsct, trainable_state_dict

    torch.manual_seed(seed)
    model = build_dgsct("ave", "tiny", backend="reference")
    with torch.no_grad():
        for key, value in trainable_state_dict(model).items():
            if value.is_floating_point():
                noise = torch.randn_like(value)
                value.copy_(noise.abs() + 0.5 if key.endswith("running_var") else noise)
    return model
