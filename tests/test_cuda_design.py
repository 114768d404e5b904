"""The `cuda` backend without a GPU: its registration and build, and its math on the CPU.

`dgsct_kernels::cuda_forward_on_host` runs the CUDA forward's driver with the kernels'
own tile functions (csrc/cuda/dgsct_tiles.h) executed on the CPU, tile after tile;
`cuda_backward_on_host` runs the CUDA backward (ATen) on CPU tensors. Both are compared
with the float64 reference here. What only a GPU can check (launches, shared-memory
sizes, races within a block) is in tests/test_gpu.py.
"""
import os
import subprocess
import sys

import pytest
import torch
from _support import (
    ODD_SHAPES,
    SPEC_TOLERANCE,
    Case,
    assert_close,
    make_inputs,
    make_module,
    relative_error,
)

from dgsct_kernels import dispatch
from dgsct_kernels.backends.reference import forward_in_accumulation_dtype
from dgsct_kernels.config import OP_PARAM_NAMES
from dgsct_kernels.guide_path import plan_guide_path

cuda_backend = dispatch.get_backend("cuda")
HAS_HOST_OPS = hasattr(torch.ops.dgsct_kernels, "cuda_forward_on_host")
needs_host_ops = pytest.mark.skipif(not HAS_HOST_OPS, reason="dgsct_kernels._C not built")
OPTIONS = {"all-on": {}, "bare": {"use_bn": False, "use_gate": False, "ln_before": False, "ln_post": False},
           "bn-only": {"ln_before": False, "ln_post": False}}
# more than one tile per frame (64 tokens a tile at most), C not a multiple of the row block
MEDIUM = Case(frames=4, tokens=150, dim=40, guide_tokens=20, guide_dim=24, num_latents=6, reduction=4, segments=2)
CASES = ODD_SHAPES + [MEDIUM]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _order(case):
    return plan_guide_path(case.frames, case.tokens, case.guide_tokens, case.guide_dim, case.dim,
                           case.num_latents).order


def _setup(case, options, dtype, training, scale=1.0):
    """Inputs and parameters rounded to `dtype`, and the same values in float64 for the
    oracle (so only the computation's error counts, not the rounding of its inputs)."""
    module = make_module(case, gamma=0.2, **options).train(training)
    x64, g64 = (t.to(dtype).double() for t in make_inputs(case, scale=scale))
    params = {n: (p.to(dtype) if p is not None else None) for n, p in module.op_params().items()}
    params64 = {n: (p.double() if p is not None else None) for n, p in params.items()}
    return module, x64, g64, params64, params


@needs_host_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_tiles_on_host_match_reference(case, training, options, dtype):
    module, x64, g64, params64, params = _setup(case, options, dtype, training)
    hyper = list(module.hyper())
    want = forward_in_accumulation_dtype(x64, g64, params64, module.hyper(), training)
    slots = [params.get(n) for n in OP_PARAM_NAMES]
    got = torch.ops.dgsct_kernels.cuda_forward_on_host(x64.to(dtype), g64.to(dtype), slots, hyper, training,
                                                       _order(case))
    for field, expected, actual in zip(want._fields, want, got):
        assert actual.numel() == expected.numel(), field
        if expected.numel():
            if field.startswith("bn"):
                assert actual.dtype == torch.float32, field
            else:
                assert actual.dtype == dtype and actual.shape == expected.shape, field
            assert_close(actual, expected, SPEC_TOLERANCE[dtype], f"cuda host {dtype} {case} {field}")


@needs_host_ops
@pytest.mark.parametrize("order", ["rewritten", "tokens-first"])
def test_forward_on_host_both_guide_orders_and_large_inputs(order):
    """|x| up to 1e4 (SPEC.md "Numerics"): no NaN or Inf; as close to float64 as the
    reference computed in float32 (within 3x its error, or SPEC.md's 1e-4)."""
    module, x64, g64, params64, params = _setup(MEDIUM, {}, torch.float32, True, scale=1e4)
    want = forward_in_accumulation_dtype(x64, g64, params64, module.hyper(), True)
    ref32 = forward_in_accumulation_dtype(x64.float(), g64.float(), params, module.hyper(), True)
    got = torch.ops.dgsct_kernels.cuda_forward_on_host(
        x64.float(), g64.float(), [params.get(n) for n in OP_PARAM_NAMES], list(module.hyper()), True, order)
    for field, expected, actual, ref in zip(want._fields, want, got, ref32):
        assert torch.isfinite(actual).all(), field
        bound = max(1e-4, 3 * relative_error(ref, expected))
        assert_close(actual, expected, bound, f"{order} {field}")


