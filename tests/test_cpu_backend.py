"""The fused C++ `cpu` backend beyond the shared parity tests: float64 agreement with the
reference to 1e-8 (outputs, BatchNorm statistics, every gradient), both guide-path
orders, gradient subsets, odd and non-contiguous inputs, and clear errors."""
import pytest
import torch

from dgsct_kernels import dispatch
from dgsct_kernels.backends.reference import forward_in_accumulation_dtype
from dgsct_kernels.config import OP_PARAM_NAMES
from _support import ODD_SHAPES, SMALL, assert_close, make_inputs, make_module

cpu = dispatch.get_backend("cpu")
pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None,
                                reason=f"cpu backend unavailable: {cpu.unavailable_reason()}")
OPTIONS = {"all-on": {}, "bare": {"use_bn": False, "use_gate": False, "ln_before": False, "ln_post": False},
           "bn-only": {"ln_before": False, "ln_post": False}}
TOL64 = 1e-8


def _run(case, backend, training, options, x, g):
    module = make_module(case, gamma=0.2, backend=backend, **options).train(training)
    x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
    out = module(x, g)
    weight = torch.randn(out.residual.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    ramp = torch.arange(case.tokens, dtype=x.dtype)
    ((out.residual * weight).sum() + (out.spatial_map * ramp).sum()
     + (out.temporal_gate * 1.5).sum()).backward()
    tensors = {"residual": out.residual, "spatial_map": out.spatial_map, "temporal_gate": out.temporal_gate,
               "grad x": x.grad, "grad g": g.grad}
    tensors.update({f"buffer {n}": b.clone() for n, b in module.named_buffers() if b.is_floating_point()})
    tensors.update({f"grad {n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    return tensors


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ODD_SHAPES, ids=str)
def test_float64_matches_reference(case, training, options):
    x, g = make_inputs(case)
    want = _run(case, "reference", training, options, x, g)
    got = _run(case, "cpu", training, options, x, g)
    assert want.keys() == got.keys()
    scale = want["grad x"].abs().max()
    for name, expected in want.items():
        if name.startswith("grad") and expected.abs().max() <= 1e-9 * scale:
            # zero in exact arithmetic (a bias in front of training BatchNorm)
            assert got[name].abs().max() <= 1e-9 * scale, name
            continue
        assert_close(got[name], expected, TOL64, f"cpu float64 {name}")


@pytest.mark.parametrize("order", ["rewritten", "tokens-first"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_both_guide_orders(order, training):
    """The C++ op runs either order of guide_path.py (plan_guide_path picks one per shape)."""
    case = ODD_SHAPES[1]
    module = make_module(case, gamma=0.2).train(training)
    x, g = make_inputs(case)
    params = module.op_params()
    slots = [params.get(n) for n in OP_PARAM_NAMES]
    want = forward_in_accumulation_dtype(x, g, params, module.hyper(), training)
    got = torch.ops.dgsct_kernels.fused_forward(x, g, slots, list(module.hyper()), training, order)
    for field, expected, actual in zip(want._fields, want, got):
        if expected.numel():
            assert_close(actual, expected, TOL64, f"{order} {field}")
    grads = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(3)) for t in want[:3]]
    inputs = [x.clone().requires_grad_(), g.clone().requires_grad_()]
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()
              if p.is_floating_point() and "running_" not in n}
    out = forward_in_accumulation_dtype(*inputs, {**params, **leaves}, module.hyper(), training)
    expected = torch.autograd.grad(out[:3], inputs + list(leaves.values()), grads, allow_unused=True)
    flags = [1, 1] + [int(n in leaves) for n in OP_PARAM_NAMES]
    actual = torch.ops.dgsct_kernels.fused_backward(*grads, x, g, slots, list(module.hyper()), training, order,
                                                    flags)
    names = ["x", "g", *leaves]
    by_name = dict(zip(["x", "g", *OP_PARAM_NAMES], actual))
    for name, e in zip(names, expected):
        if e is not None and e.abs().max() > 1e-9:
            assert_close(by_name[name], e, TOL64, f"{order} grad {name}")


def test_gradient_subsets_are_respected():
    """Only the gradients autograd asks for are returned; each equals the full run's."""
    case = SMALL
    module = make_module(case, backend="cpu").train()
    x, g = make_inputs(case)
    x.requires_grad_()
    full = torch.autograd.grad(module(x, g).residual.sum(), [x, module.fc.weight, module.up_sampler.weight])
    module = make_module(case, backend="cpu").train()
    only_x = torch.autograd.grad(module(x, g).residual.sum(), [x])
    assert_close(only_x[0], full[0], 1e-12, "grad x alone")
    module = make_module(case, backend="cpu").train()
    some = torch.autograd.grad(module(x, g).residual.sum(), [module.fc.weight, module.up_sampler.weight])
    assert_close(some[0], full[1], 1e-12, "grad fc.weight alone")
    assert_close(some[1], full[2], 1e-12, "grad up_sampler.weight alone")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_and_expanded_inputs(dtype):
    case = ODD_SHAPES[1]
    x, g = make_inputs(case, dtype=dtype)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    g_expanded = g[:1].expand_as(g)
    assert not x_strided.is_contiguous() and g_expanded.stride(0) == 0
    outs = []
    for xi, gi in ((x_strided, g_expanded), (x.contiguous(), g_expanded.contiguous())):
        module = make_module(case, dtype=dtype, backend="cpu").train()
        xi = xi.detach().requires_grad_()
        out = module(xi, gi)
        out.residual.float().pow(2).sum().backward()
        outs.append((out.residual, out.spatial_map, xi.grad, module.fc.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_auto_prefers_cpu_for_cpu_tensors():
    case = SMALL
    module = make_module(case)
    problem = dispatch.Problem.of(make_inputs(case)[0], module.dims, True, True)
    assert dispatch.resolve(problem).name == "cpu"


def test_op_refuses_malformed_calls_clearly():
    case = SMALL
    module = make_module(case)
    x, g = make_inputs(case)
    slots = [module.op_params().get(n) for n in OP_PARAM_NAMES]
    hyper = list(module.hyper())
    with pytest.raises(RuntimeError, match="parameter slots"):
        torch.ops.dgsct_kernels.fused_forward(x, g, slots[:-1], hyper, True, "rewritten")
    with pytest.raises(RuntimeError, match="guide_order='sideways'"):
        torch.ops.dgsct_kernels.fused_forward(x, g, slots, hyper, True, "sideways")
    with pytest.raises(RuntimeError, match="x and g dtypes differ"):
        torch.ops.dgsct_kernels.fused_forward(x, g.float(), slots, hyper, True, "rewritten")
    with pytest.raises(RuntimeError, match="required parameter slot"):
        torch.ops.dgsct_kernels.fused_forward(x, g, [None] * len(slots), hyper, True, "rewritten")
