"""The precision plan: which of the op's matrix products may take the inputs' bf16/fp16
dtype as operands (float32 accumulation) and which keep float32 operands.

Declared once, in precision_plan.def (with the reasons), for every backend: the C++
sources expand it (csrc/precision_plan.h) and the Triton passes read `operand_dtype`.
Each backend states which of the plan's low-precision products it runs so
(`Backend.low_precision_products`); `python -m dgsct_kernels.info` prints both.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _read_plan(path: Path = Path(__file__).with_name("precision_plan.def")) -> dict[str, tuple[str, ...]]:
    """precision_plan.def's DGSCT_PRODUCT(kName, "name", "dtypes") lines: {name: dtypes}, in order."""
    plan: dict[str, tuple[str, ...]] = {}
    for line in path.read_text().splitlines():
        line = line.split("//", 1)[0].strip()
        if not line:
            continue
        entry = re.fullmatch(r'DGSCT_PRODUCT\(\s*k\w+\s*,\s*"([a-z_]+)"\s*,\s*"([a-z0-9 ]*)"\s*\)', line)
        dtypes = tuple(entry.group(2).split()) if entry else ()
        if entry is None or entry.group(1) in plan or not set(dtypes) <= set(LOW_PRECISION_DTYPES):
            raise RuntimeError(f"{path}: cannot read {line!r}; expected one DGSCT_PRODUCT(kName, \"name\", "
                               f"\"dtypes\") per product, names unique, dtypes from {sorted(LOW_PRECISION_DTYPES)}")
        plan[entry.group(1)] = dtypes
    if not plan:
        raise RuntimeError(f"{path}: no DGSCT_PRODUCT lines")
    return plan


# product name -> the low-precision input dtypes whose type its operands take
PLAN: dict[str, tuple[str, ...]] = _read_plan()


def operand_dtype(product: str, input_dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of `product` for inputs of `input_dtype`: the input's own bf16/fp16
    where the plan lists it for that product, else float32."""
    if product not in PLAN:
        raise ValueError(f"product={product!r}: expected one of {sorted(PLAN)}")
    if any(LOW_PRECISION_DTYPES[name] == input_dtype for name in PLAN[product]):
        return input_dtype
    return torch.float32


def describe() -> str:
    """The plan in one line, for `python -m dgsct_kernels.info`."""
    return "; ".join(f"{name} {'/'.join(dtypes) if dtypes else 'float32'}" for name, dtypes in PLAN.items())
