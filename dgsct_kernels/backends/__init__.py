"""Backends register themselves with `dgsct_kernels.dispatch` when imported here."""
from . import reference, triton  # noqa: F401
