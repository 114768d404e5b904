"""Backend registry and choice.

Each backend states what it supports through `not_supported_reasons(problem)`; `auto`
picks the highest-ranked backend with no reasons and logs its choice once per kind of
call. The choice comes from, in order: a `use_backend(...)` scope, the module's or
call's `backend=` argument, the environment variable DGSCT_BACKEND, then `auto`.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .config import Dims, Hyper
from .reference import RawOutputs

logger = logging.getLogger("dgsct_kernels")

AUTO = "auto"
ENV_VAR = "DGSCT_BACKEND"


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can run a call."""

    device_type: str
    dtype: torch.dtype
    dims: Dims
    frames: int
    training: bool
    use_bn: bool

    @staticmethod
    def of(x: Tensor, dims: Dims, training: bool, use_bn: bool,
           dtype: Optional[torch.dtype] = None) -> "Problem":
        """`dtype`: the dtype the call computes in when it differs from x's (autocast)."""
        return Problem(x.device.type, dtype or x.dtype, dims, x.shape[0], training, use_bn)


class Backend(abc.ABC):
    """One way to compute the operator. Subclasses register an instance with `register`."""

    name: ClassVar[str]
    # auto prefers higher ranks among backends that support a call
    rank: ClassVar[int]
    devices: ClassVar[tuple[str, ...]]
    dtypes: ClassVar[tuple[torch.dtype, ...]]
    description: ClassVar[str]
    # the products of the precision plan (precision.py) this backend runs with bf16/fp16
    # operands for bf16/fp16 inputs, a subset of the plan's low-precision products; None:
    # not governed by the plan (every product in the input dtype, as eager PyTorch)
    low_precision_products: ClassVar[Optional[frozenset[str]]] = frozenset()

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (None: it can)."""
        return None

    # State the forward may keep for the backward (ops.py, keep_state): by default none, and
    # the backward recomputes what it needs. A backend that keeps state overrides all three.
    def saved_state_shapes(self, x, g, params, training) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of what `forward_saving` keeps, without running anything."""
        return []

    def forward_saving(self, x, g, params, hyper, training):
        """(the forward's outputs, the kept state as a list of tensors)."""
        return self.forward(x, g, params, hyper, training), []

    def backward_saved(self, grads, x, g, params, hyper, training, wanted, saved):
        raise NotImplementedError(f"backend {self.name!r} keeps no state for its backward, "
                                  f"got {len(saved)} saved tensors")

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if problem.device_type not in self.devices:
            reasons.append(f"device {problem.device_type!r} not in {list(self.devices)}")
        if problem.dtype not in self.dtypes:
            reasons.append(f"dtype {problem.dtype} not in {[str(d) for d in self.dtypes]}")
        return reasons + self.shape_reasons(problem)

    def shape_reasons(self, problem: Problem) -> list[str]:
        """Backend-specific limits on sizes or modes; empty when all are supported."""
        return []

    def auto_reasons(self, problem: Problem) -> list[str]:
        """Why `auto` should not pick this backend although it can run (it may be forced)."""
        return []

    def path_note(self, problem: Problem) -> str:
        """Appended to auto's announcement: which inner path the backend takes here, if any."""
        return ""

    def roofline_works(self, problem: Problem) -> Optional[list]:
        """The forward's kernels as roofline `Work` (roofline.py), for auto's estimate between
        GPU backends that have not been measured; None when the backend has no cost model."""
        return None

    def supports(self, problem: Problem) -> bool:
        return not self.not_supported_reasons(problem)

    @abc.abstractmethod
    def forward(self, x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper,
                training: bool) -> RawOutputs:
        """SPEC.md's forward; returns fresh tensors (never views of the inputs)."""

    @abc.abstractmethod
    def backward(self, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                 params: Mapping[str, Optional[Tensor]], hyper: Hyper, training: bool,
                 wanted: Sequence[str]) -> dict[str, Tensor]:
        """Gradients of (residual, spatial_map, temporal_gate) for the inputs named in
        `wanted` ("x", "g" or parameter names), recomputing what the forward did not keep."""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY or backend.name == AUTO:
        raise ValueError(f"backend name {backend.name!r} is already taken")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend={name!r}: unknown; expected one of {backend_names()}") from None


