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
    return [b.name for b in dispatch.registered_backends() if "cuda" in b.devices and b.name != "reference"]


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
