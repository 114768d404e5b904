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

ROOT = Path(__file__).resolve().parents[1]


def test_plan_names_every_product_once_and_keeps_batch_normalised_ones_float32():
    assert list(PLAN) == ["guide", "prompt_logits", "prompt_mix", "channel", "spatial", "bottleneck"]
    # what train-mode BatchNorm magnifies stays float32 for every input dtype
    for product in ("prompt_logits", "prompt_mix", "bottleneck"):
        assert PLAN[product] == ()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert operand_dtype(product, dtype) == torch.float32


def test_operand_dtype_follows_the_input_where_the_plan_allows_it():
    assert operand_dtype("channel", torch.bfloat16) == torch.bfloat16
    assert operand_dtype("channel", torch.float16) == torch.float16
    assert operand_dtype("guide", torch.bfloat16) == torch.bfloat16
    assert operand_dtype("guide", torch.float16) == torch.float32  # bf16 only (precision_plan.def)
    assert operand_dtype("channel", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="product='chanel'.*expected one of"):
        operand_dtype("chanel", torch.bfloat16)
    assert "guide bf16" in describe() and "bottleneck float32" in describe()


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
