"""hvae.load on damaged and hostile files, beyond tests/test_save_load.py
(which checks specific truncations, a flipped parameter byte, re-saved
altered arrays, wrong versions, inconsistent metadata and a declared-size
bomb).

* Byte-level fuzzing: a saved file with bytes flipped, overwritten,
  inserted or removed, or cut short, either loads as the very same model
  (a byte the format does not depend on, such as a zip timestamp) or fails
  with a ValueError that names the file; never another exception, a crash,
  or a large allocation.
* Hostile files: sizes and shapes declared in the zip directory, in .npy
  headers and in the JSON metadata that the data cannot back, and deeply
  nested JSON, fail with a ValueError before allocating much memory.
"""
import hashlib
import io
import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402

import hvae  # noqa: E402
from hvae import HierarchicalVAE  # noqa: E402

# Small models: their files are a few kB, so anything above this while
# loading one comes from a size the file declared, not from its content.
MAX_PEAK = 20e6  # bytes


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    X = np.random.default_rng(0).random((30, 6))
    vae = HierarchicalVAE(latent_dims=(3, 2), hidden_dims=(5,), likelihood="bernoulli",
                          n_epochs=2, batch_size=8, random_state=0, n_threads=1).fit(X)
    path = tmp_path_factory.mktemp("hostile") / "model.hvae"
    vae.save(path)
    return vae, X, path.read_bytes()


def load_measured(path):
    """(estimator or None, exception or None, peak traced bytes)."""
    tracemalloc.start()
    try:
        return hvae.load(path), None, tracemalloc.get_traced_memory()[1]
    except Exception as exc:  # noqa: BLE001 - the test judges the type
        return None, exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_refused_or_identical(path, vae, X):
    loaded, error, peak = load_measured(path)
    assert peak < MAX_PEAK, f"loading allocated {peak / 1e6:.0f} MB"
    if error is not None:
        assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
        assert str(path) in str(error)
        return "refused"
    np.testing.assert_array_equal(loaded.model_.parameters, vae.model_.parameters)
    np.testing.assert_array_equal(loaded.transform(X), vae.transform(X))
    assert loaded.history_ == vae.history_
    return "identical"


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("zero run"), st.integers(0, 10**6), st.integers(1, 256)),
    st.tuples(st.just("0xff run"), st.integers(0, 10**6), st.integers(1, 16)),
)


def mutate(data, mutation):
    kind, where, arg = mutation
    if not data:
        return data
    data = bytearray(data)
    where %= len(data)
    if kind == "flip":
        data[where] ^= arg
    elif kind == "set":
        data[where] = arg
    elif kind == "truncate":
        del data[where:]
    elif kind == "delete":
        del data[where:where + arg]
    elif kind == "insert":
        data[where:where] = bytes([arg])
    elif kind == "zero run":
        data[where:where + arg] = bytes(len(data[where:where + arg]))
    elif kind == "0xff run":
        # Sizes and counts in zip and .npy headers become huge.
        data[where:where + arg] = b"\xff" * len(data[where:where + arg])
    return bytes(data)


@given(mutation_list=st.lists(mutations, min_size=1, max_size=3))
def test_mutated_files_are_refused_or_load_identically(saved, tmp_path_factory, mutation_list):
    vae, X, data = saved
    for mutation in mutation_list:
        data = mutate(data, mutation)
    note(f"{mutation_list}")
    path = tmp_path_factory.mktemp("mutated") / "model.hvae"
    path.write_bytes(data)
    assert_refused_or_identical(path, vae, X)


def test_every_truncation_is_refused(saved, tmp_path):
    """Cut at every 13th byte (and just before the end): all refused."""
    vae, X, data = saved
    path = tmp_path / "cut.hvae"
    for n in list(range(0, len(data), 13)) + [len(data) - 1]:
        path.write_bytes(data[:n])
        assert assert_refused_or_identical(path, vae, X) == "refused", n


# ---- hostile files ------------------------------------------------------------------


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def members_of(data):
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    metadata = json.loads(members.pop("metadata").tobytes().decode("utf-8"))
    return metadata, members


def write_archive(path, metadata, members, raw=None, compression=zipfile.ZIP_STORED):
    """An archive of .npy members; `raw` maps member names to their bytes."""
    raw = dict(raw or {})
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        raw.setdefault("metadata", npy_bytes(np.frombuffer(text.encode(), dtype=np.uint8)))
    for name, array in members.items():
        raw.setdefault(name, npy_bytes(array))
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, content in raw.items():
            archive.writestr(f"{name}.npy", content)


def npy_header_claiming(shape, dtype="<f4"):
    """A .npy header declaring `shape`, with (almost) no data after it."""
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    text = repr(header).encode("latin1")
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(16)


