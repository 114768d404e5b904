"""Loads the compiled extension `dgsct_kernels._C` if it was built, warning once if not."""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Optional

_C: Optional[Any] = None
_load_error: Optional[str] = None

if importlib.util.find_spec(__package__ + "._C") is None:
    _load_error = "no compiled dgsct_kernels/_C module"
else:
    try:
        from . import _C  # type: ignore[no-redef]
    except ImportError as error:  # built against another torch, or a missing library
        _load_error = str(error).splitlines()[0] if str(error) else type(error).__name__
if _load_error is not None:
    warnings.warn(
        f"dgsct_kernels._C is not available ({_load_error}); only the pure-PyTorch backends "
        "run. Build it with: pip install --no-build-isolation -e .", RuntimeWarning, stacklevel=2)


def extension_status() -> dict[str, Any]:
    """What was compiled: {'cpu': (built, detail), 'cuda': (built, detail), 'info': dict}."""
    if _C is None:
        reason = f"import failed: {_load_error}"
        return {"cpu": (False, reason), "cuda": (False, reason), "info": {}}
    info = dict(_C.build_info())
    cuda = (True, "archs " + info["cuda_archs"]) if info["cuda_built"] else (False, info["cuda_reason"])
    return {"cpu": (True, info["compiler"]), "cuda": cuda, "info": info}
