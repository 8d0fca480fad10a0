"""partial_fit, and fit on data read in chunks (np.memmap, h5py, zarr).

* Exactness: n partial_fit calls on X equal fit(X) with n_epochs=n; partial_fit
  over the chunks of a data set, in the documented chunk order, equals fit on
  that data read in those chunks; h5py and zarr input equal a memmap's; a
  memmap in one chunk equals the same rows in memory (bit for bit).
* Streaming state: KL warm-up counts partial_fit passes, conditional models
  take classes= on the first call, pickling mid-stream continues exactly.
* Errors: a wrong feature count, missing classes, another architecture, a
  NaN or out-of-range chunk raise a ValueError before the work they concern
  (naming the chunk's rows) and leave the model usable with its history.
* Memory: fitting from a memmap larger than a memory budget stays within it
  (measured in a separate process, VmHWM against the resident set before).
* joblib: GridSearchCV with n_jobs=2 under loky and threading gives the
  results of n_jobs=1.
"""
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.utils.validation import check_is_fitted

from hvae import HierarchicalVAE
from hvae._chunks import default_chunk_size
from hvae.datasets import load_digits

CHUNK = 320  # rows per chunk: a multiple of the batch size (64), 17 chunks of X


@pytest.fixture(scope="module")
def data():
    X, y = load_digits()
    return np.tile(X, (3, 1)), np.tile(y, 3)  # (5391, 64)


@pytest.fixture(scope="module")
def memmap(data, tmp_path_factory):
    X = data[0]
    path = tmp_path_factory.mktemp("ooc") / "X.f32"
    X.tofile(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)


def small_vae(**params):
    defaults = dict(latent_dims=(4,), hidden_dims=(32,), likelihood="bernoulli", n_epochs=2,
                    batch_size=64, chunk_size=CHUNK, random_state=0, n_threads=1)
    defaults.update(params)
    return HierarchicalVAE(**defaults)


def chunk_rows(n, size):
    return [(first, min(first + size, n)) for first in range(0, n, size)]


def documented_order(vae_params, X, epoch):
    """The chunk order HierarchicalVAE's docstring gives for epoch `epoch`."""
    seed = HierarchicalVAE(**{**vae_params, "n_epochs": 0}).fit(X).model_.seed
    return np.random.default_rng([seed, epoch]).permutation(math.ceil(len(X) / CHUNK))


def assert_same_history(a, b, skip=("seconds",)):
    assert a.keys() == b.keys()
    for key in a:
        if key not in skip:
            assert a[key] == b[key], key


# ---- exactness -----------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"kl_warmup_epochs": 3, "beta": 2.0},
                                    {"conditional": True}])
def test_n_partial_fit_calls_equal_fit_with_n_epochs(data, params):
    X, y = data[0][:1000], data[1][:1000]
    fitted = small_vae(n_epochs=4, **params).fit(X, y)
    streamed = small_vae(**params)
    for _ in range(4):
        streamed.partial_fit(X, y, classes=np.arange(10) if params.get("conditional") else None)
    np.testing.assert_array_equal(streamed.model_.parameters, fitted.model_.parameters)
    assert streamed.n_iter_ == fitted.n_iter_ == 4
    assert_same_history(streamed.history_, fitted.history_)
    if "kl_warmup_epochs" in params:  # passes count as epochs
        assert streamed.history_["beta"] == [0.0, 2 / 3, 4 / 3, 2.0]


