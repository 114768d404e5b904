"""The precision plan is declared once, in dgsct_kernels/precision_plan.def: Python reads it
(dgsct_kernels.precision), the C++ sources expand it (csrc/precision_plan.h), the Triton
passes take their operand dtypes from it, and no backend runs a product in low precision
that the plan keeps in float32. Its numerical effect is checked by the parity tests
(tests/test_backend_parity.py: every backend and dtype against float64)."""
from pathlib import Path

import pytest
import torch

import dgsct_kernels
from dgsct_kernels import _extension, dispatch
from dgsct_kernels.precision import PLAN, _read_plan, describe, operand_dtype
from _support import assert_close

ROOT = Path(__file__).resolve().parents[1]


def test_plan_names_every_product_once_and_keeps_batch_normalised_ones_float32():
    assert list(PLAN) == ["guide", "prompt_logits", "prompt_mix", "channel", "spatial", "bottleneck"]
    # what train-mode BatchNorm magnifies stays float32 for every input dtype
    for product in ("guide", "prompt_logits", "prompt_mix", "bottleneck"):
        assert PLAN[product] == ()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert operand_dtype(product, dtype) == torch.float32


def test_operand_dtype_follows_the_input_where_the_plan_allows_it():
    assert operand_dtype("channel", torch.bfloat16) == torch.bfloat16
    assert operand_dtype("channel", torch.float16) == torch.float16
    assert operand_dtype("spatial", torch.bfloat16) == torch.bfloat16
    assert operand_dtype("channel", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="product='chanel'.*expected one of"):
        operand_dtype("chanel", torch.bfloat16)
    assert "channel bf16/fp16" in describe() and "guide float32" in describe()


def test_every_backend_runs_low_only_what_the_plan_allows():
    allowed = {name for name, dtypes in PLAN.items() if dtypes}
    for backend in dispatch.registered_backends():
        low = backend.low_precision_products
        if low is None:  # eager reference: the input dtype throughout
            assert backend.name == "reference"
            continue
        assert low <= allowed, (backend.name, low - allowed)


@pytest.mark.skipif(_extension._C is None, reason="the compiled extension is not built")
def test_cpp_sees_the_same_plan_and_the_cpu_backend_states_what_its_cpp_runs():
    assert _extension._C.precision_plan() == {name: list(dtypes) for name, dtypes in PLAN.items()}
    cpu = next(b for b in dispatch.registered_backends() if b.name == "cpu")
    assert set(_extension._C.cpu_low_precision_products()) == cpu.low_precision_products


def test_def_file_is_the_one_declaration_and_is_shipped():
    assert "precision_plan.def" in (ROOT / "setup.py").read_text()
    for source in (ROOT / "csrc").rglob("*"):
        if source.suffix in (".h", ".cpp", ".cu") and source.name != "precision_plan.h":
            assert '"prompt_logits"' not in source.read_text(), source
    # the Triton passes ask the plan rather than using the input dtype directly
    triton_dir = Path(dgsct_kernels.__file__).with_name("backends") / "triton"
    for source in triton_dir.glob("*.py"):
        assert "dot_dtype(x.dtype)" not in source.read_text(), source


def test_reader_refuses_a_malformed_plan(tmp_path):
    bad = tmp_path / "precision_plan.def"
    bad.write_text('// c\nDGSCT_PRODUCT(kGuide, "guide", "bf16")\nDGSCT_PRODUCT(kX, "x", "int8")\n')
    with pytest.raises(RuntimeError, match="cannot read"):
        _read_plan(bad)
    bad.write_text('DGSCT_PRODUCT(kGuide, "guide", "bf16")\nDGSCT_PRODUCT(kG, "guide", "")\n')
    with pytest.raises(RuntimeError, match="names unique"):
        _read_plan(bad)
    bad.write_text("// nothing\n")
    with pytest.raises(RuntimeError, match="no DGSCT_PRODUCT"):
        _read_plan(bad)


@pytest.mark.skipif(_extension._C is None, reason="the compiled extension is not built")
def test_cpu_bfloat16_meets_spec_tolerance_at_a_paper_shape():
    """The plan's reasons hold where BatchNorm's statistics are realistic: at stage 2's visual
    module (N 576, C 384, guide 1024 x 192), F = 10, train mode, every output and gradient of
    the cpu backend in bf16 is within SPEC.md's 2e-2 of float64 on the same rounded values.
    (Rounding the guide path too gave 0.033 on the residual: precision_plan.def.)"""
    from dgsct_kernels import FusedDGSCT
    torch.manual_seed(0)
    oracle = FusedDGSCT(384, 192, 576, 1024, backend="reference").double().train()
    with torch.no_grad():
        oracle.gate.fill_(1.0)
        oracle.gate_av.fill_(1.0)
        for t in oracle.parameters():
            t.copy_(t.bfloat16().double())
    module = FusedDGSCT(384, 192, 576, 1024, backend="cpu").bfloat16().train()
    module.load_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in oracle.state_dict().items()})
    x = torch.randn(10, 576, 384, dtype=torch.bfloat16)
    g = torch.randn(10, 1024, 192, dtype=torch.bfloat16)
    weight = torch.randn(10, 576, 384, dtype=torch.float64)
    results = []
    for m, dtype in ((oracle, torch.float64), (module, torch.bfloat16)):
        xi, gi = x.to(dtype).requires_grad_(), g.to(dtype).requires_grad_()
        residual, spatial_map, temporal_gate = m(xi, gi)
        (residual.double() * weight).sum().backward()
        grads = {"x": xi.grad, "g": gi.grad, **{n: p.grad for n, p in m.named_parameters() if p.grad is not None}}
        results.append(((residual, spatial_map, temporal_gate), grads))
    (want, want_grads), (got, got_grads) = results
    for name, a, b in zip(("residual", "spatial_map", "temporal_gate"), got, want):
        assert_close(a, b, 2e-2, f"cpu bf16 {name}")
    scale = want_grads["x"].abs().max()
    for name, expected in want_grads.items():
        if expected.abs().max() <= 1e-9 * scale:  # zero in exact arithmetic (bias before train BN)
            continue
        assert_close(got_grads[name], expected, 2e-2, f"cpu bf16 grad {name}")
