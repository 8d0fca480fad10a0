"""hvae: hierarchical variational autoencoders trained fast on the CPU.

:class:`HierarchicalVAE` is the scikit-learn estimator, :class:`VaDE` the
clusterer built on it (a mixture-of-Gaussians prior); :class:`Model` is the
low-level model whose parameters live in C buffers; :mod:`hvae.datasets`
loads the bundled and on-disk data sets without downloading anything;
:func:`load` reads a model written by :meth:`HierarchicalVAE.save`;
:mod:`hvae.plot` draws training curves, samples, reconstructions and latent
spaces (with matplotlib, imported only when a plot is drawn);
:mod:`hvae.distributed` trains data-parallel over MPI (``fit(X, comm=...)``,
with mpi4py, imported only when a communicator is passed);
:func:`gradient_draws` and :func:`gradient_variance` draw many independent
gradient estimates of one minibatch, to compare the gradient estimators.
A fit that leaves a latent layer without active units warns with
:class:`PosteriorCollapseWarning`.
"""
from ._collapse import PosteriorCollapseWarning
from ._native import DivergenceError, Model, blas_info, get_num_threads, set_num_threads
from .estimator import HierarchicalVAE
from .clustering import VaDE
from .file_format import load
from .gradients import gradient_draws, gradient_variance
from . import distributed  # noqa: E402  (cheap: mpi4py is imported when it is used)
from . import plot  # noqa: E402  (cheap: matplotlib is imported when a plot is drawn)
from . import metrics  # noqa: E402  (disentanglement metrics; scikit-learn imported on use)

__version__ = "0.1.0"

__all__ = ["DivergenceError", "HierarchicalVAE", "Model", "PosteriorCollapseWarning", "VaDE",
           "blas_info", "get_num_threads", "gradient_draws", "gradient_variance", "load",
           "set_num_threads", "__version__"]