@pytest.mark.parametrize("shuffle", [True, False])
def test_partial_fit_over_chunks_equals_chunked_fit(data, memmap, shuffle):
    X = data[0]
    params = small_vae(shuffle=shuffle).get_params()
    fitted = HierarchicalVAE(**params).fit(memmap)
    streamed = HierarchicalVAE(**params)
    chunks = chunk_rows(len(X), CHUNK)
    for epoch in range(2):
        order = documented_order(params, memmap, epoch) if shuffle else range(len(chunks))
        for k in order:
            first, end = chunks[k]
            streamed.partial_fit(X[first:end])
    np.testing.assert_array_equal(streamed.model_.parameters, fitted.model_.parameters)
    assert fitted.n_iter_ == 2 and streamed.n_iter_ == 2 * len(chunks)
    assert fitted.history_["n_batches"] == [math.ceil(len(X) / 64)] * 2
    # An epoch's record averages its chunks' records over the rows.
    per_chunk = np.array(streamed.history_["elbo"][len(chunks):])
    rows = np.array([end - first for first, end in chunks])[np.asarray(
        documented_order(params, memmap, 1) if shuffle else range(len(chunks)))]
    assert fitted.history_["elbo"][1] == pytest.approx(np.sum(per_chunk * rows) / len(X),
                                                       rel=1e-12)


def test_memmap_in_one_chunk_equals_the_rows_in_memory(data, memmap):
    X = data[0]
    in_memory = small_vae(n_epochs=3).fit(X)
    chunked = small_vae(n_epochs=3, chunk_size=len(X)).fit(memmap)
    np.testing.assert_array_equal(chunked.model_.parameters, in_memory.model_.parameters)
    assert_same_history(chunked.history_, in_memory.history_)


def test_partial_fit_on_a_memmap_is_one_epoch_of_fit(data, memmap):
    fitted = small_vae(n_epochs=3).fit(memmap)
    streamed = small_vae()
    for _ in range(3):
        streamed.partial_fit(memmap)
    np.testing.assert_array_equal(streamed.model_.parameters, fitted.model_.parameters)
    assert_same_history(streamed.history_, fitted.history_)


def test_h5py_dataset_trains_as_the_memmap(data, memmap, tmp_path):
    h5py = pytest.importorskip("h5py")
    reference = small_vae().fit(memmap)
    with h5py.File(tmp_path / "X.h5", "w") as f:
        f.create_dataset("X", data=data[0].astype(np.float64), chunks=(100, 64))
    with h5py.File(tmp_path / "X.h5", "r") as f:
        vae = small_vae().fit(f["X"])
        assert vae.n_features_in_ == 64
        np.testing.assert_array_equal(vae.model_.parameters, reference.model_.parameters)
        vae.partial_fit(f["X"])
        assert vae.n_iter_ == 3


def test_zarr_array_trains_as_the_memmap(data, memmap, tmp_path):
    zarr = pytest.importorskip("zarr")
    reference = small_vae().fit(memmap)
    z = zarr.open(str(tmp_path / "X.zarr"), mode="w", shape=data[0].shape, chunks=(500, 64),
                  dtype="f4")
    z[:] = data[0]
    vae = small_vae().fit(z)
    np.testing.assert_array_equal(vae.model_.parameters, reference.model_.parameters)


def test_default_chunk_size_is_about_64_mb_in_whole_minibatches():
    for n_features, batch_size in [(64, 128), (784, 100), (3, 1000), (10**7, 64)]:
        rows = default_chunk_size(n_features, batch_size)
        assert rows % batch_size == 0 and rows >= batch_size
        assert rows * n_features * 4 <= max(64 << 20, batch_size * n_features * 4)
        assert rows * n_features * 4 > (64 << 20) - batch_size * n_features * 4 or \
            rows == batch_size


# ---- validation, early stopping, progress, callbacks -------------------------------------


def test_validation_fraction_of_chunked_data_holds_out_the_tail(data, memmap):
    X = data[0]
    vae = small_vae(n_epochs=4, validation_fraction=0.1, early_stopping=True,
                    n_iter_no_change=1).fit(memmap)
    n_val = math.ceil(0.1 * len(X))
    assert vae.history_["n_batches"][0] == math.ceil((len(X) - n_val) / 64)
    # The model holds the best epoch's parameters; its val_elbo is the tail's score.
    assert vae.history_["val_elbo"][vae.best_epoch_] == pytest.approx(
        vae.score(X[-n_val:]), rel=1e-12)
    # Training on the head only: the same as a fit on those rows.
    head = small_vae(n_epochs=vae.n_iter_).fit(memmap[:len(X) - n_val])
    assert head.history_["elbo"] == vae.history_["elbo"]


