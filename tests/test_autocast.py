"""torch.autocast: the op casts x, g and the float32 parameters to the region's dtype once,
every backend computes in that dtype, and float32 parameters get float32 gradients.

Under autocast a call is, by construction, the same call on the module cast to the
autocast dtype: outputs and gradients must be bit-identical to that explicit call, and
within SPEC.md's tolerance of float64.
"""
import copy

import pytest
import torch

from dgsct_kernels import FusedDGSCT, dispatch
from _support import SPEC_TOLERANCE, Case, assert_close, make_inputs, make_module, runnable_backends

CASE = Case(frames=4, tokens=6, dim=16, guide_tokens=5, guide_dim=8)
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _loss(out):
    ramp = torch.linspace(-1, 1, out.residual.numel(), device=out.residual.device).view_as(out.residual)
    return ((out.residual.float() * ramp).sum() + out.spatial_map.float().pow(2).sum()
            + out.temporal_gate.float().sum())


def _run(module, x, g, autocast_dtype=None):
    """Forward + backward; returns outputs, input grads, parameter grads and buffers."""
    x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = module(x, g)
    _loss(out).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return out, (x.grad, g.grad), grads, buffers


@pytest.mark.parametrize("backend", runnable_backends(torch.bfloat16, CASE))
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_is_the_explicit_low_precision_call(backend, dtype, training):
    """float32 module and float32 inputs under autocast == the module and inputs cast to
    `dtype`, bit for bit; parameter gradients come back float32, buffers stay float32."""
    master = make_module(CASE, dtype=torch.float32, gamma=0.2, backend=backend).train(training)
    explicit = copy.deepcopy(master).to(dtype)
    x, g = make_inputs(CASE, dtype=torch.float32)

    out, (grad_x, grad_g), grads, buffers = _run(master, x, g, autocast_dtype=dtype)
    want, (want_x, want_g), want_grads, want_buffers = _run(explicit, x.to(dtype), g.to(dtype))

    for field in out._fields:
        got = getattr(out, field)
        assert got.dtype == dtype, f"{field}: dtype {got.dtype}, expected the autocast dtype {dtype}"
        assert torch.equal(got, getattr(want, field)), f"{backend} {field} differs from the explicit {dtype} call"
    assert grad_x.dtype == torch.float32 and grad_g.dtype == torch.float32
    assert torch.equal(grad_x, want_x.float()) and torch.equal(grad_g, want_g.float())
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, f"grad {name}: dtype {grad.dtype}, expected float32 (master weight)"
        assert torch.equal(grad, want_grads[name].float()), f"{backend} grad {name} differs"
    for name, buffer in buffers.items():
        assert buffer.dtype == master.get_buffer(name).dtype
        if buffer.is_floating_point():  # float32 update from float32 statistics
            assert_close(buffer, want_buffers[name].float(), 1e-2, f"{backend} buffer {name}")


