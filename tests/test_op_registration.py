"""The torch.library op: opcheck, fake shapes, and torch.compile(fullgraph=True) through it."""
import copy

import pytest
import torch

from dgsct_kernels import dispatch
from dgsct_kernels.ops import dgsct_forward, pack_params
from _support import SMALL, Case, assert_close, make_inputs, make_module


def _op_args(module, x, g, training, backend="reference"):
    tensors, layout = pack_params(module.op_params())
    return (x, g, tensors, layout, list(module.hyper()), training, backend)


def _float32_cpu_backends():
    probe = dispatch.Problem("cpu", torch.float32, make_module(SMALL).dims, SMALL.frames, True, True)
    return [b.name for b in dispatch.registered_backends() if b.supports(probe)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", [{}, {"use_bn": False, "use_gate": False}], ids=["all-on", "bare"])
def test_opcheck(training, options):
    module = make_module(SMALL, **options)
    x, g = make_inputs(SMALL)
    torch.library.opcheck(dgsct_forward, _op_args(module, x.requires_grad_(), g.requires_grad_(), training))


@pytest.mark.parametrize("backend", _float32_cpu_backends())
def test_opcheck_float32(backend):
    module = make_module(SMALL, dtype=torch.float32)
    x, g = make_inputs(SMALL, dtype=torch.float32)
    for training in (True, False):
        torch.library.opcheck(dgsct_forward, _op_args(module, x.clone().requires_grad_(), g, training, backend))


def test_fake_shapes_match_real_outputs():
    module = make_module(SMALL)
    x, g = make_inputs(SMALL)
    from torch._subclasses.fake_tensor import FakeTensorMode
    for training in (True, False):
        real = dgsct_forward(*_op_args(module, x, g, training))
        with FakeTensorMode() as mode:
            fake_args = _op_args(module, mode.from_tensor(x), mode.from_tensor(g), training)
            fake_args = (fake_args[0], fake_args[1], [mode.from_tensor(t) for t in fake_args[2]], *fake_args[3:])
            fake = dgsct_forward(*fake_args)
        real, fake = [*real[:7], *real[7]], [*fake[:7], *fake[7]]  # the last output is a list
        assert len(real) == len(fake)
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


class _Block(torch.nn.Module):
    """A model around FusedDGSCT, as an encoder block uses it."""

    def __init__(self, case: Case):
        super().__init__()
        self.adapter = make_module(case, dtype=torch.float32)
        self.proj = torch.nn.Linear(case.dim, case.dim)

    def forward(self, x, g):
        out = self.adapter(x, g)
        y = self.proj(x + out.residual)
        return y.sum() + (out.spatial_map * 2).sum() + out.temporal_gate.sum()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(training):
    torch._dynamo.reset()
    eager = _Block(SMALL).train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, g = make_inputs(SMALL, dtype=torch.float32)
    for step in range(2):  # the second call reuses the graph; BatchNorm buffers keep advancing
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager(xe, g).backward()
        compiled(xc, g).backward()
        assert_close(xc.grad, xe.grad, 1e-5, f"grad x, step {step}")
        for (name, b_e), (_, b_c) in zip(eager.named_buffers(), compiled_model.named_buffers()):
            assert_close(b_c.float(), b_e.float(), 1e-6, f"buffer {name}, step {step}")
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            if p_e.grad is not None:
                assert_close(p_c.grad, p_e.grad, 1e-5, f"grad {name}, step {step}")


def test_compile_inductor_fullgraph_runs():
    """The default inductor backend compiles a model holding the op without graph breaks."""
    torch._dynamo.reset()
    model = _Block(SMALL).train()
    compiled = torch.compile(model, fullgraph=True)
    x, g = make_inputs(SMALL, dtype=torch.float32)
    compiled(x.requires_grad_(), g).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    explanation = torch._dynamo.explain(_Block(SMALL).train())(x.detach(), g)
    assert explanation.graph_break_count == 0, explanation.break_reasons