def test_validation_data_read_in_chunks(data, memmap):
    X = data[0]
    held = np.memmap(memmap.filename, dtype=np.float32, mode="r", shape=memmap.shape)[4000:]
    vae = small_vae(n_epochs=2).fit(memmap[:4000], validation_data=held)
    assert vae.history_["val_elbo"][-1] == pytest.approx(vae.score(X[4000:]), rel=1e-12)
    with pytest.raises(ValueError, match="validation_data: X has 63 features"):
        small_vae().fit(memmap, validation_data=X[:10, :63])


def test_callbacks_and_progress_with_chunked_data(memmap, capsys):
    seen = []
    vae = small_vae(n_epochs=3, verbose=2, callbacks=lambda e, h: seen.append(e) or e < 1)
    vae.fit(memmap)
    assert seen == [0, 1] and vae.n_iter_ == 2  # the callback stopped it after epoch 1
    assert "epoch 2/3" in capsys.readouterr().out
    vae.partial_fit(memmap)
    assert seen == [0, 1, 2]


# ---- conditional streaming ---------------------------------------------------------------


def test_conditional_partial_fit_needs_classes_on_the_first_call(data):
    X, y = data[0][:640], data[1][:640]
    vae = small_vae(conditional=True)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        vae.partial_fit(X, y)
    with pytest.raises(NotFittedError):
        check_is_fitted(vae)
    assert not hasattr(vae, "n_features_in_")
    # A chunk that lacks some classes still gets the full one-hot code.
    vae.partial_fit(X[y < 5], y[y < 5], classes=np.arange(10))
    np.testing.assert_array_equal(vae.classes_, np.arange(10))
    assert vae.model_.n_conditions == 10
    vae.partial_fit(X[y >= 5], y[y >= 5])
    vae.partial_fit(X, y, classes=np.arange(10)[::-1])  # the same set
    with pytest.raises(ValueError, match="differs from classes_"):
        vae.partial_fit(X, y, classes=np.arange(11))
    with pytest.raises(ValueError, match="labels not in classes"):
        vae.partial_fit(X[:2], np.array([3, 12]))
    assert vae.n_iter_ == 3
    assert vae.sample(2, y=7, random_state=0).shape == (2, 64)


def test_conditional_chunked_fit_equals_partial_fit_over_chunks(data, memmap):
    X, y = data
    params = small_vae(conditional=True, shuffle=False, n_epochs=1).get_params()
    fitted = HierarchicalVAE(**params).fit(memmap, y)
    streamed = HierarchicalVAE(**params)
    for first, end in chunk_rows(len(X), CHUNK):
        streamed.partial_fit(X[first:end], y[first:end], classes=np.unique(y))
    np.testing.assert_array_equal(streamed.model_.parameters, fitted.model_.parameters)
    np.testing.assert_array_equal(fitted.classes_, np.arange(10))


# ---- errors leave the model usable -------------------------------------------------------


def test_a_wrong_feature_count_on_a_later_call_is_refused(data, memmap):
    vae = small_vae().partial_fit(memmap)
    parameters, history = vae.model_.parameters.copy(), vae.history_["elbo"][:]
    for bad in (data[0][:100, :63], memmap[:, :63]):
        with pytest.raises(ValueError, match="X has 63 features, but HierarchicalVAE is "
                                             "expecting 64 features"):
            vae.partial_fit(bad)
    np.testing.assert_array_equal(vae.model_.parameters, parameters)
    assert vae.history_["elbo"] == history and vae.n_features_in_ == 64
    vae.set_params(latent_dims=(5,))
    with pytest.raises(ValueError, match="architecture"):
        vae.partial_fit(data[0][:100])
    vae.set_params(latent_dims=(4,)).partial_fit(data[0][:100])
    assert vae.n_iter_ == 2


