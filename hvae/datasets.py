"""Loaders for the data sets used in hvae's examples, tests and benchmarks.

Nothing here downloads anything: every loader reads files that are already on
the machine (scikit-learn's bundled digits, or IDX files that the user or a
Debian package put on disk) and says where it looked when it finds nothing.

All image loaders return pixels as float32 scaled to [0, 1], one flattened
image per row, which is what a Bernoulli likelihood expects.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["load_digits", "read_idx", "load_fashion_mnist", "load_mnist"]

# IDX type codes (the third magic byte) and the big-endian dtype each one
# stores. The format is Yann LeCun's MNIST format; every multi-byte value is
# big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"

# Where Debian's `dataset-fashion-mnist` package installs its files.
_DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_DEBIAN_MNIST_DIR = Path("/usr/share/datasets/mnist")

# File-name prefix of each split in the standard (Fashion-)MNIST layout.
_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


def load_digits(return_y=True):
    """Load scikit-learn's bundled 8x8 handwritten digits.

    The data ship inside scikit-learn, so this never touches the network.

    Parameters
    ----------
    return_y : bool, default=True
        Whether to also return the digit labels.

    Returns
    -------
    X : ndarray of shape (1797, 64), dtype float32
        Pixel intensities divided by 16, so in [0, 1].
    y : ndarray of shape (1797,), dtype int64
        Digit labels 0..9. Only returned when ``return_y`` is True.
    """
    # Imported here so that `import hvae.datasets` stays cheap.
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    X = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(
        np.float32, copy=False
    )
    if not return_y:
        return X
    return X, np.asarray(bunch.target, dtype=np.int64)


def read_idx(path):
    """Read an IDX file (the MNIST file format) into a NumPy array.

    The file may be gzip-compressed; compression is detected from the first
    two bytes (``1f 8b``), not from the file name.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.

    Returns
    -------
    array : ndarray
        An array with the shape given in the file's header and the dtype given
        by its type code (uint8, int8, int16, int32, float32 or float64), in
        native byte order, writable, and owning its memory.

    Raises
    ------
    ValueError
        If the file is not a well-formed IDX file: a bad magic number, an
        unknown type code, no dimensions, a header or data section shorter
        than the header promises, trailing bytes, or a corrupt gzip stream.
        The message names the file and the problem.
    FileNotFoundError
        If ``path`` does not exist.

    Notes
    -----
    Layout: two zero bytes, a type code byte, a byte with the number of
    dimensions ``ndim``, then ``ndim`` big-endian uint32 sizes, then the data
    in row-major (C) order, big-endian.
    """
    path = Path(os.fspath(path))
    with open(path, "rb") as file:
        raw = file.read()

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            # gzip raises BadGzipFile (an OSError) for bad headers, EOFError
            # for a stream cut short and zlib.error for corrupt blocks.
            raise ValueError(
                f"{path}: corrupt or truncated gzip stream ({error})"
            ) from None

    if len(raw) < 4:
        raise ValueError(
            f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the "
            "4-byte magic number"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: magic number starts with "
            f"{raw[:4].hex(' ')}, expected two zero bytes"
        )
    type_code = raw[2]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_DTYPES)
        raise ValueError(
            f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})"
        )
    dtype = _IDX_DTYPES[type_code]
    ndim = raw[3]
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: truncated IDX header: {len(raw)} bytes, but {ndim} "
            f"dimensions need {header_size}"
        )
    shape = tuple(
        int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    )

    # Python integers, so a hostile header cannot overflow the product.
    n_items = 1
    for size in shape:
        n_items *= size
    expected_data_bytes = n_items * dtype.itemsize
    data_bytes = len(raw) - header_size
    if data_bytes < expected_data_bytes:
        raise ValueError(
            f"{path}: truncated IDX data: shape {shape} of {dtype.name} needs "
            f"{expected_data_bytes} bytes after the header, found {data_bytes}"
        )
    if data_bytes > expected_data_bytes:
        raise ValueError(
            f"{path}: size mismatch: shape {shape} of {dtype.name} needs "
            f"{expected_data_bytes} bytes after the header, found {data_bytes} "
            f"({data_bytes - expected_data_bytes} trailing bytes)"
        )

    array = np.frombuffer(raw, dtype=dtype, count=n_items, offset=header_size)
    # astype copies, which also detaches the result from the read-only bytes.
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def load_fashion_mnist(kind="train", path=None, return_y=True):
    """Load Fashion-MNIST from IDX files on disk.

    Parameters
    ----------
    kind : {"train", "test"}, default="train"
        Which split: 60000 training or 10000 test images.
    path : str or os.PathLike, optional
        Directory holding the standard files ``train-images-idx3-ubyte.gz``,
        ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
        ``t10k-labels-idx1-ubyte.gz`` (each may also be uncompressed, without
        the ``.gz``). When None, the directory named by the environment
        variable ``HVAE_FASHION_MNIST`` is tried, then
        ``/usr/share/datasets/fashion-mnist`` (where Debian's
        ``dataset-fashion-mnist`` package puts the files).
    return_y : bool, default=True
        Whether to also return the labels.

    Returns
    -------
    X : ndarray of shape (n_samples, 784), dtype float32
        Flattened 28x28 images, pixel values divided by 255.
    y : ndarray of shape (n_samples,), dtype int64
        Class labels 0..9. Only returned when ``return_y`` is True.

    Raises
    ------
    FileNotFoundError
        If the files are in none of the places searched; the message lists
        them and says how to get the files.
    ValueError
        If ``kind`` is unknown or the files are malformed or inconsistent.
    """
    return _load_mnist_like(
        kind,
        path,
        return_y,
        dataset_name="Fashion-MNIST",
        env_var="HVAE_FASHION_MNIST",
        default_dir=_DEBIAN_FASHION_MNIST_DIR,
        how_to_get=(
            "install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist), set HVAE_FASHION_MNIST "
            "to a directory holding the files, or pass path="
        ),
    )


def load_mnist(kind="test", path=None, return_y=True):
    """Load MNIST handwritten digits from IDX files on disk.

    Parameters
    ----------
    kind : {"train", "test"}, default="test"
        Which split: 60000 training or 10000 test images.
    path : str or os.PathLike, optional
        Directory holding the standard files ``train-images-idx3-ubyte.gz``,
        ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
        ``t10k-labels-idx1-ubyte.gz`` (each may also be uncompressed, without
        the ``.gz``). When None, the directory named by the environment
        variable ``HVAE_MNIST`` is tried, then ``/usr/share/datasets/mnist``.
    return_y : bool, default=True
        Whether to also return the labels.

    Returns
    -------
    X : ndarray of shape (n_samples, 784), dtype float32
        Flattened 28x28 images, pixel values divided by 255.
    y : ndarray of shape (n_samples,), dtype int64
        Digit labels 0..9. Only returned when ``return_y`` is True.

    Raises
    ------
    FileNotFoundError
        If the files are in none of the places searched; the message lists
        them and says how to get the files.
    ValueError
        If ``kind`` is unknown or the files are malformed or inconsistent.
    """
    return _load_mnist_like(
        kind,
        path,
        return_y,
        dataset_name="MNIST",
        env_var="HVAE_MNIST",
        default_dir=_DEBIAN_MNIST_DIR,
        how_to_get=(
            "put the standard MNIST IDX files in a directory and set "
            "HVAE_MNIST to it, or pass path="
        ),
    )


def _find_split_file(directory, stem):
    """Return the path of ``stem`` in ``directory`` (``.gz`` first), or None."""
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _find_split_files(directory, kind):
    """Return (images_path, labels_path) for ``kind`` in ``directory``, or None."""
    prefix = _SPLIT_PREFIXES[kind]
    images = _find_split_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find_split_file(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return images, labels


def _load_mnist_like(
    kind, path, return_y, *, dataset_name, env_var, default_dir, how_to_get
):
    """Shared body of the MNIST-format loaders; see `load_fashion_mnist`."""
    if kind not in _SPLIT_PREFIXES:
        raise ValueError(
            f"kind must be one of {sorted(_SPLIT_PREFIXES)}, got {kind!r}"
        )
    prefix = _SPLIT_PREFIXES[kind]
    wanted = f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"

    if path is not None:
        directory = Path(os.fspath(path))
        files = _find_split_files(directory, kind)
        if files is None:
            raise FileNotFoundError(
                f"{dataset_name} {kind} split not found: {directory} does not "
                f"hold {wanted}"
            )
    else:
        searched = []
        files = None
        env_value = os.environ.get(env_var)
        if env_value:
            directory = Path(env_value)
            searched.append(f"{directory} (from ${env_var})")
            files = _find_split_files(directory, kind)
        else:
            searched.append(f"${env_var} (not set)")
        if files is None:
            searched.append(str(default_dir))
            files = _find_split_files(default_dir, kind)
        if files is None:
            raise FileNotFoundError(
                f"{dataset_name} {kind} split not found: looked for {wanted} "
                f"in {', '.join(searched)}. To get the files, {how_to_get}."
            )

    images_path, labels_path = files
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (n, rows, cols), "
            f"got {images.dtype.name} of shape {images.shape}"
        )
    n_samples = images.shape[0]
    X = images.reshape(n_samples, -1).astype(np.float32)
    X /= np.float32(255.0)
    if not return_y:
        return X

    labels = read_idx(labels_path)
    if labels.ndim != 1 or labels.shape[0] != n_samples:
        raise ValueError(
            f"{labels_path}: expected {n_samples} labels to match "
            f"{images_path.name}, got shape {labels.shape}"
        )
    return X, labels.astype(np.int64)


# Data sets with known factors (for the disentanglement metrics in
# hvae.metrics) live in their own modules; re-exported here.
from ._factor_dataset import FactorDataset  # noqa: E402
from ._sprites import (  # noqa: E402
    SPRITES_FACTOR_NAMES, SPRITES_FACTOR_SIZES, SPRITES_SHAPE_NAMES, Sprites, make_sprites)

__all__ += ["FactorDataset", "SPRITES_FACTOR_NAMES", "SPRITES_FACTOR_SIZES",
            "SPRITES_SHAPE_NAMES", "Sprites", "make_sprites"]
