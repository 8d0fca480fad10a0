"""hvae: hierarchical variational autoencoders trained fast on the CPU.

The estimator :class:`HierarchicalVAE` follows scikit-learn's conventions;
:class:`Model` is the low-level model held in C buffers.
"""
from ._native import DivergenceError, Model, blas_info, get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = ["DivergenceError", "Model", "blas_info", "get_num_threads",
           "set_num_threads", "__version__"]
