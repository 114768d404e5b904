"""dgsct-kernels: fused DG-SCT (dual-guided spatial-channel-temporal attention) for PyTorch.

Public API: `FusedDGSCT` (the module), `dgsct` (the functional form), `DGSCTOutput`,
and backend selection (`use_backend`, `backend_names`, `get_backend`).
"""
from ._extension import extension_status  # noqa: F401  (warns once if _C is missing)
from . import backends  # noqa: F401  (registers the backends)
from .dispatch import backend_names, get_backend, use_backend
from .functional import DGSCTOutput, dgsct
from .module import FusedDGSCT

__all__ = ["FusedDGSCT", "dgsct", "DGSCTOutput", "use_backend", "backend_names", "get_backend"]
__version__ = "0.1.0"
