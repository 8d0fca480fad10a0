"""hvae.Model, the low-level API: zero-copy, training loop, interruption, errors."""
import os
import pickle
import signal
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import hvae
from hvae.datasets import load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()[0]


def make(**kw):
    args = dict(n_features=64, latent_dims=(8, 4), hidden_dims=(32,), likelihood="bernoulli", seed=0)
    args.update(kw)
    m = hvae.Model(**args)
    m.n_threads = 1
    return m


def test_parameters_are_a_writable_zero_copy_view():
    m = make()
    p = m.parameters
    assert p.dtype == np.float32 and p.ndim == 1 and p.size == m.n_params
    assert p.flags.writeable and p.base is m
    named = m.named_parameters()
    assert sum(v.size for _, v in named) == m.n_params
    for _, view in named:
        assert np.shares_memory(view, p)
    # The views tile the buffer in order, without gaps or overlap.
    offsets = [(v.__array_interface__["data"][0] - p.__array_interface__["data"][0]) // 4
               for _, v in named]
    sizes = [v.size for _, v in named]
    assert offsets == list(np.cumsum([0] + sizes[:-1]))
    # Writing through a view changes the model.
    X = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    before = m.elbo(X)
    dict(named)["dec1.logits.b"][:] += 1.0
    assert not np.array_equal(before, m.elbo(X))
    assert m.parameters[offsets[sizes and [n for n, _ in named].index("dec1.logits.b")]] == \
        dict(named)["dec1.logits.b"][0]


def test_views_keep_the_model_alive():
    view = make().parameters
    del_ok = view.copy()
    import gc
    gc.collect()
    np.testing.assert_array_equal(view, del_ok)


def test_float32_c_contiguous_input_is_not_copied():
    m = make()
    X = np.random.default_rng(0).random((30000, 64), dtype=np.float32)  # 7.7 MB
    tracemalloc.start()
    m.elbo(X)
    m.encode(X)
    m.fit(X, n_epochs=1, batch_size=512)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Outputs: elbo (n float64), encode 2 x (mu, logvar): about 1.9 MB. A copy
    # of X would add 7.7 MB.
    assert peak < X.nbytes / 2, peak


@pytest.mark.parametrize("make_input", [
    lambda X: X.astype(np.float64),
    lambda X: np.asfortranarray(X),
    lambda X: X.astype(">f4"),
    lambda X: np.repeat(X, 2, axis=0)[::2],
])
def test_other_layouts_give_the_same_result(make_input):
    m = make()
    X = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    np.testing.assert_array_equal(m.elbo(make_input(X)), m.elbo(X))


def test_fit_is_deterministic_and_resumable(digits):
    a, b, c = make(), make(), make()
    a.fit(digits, n_epochs=3, batch_size=64)
    b.fit(digits, n_epochs=3, batch_size=64)
    for _ in range(3):
        c.fit(digits, n_epochs=1, batch_size=64)
    assert np.array_equal(a.parameters, b.parameters)
    assert np.array_equal(a.parameters, c.parameters)
    assert a.optimizer_steps == 3 * int(np.ceil(len(digits) / 64))


def test_fit_records_and_callback(digits):
    m = make()
    seen = []

    def callback(epoch, record):
        seen.append(epoch)
        return epoch < 2  # stop after the third epoch

    history = []
    records = m.fit(digits, n_epochs=10, batch_size=128, callback=callback, history=history)
    assert seen == [0, 1, 2]
    assert records == history and len(records) == 3
    for r in records:
        assert r["complete"] and r["n_rows"] == len(digits)
        assert r["elbo"] == pytest.approx(r["reconstruction"] - sum(r["kl"]))
        assert r["loss"] == pytest.approx(-r["elbo"])


