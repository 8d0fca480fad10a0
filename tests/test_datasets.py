"""Tests for hvae.datasets: the IDX reader on files written here, and the
loaders on the real Fashion-MNIST/MNIST files kept in the shared folder."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from hvae.datasets import load_digits, load_fashion_mnist, load_mnist, read_idx

# The shared/ folder sits beside the repository; the data are not part of it.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_MNIST_DIR = SHARED_DATA_DIR / "fashion-mnist"
MNIST_TEST_DIR = SHARED_DATA_DIR / "mnist-test"

IDX_TYPE_CODES = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def encode_idx(array):
    """Bytes of ``array`` in the IDX format, written independently of read_idx."""
    big_endian = np.dtype(array.dtype).newbyteorder(">")
    if array.dtype.itemsize == 1:
        big_endian = array.dtype
    type_code = IDX_TYPE_CODES[big_endian]
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(struct.pack(">I", size) for size in array.shape)
    return header + np.ascontiguousarray(array, dtype=big_endian).tobytes()


def write_file(path, payload, compress):
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "dtype, shape",
    [
        ("uint8", (7, 3, 5)),
        ("float32", (4, 6)),
        ("int8", (11,)),
        ("int16", (2, 3)),
        ("int32", (3, 2, 2)),
        ("float64", (5, 1)),
    ],
)
def test_read_idx_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    else:
        array = rng.standard_normal(shape).astype(dtype)
    path = write_file(tmp_path / "data.idx", encode_idx(array), compress)

    result = read_idx(path)

    assert result.dtype == np.dtype(dtype)
    assert result.dtype.isnative
    assert result.shape == shape
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable and result.flags.c_contiguous


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    compressed_without_suffix = write_file(tmp_path / "a", encode_idx(array), True)
    plain_with_suffix = write_file(tmp_path / "b.gz", encode_idx(array), False)
    np.testing.assert_array_equal(read_idx(compressed_without_suffix), array)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), array)


def test_read_idx_accepts_str_path(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    path = write_file(tmp_path / "x.idx", encode_idx(array), False)
    np.testing.assert_array_equal(read_idx(str(path)), array)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-1], "truncated IDX data"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:3], "truncated IDX file"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX type code 0x42"),
        (lambda b: b[:3] + b"\x00" + b[4:], "0 dimensions"),
    ],
    ids=["data", "header", "magic", "trailing", "bad-magic", "bad-type", "no-dims"],
)
def test_read_idx_rejects_malformed_files(tmp_path, mangle, message, compress):
    good = encode_idx(np.zeros((3, 4), dtype=np.float32))
    path = write_file(tmp_path / "bad.idx", mangle(good), compress)
    with pytest.raises(ValueError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    compressed = gzip.compress(encode_idx(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="gzip") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_huge_header_does_not_allocate(tmp_path):
    # A header claiming 2^32-1 squared float64s must fail on size, not on memory.
    header = bytes([0, 0, 0x0E, 2]) + struct.pack(">II", 2**32 - 1, 2**32 - 1)
    path = write_file(tmp_path / "huge.idx", header + b"\x00" * 8, False)
    with pytest.raises(ValueError, match="truncated IDX data"):
        read_idx(path)


def write_fake_mnist(directory, kind, n_samples, compress=True, n_labels=None):
    """Write a small MNIST-layout split; returns the images and labels written."""
    prefix = {"train": "train", "test": "t10k"}[kind]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n_samples, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_labels or n_samples, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / f"{prefix}-images-idx3-ubyte{suffix}", encode_idx(images), compress)
    write_file(directory / f"{prefix}-labels-idx1-ubyte{suffix}", encode_idx(labels), compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_load_fashion_mnist_from_path(tmp_path, compress):
    images, labels = write_fake_mnist(tmp_path, "test", 5, compress)
    X, y = load_fashion_mnist("test", path=tmp_path)
    assert X.shape == (5, 784) and X.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_allclose(X, images.reshape(5, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)
    X_only = load_fashion_mnist("test", path=tmp_path, return_y=False)
    np.testing.assert_array_equal(X_only, X)


def test_loaders_search_environment_variable(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "fashion", "train", 3)
    write_fake_mnist(tmp_path / "digits", "test", 4)
    monkeypatch.setenv("HVAE_FASHION_MNIST", str(tmp_path / "fashion"))
    monkeypatch.setenv("HVAE_MNIST", str(tmp_path / "digits"))
    assert load_fashion_mnist("train")[0].shape == (3, 784)
    assert load_mnist("test")[0].shape == (4, 784)


def test_missing_files_message_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_FASHION_MNIST", str(tmp_path / "nowhere"))
    if Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the Debian package is installed, so the search succeeds")
    with pytest.raises(FileNotFoundError) as caught:
        load_fashion_mnist("test")
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message
    assert "/usr/share/datasets/fashion-mnist" in message
    assert "dataset-fashion-mnist" in message
    assert "path=" in message


def test_explicit_path_without_files_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_mnist("train", path=tmp_path)


def test_label_count_mismatch_raises(tmp_path):
    write_fake_mnist(tmp_path, "test", 5, n_labels=4)
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist("test", path=tmp_path)


def test_unknown_kind_raises(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        load_fashion_mnist("validation", path=tmp_path)


def test_load_digits():
    pytest.importorskip("sklearn")
    X, y = load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert X.min() == 0.0 and X.max() == 1.0
    assert y.shape == (1797,) and set(np.unique(y)) == set(range(10))
    assert load_digits(return_y=False).shape == (1797, 64)


def check_real_test_split(X, y):
    assert X.shape == (10000, 784)
    assert X.dtype == np.float32
    assert X.min() >= 0.0 and X.max() <= 1.0
    assert X.max() == 1.0  # some pixel is saturated, so the scale is /255
    assert y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 1000))


def test_real_fashion_mnist_test_split():
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}")
    check_real_test_split(*load_fashion_mnist("test", path=FASHION_MNIST_DIR))


def test_real_mnist_test_split():
    if not (MNIST_TEST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found in {MNIST_TEST_DIR}")
    X, y = load_mnist("test", path=MNIST_TEST_DIR)
    assert X.shape == (10000, 784) and X.dtype == np.float32
    # MNIST's test classes are not balanced; check only that all ten occur.
    assert set(np.unique(y)) == set(range(10))