@pytest.mark.parametrize("backend", runnable_backends(torch.bfloat16, CASE))
def test_autocast_within_tolerance_of_float64(backend):
    """x comes out of a Linear layer (bf16 under autocast), g is float32: the issue's first call."""
    module = make_module(CASE, dtype=torch.float32, gamma=0.2, backend=backend).eval()
    project = torch.nn.Linear(CASE.dim, CASE.dim)
    x, g = make_inputs(CASE, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        projected = project(x)
        assert projected.dtype == torch.bfloat16 and g.dtype == torch.float32
        out = module(projected, g)
        oracle_module = copy.deepcopy(module).double()
        oracle_module.backend = "reference"
        oracle = oracle_module(projected.double(), g.double())
    for field in out._fields:
        assert_close(getattr(out, field), getattr(oracle, field), SPEC_TOLERANCE[torch.bfloat16],
                     f"{backend} {field} under bf16 autocast")


def test_outside_autocast_the_dtype_contract_holds():
    module = make_module(CASE, dtype=torch.float32)
    x, g = make_inputs(CASE, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"g: dtype torch\.float32 differs from x's dtype torch\.bfloat16"):
        module(x.bfloat16(), g)
    with pytest.raises(TypeError, match=r"params\['conv_adapter\.weight'\]: dtype torch\.float32 differs"):
        module(x.bfloat16(), g.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        with pytest.raises(TypeError, match="g: dtype"):
            module(x.bfloat16(), g)


def test_autocast_leaves_float64_alone():
    """As torch's autocast: a float64 call runs in float64, and float64 mixed with float32
    keeps the explicit error."""
    module = make_module(CASE, dtype=torch.float64).eval()
    x, g = make_inputs(CASE, dtype=torch.float64)
    with torch.no_grad():
        want = module(x, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = module(x, g)
            with pytest.raises(TypeError, match="g: dtype torch.float32 differs"):
                module(x, g.float())
    assert got.residual.dtype == torch.float64 and torch.equal(got.residual, want.residual)


def test_autocast_on_the_registered_op_directly():
    """Callers of torch.ops.dgsct_kernels.forward get the same casting as the module."""
    from dgsct_kernels.ops import pack_params
    module = make_module(CASE, dtype=torch.float32).eval()
    x, g = make_inputs(CASE, dtype=torch.float32)
    tensors, layout = pack_params(module.op_params())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.dgsct_kernels.forward(x, g.bfloat16(), tensors, layout, list(module.hyper()),
                                              False, "reference")
    assert out[0].dtype == torch.bfloat16


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_under_autocast(training):
    """No graph break, and the compiled autocast call equals the eager autocast call."""
    torch._dynamo.reset()
    eager = make_module(CASE, dtype=torch.float32, gamma=0.2, backend="cpu").train(training)
    compiled_module = copy.deepcopy(eager)
    x, g = make_inputs(CASE, dtype=torch.float32)

    def step(module, x, g):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, g)
        return _loss(out)

    explanation = torch._dynamo.explain(step)(copy.deepcopy(eager), x, g)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        step(eager, xe, g).backward()
        compiled(compiled_module, xc, g).backward()
        assert torch.equal(xc.grad, xe.grad)
        for (name, b_e), (_, b_c) in zip(eager.named_buffers(), compiled_module.named_buffers()):
            assert torch.equal(b_c, b_e), f"buffer {name}"
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_module.named_parameters()):
            if p_e.grad is not None:
                assert p_c.grad.dtype == torch.float32
                assert torch.equal(p_c.grad, p_e.grad), f"grad {name}"


def _scaled_step(module, x, g, scaler, optimizer):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = module(x, g)
        loss = _loss(out)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_grad_scaler_skips_an_overflowing_fp16_step():
    """A scale so large that the fp16 gradients overflow: the scaler finds non-finite
    gradients, skips the step (parameters unchanged) and lowers the scale. The forward was
    finite, so BatchNorm's running buffers did advance, as with torch.nn.BatchNorm2d."""
    module = make_module(CASE, dtype=torch.float32, backend="cpu").train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    running_before = module.bn1.running_mean.clone()
    x, g = make_inputs(CASE, dtype=torch.float32)
    _scaled_step(module, x, g, scaler, optimizer)
    assert scaler.get_scale() < 2.0 ** 40, "the scaler did not see the overflow"
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed on a skipped step"
    assert not torch.equal(module.bn1.running_mean, running_before)
    assert torch.isfinite(module.bn1.running_mean).all()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # a sane scale: the step runs
    _scaled_step(module, x, g, scaler, optimizer)
    assert scaler.get_scale() == 2.0 ** 8
    assert not torch.equal(module.fc.weight, before["fc.weight"])


def test_forward_overflow_keeps_running_buffers():
    """Inputs beyond fp16's range overflow in the forward: the batch statistics are not
    finite, so the running buffers keep their values instead of turning NaN."""
    module = make_module(CASE, dtype=torch.float32, backend="cpu").train()
    buffers = {n: b.clone() for n, b in module.named_buffers() if "running" in n}
    x, g = make_inputs(CASE, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = module(x * 1e6, g)
    assert not torch.isfinite(out.residual).all()
    for name, value in buffers.items():
        assert torch.equal(module.get_buffer(name), value), f"{name} changed"
    assert module.bn1.num_batches_tracked.item() == 1


def test_tiny_ave_model_trains_two_steps_under_bf16_autocast():
    """The whole AVE model: two Adam steps under bf16 autocast follow the float32 run."""
    from dgsct_kernels.models import build_dgsct
    from dgsct_kernels.models.heads.ave import ave_loss
    torch.manual_seed(0)
    model = build_dgsct("ave", "tiny", encoders_eval=True)  # eval encoders: no random drops
    for module in model.modules():
        if isinstance(module, FusedDGSCT):
            with torch.no_grad():
                module.gate.fill_(0.5)  # open the gates, so the modules change the features
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 10, 3, model.image_size, model.image_size, generator=generator)
    audio = 0.1 * torch.randn(2, 10, model.segment_samples, generator=generator)
    labels = torch.zeros(2, 10, 29)  # AVE's 28 events + background, one-hot per segment
    labels[..., -1] = 1
    labels[0, 3:6, -1], labels[0, 3:6, 2] = 0, 1

    def train(amp):
        replica = copy.deepcopy(model)
        optimizer = torch.optim.Adam([p for p in replica.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = replica(frames=frames, audio=audio)
                loss, _ = ave_loss(out, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            for p in replica.parameters():
                assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
        return losses

    full, mixed = train(False), train(True)
    assert full[1] < full[0] and mixed[1] < mixed[0], (full, mixed)
    for step, (a, b) in enumerate(zip(full, mixed)):
        assert abs(a - b) <= SPEC_TOLERANCE[torch.bfloat16] * abs(a), f"step {step}: float32 {a}, bf16 {b}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_cuda_autocast_every_gpu_backend(dtype):
    probe = dispatch.Problem("cuda", dtype, make_module(CASE).dims, CASE.frames, True, True)
    backends = [b.name for b in dispatch.registered_backends() if b.supports(probe)]
    assert backends, "no backend runs on CUDA"
    x, g = (t.cuda() for t in make_inputs(CASE, dtype=torch.float32))
    for backend in backends:
        master = make_module(CASE, dtype=torch.float32, gamma=0.2, backend=backend).cuda().train()
        explicit = copy.deepcopy(master).to(dtype)
        with torch.autocast("cuda", dtype=dtype):
            out = master(x, g)
        want = explicit(x.to(dtype), g.to(dtype))
        for field in out._fields:
            assert getattr(out, field).dtype == dtype
            assert torch.equal(getattr(out, field), getattr(want, field)), f"{backend} {field}"
        _loss(out).backward()
        assert all(p.grad.dtype == torch.float32 for p in master.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_grad_scaler():
    module = make_module(CASE, dtype=torch.float32).cuda().train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x, g = (t.cuda() for t in make_inputs(CASE, dtype=torch.float32))
    before = module.fc.weight.detach().clone()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    _scaled_step(module, x, g, scaler, optimizer)
    assert scaler.get_scale() < 2.0 ** 40 and torch.equal(module.fc.weight, before)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    _scaled_step(module, x, g, scaler, optimizer)
    assert not torch.equal(module.fc.weight, before)