# C = 1536 (AVE stage 4): fewer than 16 tokens fit a tile in 96 KiB (9 here), so the
# tensor-core products' 16-row blocks are partly empty and each frame spans three tiles.
WIDE = Case(frames=2, tokens=20, dim=1536, guide_tokens=6, guide_dim=16, num_latents=4, reduction=8, segments=2)


@needs_host_ops
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_on_host_with_tiles_under_16_tokens(training):
    test_forward_tiles_on_host_match_reference(WIDE, training, {}, torch.float32)


def _reference_grads(module, x64, g64, params64, training, grads_out):
    inputs = [x64.clone().requires_grad_(), g64.clone().requires_grad_()]
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params64.items()
              if p is not None and n in OP_PARAM_NAMES and "running_" not in n}
    out = forward_in_accumulation_dtype(*inputs, {**params64, **leaves}, module.hyper(), training)
    expected = torch.autograd.grad(out[:3], inputs + list(leaves.values()), grads_out, allow_unused=True)
    return dict(zip(["x", "g", *leaves], expected))


@needs_host_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_on_host_matches_reference(case, training, options, dtype):
    module, x64, g64, params64, params = _setup(case, options, dtype, training)
    gen = torch.Generator().manual_seed(3)
    grads_out = [torch.randn(case.frames, case.tokens, case.dim, generator=gen, dtype=torch.float64),
                 torch.randn(case.frames, case.tokens, generator=gen, dtype=torch.float64),
                 torch.randn(case.frames, generator=gen, dtype=torch.float64)]
    grads_out = [t.to(dtype).double() for t in grads_out]
    expected = _reference_grads(module, x64, g64, params64, training, grads_out)
    slots = [params.get(n) for n in OP_PARAM_NAMES]
    if training:  # what ops.py hands the backward in training: running buffers dropped
        slots = [x64.new_empty(0).to(dtype) if t is not None and "running_" in n else t
                 for n, t in zip(OP_PARAM_NAMES, slots)]
    flags = [1, 1] + [int(n in expected) for n in OP_PARAM_NAMES]
    actual = torch.ops.dgsct_kernels.cuda_backward_on_host(
        *[t.to(dtype) for t in grads_out], x64.to(dtype), g64.to(dtype), slots, list(module.hyper()), training,
        _order(case), flags)
    by_name = dict(zip(["x", "g", *OP_PARAM_NAMES], actual))
    # the reference's own float32 error sets the bar where a gradient is ill-conditioned
    # (training BatchNorm over 2 tokens makes d/dx nearly cancel)
    ref32 = _reference_grads(module, x64.float(), g64.float(),
                             {n: (p.float() if p is not None else None) for n, p in params64.items()},
                             training, [t.float() for t in grads_out])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    largest = max(e.abs().max().item() for e in expected.values())
    for name, e in expected.items():
        assert e is not None, name
        got = by_name[name]
        assert got.shape == e.shape and got.dtype == dtype, name
        ref_abs = (ref32[name].double() - e).abs().max().item()
        bound = max(tol, 3 * relative_error(ref32[name], e))
        assert_close(got, e, bound, f"cuda host backward {dtype} {case} grad {name}",
                     atol=3 * ref_abs + 1e-6 * largest)


@needs_host_ops
def test_backward_on_host_returns_only_wanted_gradients():
    case = ODD_SHAPES[1]
    module, x64, g64, _, params = _setup(case, {}, torch.float32, False)
    slots = [params.get(n) for n in OP_PARAM_NAMES]
    names = ["x", "g", *OP_PARAM_NAMES]
    for chosen in ({"x"}, {"g"}, {"fc_affine_video_1.weight", "up_sampler.weight"}, {"my_tokens"}):
        flags = [int(n in chosen) for n in names]
        out = torch.ops.dgsct_kernels.cuda_backward_on_host(
            torch.ones(case.frames, case.tokens, case.dim), torch.ones(case.frames, case.tokens),
            torch.ones(case.frames), x64.float(), g64.float(), slots, list(module.hyper()), False, _order(case),
            flags)
        for n, t in zip(names, out):
            assert (t.numel() > 0) == (n in chosen), (chosen, n)


