"""Reliability: the same inputs give bit-identical results on every call.

For every backend that runs here, three calls from an identical starting state (a fresh
module with the same parameters and buffers, the same x and g, the same upstream
gradients) must agree bit for bit in the outputs, the BatchNorm running buffers after
their update, and the gradients of x, g and every parameter. Between the calls the same
backend runs an unrelated, larger problem, so a kernel that read stale workspace memory
or left state behind (per-thread caches, partial sums) would show up as a mismatch.
Bit-identity is only promised for a fixed thread count, which a test session keeps.
"""
import pytest
import torch

from _support import Case, make_inputs, make_module, runnable_backends

CASE = Case(frames=4, tokens=9, dim=12, guide_tokens=5, guide_dim=6, num_latents=3, reduction=3, segments=2)
TINY = Case(frames=2, tokens=3, dim=8, guide_tokens=2, guide_dim=4, num_latents=2, reduction=2, segments=1)
# the problem run between the compared calls: other sizes, values and mode
OTHER = Case(frames=6, tokens=17, dim=20, guide_tokens=7, guide_dim=5, num_latents=5, reduction=5, segments=3)

PARAMS = [(backend, dtype) for backend in runnable_backends() for dtype in (torch.float32, torch.bfloat16)
          if backend != "triton" or dtype == torch.float32]  # the interpreter is slow: float32 only


def _call(case, backend, dtype, training, seed=0):
    """One forward and backward from a fresh module; every result that must repeat."""
    module = make_module(case, seed=seed, dtype=dtype, gamma=0.2, backend=backend).train(training)
    x, g = make_inputs(case, seed=seed, dtype=dtype)
    x.requires_grad_()
    g.requires_grad_()
    out = module(x, g)
    gen = torch.Generator().manual_seed(seed + 7)
    upstream = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in out]
    torch.autograd.backward(list(out), upstream)
    results = {f"output {name}": t.detach() for name, t in zip(out._fields, out)}
    results.update({f"buffer {name}": b for name, b in module.named_buffers()})
    results.update({"grad x": x.grad, "grad g": g.grad})
    results.update({f"grad {name}": p.grad for name, p in module.named_parameters() if p.grad is not None})
    return results


def _assert_bit_identical(first, other, what):
    assert first.keys() == other.keys(), what
    for key, expected in first.items():
        got = other[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{what}: {key}"
        assert torch.isfinite(expected).all(), f"{what}: {key} is not finite"
        if not torch.equal(got, expected):
            diff = (got.double() - expected.double()).abs().max().item()
            raise AssertionError(f"{what}: {key} differs between identical calls (max |diff| {diff:.3g})")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,dtype", PARAMS, ids=[f"{b}-{str(d)[6:]}" for b, d in PARAMS])
def test_identical_calls_are_bit_identical(backend, dtype, training):
    case = TINY if backend == "triton" else CASE
    first = _call(case, backend, dtype, training)
    assert any(k.startswith("grad my_tokens") for k in first), "the backward reached no guide parameter"
    for repeat in (1, 2):
        if backend != "triton":  # dirty every cache and workspace with an unrelated problem
            _call(OTHER, backend, dtype, not training, seed=repeat)
        _assert_bit_identical(first, _call(case, backend, dtype, training), f"{backend} {dtype} call {repeat + 1}")


@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b != "triton"])
def test_one_module_repeats_in_eval(backend):
    """The same module object called again (eval: its state does not change) repeats itself,
    including after a training call of a different module on the same backend."""
    module = make_module(CASE, dtype=torch.float32, backend=backend).eval()
    x, g = make_inputs(CASE, dtype=torch.float32)
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
        out = module(xr, gr)
        loss = (out.residual.pow(2).sum() + (out.spatial_map * out.spatial_map.detach()).sum()
                + out.temporal_gate.sum())
        grads = torch.autograd.grad(loss, [xr, gr, *params], allow_unused=True)
        return {**{n: t.detach() for n, t in zip(out._fields, out)},
                **{f"grad {i}": gr_ for i, gr_ in enumerate(grads) if gr_ is not None}}

    first = run()
    for repeat in range(2):
        _call(OTHER, backend, torch.float32, True, seed=repeat + 3)
        _assert_bit_identical(first, run(), f"{backend} eval call {repeat + 2}")
