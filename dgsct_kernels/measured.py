"""How `auto` chooses between the GPU backends (triton, cuda): measured speed first, then an estimate.

1. Measured. After a CUDA run, `benchmarks/run.py` writes `winners.json` next to its rows;
   the rows of a reviewed, committed run are copied into `measured_winners.json` beside
   this file. A call whose (GPU, dtype, mode, N, C, M, D) has a row goes to its winner.
2. Estimated, while no measurement exists for the call. Among the GPU backends that can
   run it and whose kernels passed the full compile report for this GPU's architecture
   (`compile_status.json`, written by `python python/compile_report.py`: no spill, tensor
   cores in every product kernel, shared memory within the limit), auto takes the one with
   the lower roofline floor (dgsct_kernels/roofline.py) for the forward of this call, and
   logs once that the choice is an estimate. A backend absent from the status file, or
   on an architecture the report did not check, is not chosen by auto.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from pathlib import Path

import torch

from .config import Dims

TABLE_PATH = Path(__file__).with_name("measured_winners.json")
STATUS_PATH = Path(__file__).with_name("compile_status.json")
logger = logging.getLogger("dgsct_kernels")
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


@torch._dynamo.assume_constant_result
def current_cuda_arch() -> int:
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    return 10 * major + minor


def checked_arch(arch: int) -> int | None:
    """The architecture of the compile report that covers `arch`: sm_80 itself; sm_86, sm_87
    and sm_89 by sm_89 (the same 99 KB shared-memory limit); sm_90. None for the others."""
    return {80: 80, 86: 89, 87: 89, 89: 89, 90: 90}.get(arch)


@functools.lru_cache(maxsize=None)
def load_compile_status(path: Path = STATUS_PATH) -> dict[str, frozenset[int]]:
    """{backend: architectures where every kernel of that backend compiled clean}."""
    if not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text())
    return {name: frozenset(int(a) for a in archs) for name, archs in data.get("clean", {}).items()}


def compile_clean(backend: str, arch: int) -> bool:
    checked = checked_arch(arch)
    return checked is not None and checked in load_compile_status().get(backend, frozenset())


def gpu_auto_reasons(backend: str, problem) -> list[str]:
    """Why `auto` should not pick GPU backend `backend` for `problem` (empty: pick it)."""
    if problem.device_type != "cuda":
        return []  # the backend refuses such calls anyway
    device = current_cuda_device_name()
    winner = measured_winner(device, problem.dtype, problem.training, problem.dims)
    if winner is not None:
        return [] if winner == backend else [f"measured slower than {winner!r} on {device} at this shape, "
                                             "dtype and mode"]
    choice, floors = estimated_winner(problem, current_cuda_arch(), device)
    if choice is None:
        return [f"not yet measured on {device} at this shape, dtype and mode, and no GPU backend passed the "
                f"compile report for sm_{current_cuda_arch()}; select it explicitly with backend={backend!r}"]
    if choice != backend:
        why = (f"{floors[backend] * 1e6:.0f} us" if backend in floors
               else f"not in the compile report's clean list for sm_{current_cuda_arch()}")
        return [f"not measured; roofline estimate {why} against {choice!r}'s {floors[choice] * 1e6:.0f} us"]
    _log_estimate_once(problem, device, choice, floors)
    return []


@functools.lru_cache(maxsize=None)
def estimated_winner(problem, arch: int, device: str) -> tuple[str | None, dict[str, float]]:
    """The compile-clean GPU backend with the lowest forward roofline floor, and the floors."""
    from . import dispatch
    from .roofline import peaks_for, total_seconds

    peaks = peaks_for(device)
    floors = {}
    for candidate in dispatch.registered_backends():
        if "cuda" not in candidate.devices or not compile_clean(candidate.name, arch):
            continue
        if candidate.not_supported_reasons(problem):
            continue
        works = candidate.roofline_works(problem)
        if works:
            floors[candidate.name] = total_seconds(works, peaks)
    if not floors:
        return None, {}
    return min(floors, key=floors.get), floors


_logged: set = set()
_logged_lock = threading.Lock()


def _log_estimate_once(problem, device: str, choice: str, floors: dict[str, float]) -> None:
    if torch.compiler.is_compiling():  # first: a look into the set would become a guard
        return
    key = (problem, device, choice, tuple(sorted(floors)))
    with _logged_lock:  # concurrent first calls log once
        if key in _logged:
            return
        _logged.add(key)
    listed = ", ".join(f"{name} {seconds * 1e6:.0f} us" for name, seconds in sorted(floors.items()))
    logger.info(f"dgsct_kernels: no measurement on {device} for this call; auto's choice of {choice!r} is a "
                f"roofline estimate of the forward ({listed}), not a measured winner")
