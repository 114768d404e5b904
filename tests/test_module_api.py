"""FusedDGSCT's public surface: parameter names, state dicts, functional form, backend choice."""
import logging

import pytest
import torch

import dgsct_kernels
from dgsct_kernels import FusedDGSCT, dgsct, dispatch, use_backend
from dgsct_kernels.reference import RawOutputs
from _support import SMALL, assert_close, make_inputs, make_module

# SPEC.md's parameter table (plus BatchNorm's buffers), written out independently of the package
SPEC_NAMES = sorted([
    "conv_adapter.weight", "conv_adapter.bias", "fc.weight", "fc.bias", "my_tokens", "gate_av", "gate_tk",
    "fc_affine_audio_1.weight", "fc_affine_audio_1.bias", "fc_affine_video_1.weight", "fc_affine_video_1.bias",
    "fc_affine_bottleneck.weight", "fc_affine_bottleneck.bias", "fc_affine_v_c_att.weight",
    "fc_affine_v_c_att.bias", "fc_affine_video_2.weight", "fc_affine_video_2.bias",
    "fc_affine_audio_2.weight", "fc_affine_audio_2.bias", "fc_affine_v_s_att.weight", "fc_affine_v_s_att.bias",
    "temporal_gated.0.weight", "temporal_gated.0.bias", "ln_before.weight", "ln_before.bias",
    "down_sampler.weight", "up_sampler.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
    "bn1.running_var", "bn1.num_batches_tracked", "bn2.weight", "bn2.bias", "bn2.running_mean",
    "bn2.running_var", "bn2.num_batches_tracked", "ln_post.weight", "ln_post.bias", "gate",
])


def test_state_dict_names_and_shapes_are_the_authors():
    C, D, N, M, K, r, G = 192, 96, 2304, 4096, 32, 8, 2
    module = FusedDGSCT(C, D, N, M, num_latents=K, reduction=r, groups=G)
    state = module.state_dict()
    assert sorted(state) == SPEC_NAMES
    H = C // r
    shapes = {"conv_adapter.weight": (N, M, 1, 1), "fc.weight": (C, D), "my_tokens": (K, C),
              "fc_affine_bottleneck.weight": (C // 2, C), "fc_affine_v_c_att.weight": (C, C // 2),
              "fc_affine_v_s_att.weight": (1, C // 2), "temporal_gated.0.weight": (1, C),
              "down_sampler.weight": (H, C // G, 1, 1), "up_sampler.weight": (C, H // G, 1, 1),
              "bn1.running_var": (H,), "bn2.running_var": (C,), "gate": (1,), "gate_tk": (1,)}
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name


def test_initial_values_follow_spec():
    torch.manual_seed(0)
    module = FusedDGSCT(16, 8, 6, 5, num_latents=4, reduction=4, segments=2)
    assert module.gate.item() == 0 and module.gate_av.item() == 0 and module.gate_tk.item() == 1
    assert 0 <= module.my_tokens.min() and module.my_tokens.max() < 1
    x, g = make_inputs(SMALL, dtype=torch.float32)
    out = module(x, g)
    assert torch.equal(out.residual, torch.zeros_like(x))  # identity residual at initialisation
    assert_close(out.spatial_map.sum(-1), torch.ones(SMALL.frames), 1e-6, "spatial_map sums to one")


def test_optional_layers_are_absent_from_the_state_dict():
    module = FusedDGSCT(16, 8, 6, 5, use_bn=False, use_gate=False, ln_before=False, ln_post=False)
    names = set(module.state_dict())
    assert not any(n.startswith(("bn1", "bn2", "ln_before", "ln_post")) for n in names)
    assert "gate" not in names and module.gate is None


def test_load_state_dict_strict_roundtrip():
    source = make_module(SMALL, seed=1)
    target = make_module(SMALL, seed=2)
    target.load_state_dict(source.state_dict(), strict=True)
    x, g = make_inputs(SMALL)
    assert torch.equal(source.eval()(x, g).residual, target.eval()(x, g).residual)


def test_authors_ave_state_dict_loads_reporting_only_the_temporal_gate():
    source = make_module(SMALL, seed=1, gamma=0.0)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("temporal_gated")}
    target = FusedDGSCT(16, 8, 6, 5, num_latents=4, reduction=4, segments=2, gamma=0.0).double()
    with pytest.raises(RuntimeError, match="temporal_gated"):
        target.load_state_dict(state, strict=True)
    result = target.load_authors_state_dict(state)
    assert sorted(result.missing_keys) == ["temporal_gated.0.bias", "temporal_gated.0.weight"]
    assert result.unexpected_keys == []
    x, g = make_inputs(SMALL)
    assert torch.equal(source.eval()(x, g).residual, target.eval()(x, g).residual)


def test_authors_state_dict_path_refuses_other_gaps_and_warns_on_gamma():
    state = make_module(SMALL).state_dict()
    target = make_module(SMALL)
    with pytest.raises(RuntimeError, match="fc.weight"):
        target.load_authors_state_dict({k: v for k, v in state.items() if k != "fc.weight"})
    with pytest.raises(RuntimeError, match="extra.weight"):
        target.load_authors_state_dict({**state, "extra.weight": torch.zeros(1)})
    with pytest.warns(UserWarning, match="gamma"):
        target.load_authors_state_dict({k: v for k, v in state.items() if not k.startswith("temporal")})


def test_functional_form_equals_module_and_updates_buffers():
    module = make_module(SMALL).train()
    params = {k: v.clone() for k, v in module.state_dict().items()}
    x, g = make_inputs(SMALL)
    out_module = module(x, g)
    out_functional = dgsct(x, g, params, segments=SMALL.segments, alpha=module.alpha, beta=module.beta,
                           gamma=module.gamma, training=True)
    # equal up to rounding: matmul folds batch dims differently for tensors requiring grad
    for a, b, what in zip(out_module, out_functional, out_module._fields):
        assert_close(b, a, 1e-13, what)
    for name, buffer in module.named_buffers():
        assert_close(params[name], buffer, 1e-13, name)


def test_cumulative_batchnorm_momentum():
    module = make_module(SMALL).train()
    module.bn1.momentum = module.bn2.momentum = None
    x, g = make_inputs(SMALL)
    running = [module.bn1.running_mean.clone()]
    module(x, g)
    running.append(module.bn1.running_mean.clone())
    module(x * 2, g)
    # the cumulative average of two batches: the second update weighs 1/2
    first_mean = running[1]  # after one batch with factor 1 the buffer equals the batch mean
    second_only = make_module(SMALL).train()
    second_only.bn1.momentum = second_only.bn2.momentum = 1.0
    second_only(x * 2, g)
    assert_close(module.bn1.running_mean, (first_mean + second_only.bn1.running_mean) / 2, 1e-12, "cma")
    assert module.bn1.num_batches_tracked.item() == 2


class _NeverBackend(dispatch.Backend):
    """A backend that supports nothing, to exercise refusal and auto's skipping."""

    name = "never"
    rank = 100
    devices = ("cuda",)
    dtypes = (torch.float16,)
    description = "test-only"

    def shape_reasons(self, problem):
        return [] if problem.dims.tokens > 10 ** 6 else ["needs more than a million tokens"]

    def forward(self, *args):
        raise AssertionError("never runs")

    backward = forward


@pytest.fixture
def never_backend():
    backend = dispatch.register(_NeverBackend())
    yield backend
    del dispatch._REGISTRY[backend.name]


def test_forcing_an_unsupported_backend_lists_its_reasons(never_backend):
    module = make_module(SMALL, backend="never")
    x, g = make_inputs(SMALL)
    with pytest.raises(RuntimeError) as error:
        module(x, g)
    message = str(error.value)
    assert "'never'" in message and "device 'cpu'" in message and "float64" in message
    assert "million tokens" in message


def test_auto_skips_unsupported_backends_and_logs_once(never_backend, caplog):
    dispatch._announced.clear()
    module = make_module(SMALL)
    x, g = make_inputs(SMALL)
    with caplog.at_level(logging.INFO, logger="dgsct_kernels"):
        module(x, g)
        module(x, g)
    chosen = [r.getMessage() for r in caplog.records if "auto chose" in r.getMessage()]
    problem = dispatch.Problem.of(x, module.dims, True, True)
    best = next(b.name for b in dispatch.registered_backends()
                if b.supports(problem) and not b.auto_reasons(problem))  # cpu where built, else reference
    assert len(chosen) == 1 and f"'{best}'" in chosen[0] and "never:" in chosen[0]


def test_backend_precedence_scope_then_argument_then_environment(never_backend, monkeypatch):
    x, g = make_inputs(SMALL)
    monkeypatch.setenv("DGSCT_BACKEND", "never")
    with pytest.raises(RuntimeError, match="DGSCT_BACKEND"):
        make_module(SMALL)(x, g)
    make_module(SMALL, backend="reference")(x, g)  # the argument beats the environment
    with use_backend("reference"):
        make_module(SMALL, backend="never")(x, g)  # the scope beats the argument
    with use_backend("never"), pytest.raises(RuntimeError, match="use_backend"):
        make_module(SMALL, backend="reference")(x, g)
    monkeypatch.setenv("DGSCT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DGSCT_BACKEND='nonsense'"):
        make_module(SMALL)(x, g)


def test_unknown_backend_names_are_refused_up_front():
    with pytest.raises(ValueError, match="backend='fast'"):
        FusedDGSCT(16, 8, 6, 5, backend="fast")
    with pytest.raises(ValueError, match="backend='fast'"):
        with use_backend("fast"):
            pass
    assert "reference" in dgsct_kernels.backend_names()


def test_reference_backend_outputs_are_fresh_tensors():
    """The op must not return views of its inputs (torch.library's aliasing rule)."""
    module = make_module(SMALL).eval()
    x, g = make_inputs(SMALL)
    backend = dispatch.get_backend("reference")
    out = backend.forward(x, g, module.op_params(), module.hyper(), False)
    assert isinstance(out, RawOutputs)
    assert all(t.data_ptr() != x.data_ptr() for t in out if t.numel())
