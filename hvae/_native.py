"""Loads the compiled core.

When hvae was built against the scipy-openblas32 wheel, importing that
package first loads its OpenBLAS into the process, so that the extension
finds it even where its run-time search path does not point (in-place and
editable builds).
"""
try:  # pragma: no cover - depends on how hvae was built
    import scipy_openblas32  # noqa: F401
except ImportError:
    pass

from ._core import (  # noqa: E402
    MAX_HIDDEN,
    MAX_LAYERS,
    DivergenceError,
    Model,
    blas_info,
    get_num_threads,
    set_num_threads,
)

__all__ = ["MAX_HIDDEN", "MAX_LAYERS", "DivergenceError", "Model", "blas_info",
           "get_num_threads", "set_num_threads"]