def test_callback_error_propagates_and_keeps_history(digits):
    m = make()
    history = []

    def callback(epoch, record):
        if epoch == 1:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        m.fit(digits, n_epochs=5, callback=callback, history=history)
    assert len(history) == 2
    assert np.all(np.isfinite(m.parameters))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_after_the_current_minibatch(digits):
    m = make(hidden_dims=(256, 256))
    X = np.tile(digits, (4, 1))
    history = []
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        m.fit(X, n_epochs=10_000, batch_size=32, history=history)
    timer.join()
    assert time.perf_counter() - started < 5.0
    assert m.optimizer_steps > 0
    assert np.all(np.isfinite(m.parameters))
    # The interrupted epoch is recorded as incomplete; the model still works.
    assert history and not history[-1]["complete"]
    assert np.all(np.isfinite(m.elbo(digits[:10])))


def test_gil_is_released_during_fit(digits):
    m = make(hidden_dims=(256, 256))
    X = np.tile(digits, (4, 1))
    ticks = 0
    done = threading.Event()

    def train():
        m.fit(X, n_epochs=3, batch_size=64)
        done.set()

    worker = threading.Thread(target=train)
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks > 20


def test_concurrent_calls_on_one_model_wait_for_it(digits):
    """A call from another thread waits until the fit releases the model,
    then sees the fitted model; the fit is unharmed."""
    m, undisturbed = make(hidden_dims=(256, 256)), make(hidden_dims=(256, 256))
    X = np.tile(digits, (4, 1))
    undisturbed.fit(X, n_epochs=3, batch_size=64)
    started, finished = threading.Event(), []

    def train():
        m.fit(X, n_epochs=3, batch_size=64, progress=lambda n: started.set())
        finished.append(time.perf_counter())

    worker = threading.Thread(target=train)
    worker.start()
    started.wait()
    assert worker.is_alive()
    value = m.elbo(X[:5])  # issued mid-fit: waits for the whole fit call
    returned = time.perf_counter()
    worker.join()
    np.testing.assert_array_equal(m.parameters, undisturbed.parameters)
    np.testing.assert_array_equal(value, undisturbed.elbo(X[:5]))
    assert finished and finished[0] <= returned + 0.05


def test_a_fit_callback_cannot_call_back_into_its_model(digits):
    m = make()
    errors = []

    def callback(epoch, record):
        try:
            m.elbo(digits[:3])
        except RuntimeError as exc:
            errors.append(str(exc))

    m.fit(digits, n_epochs=2, batch_size=64, callback=callback)  # no deadlock
    assert len(errors) == 2 and "busy in a call of this thread" in errors[0]
    assert np.all(np.isfinite(m.elbo(digits[:3])))  # usable afterwards


def test_two_models_in_two_threads_match_sequential(digits):
    seq = [make(seed=s) for s in (1, 2)]
    for m in seq:
        m.fit(digits, n_epochs=2, batch_size=64)
    par = [make(seed=s) for s in (1, 2)]
    threads = [threading.Thread(target=m.fit, args=(digits,), kwargs=dict(n_epochs=2, batch_size=64))
               for m in par]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(seq, par):
        np.testing.assert_array_equal(a.parameters, b.parameters)


def test_sample_and_decode(digits):
    m = make()
    m.fit(digits, n_epochs=1)
    s1, s2 = m.sample(6, seed=5), m.sample(6, seed=5)
    assert s1.shape == (6, 64) and np.array_equal(s1, s2)
    assert not np.array_equal(m.sample(6), m.sample(6))  # the model's own stream advances
    mean, logvar = hvae.Model(64, (3,), (8,)).decode(np.zeros((2, 3)), return_logvar=True)
    assert mean.shape == logvar.shape == (2, 64)
    assert np.all(np.abs(logvar) <= 20.0)
    assert m.sample(0).shape == (0, 64)