def backend_names() -> list[str]:
    return [AUTO] + sorted(_REGISTRY)


def registered_backends() -> list[Backend]:
    return sorted(_REGISTRY.values(), key=lambda b: -b.rank)


def check_backend_name(name: str, argument: str = "backend") -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"{argument}={name!r}: unknown; expected one of {backend_names()}")
    return name


_scope = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every DG-SCT call in this block (this thread) on `name` ("auto" re-enables auto)."""
    check_backend_name(name)
    previous = getattr(_scope, "name", None)
    _scope.name = name
    try:
        yield
    finally:
        _scope.name = previous


def requested_backend(argument: str = AUTO) -> tuple[str, str]:
    """(name, where it came from) by the precedence scope > argument > environment."""
    scoped = getattr(_scope, "name", None)
    if scoped is not None:
        return scoped, "use_backend scope"
    if argument != AUTO:
        return argument, "backend argument"
    env = os.environ.get(ENV_VAR, "")
    if env:
        return check_backend_name(env, ENV_VAR), f"environment variable {ENV_VAR}"
    return AUTO, "default"


_announced: set[tuple] = set()
# Two threads making the first call of a kind at once would both pass the membership test
# and log twice; the check-and-add happens under this lock (the fast path stays lock-free).
_announced_lock = threading.Lock()


def announce(name: str, device_type: str, dtype: torch.dtype, training: bool,
             message: Optional[Callable[[], str]] = None) -> None:
    """Log once per (backend, device, dtype, mode) which backend ran.

    `resolve` announces with its reasons in eager mode; under torch.compile it cannot
    log while tracing, so the op announces when it runs (whichever comes first wins).
    `message` is built only when logged: formatting F while tracing would specialise a
    dynamic batch size.
    """
    if torch.compiler.is_compiling():  # first: a look into the set would become a guard
        return
    key = (name, device_type, dtype, training)
    if key in _announced:
        return
    with _announced_lock:
        if key in _announced:
            return
        _announced.add(key)
    mode = "training" if training else "eval"
    logger.info(message() if message else f"dgsct_kernels: backend {name!r} ran {device_type} "
                f"{str(dtype).replace('torch.', '')} {mode}")


def resolve(problem: Problem, argument: str = AUTO) -> Backend:
    """The backend that runs `problem`; raises with every backend's reasons if none can."""
    name, source = requested_backend(argument)
    if name != AUTO:
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            raise RuntimeError(f"backend {name!r} (from {source}) cannot run this call "
                               f"({_describe(problem)}): " + "; ".join(reasons))
        announce(name, problem.device_type, problem.dtype, problem.training,
                 lambda: f"dgsct_kernels: backend {name!r} (from {source}) runs {_describe(problem)}")
        return backend
    rejected = []
    for backend in registered_backends():
        reasons = backend.not_supported_reasons(problem) or backend.auto_reasons(problem)
        if not reasons:
            announce(backend.name, problem.device_type, problem.dtype, problem.training,
                     lambda: f"dgsct_kernels: auto chose backend {backend.name!r} for "
                     f"{_describe(problem)}" + backend.path_note(problem)
                     + (f" (skipped: {'; '.join(rejected)})" if rejected else ""))
            return backend
        rejected.append(f"{backend.name}: {', '.join(reasons)}")
    raise RuntimeError(f"no backend can run {_describe(problem)}: " + "; ".join(rejected))


def _describe(p: Problem) -> str:
    d = p.dims
    mode = "training" if p.training else "eval"
    return (f"{p.device_type} {str(p.dtype).replace('torch.', '')} {mode} F={p.frames} "
            f"N={d.tokens} C={d.dim} M={d.guide_tokens} D={d.guide_dim}")
