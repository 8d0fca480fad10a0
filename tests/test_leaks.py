"""Leaks: reference counts, tracemalloc and the resident set stay flat over
thousands of calls of every entry point, error paths included.

* Reference counts of every object handed to hvae (the model, X, noise
  arrays, callbacks) are the same before and after the loop: a missing
  Py_DECREF shows up as a count that grows with the number of calls.
* tracemalloc sees Python objects and NumPy array buffers: after a warm-up,
  what is still allocated after the loop must stay under 100 kB.
* The C core allocates with malloc, which tracemalloc does not see: creating
  and freeing thousands of models (and failing to create absurd ones) must
  not grow the resident set size.
"""
import contextlib
import gc
import pickle
import resource
import sys
import tracemalloc

import numpy as np
import pytest

import hvae
from hvae import HierarchicalVAE

N_CALLS = 2000
WARMUP = 100
# What may stay allocated after the second half of the calls: a leak of even
# a small output array per call (a 112-byte header and its data) exceeds it.
MAX_GROWTH_PER_CALL = 32  # bytes
MIN_GROWTH_LIMIT = 16_000  # bytes
# Caches of the standard library that fill up slowly (inspect.signature
# parses text signatures through ast, whose strings land in the type
# attribute cache); they are bounded, and not hvae's.
IGNORED = [tracemalloc.Filter(False, "*/inspect.py"), tracemalloc.Filter(False, "*/ast.py"),
           tracemalloc.Filter(False, tracemalloc.__file__)]


