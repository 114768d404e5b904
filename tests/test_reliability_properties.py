"""Reliability: property-based tests over random legal shapes and layer options.

Hypothesis draws the sizes (frames a multiple of segments, tokens, dim, guide_tokens,
guide_dim, num_latents, reduction, groups dividing dim and the hidden size), the optional
layers (use_bn, use_gate, ln_before, ln_post), the mode (training / eval) and gamma (zero
or not), and every backend that runs here must match the reference backend run in
float64 on the same rounded parameters and inputs:

* BatchNorm running buffers within SPEC.md's tolerance for the dtype;
* outputs, and the gradients of x, g and every parameter, within that tolerance or within
  NOISE_FACTOR (10) times the error of eager PyTorch in the same dtype (+ 1e-5);
  gradients may instead have an absolute error within the tolerance times the problem's
  largest gradient (SPEC.md's measure applied to all gradients as one output).

Why looser than test_backend_parity.py's 3x rule, which holds on its fixed,
well-conditioned cases: random legal problems include ill-conditioned ones, where two
float32 implementations differ by rounding noise whose size depends on the order of
operations. ln_post or ln_before over C = 2 channels, or training BatchNorm over two
tokens, amplify rounding so that eager float32 itself misses 1e-4 on outputs, and a fused
backend's error was up to 4.7x eager's over 700 random problems (C = 2, LayerNorm and
training BatchNorm). With one hidden channel the up projection is rank 1 and ln_post or
training BatchNorm nearly cancels its input's gradient, so some gradients are 1e-4 to
1e-12 of the largest and computed by cancellation: pure noise, for which eager's error
on one tensor is no yardstick (10x below a fused backend's on some problems, 3x above on
others); the absolute floor covers those. On a well-conditioned problem eager's error is
~1e-6 and SPEC.md's tolerance governs. A wrong formula, index or mask gives an error of
the order of the output or gradient itself and still fails unless that gradient is
negligible next to the others. Upstream gradients are rounded to the dtype first, so every
implementation, the float64 oracle included, differentiates the same loss.

Examples are derandomized (the same ones on every run, no example database), so CI is
reproducible; a failure prints the drawn problem, which
`check_problem(backend, dtype, problem)` replays alone.
The Triton interpreter is slow, so it gets a handful of tiny problems.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

from dgsct_kernels.reference import reference_forward  # noqa: E402
from _support import SPEC_TOLERANCE, Case, assert_close, make_inputs, make_module, relative_error  # noqa: E402
from _support import runnable_backends  # noqa: E402

NOISE_FACTOR = 10  # see the module docstring


@dataclass(frozen=True)
class Problem:
    case: Case
    options: dict = field(default_factory=dict)  # FusedDGSCT layer switches and gamma
    training: bool = True
    seed: int = 0

    def __repr__(self) -> str:
        return (f"Problem(case={self.case!r}, options={self.options!r}, training={self.training}, "
                f"seed={self.seed})")


@st.composite
def problems(draw, tiny: bool = False) -> Problem:
    top = 4 if tiny else 10
    segments = draw(st.integers(1, 2 if tiny else 3))
    frames = segments * draw(st.integers(1, 2))
    dim = draw(st.integers(2, 8 if tiny else 24))
    reduction = draw(st.integers(1, dim))  # hidden = dim // reduction >= 1
    hidden = dim // reduction
    common = math.gcd(dim, hidden)
    groups = draw(st.sampled_from([d for d in range(1, common + 1) if common % d == 0]))
    case = Case(frames=frames, tokens=draw(st.integers(1, top)), dim=dim,
                guide_tokens=draw(st.integers(1, top)), guide_dim=draw(st.integers(1, 2 * top)),
                num_latents=draw(st.integers(1, 5)), reduction=reduction, groups=groups, segments=segments)
    options = {name: draw(st.booleans()) for name in ("use_bn", "use_gate", "ln_before", "ln_post")}
    options["gamma"] = draw(st.sampled_from([0.0, 0.2]))
    training = draw(st.booleans())
    # BatchNorm in training needs two values per channel (the module raises otherwise)
    assume(not (training and options["use_bn"] and frames * case.tokens < 2))
    return Problem(case, options, training, draw(st.integers(0, 2**16)))


def _loss(out, weights):
    return sum((t.double() * w).sum() for t, w in zip(out, weights))


def _grads(module, x, g, weights, call):
    """Outputs and gradients of (x, g, every parameter) of one loss, via `call`."""
    x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
    out, params = call(module, x, g)
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(_loss(out, weights), [x, g, *(params[n] for n in names)], allow_unused=True)
    return out, dict(zip(["x", "g", *names], grads))


def _via_module(module, x, g):
    out = module(x, g)
    return (out.residual, out.spatial_map, out.temporal_gate.flatten()), dict(module.named_parameters())


def _eager(module, x, g):
    """The plain autograd graph of reference_forward in the input dtype (for the error rule)."""
    params = {n: t.detach().clone().requires_grad_(t.is_floating_point() and "running_" not in n)
              for n, t in module.op_params().items()}
    out = reference_forward(x, g, params, module.hyper(), module.training)
    return (out.residual, out.spatial_map, out.temporal_gate), {n: p for n, p in params.items() if p.requires_grad}


def check_problem(backend: str, dtype: torch.dtype, problem: Problem) -> None:
    case, tol = problem.case, SPEC_TOLERANCE[dtype]
    build = dict(seed=problem.seed, dtype=dtype, **problem.options)
    # the oracle: the reference backend in float64 on the same rounded values (named: `auto`
    # would pick the cpu backend for float64)
    oracle = make_module(case, backend="reference", **build).double().train(problem.training)
    module = make_module(case, backend=backend, **build).train(problem.training)
    eager = make_module(case, **build).train(problem.training)
    x, g = make_inputs(case, seed=problem.seed, dtype=dtype)
    gen = torch.Generator().manual_seed(problem.seed + 1)
    shapes = [(case.frames, case.tokens, case.dim), (case.frames, case.tokens), (case.frames,)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).double() for s in shapes]

    want, want_grads = _grads(oracle, x.double(), g.double(), weights, _via_module)
    got, got_grads = _grads(module, x, g, weights, _via_module)
    eager_out, eager_grads = _grads(eager, x, g, weights, _eager)
    where = f"{backend} {dtype} {problem!r}"

    for name, actual, expected, plain in zip(("residual", "spatial_map", "temporal_gate"), got, want, eager_out):
        assert actual.dtype == dtype, f"{where}: {name} dtype {actual.dtype}"
        bound = max(tol, NOISE_FACTOR * relative_error(plain, expected) + 1e-5)
        assert_close(actual, expected, bound, f"{where}: {name}")
    for name, expected in oracle.named_buffers():
        if expected.is_floating_point():
            assert_close(module.get_buffer(name), expected, tol, f"{where}: buffer {name}")
    if problem.training and problem.options["use_bn"]:  # the buffers above were updated once
        assert module.bn1.num_batches_tracked.item() == oracle.bn1.num_batches_tracked.item() == 1

    largest = max(t.abs().max().item() for t in want_grads.values() if t is not None)
    assert want_grads.keys() == got_grads.keys()
    for name, expected in want_grads.items():
        actual = got_grads[name]
        if expected is None:
            assert actual is None, f"{where}: grad {name} should be None (unused)"
            continue
        assert actual is not None, f"{where}: grad {name} missing"
        assert actual.dtype == dtype, f"{where}: grad {name} dtype {actual.dtype}"
        bound = max(tol, NOISE_FACTOR * relative_error(eager_grads[name], expected) + 1e-5)
        assert_close(actual, expected, bound, f"{where}: grad {name}", atol=tol * largest)


def _plan():
    """(backend, dtype, examples): float32 everywhere, bfloat16 where cheap."""
    plan = []
    for backend in runnable_backends():
        if backend == "triton":  # the interpreter: a few tiny problems
            plan.append((backend, torch.float32, 4))
        else:
            plan += [(backend, torch.float32, 50), (backend, torch.bfloat16, 20)]
    return plan


PLAN = _plan()


@pytest.mark.parametrize("backend,dtype,examples", PLAN,
                         ids=[f"{b}-{str(d).replace('torch.', '')}" for b, d, _ in PLAN])
def test_random_problems_match_float64_reference(backend, dtype, examples):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(problem=problems(tiny=backend == "triton"))
    def check(problem):
        check_problem(backend, dtype, problem)

    check()
