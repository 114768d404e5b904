"""GPU checks at the paper's AVE shapes (F = 80). Run by benchmarks/gpu_suite.sh.

Skipped without a CUDA device; the device is queried when a test runs, never at import.
"""
import sys
from pathlib import Path

import pytest
import torch

from dgsct_kernels import dispatch
from _support import SPEC_TOLERANCE, assert_close, relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import AVE_SHAPES  # noqa: E402

pytestmark = pytest.mark.gpu
FRAMES = 80
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def _gpu_backends():
    # backends this build can run on a GPU (triton importable, CUDA kernels compiled); the
    # check reads the build only, it never queries a device
    return [b.name for b in dispatch.registered_backends()
            if "cuda" in b.devices and b.name != "reference" and b.unavailable_reason() is None]


def _module(shape, dtype, device, backend="reference", seed=0):
    from dgsct_kernels import FusedDGSCT
    torch.manual_seed(seed)
    module = FusedDGSCT(shape.dim, shape.guide_dim, shape.tokens, shape.guide_tokens, gamma=0.05,
                        backend=backend)
    with torch.no_grad():  # open the zero-initialised gates so every term counts
        module.gate.fill_(1.0)
        module.gate_av.fill_(1.0)
    return module.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", AVE_SHAPES, ids=lambda s: s.label)
def test_forward_parity_at_ave_shapes(cuda, backend, dtype, training, shape):
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device=cuda).manual_seed(1)
    x = torch.randn(FRAMES, shape.tokens, shape.dim, device=cuda, generator=generator).to(dtype)
    g = torch.randn(FRAMES, shape.guide_tokens, shape.guide_dim, device=cuda, generator=generator).to(dtype)
    with torch.no_grad():
        want = _module(shape, dtype, cuda).double().train(training)(x.double(), g.double())
        ref = _module(shape, dtype, cuda).train(training)(x, g)
        got = _module(shape, dtype, cuda, backend).train(training)(x, g)
    for field in want._fields:
        expected = getattr(want, field)
        bound = min(SPEC_TOLERANCE[dtype], 3 * relative_error(getattr(ref, field), expected) + 1e-5)
        assert_close(getattr(got, field), expected, bound, f"{backend} {dtype} {shape.label} {field}")


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_at_a_stage_4_shape(cuda, backend, dtype):
    shape = next(s for s in AVE_SHAPES if s.label == "s4-visual")
    generator = torch.Generator(device=cuda).manual_seed(2)
    x = torch.randn(FRAMES, shape.tokens, shape.dim, device=cuda, generator=generator).to(dtype)
    g = torch.randn(FRAMES, shape.guide_tokens, shape.guide_dim, device=cuda, generator=generator).to(dtype)
    weight = torch.randn(x.shape, device=cuda, generator=generator, dtype=torch.float64)
    grads = {}
    for name, module_dtype in (("oracle", torch.float64), ("reference", dtype), (backend, dtype)):
        module = _module(shape, dtype, cuda, "reference" if name == "oracle" else name).to(module_dtype).train()
        xi = x.to(module_dtype).requires_grad_()
        out = module(xi, g.to(module_dtype))
        ((out.residual.double() * weight).sum() + out.spatial_map.double().sum()).backward()
        grads[name] = [xi.grad] + [p.grad for n, p in module.named_parameters() if p.grad is not None]
    for got, ref, want in zip(grads[backend], grads["reference"], grads["oracle"]):
        bound = max(SPEC_TOLERANCE[dtype], 3 * relative_error(ref, want) + 1e-5)
        assert_close(got, want, bound, f"{backend} {dtype} gradient")


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_gradient_in_train_and_eval_at_a_stage_3_shape(cuda, backend, training):
    """Every gradient (x, g, each parameter) against float64, both modes, bf16 and fp32."""
    shape = next(s for s in AVE_SHAPES if s.label == "s3-audio")
    generator = torch.Generator(device=cuda).manual_seed(4)
    x = torch.randn(FRAMES, shape.tokens, shape.dim, device=cuda, generator=generator)
    g = torch.randn(FRAMES, shape.guide_tokens, shape.guide_dim, device=cuda, generator=generator)
    weight = torch.randn(x.shape, device=cuda, generator=generator, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float32):
        grads = {}
        for name, module_dtype in (("oracle", torch.float64), ("reference", dtype), (backend, dtype)):
            module = _module(shape, dtype, cuda, "reference" if name == "oracle" else name).to(module_dtype)
            module.train(training)
            xi = x.to(dtype).to(module_dtype).requires_grad_()
            gi = g.to(dtype).to(module_dtype).requires_grad_()
            out = module(xi, gi)
            ((out.residual.double() * weight).sum() + out.spatial_map.double().sum()
             + out.temporal_gate.double().sum()).backward()
            grads[name] = [xi.grad, gi.grad] + [p.grad for p in module.parameters() if p.grad is not None]
        assert len(grads[backend]) == len(grads["oracle"])
        for got, ref, want in zip(grads[backend], grads["reference"], grads["oracle"]):
            bound = max(SPEC_TOLERANCE[dtype], 3 * relative_error(ref, want) + 1e-5)
            assert_close(got, want, bound, f"{backend} {dtype} {'train' if training else 'eval'} gradient")


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_shapes(cuda, backend, dtype, training):
    """Shapes that are no multiple of any tile: outputs and gradients against float64."""
    from _support import ODD_SHAPES, Case, make_inputs, make_module
    cases = ODD_SHAPES + [Case(frames=4, tokens=150, dim=40, guide_tokens=20, guide_dim=24, num_latents=6,
                               reduction=4, segments=2)]
    for case in cases:
        x64, g64 = (t.to(dtype).double().to(cuda) for t in make_inputs(case))
        results = {}
        for name in ("oracle", "reference", backend):
            module = make_module(case, gamma=0.2, backend="reference" if name == "oracle" else name)
            module = module.to(cuda).to(dtype)
            if name == "oracle":
                module = module.double()
            module.train(training)
            xi = (x64 if name == "oracle" else x64.to(dtype)).clone().requires_grad_()
            gi = (g64 if name == "oracle" else g64.to(dtype)).clone().requires_grad_()
            out = module(xi, gi)
            (out.residual.double().sum() + (out.spatial_map.double() ** 2).sum()
             + out.temporal_gate.double().sum()).backward()
            results[name] = [out.residual, out.spatial_map, out.temporal_gate, xi.grad, gi.grad] + [
                p.grad for p in module.parameters() if p.grad is not None]
        for got, ref, want in zip(results[backend], results["reference"], results["oracle"]):
            bound = max(SPEC_TOLERANCE[dtype], 3 * relative_error(ref, want) + 1e-5)
            assert_close(got, want, bound, f"{backend} {dtype} {case}", atol=1e-6)