@needs_host_ops
def test_bad_inputs_name_the_argument():
    case = ODD_SHAPES[0]
    module, x64, g64, _, params = _setup(case, {}, torch.float32, False)
    slots = [params.get(n) for n in OP_PARAM_NAMES]
    hyper, order = list(module.hyper()), _order(case)
    run = torch.ops.dgsct_kernels.cuda_forward_on_host
    x, g = x64.float(), g64.float()
    with pytest.raises(RuntimeError, match=r"x has dtype Double; expected float32, bfloat16 or float16"):
        run(x64, g64, slots, hyper, False, order)
    with pytest.raises(RuntimeError, match=r"g has dtype BFloat16, expected x's dtype Float"):
        run(x, g.bfloat16(), slots, hyper, False, order)
    with pytest.raises(RuntimeError, match=r"x must be \[F, N, C\]"):
        run(x[0], g, slots, hyper, False, order)
    with pytest.raises(RuntimeError, match=r"x has F=4 frames .* but g has F=3"):
        run(x, g[:3], slots, hyper, False, order)
    with pytest.raises(RuntimeError, match=r"params has 36 slots, expected 37"):
        run(x, g, slots[:-1], hyper, False, order)
    with pytest.raises(RuntimeError, match=r"hyper has 6 values, expected 7"):
        run(x, g, slots, hyper[:6], False, order)
    bad = list(slots)
    bad[OP_PARAM_NAMES.index("fc.weight")] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r"params\[fc.weight\] has shape \[3, 3\], expected \[16, 8\]"):
        run(x, g, bad, hyper, False, order)
    bad = list(slots)
    bad[OP_PARAM_NAMES.index("my_tokens")] = None
    with pytest.raises(RuntimeError, match=r"required parameter my_tokens is missing"):
        run(x, g, bad, hyper, False, order)
    bad = list(slots)
    bad[OP_PARAM_NAMES.index("bn2.bias")] = None
    with pytest.raises(RuntimeError, match=r"optional layer bn is partly given"):
        run(x, g, bad, hyper, False, order)
    with pytest.raises(RuntimeError, match=r"guide_order='sideways'"):
        run(x, g, slots, hyper, False, "sideways")
    with pytest.raises(RuntimeError, match=r"grad_residual has shape \[6, 16\], expected x's shape \[4, 6, 16\]"):
        torch.ops.dgsct_kernels.cuda_backward_on_host(
            x[0], torch.ones(4, 6), torch.ones(4), x, g, slots, hyper, False, order, [1] * 39)


def test_cuda_backend_is_registered_and_explains_itself():
    assert "cuda" in dispatch.backend_names()
    assert cuda_backend.devices == ("cuda",)
    problem = dispatch.Problem("cpu", torch.float32, make_module().dims, 4, True, True)
    assert any("device 'cpu'" in r for r in cuda_backend.not_supported_reasons(problem))
    why = cuda_backend.unavailable_reason()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("dgsct_kernels::fused_forward", "CUDA")
    assert (why is None) == has_kernel, why
    if why is not None:
        assert "CUDA kernels" in why or "not available" in why


def test_forcing_cuda_on_cpu_tensors_is_a_clear_error():
    module = make_module(backend="cuda").float()
    x, g = make_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(from backend argument\) cannot run"):
        module(x, g)


@pytest.mark.skipif(os.environ.get("DGSCT_REQUIRE_CUDA_EXTENSION") != "1",
                    reason="set DGSCT_REQUIRE_CUDA_EXTENSION=1 where the CUDA part must have been built (CI)")
def test_cuda_extension_was_built():
    from dgsct_kernels import extension_status
    built, detail = extension_status()["cuda"]
    assert built and detail.startswith("archs "), detail
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dgsct_kernels::fused_forward", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dgsct_kernels::fused_backward", "CUDA")
    out = subprocess.run([sys.executable, "-m", "dgsct_kernels.info"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "cuda extension: built (archs " in out, out