def hostile_files(saved):
    """(name, archive writer) pairs: each writes a file hvae.load must refuse."""
    _, _, data = saved
    metadata, members = members_of(data)
    n_params = members["parameters"].size
    huge = 10**12

    def declared_huge_shape(path):
        md = json.loads(json.dumps(metadata))
        md["arrays"]["parameters"]["shape"] = [huge]
        write_archive(path, md, members, raw={"parameters": npy_header_claiming((huge,))})

    def npy_header_lies(path):
        write_archive(path, metadata, members,
                      raw={"parameters": npy_header_claiming((n_params,))})

    def huge_shape_product(path):
        md = json.loads(json.dumps(metadata))
        md["arrays"]["parameters"]["shape"] = [2**40, 2**40]
        write_archive(path, md, members,
                      raw={"parameters": npy_header_claiming((2**40, 2**40))})

    def zip_directory_lies(path):
        write_archive(path, metadata, members)
        blob = bytearray(open(path, "rb").read())
        # Patch the uncompressed size of parameters.npy in the central directory.
        at = blob.rindex(b"PK\x01\x02", 0, blob.index(b"parameters.npy", blob.index(b"PK\x01\x02")))
        blob[at + 24:at + 28] = struct.pack("<I", 0xFFFFFFF0)
        open(path, "wb").write(bytes(blob))

    def huge_architecture(path):
        md = json.loads(json.dumps(metadata))
        md["model"]["hidden_dims"] = {"__tuple__": [2**31 - 1, 2**31 - 1]}
        write_archive(path, md, members)

    def huge_latent(path):
        md = json.loads(json.dumps(metadata))
        md["model"]["latent_dims"] = {"__tuple__": [10**7]}
        write_archive(path, md, members)

    def huge_layout(path):
        md = json.loads(json.dumps(metadata))
        md["layout"] = [["enc1.hidden1.W", [10**9, 10**9]]] * 10_000
        write_archive(path, md, members)

    def huge_history(path):
        md = json.loads(json.dumps(metadata))
        md["attributes"]["n_features_in_"] = 10**12
        write_archive(path, md, members)

    def wrong_dtype(path):
        write_archive(path, metadata, dict(members, parameters=members["parameters"].astype("<f8")))

    def object_array(path):
        # An object array would need pickle to read: refused from its header.
        write_archive(path, metadata, members,
                      raw={"parameters": npy_header_claiming((4,), "|O")})

    def negative_shape(path):
        md = json.loads(json.dumps(metadata))
        md["arrays"]["parameters"]["shape"] = [-1]
        write_archive(path, md, members)

    def many_members(path):
        raw = {f"junk{i}": npy_bytes(np.zeros(1, np.float32)) for i in range(2000)}
        write_archive(path, metadata, members, raw=raw)

    def huge_json_string(path):
        md = json.loads(json.dumps(metadata))
        md["hvae_version"] = "x" * 3_000_000
        md["format_version"] = 99
        write_archive(path, md, members)

    return [(f.__name__, f) for f in (
        declared_huge_shape, npy_header_lies, huge_shape_product, zip_directory_lies,
        huge_architecture, huge_latent, huge_layout, huge_history, wrong_dtype, object_array,
        negative_shape, many_members, huge_json_string)]


HOSTILE = [
    "declared_huge_shape", "npy_header_lies", "huge_shape_product", "zip_directory_lies",
    "huge_architecture", "huge_latent", "huge_layout", "huge_history", "wrong_dtype",
    "object_array", "negative_shape", "many_members", "huge_json_string"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_is_refused_without_a_large_allocation(saved, tmp_path, name):
    writer = dict(hostile_files(saved))[name]
    path = tmp_path / f"{name}.hvae"
    writer(path)
    loaded, error, peak = load_measured(path)
    # A 3 MB JSON string is held a few times over while decoding it.
    limit = MAX_PEAK + 4 * path.stat().st_size
    assert peak < limit, f"loading allocated {peak / 1e6:.0f} MB"
    assert error is not None, "a hostile file was loaded"
    assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
    assert str(path) in str(error)


@pytest.mark.parametrize("where", ["metadata", "params"])
def test_deeply_nested_metadata_is_refused(saved, tmp_path, where):
    _, _, data = saved
    metadata, members = members_of(data)
    path = tmp_path / "deep.hvae"
    if where == "metadata":
        write_archive(path, "[" * 100_000 + "]" * 100_000, members)
    else:
        metadata["params"]["latent_dims"] = json.loads("[" * 900 + "]" * 900)
        write_archive(path, metadata, members)
    with pytest.raises(ValueError, match="deep.hvae"):
        hvae.load(path)


def test_a_compressed_bomb_is_refused_without_a_large_allocation(tmp_path):
    big = HierarchicalVAE(latent_dims=(2,), hidden_dims=(1000,), n_epochs=0, random_state=0,
                          n_threads=1).fit(np.zeros((2, 4000)))
    plain = tmp_path / "plain.hvae"
    big.save(plain)
    metadata, members = members_of(plain.read_bytes())
    del big
    members["parameters"] = np.zeros_like(members["parameters"])
    metadata["arrays"]["parameters"]["sha256"] = hashlib.sha256(
        members["parameters"].tobytes()).hexdigest()
    bomb = tmp_path / "bomb.hvae"
    write_archive(bomb, metadata, members, compression=zipfile.ZIP_DEFLATED)
    del members
    size = bomb.stat().st_size
    assert size < 1e6
    loaded, error, peak = load_measured(bomb)
    del loaded
    assert peak < 100 * size, f"a {size / 1e3:.0f} kB file made load allocate {peak / 1e6:.0f} MB"
    assert isinstance(error, ValueError)


def test_loading_a_large_valid_file_costs_about_its_size(tmp_path):
    """The honest counterpart: an uncompressed file loads with a peak of a
    few times its size (the archive's arrays, then the model's buffers)."""
    vae = HierarchicalVAE(latent_dims=(8,), hidden_dims=(512,), n_epochs=1, batch_size=64,
                          random_state=0, n_threads=1).fit(
        np.random.default_rng(0).random((64, 1000)))
    path = tmp_path / "large.hvae"
    vae.save(path)
    loaded, error, peak = load_measured(path)
    assert error is None, error
    assert peak < 4 * path.stat().st_size + 5e6, (peak, path.stat().st_size)
    np.testing.assert_array_equal(loaded.model_.parameters, vae.model_.parameters)