@pytest.mark.parametrize("kind", ["nan", "bernoulli range"])
def test_a_bad_chunk_raises_naming_its_rows_and_keeps_the_training_before_it(data, tmp_path,
                                                                             kind):
    X = data[0]
    bad = X.copy()
    bad[1000, 5] = np.nan if kind == "nan" else 1.5  # in chunk 3 of 17: rows 960:1280
    path = tmp_path / "bad.f32"
    bad.tofile(path)
    bad = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    vae = small_vae(shuffle=False, n_epochs=3)
    message = "NaN or infinity" if kind == "nan" else r"outside \[0, 1\]"
    with pytest.raises(ValueError, match=f"rows 960:1280 of X .*{message}"):
        vae.fit(bad)
    # One epoch cut short after chunks 0-2: exactly the training on rows 0:960.
    assert vae.n_iter_ == 1 and vae.history_["n_batches"] == [15]
    reference = small_vae(shuffle=False, n_epochs=1).fit(X[:960])
    np.testing.assert_array_equal(vae.model_.parameters, reference.model_.parameters)
    assert np.all(np.isfinite(vae.transform(X[:50])))
    vae.partial_fit(X[:100])
    assert vae.n_iter_ == 2
    # A first call whose first chunk is bad leaves the estimator unfitted.
    fresh = small_vae(shuffle=False)
    with pytest.raises(ValueError, match="rows 0:320 of X"):  # rows of the array given
        fresh.partial_fit(bad[960:])
    with pytest.raises(NotFittedError):
        check_is_fitted(fresh)


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e39, -1e300])
def test_infinite_values_and_values_beyond_float32_are_refused(data, tmp_path, value):
    X = data[0][:1000].astype(np.float64)
    X[700, 1] = value
    path = tmp_path / "X.f64"
    X.tofile(path)
    X = np.memmap(path, dtype=np.float64, mode="r", shape=X.shape)
    vae = small_vae(likelihood="gaussian", shuffle=False)
    with pytest.raises(ValueError, match="rows 640:960 of X contain NaN or infinity"):
        vae.partial_fit(X)
    assert vae.history_["n_batches"] == [10]  # chunks 0 and 1 trained


def test_shape_and_dtype_are_checked_before_any_work(memmap, tmp_path):
    vae = small_vae()
    with pytest.raises(ValueError, match="2D"):
        vae.fit(memmap[:, 0])
    with pytest.raises(ValueError, match="0 sample"):
        vae.fit(memmap[:0])
    complex_map = np.memmap(tmp_path / "c.bin", dtype=np.complex64, mode="w+", shape=(10, 3))
    with pytest.raises(ValueError, match="Complex"):
        vae.fit(complex_map)
    with pytest.raises(NotFittedError):
        check_is_fitted(vae)


# ---- pickling and joblib -----------------------------------------------------------------


def test_pickling_mid_stream_continues_identically(data, memmap, tmp_path):
    X = data[0]
    vae = small_vae(kl_warmup_epochs=4)
    for first, end in chunk_rows(len(X), 1000)[:3]:
        vae.partial_fit(X[first:end])
    copy = pickle.loads(pickle.dumps(vae))
    vae.save(tmp_path / "vae.npz")
    from hvae import load
    loaded = load(tmp_path / "vae.npz")
    for model in (vae, copy, loaded):
        for first, end in chunk_rows(len(X), 1000)[3:]:
            model.partial_fit(X[first:end])
        model.partial_fit(memmap)
    for other in (copy, loaded):
        np.testing.assert_array_equal(other.model_.parameters, vae.model_.parameters)
        assert_same_history(other.history_, vae.history_)
    assert loaded.chunk_size == CHUNK


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_grid_search_in_parallel_equals_sequential(data, backend):
    from joblib import parallel_backend

    X = data[0][:1200]
    search = dict(param_grid={"latent_dims": [(2,), (6,)], "learning_rate": [1e-3, 3e-3]},
                  cv=2)
    sequential = GridSearchCV(small_vae(), **search).fit(X)
    with parallel_backend(backend):
        parallel = GridSearchCV(small_vae(), n_jobs=2, **search).fit(X)
    np.testing.assert_array_equal(parallel.cv_results_["mean_test_score"],
                                  sequential.cv_results_["mean_test_score"])
    assert parallel.best_params_ == sequential.best_params_
    np.testing.assert_array_equal(parallel.best_estimator_.model_.parameters,
                                  sequential.best_estimator_.model_.parameters)