@pytest.mark.parametrize("shape", AVE_SHAPES, ids=lambda s: s.label)
def test_cuda_forward_writes_no_token_by_channel_temporaries(cuda, shape):
    """torch.cuda memory statistics: the cuda backend's forward allocates nothing the size of
    an [F, N, C] intermediate besides its output (z [F, N, C/r], the guide path's
    [F, K, *] products and per-tile partial sums are allowed)."""
    if dispatch.get_backend("cuda").unavailable_reason():
        pytest.skip(dispatch.get_backend("cuda").unavailable_reason())
    from dgsct_kernels.guide_path import plan_guide_path
    dtype = torch.bfloat16
    module = _module(shape, dtype, cuda, "cuda").train()
    x = torch.randn(FRAMES, shape.tokens, shape.dim, device=cuda, dtype=dtype)
    g = torch.randn(FRAMES, shape.guide_tokens, shape.guide_dim, device=cuda, dtype=dtype)
    with torch.no_grad():
        module(x, g)  # warm-up: cuBLAS workspaces, lazy initialisation
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        module(x, g)
        torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    F, N, C, M, D, K = FRAMES, shape.tokens, shape.dim, shape.guide_tokens, shape.guide_dim, 32
    H = C // 8
    order = plan_guide_path(F, N, M, D, C, K).order
    guide = F * M * D * 4 * 2 + (F * K * (M + N) * 4 * 4 if order == "rewritten" else F * N * D * 4 * 3)
    allowed = (F * N * C * 2  # the output o
               + F * N * H * 4 + F * N * 4 * 4  # z; s, spatial map and its softmax
               + guide + F * K * C * 4 * 4 + (8 << 20))
    one_intermediate = F * N * C * 2  # the smallest [F, N, C] temporary (bf16)
    assert grown < allowed + one_intermediate // 2, (
        f"{shape.label}: the forward allocated {grown / 2**20:.1f} MiB at peak; allowed "
        f"{allowed / 2**20:.1f} MiB, one [F, N, C] bf16 temporary is {one_intermediate / 2**20:.1f} MiB")


@pytest.mark.parametrize("backend", _gpu_backends())
def test_tiny_ave_model_trains_a_step_on_the_gpu(cuda, backend):
    """The model layer end to end on the GPU: forward, the AVE loss, backward, finite gradients
    that reach the first block's DG-SCT modules."""
    pytest.importorskip("timm", reason="the model layer needs timm")
    from dgsct_kernels.models import build_dgsct
    from dgsct_kernels.models.heads.ave import ave_loss

    model = build_dgsct(task="ave", preset="tiny", backend=backend).to(cuda).train()
    batch = 2
    generator = torch.Generator(device=cuda).manual_seed(3)
    frames = torch.randn(batch, 10, 3, model.image_size, model.image_size, device=cuda,
                         generator=generator)
    audio = torch.randn(batch, 10, model.segment_samples, device=cuda, generator=generator)
    labels = torch.nn.functional.one_hot(torch.randint(0, 29, (batch, 10), device=cuda), 29).float()
    loss, _ = ave_loss(model(frames=frames, audio=audio), labels)
    loss.backward()
    assert torch.isfinite(loss)
    first = model.encoder.vis_adapter_blocks_p1[0]
    assert first.gate.grad is not None and torch.isfinite(first.gate.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
