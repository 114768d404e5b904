"""Every public entry point refuses bad input with a message naming the argument."""
import pytest
import torch

from dgsct_kernels import FusedDGSCT, dgsct
from _support import SMALL, assert_close, make_inputs, make_module


@pytest.fixture
def module():
    return make_module(SMALL)


@pytest.fixture
def inputs():
    return make_inputs(SMALL)


def _both_entry_points(module, x, g):
    """Run the module and the functional form; both must raise the same way."""
    errors = []
    for call in (lambda: module(x, g),
                 lambda: dgsct(x, g, module.state_dict(), segments=module.segments)):
        with pytest.raises((ValueError, TypeError)) as error:
            call()
        errors.append(str(error.value))
    return errors


@pytest.mark.parametrize("bad, pattern", [
    (lambda x, g: (x[0], g), r"x: expected rank 3 .* got rank 2 with shape \(6, 16\)"),
    (lambda x, g: (x, g[None]), r"g: expected rank 3 .* got rank 4"),
    (lambda x, g: (x, g[:2]), r"x and g: frame counts differ, x has F=4 .* g has F=2"),
    (lambda x, g: (x[:, :5], g), r"x: expected \[F, N=6, C=16\] .* got shape \(4, 5, 16\)"),
    (lambda x, g: (x[..., :12], g), r"x: expected \[F, N=6, C=16\] .* got shape \(4, 6, 12\)"),
    (lambda x, g: (x, g[:, :4]), r"g: expected \[F, M=5, D=8\] .* got shape \(4, 4, 8\)"),
    (lambda x, g: (x, g[..., :7]), r"g: expected \[F, M=5, D=8\] .* got shape \(4, 5, 7\)"),
    (lambda x, g: (x[:3], g[:3]), r"x: frame count F=3 .* multiple of segments=2"),
    (lambda x, g: (x, g.float()), r"g: dtype torch.float32 differs from x's dtype torch.float64"),
    (lambda x, g: (x.float(), g.float()), r"params\['conv_adapter.weight'\]: dtype torch.float64 differs"),
    (lambda x, g: (x.long(), g.long()), r"x: dtype torch.int64 not supported"),
    (lambda x, g: (x, g.to("meta")), r"g: on device meta but x is on cpu"),
])
def test_refused_with_a_clear_message(module, inputs, bad, pattern):
    x, g = bad(*inputs)
    for message in _both_entry_points(module, x, g):
        assert pytest.importorskip("re").search(pattern, message), message


def test_tensors_required(module, inputs):
    with pytest.raises(TypeError, match="x and g must be tensors"):
        module(inputs[0].tolist(), inputs[1])


def test_single_token_batch_in_training_is_refused():
    case_module = make_module(type(SMALL)(frames=1, tokens=1, dim=8, guide_tokens=2, guide_dim=3,
                                          num_latents=2, reduction=2, segments=1)).train()
    x, g = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="F\\*N = 1"):
        case_module(x, g)
    case_module.eval()(x, g)  # eval mode uses running statistics and is fine


@pytest.mark.parametrize("kwargs, pattern", [
    ({"groups": 3}, r"groups=3: expected it to divide dim=16"),
    ({"reduction": 0}, r"reduction=0"),
    ({"reduction": 32}, r"hidden size|at least 1 hidden"),
    ({"segments": 0}, r"segments=0"),
    ({"num_latents": 0}, r"num_latents=0"),
])
def test_constructor_refuses_bad_hyper_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FusedDGSCT(16, 8, 6, 5, **kwargs)


def test_functional_form_refuses_bad_params(module, inputs):
    x, g = inputs
    state = module.state_dict()
    with pytest.raises(ValueError, match="missing required parameter 'fc.bias'"):
        dgsct(x, g, {k: v for k, v in state.items() if k != "fc.bias"}, segments=2)
    with pytest.raises(ValueError, match=r"params\['my_tokens'\]: expected shape \(4, 16\), got \(4, 15\)"):
        dgsct(x, g, {**state, "my_tokens": state["my_tokens"][:, :15]}, segments=2)
    with pytest.raises(ValueError, match="optional layer 'bn' is partly given"):
        dgsct(x, g, {k: v for k, v in state.items() if k != "bn2.bias"}, segments=2)


def test_non_contiguous_and_expanded_inputs_are_handled(module, inputs):
    x, g = inputs
    module.eval()
    expected = module(x, g)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    g_expanded = g[:1].expand(SMALL.frames, -1, -1)
    assert not x_strided.is_contiguous() and g_expanded.stride(0) == 0
    got = module(x_strided, g)
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-12, "non-contiguous x")
    got = module(x, g_expanded)
    want = module(x, g[:1].repeat(SMALL.frames, 1, 1))
    for a, b in zip(got, want):
        assert_close(a, b, 1e-12, "expanded g")
    # gradients flow to a non-contiguous leaf too
    leaf = x.transpose(0, 1).contiguous().requires_grad_()
    module(leaf.transpose(0, 1), g).residual.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape
