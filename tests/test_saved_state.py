"""The state the cpu backend keeps from its forward for its backward (ops.py `keep_state`):
the backward reads it instead of re-running the guide path, nothing [F, N, C] is kept,
gradients still match the reference, and the op stays opcheck- and compile-clean."""
import copy
import re

import pytest
import torch

from dgsct_kernels import dispatch
from dgsct_kernels.config import OP_PARAM_NAMES
from dgsct_kernels.ops import dgsct_forward, pack_params
from _support import ODD_SHAPES, SMALL, Case, assert_close, make_inputs, make_module

cpu = dispatch.get_backend("cpu")
pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None,
                                reason=f"cpu backend unavailable: {cpu.unavailable_reason()}")
# K=4 with D=16 plans "rewritten", K=8 with D=6 "tokens-first" (guide_path.plan_guide_path)
REWRITTEN = Case(frames=4, tokens=24, dim=16, guide_tokens=20, guide_dim=16, num_latents=4)
TOKENS_FIRST = Case(frames=4, tokens=24, dim=16, guide_tokens=20, guide_dim=6, num_latents=8)
# tokens-first with D >= C: U [F, N, D] would be as large as x, so the backward recomputes it
WIDE_GUIDE = Case(frames=4, tokens=24, dim=10, guide_tokens=20, guide_dim=12, num_latents=8)
# rewritten with B = A Wtok [F, K, M] over a quarter of x (4 K M > N C, as at s1-visual):
# the backward recomputes B instead of keeping it
LARGE_B = Case(frames=4, tokens=24, dim=16, guide_tokens=40, guide_dim=16, num_latents=4)
CASES = {"rewritten": REWRITTEN, "tokens-first": TOKENS_FIRST, "tokens-first-wide-guide": WIDE_GUIDE,
         "rewritten-large-b": LARGE_B}
OPTIONS = {"all-on": {}, "bare": {"use_bn": False, "use_gate": False, "ln_before": False, "ln_post": False}}
_GUIDE_PHASE = re.compile(r"\[dgsct cpu\] guide\s+\d")  # guide_forward's line, not "guide bwd"


def _op_args(module, x, g, training, keep_state=True, backend="cpu"):
    tensors, layout = pack_params(module.op_params())
    return (x, g, tensors, layout, list(module.hyper()), training, backend, keep_state)


def _step(module, x, g):
    out = module(x, g)
    weight = torch.randn(out.residual.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    ((out.residual * weight).sum() + (out.spatial_map * torch.arange(x.shape[1], dtype=x.dtype)).sum()
     + (out.temporal_gate * 1.5).sum()).backward()


def test_planned_orders_of_the_cases():
    from dgsct_kernels.guide_path import plan_guide_path
    for name, c in CASES.items():
        plan = plan_guide_path(c.frames, c.tokens, c.guide_tokens, c.guide_dim, c.dim, c.num_latents)
        assert name.startswith(plan.order)


@pytest.mark.parametrize("name", CASES)
def test_backward_does_not_rerun_the_guide_path(name, capfd, monkeypatch):
    """DGSCT_CPU_PROFILE prints each phase: the backward restores instead of running `guide`."""
    case = CASES[name]
    module = make_module(case, backend="cpu").train()
    x, g = make_inputs(case)
    x.requires_grad_()
    out = module(x, g)
    monkeypatch.setenv("DGSCT_CPU_PROFILE", "1")
    capfd.readouterr()
    out.residual.sum().backward()
    phases = capfd.readouterr().err
    assert "[dgsct cpu] restore" in phases and not _GUIDE_PHASE.search(phases), phases
    # the plain op pair still recomputes (the check above can see a guide phase)
    raw = dgsct_forward(*_op_args(module, x.detach().requires_grad_(), g, True, keep_state=False))
    capfd.readouterr()
    raw[0].sum().backward()
    assert _GUIDE_PHASE.search(capfd.readouterr().err)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_saved_state_is_what_the_backward_reads(name, training):
    """fused_backward_saved with the kept state equals the recomputing fused_backward, and a
    changed prompt tensor R in the state changes the gradients (so it is read, not rebuilt)."""
    case = CASES[name]
    module = make_module(case, gamma=0.2).train(training)
    x, g = make_inputs(case)
    params = {n: p.detach() for n, p in module.op_params().items()}
    slots, hyper = [params.get(n) for n in OP_PARAM_NAMES], list(module.hyper())
    order = "rewritten" if name.startswith("rewritten") else "tokens-first"
    *out, saved = torch.ops.dgsct_kernels.fused_forward_saving(x, g, slots, hyper, training, order)
    plain = torch.ops.dgsct_kernels.fused_forward(x, g, slots, hyper, training, order)
    for a, b in zip(out, plain):
        assert torch.equal(a, b)
    grads = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(3)) for t in out[:3]]
    flags = [1, 1] + [int(p is not None and "running_" not in n) for n, p in zip(OP_PARAM_NAMES, slots)]
    kept = torch.ops.dgsct_kernels.fused_backward_saved(*grads, x, g, slots, saved, hyper, training, order, flags)
    again = torch.ops.dgsct_kernels.fused_backward_saved(*grads, x, g, slots, saved, hyper, training, order, flags)
    recomputed = torch.ops.dgsct_kernels.fused_backward(*grads, x, g, slots, hyper, training, order, flags)
    scale = recomputed[0].abs().max()
    for name, k, a, r in zip(["x", "g", *OP_PARAM_NAMES], kept, again, recomputed):
        assert torch.equal(k, a), f"grad {name} differs between two identical calls"
        if r.numel():
            assert_close(k, r, 1e-12, f"grad {name}", atol=1e-12 * scale)
    changed = [t.clone() for t in saved]
    changed[0].mul_(1.5)  # R
    moved = torch.ops.dgsct_kernels.fused_backward_saved(*grads, x, g, slots, changed, hyper, training, order, flags)
    assert not torch.allclose(moved[0], kept[0])


def test_saved_state_of_the_wrong_layout_is_refused():
    module = make_module(REWRITTEN)
    x, g = make_inputs(REWRITTEN)
    params = {n: p.detach() for n, p in module.op_params().items()}
    slots, hyper = [params.get(n) for n in OP_PARAM_NAMES], list(module.hyper())
    *out, saved = torch.ops.dgsct_kernels.fused_forward_saving(x, g, slots, hyper, True, "rewritten")
    flags = [1] * (2 + len(OP_PARAM_NAMES))
    with pytest.raises(RuntimeError, match=r"saved has \d+ tensors, expected \d+"):
        torch.ops.dgsct_kernels.fused_backward_saved(*out[:3], x, g, slots, saved[:-1], hyper, True, "rewritten",
                                                     flags)
    wrong = [*saved[:1], saved[1].float(), *saved[2:]]
    with pytest.raises(RuntimeError, match=r"saved\[1\] \(a\) is .*expected a CPU Double tensor"):
        torch.ops.dgsct_kernels.fused_backward_saved(*out[:3], x, g, slots, wrong, hyper, True, "rewritten", flags)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nothing_of_size_fnc_is_saved(name, dtype):
    """Every tensor autograd keeps that is not an input or a parameter is smaller than x,
    and none of them requires grad."""
    case = CASES[name]
    module = make_module(case, dtype=dtype, backend="cpu").train()
    x, g = make_inputs(case, dtype=dtype)
    x.requires_grad_(), g.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x, g)
    own = {t.untyped_storage().data_ptr() for t in [x, g, *module.parameters(), *module.buffers()]}
    state = [t for t in saved if t.untyped_storage().data_ptr() not in own and t.numel()]
    assert state, "the cpu backend kept no state"
    for t in state:
        assert t.numel() < x.numel(), f"saved {tuple(t.shape)} has >= F*N*C = {x.numel()} elements"
        assert not t.requires_grad
    out.residual.float().sum().backward()  # the saved state is consumed without error


def test_no_state_without_autograd(monkeypatch):
    """In eval under no_grad (or with nothing requiring grad) the forward keeps nothing."""
    calls = []
    original = cpu.forward_saving
    monkeypatch.setattr(cpu, "forward_saving", lambda *a, **k: calls.append(1) or original(*a, **k))
    module = make_module(SMALL, backend="cpu")
    x, g = make_inputs(SMALL)
    with torch.no_grad():
        module.eval()(x, g)
        module.train()(x, g)
    module.requires_grad_(False)
    module.eval()(x, g)
    assert calls == []
    module.requires_grad_(True)
    module.train()(x, g)
    assert calls == [1]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [*CASES.values(), *ODD_SHAPES], ids=str)
def test_gradients_match_reference(case, training, options):
    """float64 agreement with the reference to test_cpu_backend.py's 1e-8, through the module
    (so through the kept state)."""
    x, g = make_inputs(case)
    results = {}
    for backend in ("reference", "cpu"):
        module = make_module(case, gamma=0.2, backend=backend, **options).train(training)
        xi, gi = x.clone().requires_grad_(), g.clone().requires_grad_()
        _step(module, xi, gi)
        results[backend] = {"x": xi.grad, "g": gi.grad,
                            **{n: p.grad for n, p in module.named_parameters() if p.grad is not None}}
    want, got = results["reference"], results["cpu"]
    assert want.keys() == got.keys()
    scale = want["x"].abs().max()
    for name, expected in want.items():
        if expected.abs().max() <= 1e-9 * scale:  # zero in exact arithmetic
            assert got[name].abs().max() <= 1e-9 * scale, name
            continue
        assert_close(got[name], expected, 1e-8, f"cpu float64 grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_opcheck_with_kept_state(name, dtype):
    case = CASES[name]
    module = make_module(case, dtype=dtype)
    x, g = make_inputs(case, dtype=dtype)
    for training in (True, False):
        args = _op_args(module, x.clone().requires_grad_(), g.clone().requires_grad_(), training)
        assert len(dgsct_forward(*args)[7]) > 0
        torch.library.opcheck(dgsct_forward, args)


class _Block(torch.nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.adapter = make_module(case, dtype=torch.float32, backend="cpu")
        self.proj = torch.nn.Linear(case.dim, case.dim)

    def forward(self, x, g):
        out = self.adapter(x, g)
        return self.proj(x + out.residual).sum() + (out.spatial_map * 2).sum() + out.temporal_gate.sum()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_with_kept_state(training, monkeypatch):
    calls = []
    original = cpu.forward_saving
    monkeypatch.setattr(cpu, "forward_saving", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch._dynamo.reset()
    eager = _Block(REWRITTEN).train(training)
    compiled_model = copy.deepcopy(eager)
    x, g = make_inputs(REWRITTEN, dtype=torch.float32)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x.clone().requires_grad_(), g)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager(xe, g).backward()
        compiled(xc, g).backward()
        assert_close(xc.grad, xe.grad, 1e-5, f"grad x, step {step}")
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            if p_e.grad is not None:
                assert_close(p_c.grad, p_e.grad, 1e-5, f"grad {name}, step {step}")
    assert len(calls) >= 4  # eager and compiled steps both kept state


def test_empty_batch_with_kept_state():
    module = make_module(SMALL)
    x, g = make_inputs(SMALL)
    x0, g0 = x[:0].clone().requires_grad_(), g[:0]
    out = dgsct_forward(*_op_args(module, x0, g0, False))
    assert out[0].shape == x0.shape and all(t.shape[0] == 0 for t in out[7] if t.dim() > 1)
    out[0].sum().backward()
    assert x0.grad.shape == x0.shape


def test_b_is_kept_only_while_small():
    """B = A Wtok [F, K, M] is in the state unless it exceeds a quarter of x (csrc/cpu guide_keeps_b)."""
    def guide_shapes(case):
        module = make_module(case, backend="cpu")
        x, g = make_inputs(case)
        params = {n: p.detach() for n, p in module.op_params().items()}
        return [shape for shape, _ in cpu.saved_state_shapes(x, g, params, True)]
    F, K = REWRITTEN.frames, REWRITTEN.num_latents
    assert (F, K, REWRITTEN.guide_tokens) in guide_shapes(REWRITTEN)
    assert (F, K, LARGE_B.guide_tokens) not in guide_shapes(LARGE_B)
    assert len(guide_shapes(LARGE_B)) == len(guide_shapes(REWRITTEN)) - 1
