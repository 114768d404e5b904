"""Backends register themselves with `dgsct_kernels.dispatch` when imported here."""
from . import cpu, cuda, reference, triton  # noqa: F401