def rss_bytes():
    """The current resident set size (Linux), else the peak one."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # pragma: no cover - not Linux
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def traced_bytes():
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(IGNORED)
    return sum(trace.size for trace in snapshot.traces)


def assert_flat(call, objects=(), n_calls=N_CALLS, raises=None, warmup=WARMUP):
    """Calls call() warmup + n_calls times (each raising `raises`, if given).
    Reference counts of `objects` must be the same before and after, and
    the traced memory must not grow over the second half of the calls: a
    leak grows linearly, a cache filling up levels off."""
    def once():
        with pytest.raises(raises) if raises else contextlib.nullcontext():
            call()

    for _ in range(warmup):
        once()
    gc.collect()
    # Later collections skip the objects alive now (other tests', imported
    # modules'): they stay fast however much the test session has loaded.
    gc.freeze()
    counts = [sys.getrefcount(o) for o in objects]
    half = n_calls // 2
    tracemalloc.start()
    try:
        for _ in range(half):
            once()
        middle = traced_bytes()
        for _ in range(half):
            once()
        grown = traced_bytes() - middle
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    assert [sys.getrefcount(o) for o in objects] == counts, "reference counts grew"
    limit = max(MIN_GROWTH_LIMIT, MAX_GROWTH_PER_CALL * half)
    assert grown < limit, f"{grown} more bytes allocated after {half} more calls"


# ---- hvae.Model ------------------------------------------------------------------

D, LATENT = 6, (3, 2)


@pytest.fixture(scope="module")
def model():
    m = hvae.Model(D, LATENT, (8,), likelihood="bernoulli", seed=0)
    m.n_threads = 1
    return m


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    X = rng.random((5, D), dtype=np.float32)
    return dict(
        X=X,
        X64=X.astype(np.float64),       # converted on every call
        XF=np.asfortranarray(X),
        Z=rng.standard_normal((4, LATENT[0])).astype(np.float32),
        Z_top=rng.standard_normal((4, LATENT[-1])).astype(np.float32),
        noise=[rng.standard_normal((5, d)).astype(np.float32) for d in LATENT],
        X_nan=np.where(np.arange(D) == 2, np.nan, X).astype(np.float32),
        X_wide=np.zeros((5, D + 1), np.float32),
        X_range=X * 3.0,
        X_complex=X.astype(np.complex64),
        X_empty=np.zeros((0, D), np.float32),
    )


def raise_value_error(*args):
    raise ValueError("from a callback")


def stop_after_one(*args):
    return False


CALLS = {
    # name: (call(model, a), names of arrays whose refcounts are checked, expected exception)
    "elbo": (lambda m, a: m.elbo(a["X"]), ["X"], None),
    "elbo float64": (lambda m, a: m.elbo(a["X64"]), ["X64"], None),
    "elbo fortran": (lambda m, a: m.elbo(a["XF"]), ["XF"], None),
    "elbo noise": (lambda m, a: m.elbo(a["X"], noise=a["noise"]), ["X", "noise"], None),
    "elbo_terms": (lambda m, a: m.elbo_terms(a["X"], seed=2), ["X"], None),
    "encode": (lambda m, a: m.encode(a["X"]), ["X"], None),
    "decode": (lambda m, a: m.decode(a["Z"], return_logvar=True), ["Z"], None),
    "prior_log_density": (lambda m, a: m.prior_log_density(a["Z_top"]), ["Z_top"], None),
    "sample seeded": (lambda m, a: m.sample(4, seed=1), [], None),
    "sample own rng": (lambda m, a: m.sample(4, observation_noise=True), [], None),
    "sample zero": (lambda m, a: m.sample(0), [], None),
    "loss_and_grad": (lambda m, a: m.loss_and_grad(a["X"], noise=a["noise"]), ["X", "noise"], None),
    "loss_and_grad iwae": (lambda m, a: m.loss_and_grad(a["X"], objective="iwae", n_samples=2),
                           ["X"], None),
    "log_likelihood": (lambda m, a: m.log_likelihood(a["X"], n_samples=3), ["X"], None),
    "fit": (lambda m, a: m.fit(a["X"], n_epochs=1, batch_size=2, history=[]), ["X"], None),
    "fit callback stops": (lambda m, a: m.fit(a["X"], n_epochs=3, callback=stop_after_one),
                           ["X"], None),
    "named_parameters": (lambda m, a: m.named_parameters(), [], None),
    "parameters": (lambda m, a: m.parameters.sum(), [], None),
    "state round trip": (lambda m, a: m.__setstate__(m.__getstate__()), [], None),
    "pickle": (lambda m, a: pickle.loads(pickle.dumps(m)), [], None),
    "rng_state": (lambda m, a: setattr(m, "rng_state", m.rng_state), [], None),
    "repr and properties": (lambda m, a: (repr(m), m.latent_dims, m.hidden_dims, m.n_params,
                                          m.optimizer_steps, m.likelihood, m.n_threads), [], None),
    # error paths
    "elbo NaN": (lambda m, a: m.elbo(a["X_nan"]), ["X_nan"], ValueError),
    "elbo wrong width": (lambda m, a: m.elbo(a["X_wide"]), ["X_wide"], ValueError),
    "elbo out of range": (lambda m, a: m.elbo(a["X_range"]), ["X_range"], ValueError),
    "elbo complex": (lambda m, a: m.elbo(a["X_complex"]), ["X_complex"], ValueError),
    "elbo no rows": (lambda m, a: m.elbo(a["X_empty"]), ["X_empty"], ValueError),
    "elbo bad noise": (lambda m, a: m.elbo(a["X"], noise=a["noise"][:1]), ["X", "noise"], ValueError),
    "elbo noise rows": (lambda m, a: m.elbo(a["X"][:3], noise=a["noise"]), ["X", "noise"],
                        ValueError),
    "decode wrong width": (lambda m, a: m.decode(a["X"]), ["X"], ValueError),
    "prior_log_density wrong width": (lambda m, a: m.prior_log_density(a["X"]), ["X"],
                                      ValueError),
    "sample negative": (lambda m, a: m.sample(-1), [], ValueError),
    "fit bad rate": (lambda m, a: m.fit(a["X"], learning_rate=0.0), ["X"], ValueError),
    "fit bad optimizer": (lambda m, a: m.fit(a["X"], optimizer="rmsprop"), ["X"], ValueError),
    "fit NaN": (lambda m, a: m.fit(a["X_nan"]), ["X_nan"], ValueError),
    "fit callback raises": (lambda m, a: m.fit(a["X"], callback=raise_value_error, history=[]),
                            ["X"], ValueError),
    "fit progress raises": (lambda m, a: m.fit(a["X"], batch_size=2, progress=raise_value_error),
                            ["X"], ValueError),
    "loss_and_grad bad beta": (lambda m, a: m.loss_and_grad(a["X"], beta=-1.0), ["X"], ValueError),
    "setstate bad": (lambda m, a: m.__setstate__({"parameters": np.zeros(3, np.float32)}), [],
                     ValueError),
    "constructor bad": (lambda m, a: hvae.Model(D, (0,), ()), [], ValueError),
    "constructor bad choice": (lambda m, a: hvae.Model(D, (2,), (), likelihood="poisson"), [],
                               ValueError),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_model_entry_point_does_not_leak(model, arrays, name):
    call, checked, raises = CALLS[name]
    objects = [model] + [arrays[k] for k in checked]
    if "noise" in checked:
        objects += arrays["noise"]
    callbacks = [raise_value_error, stop_after_one]
    assert_flat(lambda: call(model, arrays), objects + callbacks, raises=raises)


def test_dropped_views_release_the_model():
    """A parameter view holds a reference to its model, and only while it lives."""
    m = hvae.Model(D, LATENT, (8,), seed=0)
    count = sys.getrefcount(m)
    for _ in range(N_CALLS):
        view = m.parameters
        named = m.named_parameters()
    assert sys.getrefcount(m) == count + 1 + len(named)
    del view, named
    assert sys.getrefcount(m) == count


def test_creating_and_freeing_models_keeps_rss_flat():
    """Models, workspaces and optimizers live in malloc'd C memory: create,
    use and drop 2000 of them (each about 100 kB: a leak would cost 200 MB),
    and fail to create an absurd one as often; the resident set must not
    grow by more than 20 MB."""
    X = np.random.default_rng(0).random((8, 50), dtype=np.float32)

    def cycle():
        m = hvae.Model(50, (16, 8), (32,), likelihood="bernoulli", seed=1)
        m.n_threads = 1
        m.fit(X, n_epochs=1, batch_size=4)
        m.elbo(X)
        m.log_likelihood(X[:2], n_samples=4)
        try:
            hvae.Model(50, (16,), (200_000, 200_000))
        except MemoryError:
            pass
        else:
            raise AssertionError("a model of 4e10 parameters was created")

    for _ in range(50):
        cycle()
    gc.collect()
    before = rss_bytes()
    for _ in range(N_CALLS):
        cycle()
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 20e6, f"resident set grew by {grown / 1e6:.1f} MB over {N_CALLS} models"


# ---- HierarchicalVAE ------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    X = np.random.default_rng(1).random((12, 5))
    vae = HierarchicalVAE(latent_dims=(3, 2), hidden_dims=(6,), likelihood="bernoulli",
                          n_epochs=1, batch_size=4, random_state=0, n_threads=1).fit(X)
    return vae, X


ESTIMATOR_CALLS = {
    "fit": (lambda v, X: v.fit(X), None),
    "transform": (lambda v, X: v.transform(X), None),
    "score_samples": (lambda v, X: v.score_samples(X), None),
    "encode": (lambda v, X: v.encode(X), None),
    "inverse_transform": (lambda v, X: v.inverse_transform(v.transform(X)), None),
    "sample": (lambda v, X: v.sample(3, random_state=0), None),
    "log_likelihood": (lambda v, X: v.log_likelihood(X, n_samples=4), None),
    "transform NaN": (lambda v, X: v.transform(np.where(X > 0.5, np.nan, X)), ValueError),
    "transform wrong width": (lambda v, X: v.transform(X[:, :3]), ValueError),
    "fit bad parameter": (lambda v, X: v.set_params(learning_rate=-1.0).fit(X), ValueError),
}


@pytest.mark.parametrize("name", list(ESTIMATOR_CALLS))
def test_estimator_entry_point_does_not_leak(fitted, name):
    vae, X = fitted
    vae = pickle.loads(pickle.dumps(vae))  # a private copy: some calls change it
    call, raises = ESTIMATOR_CALLS[name]
    assert_flat(lambda: call(vae, X), [X, vae.model_], n_calls=200, raises=raises, warmup=50)


def test_save_and_load_do_not_leak(fitted, tmp_path):
    vae, X = fitted
    path = tmp_path / "model.hvae"
    vae.save(path)
    # A few milliseconds a call: fewer calls than elsewhere.
    assert_flat(lambda: hvae.load(path), [X], n_calls=100, warmup=30)
    assert_flat(lambda: vae.save(path), [X, vae.model_], n_calls=100, warmup=30)
    path.write_bytes(path.read_bytes()[:100])
    assert_flat(lambda: hvae.load(path), [], n_calls=100, raises=ValueError, warmup=30)
