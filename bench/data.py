"""The benchmark workloads W1..W4, shared by hvae's and the PyTorch peer's runs.

=====  ===================================  ===============  ==========  =====
name   data                                 latent_dims      hidden_dims batch
=====  ===================================  ===============  ==========  =====
W1     digits, 1797 x 64, pixels / 16       (8,)             (64,)       64
W2     Fashion-MNIST train, 60000 x 784,    (32,)            (512, 256)  128
       pixels / 255
W3     as W2                                (32, 16)         (512, 256)  128
W4     as W2                                (64, 32, 16,     (256, 128)  128
                                            8, 4)
=====  ===================================  ===============  ==========  =====

All four use a Bernoulli likelihood. Digits have no separate test split, so
W1's X_test is the training data itself (W1 measures speed, not held-out
fit); W2..W4 test on Fashion-MNIST's 10000 test images.

Fashion-MNIST is looked for in the directory named by ``HVAE_FASHION_MNIST``,
then in ``shared/data/fashion-mnist`` beside the repository, then in Debian's
``/usr/share/datasets/fashion-mnist``. Data are read only when a workload that
needs them is requested, and read once per process.

Requires ``hvae`` to be importable (installed, or the repository root on
``sys.path``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from hvae.datasets import load_digits, load_fashion_mnist

__all__ = ["WORKLOAD_NAMES", "workloads", "find_fashion_mnist", "fashion_mnist_split",
           "quality_arguments"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# Architecture and batch size of each workload; the data are attached lazily.
_SPECS = {
    "W1": dict(data="digits", latent_dims=(8,), hidden_dims=(64,), batch_size=64),
    "W2": dict(data="fashion-mnist", latent_dims=(32,), hidden_dims=(512, 256), batch_size=128),
    "W3": dict(data="fashion-mnist", latent_dims=(32, 16), hidden_dims=(512, 256), batch_size=128),
    "W4": dict(
        data="fashion-mnist",
        latent_dims=(64, 32, 16, 8, 4),
        hidden_dims=(256, 128),
        batch_size=128,
    ),
}
WORKLOAD_NAMES = tuple(_SPECS)


def find_fashion_mnist():
    """The first directory holding Fashion-MNIST's four IDX files.

    Returns
    -------
    directory : pathlib.Path

    Raises
    ------
    FileNotFoundError
        Listing every directory tried.
    """
    candidates = []
    if os.environ.get("HVAE_FASHION_MNIST"):
        candidates.append(Path(os.environ["HVAE_FASHION_MNIST"]))
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "fashion-mnist")
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    for directory in candidates:
        if all(
            (directory / f"{stem}.gz").is_file() or (directory / stem).is_file()
            for stem in stems
        ):
            return directory
    tried = ", ".join(str(directory) for directory in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {tried}. Set HVAE_FASHION_MNIST to a "
        "directory holding the four IDX files, or install the Debian package "
        "dataset-fashion-mnist."
    )


@functools.lru_cache(maxsize=None)
def _load(data):
    """(X_train, X_test) for a data-set key, read once per process."""
    if data == "digits":
        X = load_digits(return_y=False)
        return X, X
    directory = find_fashion_mnist()
    X_train = load_fashion_mnist("train", path=directory, return_y=False)
    X_test = load_fashion_mnist("test", path=directory, return_y=False)
    return X_train, X_test


def workloads(names=None):
    """The benchmark workloads, with their data loaded.

    Parameters
    ----------
    names : iterable of str, optional
        Which of ``WORKLOAD_NAMES`` to return, in that order; all four when
        None. Fashion-MNIST is read only if one of W2..W4 is asked for.

    Returns
    -------
    workloads : list of dict
        Each with ``name``, ``X_train`` (n_train, D) and ``X_test``
        (n_test, D) float32 arrays in [0, 1], ``latent_dims``,
        ``hidden_dims``, ``batch_size`` and ``likelihood`` ("bernoulli").
        Workloads on the same data share the same arrays: do not write to
        them.
    """
    names = WORKLOAD_NAMES if names is None else tuple(names)
    unknown = [name for name in names if name not in _SPECS]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; known: {list(WORKLOAD_NAMES)}")
    result = []
    for name in names:
        spec = _SPECS[name]
        X_train, X_test = _load(spec["data"])
        result.append(
            {
                "name": name,
                "X_train": X_train,
                "X_test": X_test,
                "latent_dims": spec["latent_dims"],
                "hidden_dims": spec["hidden_dims"],
                "batch_size": spec["batch_size"],
                "likelihood": "bernoulli",
            }
        )
    return result


def quality_arguments(parser, json_name, epochs=10, ll_rows=1000, ll_samples=1000):
    """The options the Fashion-MNIST quality scripts share (bench/quality.py,
    vamp.py, discrete.py): epochs, training rows, the log-likelihood's rows
    and draws, threads and where the JSON goes."""
    results = Path(__file__).resolve().parent / "results"
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--train-rows", type=int, default=60000)
    parser.add_argument("--ll-rows", type=int, default=ll_rows)
    parser.add_argument("--ll-samples", type=int, default=ll_samples)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(results / json_name))
    return parser


def fashion_mnist_split(train_rows):
    """Fashion-MNIST's first ``train_rows`` training images and its 10,000
    test images, float32 C-contiguous in [0, 1] (labels dropped)."""
    path = find_fashion_mnist()
    X_train, _ = load_fashion_mnist("train", path=path)
    X_test, _ = load_fashion_mnist("test", path=path)
    return np.ascontiguousarray(X_train[:train_rows]), X_test
