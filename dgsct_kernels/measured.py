"""Which GPU backend measured fastest, per device, dtype, mode and shape: what `auto` reads.

`auto` chooses between the GPU backends (triton, cuda) by measured speed only, never by
guess. After a CUDA run, `benchmarks/run.py` writes `winners.json` next to its rows; the
rows of a reviewed, committed run are copied into `measured_winners.json` beside this file.
A call whose (GPU, dtype, mode, N, C, M, D) has no row is run by neither GPU backend
unless it is selected explicitly.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .config import Dims

TABLE_PATH = Path(__file__).with_name("measured_winners.json")
FIELDS = ("device_name", "dtype", "mode", "N", "C", "M", "D", "winner")


def _key(device_name: str, dtype: str, mode: str, tokens: int, dim: int, guide_tokens: int,
         guide_dim: int) -> tuple:
    return (device_name, dtype, mode, int(tokens), int(dim), int(guide_tokens), int(guide_dim))


@functools.lru_cache(maxsize=None)
def load_table(path: Path = TABLE_PATH) -> dict[tuple, str]:
    """{(device, dtype, mode, N, C, M, D): winner} from a winners file (a list of rows)."""
    rows = json.loads(Path(path).read_text())
    table = {}
    for i, row in enumerate(rows):
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}; expected the fields {list(FIELDS)}")
        table[_key(*(row[f] for f in FIELDS[:-1]))] = row["winner"]
    return table


def measured_winner(device_name: str, dtype: torch.dtype, training: bool, dims: Dims) -> str | None:
    mode = "train-fwd+bwd" if training else "eval-fwd"
    key = _key(device_name, str(dtype).replace("torch.", ""), mode, dims.tokens, dims.dim,
               dims.guide_tokens, dims.guide_dim)
    return load_table().get(key)


@torch._dynamo.assume_constant_result
def current_cuda_device_name() -> str:
    # a constant for torch.compile: `auto` may run while a graph is traced
    return torch.cuda.get_device_name(torch.cuda.current_device())


def gpu_auto_reasons(backend: str, device_type: str, dtype: torch.dtype, training: bool,
                     dims: Dims) -> list[str]:
    """Why `auto` should not pick GPU backend `backend` for this call (empty: it measured fastest)."""
    if device_type != "cuda":
        return []  # the backend refuses such calls anyway
    device = current_cuda_device_name()
    winner = measured_winner(device, dtype, training, dims)
    if winner is None:
        return [f"not yet measured on {device} at this shape, dtype and mode; select it "
                f"explicitly with backend={backend!r}"]
    if winner != backend:
        return [f"measured slower than {winner!r} on {device} at this shape, dtype and mode"]
    return []
