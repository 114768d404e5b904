"""The reference backend against the naive float64 implementation of SPEC.md."""
import pytest
import torch

from _naive import naive_dgsct
from _support import OPTION_SETS, ODD_SHAPES, SMALL, Case, assert_close, make_inputs, make_module

F64_TOL = 1e-11
# some gradients are exactly zero in exact arithmetic (a bias before train-mode BatchNorm)
F64_ATOL = 1e-12



def _leaf_params(module):
    """The module's tensors as independent leaves for the naive implementation."""
    params = {}
    for name, t in module.op_params().items():
        t = t.detach().clone()
        params[name] = t.requires_grad_() if t.is_floating_point() and "running_" not in name else t
    return params


def _compare(case: Case, training: bool, seed: int = 0, **options):
    module = make_module(case, seed=seed, gamma=0.2, **options).train(training)
    x, g = make_inputs(case, seed=seed)
    x.requires_grad_(), g.requires_grad_()
    params = _leaf_params(module)
    naive_x, naive_g = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    res, smap, tgate, running = naive_dgsct(naive_x, naive_g, params, alpha=module.alpha, beta=module.beta,
                                            gamma=module.gamma, groups=case.groups, training=training)
    out = module(x, g)
    assert_close(out.residual, res, F64_TOL, "residual")
    assert_close(out.spatial_map, smap, F64_TOL, "spatial_map")
    assert_close(out.temporal_gate.flatten(), tgate, F64_TOL, "temporal_gate")
    assert out.temporal_gate.shape == (case.frames // case.segments, case.segments)
    buffers = dict(module.named_buffers())
    for name, expected in running.items():
        assert_close(buffers[name], expected, F64_TOL, name)
    if training and running:
        assert buffers["bn1.num_batches_tracked"].item() == 1

    # every gradient, through a loss that weights all three outputs
    weights = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(7))
               for t in (res, smap, tgate)]
    loss = lambda r, s, t: (r * weights[0]).sum() + (s * weights[1]).sum() + (t * weights[2]).sum()  # noqa: E731
    loss(res, smap, tgate).backward()
    loss(out.residual, out.spatial_map, out.temporal_gate.flatten()).backward()
    assert_close(x.grad, naive_x.grad, F64_TOL, "grad x")
    assert_close(g.grad, naive_g.grad, F64_TOL, "grad g")
    for name, p in module.named_parameters():
        if name == "gate_tk":
            assert p.grad is None, "gate_tk is unused by the forward and must get no gradient"
            continue
        assert_close(p.grad, params[name].grad, F64_TOL, f"grad {name}", atol=F64_ATOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_matches_naive_for_every_layer_option(training, options):
    _compare(SMALL, training, **OPTION_SETS[options])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ODD_SHAPES, ids=str)
def test_matches_naive_on_odd_shapes(case, training):
    _compare(case, training, seed=3)


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_on_random_shapes(seed):
    rng = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
    groups = pick(1, 3)
    hidden_per_group = pick(1, 3)
    reduction = pick(1, 4)
    dim = groups * hidden_per_group * reduction
    dim += dim % 2 * groups * hidden_per_group * reduction  # keep dim >= 2 and divisible
    segments = pick(1, 3)
    case = Case(frames=segments * pick(1, 3), tokens=pick(1, 9), dim=dim, guide_tokens=pick(1, 9),
                guide_dim=pick(1, 9), num_latents=pick(1, 5), reduction=reduction, groups=groups,
                segments=segments)
    _compare(case, training=bool(seed % 2), seed=seed)


def test_gamma_zero_is_the_authors_ave_configuration():
    """With gamma=0 the temporal gate has no effect on the residual (the AVE code has none)."""
    module = make_module(SMALL, gamma=0.0).eval()
    x, g = make_inputs(SMALL)
    before = module(x, g).residual
    with torch.no_grad():
        module.temporal_gated[0].bias.add_(5.0)
    assert torch.equal(module(x, g).residual, before)


def test_gradcheck_through_the_op():
    case = Case(frames=2, tokens=3, dim=4, guide_tokens=2, guide_dim=3, num_latents=2, reduction=2,
                segments=2)
    for training in (True, False):
        module = make_module(case, gamma=0.3).train(training)
        x, g = make_inputs(case)
        names = [n for n, p in module.named_parameters() if n != "gate_tk"]
        params = [module.get_parameter(n) for n in names]

        def run(x, g, *values):
            state = module.op_params()
            state.update(zip(names, values))
            out = torch.func.functional_call(module, state, (x, g))
            return out.residual, out.spatial_map, out.temporal_gate

        inputs = (x.requires_grad_(), g.requires_grad_(), *[p.detach().clone().requires_grad_() for p in params])
        # running stats advance on every call in training; the gradient does not depend on them
        assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("order", ["tokens-first", "rewritten"])
@pytest.mark.parametrize("case", ODD_SHAPES, ids=str)
def test_guide_path_orders_agree_with_the_literal_one(case, order):
    """SPEC.md's identities: R and a without forming P, to float64 rounding."""
    from dgsct_kernels.reference import reference_forward
    module = make_module(case, gamma=0.2).train()
    x, g = make_inputs(case)
    literal = reference_forward(x, g, module.op_params(), module.hyper(), True)
    reordered = reference_forward(x, g, module.op_params(), module.hyper(), True, guide_order=order)
    for name, a, b in zip(literal._fields, reordered, literal):
        if b.numel():
            assert_close(a, b, F64_TOL, f"{order} {name}")