def test_pickle_round_trip_keeps_everything(digits):
    m = make()
    m.fit(digits, n_epochs=1)
    r = pickle.loads(pickle.dumps(m))
    assert repr(r) == repr(m)
    assert np.array_equal(r.parameters, m.parameters)
    assert r.rng_state == m.rng_state and r.optimizer_steps == m.optimizer_steps
    m.fit(digits, n_epochs=1)
    r.fit(digits, n_epochs=1)
    assert np.array_equal(r.parameters, m.parameters)


def test_setstate_rejects_bad_state_and_keeps_the_model():
    m = make()
    before = m.parameters.copy()
    state = m.__getstate__()
    bad = dict(state, parameters=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="parameters holds 3 values"):
        m.__setstate__(bad)
    with pytest.raises(ValueError, match="lacks 'rng_state'"):
        m.__setstate__({k: v for k, v in state.items() if k != "rng_state"})
    assert np.array_equal(m.parameters, before)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(latent_dims=()), ValueError, "latent_dims must have 1 to"),
    (dict(latent_dims=(4, 0)), ValueError, r"latent_dims\[1\] must be a positive size"),
    (dict(hidden_dims=(-3,)), ValueError, "hidden_dims"),
    (dict(n_features=0), ValueError, "n_features"),
    (dict(likelihood="poisson"), ValueError, "likelihood must be one of"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(decoder_variance="x"), ValueError, "decoder_variance"),
    (dict(latent_dims=(1,) * 17), ValueError, "latent_dims must have 1 to 16"),
    (dict(hidden_dims=(1 << 40,)), ValueError, "below 2"),
    (dict(hidden_dims=(200_000, 200_000)), MemoryError, "out of memory"),
])
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        make(**kwargs)


@pytest.mark.parametrize("X, message", [
    (np.zeros((3, 5), np.float32), "has 5 columns, but the model expects 64"),
    (np.zeros(64, np.float32), "2-D array"),
    (np.zeros((0, 64), np.float32), "0 rows"),
    (np.zeros((2, 64), np.complex64), "real numbers"),
    (np.array([["a"] * 64]), "real numbers"),
    (np.full((2, 64), np.nan, np.float32), r"NaN or infinity \(first at row 0, column 0\)"),
    (np.full((2, 64), 2.0, np.float32), r"outside \[0, 1\]"),
])
def test_bad_data_errors(X, message):
    m = make()
    before = m.parameters.copy()
    for call in (m.elbo, m.encode, lambda X: m.fit(X, n_epochs=1), m.loss_and_grad):
        with pytest.raises(ValueError, match=message):
            call(X)
    assert np.array_equal(m.parameters, before)
    assert m.optimizer_steps == 0


def test_bad_noise_and_options():
    m = make()
    X = np.zeros((3, 64), np.float32)
    with pytest.raises(ValueError, match="noise must hold 2 arrays"):
        m.elbo(X, noise=[np.zeros((3, 8))])
    with pytest.raises(ValueError, match=r"noise\[1\] has 5 rows but X has 3"):
        m.elbo(X, noise=[np.zeros((3, 8)), np.zeros((5, 4))])
    with pytest.raises(ValueError, match=r"noise\[0\] has 7 columns"):
        m.elbo(X, noise=[np.zeros((3, 7)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="learning_rate"):
        m.fit(X, learning_rate=0)
    with pytest.raises(ValueError, match="batch_size"):
        m.fit(X, batch_size=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        m.fit(X, optimizer="rmsprop")
    with pytest.raises(TypeError, match="callback, progress and reduce must be callable"):
        m.fit(X, callback=3)
    with pytest.raises(ValueError, match="n_threads"):
        m.n_threads = 0


def test_sgd_and_adam_both_train(digits):
    for optimizer, lr in (("adam", 1e-3), ("sgd", 0.05)):
        m = make()
        before = m.elbo(digits).mean()
        m.fit(digits, n_epochs=5, batch_size=64, optimizer=optimizer, learning_rate=lr)
        assert m.elbo(digits).mean() > before + 3.0, optimizer
