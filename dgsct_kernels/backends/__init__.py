"""Backends register themselves with `dgsct_kernels.dispatch` when imported here."""
from . import cpu, reference, triton  # noqa: F401
