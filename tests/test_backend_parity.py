"""Every backend that runs on this machine, in every dtype, against a float64 oracle.

The oracle is the reference in float64 on the same (rounded) inputs and parameters, so
the error measured is the backend's arithmetic. Outputs and BatchNorm buffers must be
within SPEC.md's tolerance; gradients within it or, where cancellation makes a gradient
small, within the flash-attention rule (3x the error of eager PyTorch in the same
dtype, + 1e-5).
"""
import pytest
import torch

from dgsct_kernels import dispatch
from dgsct_kernels.reference import reference_forward
from _support import OPTION_SETS, SPEC_TOLERANCE, Case, assert_close, make_inputs, make_module, relative_error

CASES = [Case(frames=4, tokens=24, dim=32, guide_tokens=20, guide_dim=16, num_latents=8, reduction=4),
         Case(frames=3, tokens=1, dim=10, guide_tokens=7, guide_dim=5, num_latents=3, reduction=5, segments=3),
         Case(frames=2, tokens=9, dim=12, guide_tokens=1, guide_dim=6, num_latents=1, reduction=3, segments=1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends_on_cpu():
    probe = dispatch.Problem("cpu", torch.float32, make_module(CASES[0]).dims, 4, True, True)
    return [b.name for b in dispatch.registered_backends() if b.supports(probe)]


@pytest.mark.parametrize("backend", _backends_on_cpu())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_against_float64(backend, dtype, training, case):
    """Outputs and BatchNorm buffers: SPEC.md's tolerance, and at most 3x the reference
    backend's own error in that dtype (+1e-5)."""
    oracle = make_module(case, gamma=0.2, dtype=dtype, backend="reference").double().train(training)
    x, g = make_inputs(case, dtype=dtype)
    with torch.no_grad():
        want = oracle(x.double(), g.double())
        runs = {}
        for name in dict.fromkeys(["reference", backend]):
            module = make_module(case, gamma=0.2, dtype=dtype, backend=name).train(training)
            runs[name] = (module(x, g), dict(module.named_buffers()))
    (ref_out, ref_buffers), (out, buffers) = runs["reference"], runs[backend]
    for field in want._fields:
        bound = min(SPEC_TOLERANCE[dtype], 3 * relative_error(getattr(ref_out, field), getattr(want, field)) + 1e-5)
        assert_close(getattr(out, field), getattr(want, field), bound, f"{backend} {dtype} {field}")
    for name, expected in oracle.named_buffers():
        if expected.is_floating_point():
            bound = min(SPEC_TOLERANCE[dtype], 3 * relative_error(ref_buffers[name], expected) + 1e-5)
            assert_close(buffers[name], expected, bound, f"{backend} {dtype} buffer {name}")


def _loss(residual, spatial_map, temporal_gate, weight):
    ramp = torch.arange(spatial_map.shape[1], dtype=spatial_map.dtype)
    return (residual * weight).sum() + (spatial_map * ramp).sum() + temporal_gate.sum()


def _run(module, x, g, weight, call):
    x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
    out = call(module, x, g)
    _loss(*out[:3], weight.to(x.dtype)).backward()
    return out, x.grad, g.grad


def _via_module(module, x, g):
    out = module(x, g)
    return out.residual, out.spatial_map, out.temporal_gate.flatten()


def _eager(module, x, g):
    """The plain autograd graph of reference_forward, in the input dtype."""
    params = {n: t.detach().clone().requires_grad_(t.is_floating_point() and "running_" not in n)
              for n, t in module.op_params().items()}
    out = reference_forward(x, g, params, module.hyper(), module.training)
    _eager.params = params
    return out.residual, out.spatial_map, out.temporal_gate


@pytest.mark.parametrize("backend", _backends_on_cpu())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_against_float64(backend, dtype, training, case):
    _check_gradients(backend, dtype, training, case)


@pytest.mark.parametrize("backend", _backends_on_cpu())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_gradients_for_every_layer_option(backend, training, options):
    _check_gradients(backend, torch.float32, training, CASES[0], **OPTION_SETS[options])


def _check_gradients(backend, dtype, training, case, **options):
    tol = SPEC_TOLERANCE[dtype]
    module = make_module(case, gamma=0.2, dtype=dtype, backend=backend, **options).train(training)
    oracle = make_module(case, gamma=0.2, dtype=dtype, backend="reference", **options).double().train(training)  # same values
    eager_module = make_module(case, gamma=0.2, dtype=dtype, **options).train(training)
    x, g = make_inputs(case, dtype=dtype)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    want, want_gx, want_gg = _run(oracle, x.double(), g.double(), weight, _via_module)
    got, gx, gg = _run(module, x, g, weight, _via_module)
    _, eager_gx, eager_gg = _run(eager_module, x, g, weight, _eager)
    eager_params = _eager.params

    def check_gradient(actual, eager_value, expected, what):
        bound = max(tol, 3 * relative_error(eager_value, expected) + 1e-5)
        assert_close(actual, expected, bound, f"{backend} {dtype} {what}")

    for name, actual, expected in zip(("residual", "spatial_map", "temporal_gate"), got, want):
        assert_close(actual, expected, tol, f"{backend} {dtype} {name}")
    check_gradient(gx, eager_gx, want_gx, "grad x")
    check_gradient(gg, eager_gg, want_gg, "grad g")
    scale = want_gx.abs().max()
    for name, p in module.named_parameters():
        expected = oracle.get_parameter(name).grad
        if expected is None:
            assert p.grad is None, name
            continue
        if expected.abs().max() <= 1e-9 * scale:  # zero in exact arithmetic (bias before train BN)
            assert p.grad.double().abs().max() <= tol * scale, name
            continue
        check_gradient(p.grad, eager_params[name].grad, expected, f"grad {name}")
    for name, b in module.named_buffers():
        if b.is_floating_point():
            assert_close(b, oracle.get_buffer(name), tol, f"{backend} {dtype} buffer {name}")


@pytest.mark.parametrize("backend", _backends_on_cpu())
def test_deterministic(backend):
    case = CASES[0]
    results = []
    for _ in range(2):
        module = make_module(case, dtype=torch.float32, backend=backend).train()
        x, g = make_inputs(case, dtype=torch.float32)
        x.requires_grad_()
        out = module(x, g)
        (out.residual.sum() + out.spatial_map.pow(2).sum()).backward()
        results.append([out.residual, out.spatial_map, out.temporal_gate, x.grad, module.bn2.running_var,
                        *(p.grad for p in module.parameters() if p.grad is not None)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", _backends_on_cpu())
def test_bfloat16_large_inputs_stay_finite(backend):
    """SPEC.md: no NaN or Inf for |x| up to 1e4 (what a bf16 encoder produces)."""
    case = CASES[0]
    module = make_module(case, dtype=torch.bfloat16, backend=backend).train()
    x, g = make_inputs(case, dtype=torch.bfloat16)
    x = (x.float() / x.float().abs().max() * 1e4).bfloat16().requires_grad_()
    g = (g.float() * 1e3).bfloat16()
    out = module(x, g)
    for name, t in zip(out._fields, out):
        assert torch.isfinite(t).all(), name
    (out.residual.float().sum() + out.spatial_map.float().sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", _backends_on_cpu())
def test_forward_with_wide_channels(backend):
    """C beyond 1536 and not a power of two (channel loops, masking), in bf16 training."""
    case = Case(frames=2, tokens=3, dim=1600, guide_tokens=5, guide_dim=24, num_latents=32, reduction=8,
                segments=1)
    dtype = torch.bfloat16
    oracle = make_module(case, gamma=0.2, dtype=dtype, backend="reference").double().train()
    x, g = make_inputs(case, dtype=dtype)
    with torch.no_grad():
        want = oracle(x.double(), g.double())
        ref = make_module(case, gamma=0.2, dtype=dtype).train()(x, g)
        got = make_module(case, gamma=0.2, dtype=dtype, backend=backend).train()(x, g)
    for field in want._fields:
        bound = min(SPEC_TOLERANCE[dtype], 3 * relative_error(getattr(ref, field), getattr(want, field)) + 1e-5)
        assert_close(getattr(got, field), getattr(want, field), bound, f"{backend} C=1600 {field}")
