"""Hard inputs: NaN/Inf in x or g, an empty batch, and batches of varying size under
torch.compile(dynamic=True), on every backend that runs here.

Documented behaviour for non-finite inputs (README, "Hard inputs"): no backend crashes or
hangs, and each is non-finite exactly where the float reference is. In eval a NaN/Inf
reaches the residual and spatial map of its own frame (and, through the pooled guide,
that frame's temporal gate); in training BatchNorm's batch statistics mix every frame,
so every residual is non-finite. A running-buffer entry whose batch statistic is not
finite keeps its previous value.
"""
import pytest
import torch

from _support import SMALL, assert_close, make_inputs, make_module, runnable_backends

CASE = SMALL  # F=4, segments=2


BACKENDS = runnable_backends(torch.float32, CASE)


def _non_finite(out):
    return [~torch.isfinite(t) for t in out]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("where, value", [("x", float("nan")), ("x", float("inf")),
                                          ("g", float("nan")), ("g", float("-inf"))])
def test_non_finite_inputs(backend, training, where, value):
    x, g = make_inputs(CASE, dtype=torch.float32)
    (x if where == "x" else g)[1, 2, 3] = value
    runs = {}
    for name in dict.fromkeys(["reference", backend]):
        module = make_module(CASE, dtype=torch.float32, gamma=0.2, backend=name).train(training)
        buffers = {n: b.clone() for n, b in module.named_buffers() if "running" in n}
        xg, gg = x.clone().requires_grad_(), g.clone().requires_grad_()
        out = module(xg, gg)
        sum(o.sum() for o in out).backward()  # the backward must not crash or hang either
        assert xg.grad.shape == x.shape and gg.grad.shape == g.shape
        runs[name] = out
        for n, before in buffers.items():
            after = module.get_buffer(n)
            assert torch.isfinite(after).all(), f"{backend}: {n} became non-finite"
            if training:  # every statistic is non-finite here: nothing may move
                assert torch.equal(after, before), f"{backend}: {n} changed on a non-finite batch"
    want, got = _non_finite(runs["reference"]), _non_finite(runs[backend])
    for field, w, h in zip(runs[backend]._fields, want, got):
        assert torch.equal(h, w), (f"{backend} {field}: non-finite at {h.nonzero().tolist()[:6]}, "
                                   f"the reference at {w.nonzero().tolist()[:6]}")
    # where both are finite, they agree
    for field, a, b in zip(runs[backend]._fields, runs[backend], runs["reference"]):
        finite = torch.isfinite(b)
        if finite.any():
            assert_close(a[finite], b[finite], 1e-3, f"{backend} {field} (finite part)")
    if not training:  # eval: frames other than the poisoned one stay finite
        assert torch.isfinite(runs[backend].residual[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_in_eval(backend):
    module = make_module(CASE, dtype=torch.float32, backend=backend).eval()
    x = torch.empty(0, CASE.tokens, CASE.dim, requires_grad=True)
    g = torch.empty(0, CASE.guide_tokens, CASE.guide_dim, requires_grad=True)
    out = module(x, g)
    assert out.residual.shape == (0, CASE.tokens, CASE.dim)
    assert out.spatial_map.shape == (0, CASE.tokens)
    assert out.temporal_gate.shape == (0, CASE.segments)
    sum(o.sum() for o in out).backward()
    assert x.grad.shape == x.shape and g.grad.shape == g.shape
    for name, p in module.named_parameters():  # an empty batch contributes nothing
        assert p.grad is None or not p.grad.any(), name
    with torch.no_grad():
        assert module(x, g).residual.shape == (0, CASE.tokens, CASE.dim)


def test_empty_batch_in_training_names_x():
    module = make_module(CASE, dtype=torch.float32).train()
    x, g = torch.empty(0, CASE.tokens, CASE.dim), torch.empty(0, CASE.guide_tokens, CASE.guide_dim)
    with pytest.raises(ValueError, match=r"x: frame count F=0 \(shape \(0, 6, 16\)\) in training mode"):
        module(x, g)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_dynamic_over_batch_sizes(backend):
    """One compiled graph serves every F (a multiple of segments=2) with two or more clips:
    results match eager and new batch sizes compile nothing. A single clip (F=2) may add
    one graph: torch specialises size-1 dimensions (here F // segments)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    if backend not in BACKENDS:
        pytest.skip(f"{backend} does not run here")
    torch._dynamo.reset()
    module = make_module(CASE, dtype=torch.float32, backend=backend).train()
    reference = make_module(CASE, dtype=torch.float32, backend=backend).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, dynamic=True, fullgraph=True)
    compiles = []
    for frames in (4, 6, 8, 12, 20, 2):
        case = type(CASE)(**{**CASE.__dict__, "frames": frames})
        x, g = make_inputs(case, dtype=torch.float32, seed=frames)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xc, g), reference(xe, g)
        for field in got._fields:
            assert_close(getattr(got, field), getattr(want, field), 1e-5, f"F={frames} {field}")
        got.residual.sum().backward()
        want.residual.sum().backward()
        assert_close(xc.grad, xe.grad, 1e-5, f"F={frames} grad x")
        compiles.append(counter.frame_count)
    for (name, b_c), (_, b_e) in zip(module.named_buffers(), reference.named_buffers()):
        assert_close(b_c.float(), b_e.float(), 1e-5, f"buffer {name}")
    # compiles after each call; the first may count twice (dynamo restarts its analysis
    # once to specialise the module's float hyper-parameters)
    assert len(set(compiles[:5])) == 1, f"graphs compiled after F=4, 6, 8, 12, 20: {compiles[:5]}"
    assert compiles[5] - compiles[4] <= 1, f"F=2 compiled {compiles[5] - compiles[4]} graphs"