# ---- memory ------------------------------------------------------------------------------

MB = 1 << 20
BUDGET = 150 * MB

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hvae import HierarchicalVAE

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    X = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(), n_epochs=1, batch_size=1024,
                          chunk_size=4096, random_state=0, n_threads=1)
    try:  # reset VmHWM to the current resident set (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    vae.fit(X)
    print(json.dumps({"before": before, "peak": status("VmHWM"),
                      "n_batches": vae.history_["n_batches"]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_fit_from_a_memmap_larger_than_the_budget_stays_within_it(tmp_path):
    n, d = 330_000, 256  # 338 MB of float32: more than twice the budget
    path = tmp_path / "big.f32"
    block = np.random.default_rng(0).standard_normal((10_000, d), dtype=np.float32)
    with open(path, "wb") as f:  # written without mapping it
        for first in range(0, n, len(block)):
            f.write(block[:min(len(block), n - first)].tobytes())
    assert os.path.getsize(path) > 2 * BUDGET
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n), str(d)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["n_batches"] == [math.ceil(n / 1024)]  # it read every row
    growth = measured["peak"] - measured["before"]
    assert growth < BUDGET, f"peak resident set grew by {growth / MB:.0f} MB"


TRUNCATE_CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from hvae import HierarchicalVAE
    path, mode = sys.argv[1], sys.argv[2]
    X = np.random.default_rng(0).random((2000, 16)).astype(np.float32)
    X.tofile(path)
    X = np.memmap(path, dtype=np.float32, mode=mode, shape=X.shape)

    def truncate(epoch, history):
        if epoch == 0:  # another process cuts the file to 700 rows under the fit
            os.truncate(path, 700 * 16 * 4)

    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(8,), likelihood="bernoulli",
                          n_epochs=3, batch_size=50, chunk_size=500, shuffle=False,
                          random_state=0, n_threads=1, callbacks=truncate)
    try:
        vae.fit(X)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    lengths = sorted({len(v) for v in vae.history_.values()})
    finite = bool(np.all(np.isfinite(vae.transform(np.asarray(X[:100])))))
    vae.partial_fit(np.asarray(X[:100]))  # the model trains on
    print(json.dumps(dict(error=error, n_iter=vae.n_iter_ - 1, lengths=lengths,
                          n_batches=vae.history_["n_batches"][:-1], finite=finite)))
""")


def test_a_memmap_truncated_under_a_fit_raises_instead_of_sigbus(tmp_path):
    """Issue 16, item 8: reading rows past the end of a file truncated under
    its mapping used to kill the process with SIGBUS. The rows are read
    through the file, and the missing ones raise a ValueError that names the
    file and the rows; the model keeps the training before them."""
    path = tmp_path / "X.f32"
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", TRUNCATE_CHILD, str(path), "r"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    out = json.loads(result.stdout)
    assert out["error"].startswith("ChunkError: rows 500:1000 of X lie beyond the end of "
                                   f"its file {path}, now 44800 bytes"), out["error"]
    # Epoch 1 whole (40 minibatches), epoch 2 up to the missing rows (10).
    assert out["n_iter"] == 2 and out["n_batches"] == [40, 10], out
    assert out["lengths"] == [out["n_iter"]] and out["finite"], out
