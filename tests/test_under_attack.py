"""Reliability under attack (issue 16): the reproducers of an adversarial
test, each a test that failed before its fix.

* Sizes from public arguments are checked before anything is allocated: no
  segfault, a MemoryError that says what and how much (subprocesses, since
  the failure was a crash).
* A fit that fails on a setting or an allocation leaves the estimator
  exactly as it was; an unfitted one stays unfitted.
* One fit, partial_fit, save or pickling of an estimator at a time: threads
  wait for each other; a callback calling back into its own fit gets a
  RuntimeError.
* Fork policy: a model (or estimator) busy in another thread at fork is
  refused in the child; an idle one works.
* Ctrl-C stops long evaluation calls within a fraction of a second.
"""
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import hvae
from hvae import HierarchicalVAE
from hvae.datasets import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = ("from hvae.datasets import load_digits\nX = load_digits()[0]\n"
          "X = (X / X.max()).astype('float32')\n")


def run_script(script, timeout=120):
    """Runs script (with X, the scaled digits) in a fresh interpreter
    importing this hvae; returns the completed process (a crash shows as a negative returncode)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", DIGITS + textwrap.dedent(script)], cwd=ROOT,
                          env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def X():
    data = load_digits()[0]
    return (data / data.max()).astype(np.float32)


def small_vae(**params):
    options = dict(latent_dims=(4,), hidden_dims=(16,), n_epochs=2, batch_size=64,
                   random_state=0, n_threads=1, likelihood="bernoulli")
    options.update(params)
    return HierarchicalVAE(**options)


def snapshot(vae):
    """Everything a failed call must leave as it was."""
    state = {key: value for key, value in vae.__dict__.items() if key.endswith("_")}
    model = state.get("model_")
    return (state.keys(), model, None if model is None else model.parameters.copy(),
            None if model is None else model.optimizer_steps,
            None if model is None else model.rng_state, vae.__dict__.get("n_iter_"),
            pickle.dumps(vae.__dict__.get("history_")), vae.__dict__.get("best_epoch_"))


def assert_unchanged(vae, before):
    after = snapshot(vae)
    assert after[0] == before[0]
    assert after[1] is before[1]
    if before[1] is not None:
        np.testing.assert_array_equal(after[2], before[2])
    assert after[3:] == before[3:]


# ---- 1. sizes checked before allocating ---------------------------------------------

def test_a_huge_n_global_raises_a_memory_error_that_says_what_not_a_segfault():
    result = run_script("""
        import hvae
        m = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,))
        for n_global in (2**61, 2**61 + 1, 2**60, 2**62):
            try:
                m.fit(X[:64], batch_size=32, reduce=lambda g, v: None, n_global=n_global,
                      shard_start=0)
            except MemoryError as error:
                print("MemoryError:", error)
        print(m.encode(X[:2])[0][0].shape)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and lines[-1] == "(2, 4)"
    for line in lines[:4]:
        assert "cannot allocate the row order" in line and "rows" in line


def test_an_oversized_workspace_names_its_rows_and_bytes(X):
    m = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,))
    with pytest.raises(MemoryError, match=r"workspace: 67108864 rows .* GB"):
        m.fit(X[:64], batch_size=128, n_samples=2**20)
    with pytest.raises(MemoryError, match="workspace"):
        m.reserve(2**40)
    assert m.encode(X[:2])[0][0].shape == (2, 4)


def test_the_core_s_float_messages_print_their_numbers(X):
    m = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,))
    with pytest.raises(ValueError) as info:
        m.fit(X[:8], learning_rate=1e39)
    message = str(info.value)
    assert "%" not in message and "> 0 " in message and "got 1e+39" in message


# ---- 2. a failed fit changes nothing ----------------------------------------------------

BAD_SETTINGS = [
    (dict(learning_rate=1e39), ValueError, "learning_rate"),
    (dict(beta=1e39), ValueError, "beta"),
    (dict(weight_decay=1e39), ValueError, "weight_decay"),
    (dict(free_bits=1e39), ValueError, "free_bits"),
    (dict(n_mc_samples=2**20 + 1), ValueError, "n_mc_samples"),
    (dict(n_importance_samples=2**20 + 1, objective="iwae"), ValueError,
     "n_importance_samples"),
    (dict(batch_size=2**31), ValueError, "batch_size"),
    (dict(n_threads=2000), ValueError, "n_threads"),
    (dict(n_mc_samples=2**20), MemoryError, "workspace: .* rows"),
]


@pytest.mark.parametrize("method", ["fit", "partial_fit", "warm_fit"])
@pytest.mark.parametrize("bad, error, message", BAD_SETTINGS)
def test_a_failed_refit_keeps_the_fitted_estimator(X, bad, error, message, method):
    vae = small_vae().fit(X[:300])
    before = snapshot(vae)
    vae.set_params(warm_start=method == "warm_fit", **bad)
    call = vae.partial_fit if method == "partial_fit" else vae.fit
    with pytest.raises(error, match=message):
        call(X[:300])
    assert_unchanged(vae, before)
    # ... and it trains on once the setting is fixed.
    vae.set_params(**small_vae().get_params()).set_params(warm_start=True, n_epochs=1)
    vae.fit(X[:300])
    assert vae.n_iter_ == 3


@pytest.mark.parametrize("bad, error, message", BAD_SETTINGS)
def test_a_failed_first_fit_leaves_the_estimator_unfitted(X, bad, error, message):
    vae = small_vae(**bad)
    with pytest.raises(error, match=message):
        vae.fit(X[:300])
    assert not [key for key in vae.__dict__ if key.endswith("_")]


def test_the_limits_are_the_core_s(X):
    """The table's limits are the binding's own: the largest valid setting
    is accepted by the core (no ValueError after the checks)."""
    from hvae._native import MAX_BATCH_SIZE, MAX_SAMPLES, MAX_THREADS
    from hvae._params import FLOAT32_MAX

    m = hvae.Model(64, latent_dims=(2,), hidden_dims=())
    m.n_threads = MAX_THREADS
    m.n_threads = 1
    m.fit(X[:4], n_epochs=0, batch_size=MAX_BATCH_SIZE, learning_rate=FLOAT32_MAX,
          beta=FLOAT32_MAX, weight_decay=FLOAT32_MAX, free_bits=FLOAT32_MAX)
    m.loss_and_grad(X[:1], n_samples=MAX_SAMPLES // 64)
    with pytest.raises(ValueError):
        m.fit(X[:4], n_epochs=0, batch_size=MAX_BATCH_SIZE + 1)


# ---- 3, 4. one call at a time per estimator --------------------------------------------

def test_two_threads_fitting_one_estimator_take_turns(X):
    reference = small_vae(n_epochs=6).fit(X[:400])
    vae = small_vae(n_epochs=6)
    errors = []

    def fit():
        try:
            vae.fit(X[:400])
        except Exception as error:  # pragma: no cover - the failure shown below
            errors.append(error)

    threads = [threading.Thread(target=fit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Two whole fits one after the other: the second is a fit from scratch.
    assert vae.n_iter_ == 6 and len(vae.history_["elbo"]) == 6
    np.testing.assert_array_equal(vae.model_.parameters, reference.model_.parameters)


def test_two_threads_partial_fitting_one_estimator_record_every_step(X):
    """Before: both saw no model_, both made one, and history_ recorded two
    passes with the steps of one. (float64 rows: converting them lets the
    two calls overlap.)"""
    rows = np.tile(X, (12, 1)).astype(np.float64)
    for _ in range(2):
        vae = small_vae()
        barrier = threading.Barrier(2)

        def partial_fit():
            barrier.wait()
            vae.partial_fit(rows)

        threads = [threading.Thread(target=partial_fit) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert vae.n_iter_ == 2
        assert vae.model_.optimizer_steps == sum(vae.history_["n_batches"]) == 2 * 337


def test_pickling_during_a_fit_captures_a_consistent_estimator(X, tmp_path):
    """Before: a pickle taken between two chunks of a fit held a model ahead
    of its history (pickling took 80 of 243 such snapshots). Now pickling
    waits for the fit."""
    rows = np.memmap(tmp_path / "X.f32", np.float32, "w+", shape=X.shape)
    rows[:] = X
    rows.flush()
    rows = np.memmap(tmp_path / "X.f32", np.float32, "r", shape=X.shape)
    vae = small_vae(n_epochs=3, batch_size=32, chunk_size=64)
    fitting = threading.Thread(target=vae.fit, args=(rows,))
    fitting.start()
    captures = []
    while fitting.is_alive() or not captures:
        captures.append(pickle.loads(pickle.dumps(vae)))
    fitting.join()
    assert vae.n_iter_ == 3
    for copy in captures:
        steps = copy.model_.optimizer_steps if hasattr(copy, "model_") else 0
        history = copy.__dict__.get("history_", {"n_batches": []})
        assert steps == sum(history["n_batches"])
        assert copy.__dict__.get("n_iter_", 0) == len(history["n_batches"])
    assert "_estimator_lock" not in pickle.loads(pickle.dumps(vae)).__dict__


def test_a_callback_calling_its_own_fit_gets_a_clear_error_and_history_stays(X):
    """Before: an inner fit of another architecture under early stopping
    ended the outer fit with NumPy's broadcast error and dropped its first
    epoch."""
    vae = small_vae(n_epochs=5, early_stopping=True)

    def refit(epoch, history):
        vae.set_params(latent_dims=(3,))
        vae.fit(X[:300])

    vae.set_params(callbacks=refit)
    with pytest.raises(RuntimeError, match="from inside its own fit"):
        vae.fit(X[:300])
    assert vae.n_iter_ == 1 and len(vae.history_["elbo"]) == 1
    assert vae.model_.latent_dims == (4,)
    assert vae.model_.optimizer_steps == sum(vae.history_["n_batches"])
    # set_params from the callback applies to the next fit.
    vae.set_params(callbacks=None)
    vae.fit(X[:300])
    assert vae.model_.latent_dims == (3,)


@pytest.mark.filterwarnings("ignore:callbacks cannot be saved")
def test_a_callback_may_save_its_estimator(X, tmp_path):
    saved = []

    def checkpoint(epoch, history):
        vae.save(tmp_path / f"epoch{epoch}.hvae")
        saved.append(epoch)

    vae = small_vae(callbacks=checkpoint)
    vae.fit(X[:300])
    assert saved == [0, 1]
    assert hvae.load(tmp_path / "epoch0.hvae").n_iter_ == 1


def test_the_lock_stays_out_of_parameters_and_clones(X):
    from sklearn.base import clone

    vae = small_vae().fit(X[:200])
    assert "_estimator_lock" in vae.__dict__
    twin = clone(vae)
    assert "_estimator_lock" not in twin.__dict__
    assert all(not key.startswith("_") for key in vae.get_params())


# ---- 5. fork policy ---------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_model_busy_at_fork_is_refused_in_the_child_an_idle_one_works():
    result = run_script("""
        import os, threading, time, warnings
        import hvae
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        busy = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,))
        idle = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,))
        vae = hvae.HierarchicalVAE(latent_dims=(4,), hidden_dims=(16,), n_epochs=10**6,
                                   batch_size=32, n_threads=1)
        inside = threading.Event()
        def progress(rows):
            inside.set()
        fit = threading.Thread(target=busy.fit, args=(X,),
                               kwargs=dict(n_epochs=10**6, progress=progress), daemon=True)
        fit.start()
        inside.wait(30)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                busy.encode(X[:2])
                code = 1
            except RuntimeError as error:
                code = 0 if "forked" in str(error) else 2
            code = code or (0 if idle.encode(X[:2])[0][0].shape == (2, 4) else 3)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        os._exit(0)
    """, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_an_estimator_fitting_at_fork_is_refused_in_the_child():
    result = run_script("""
        import os, pickle, threading, warnings
        import hvae
        warnings.simplefilter("ignore", DeprecationWarning)
        vae = hvae.HierarchicalVAE(latent_dims=(4,), hidden_dims=(16,), n_epochs=10**6,
                                   batch_size=32, n_threads=1)
        inside = threading.Event()
        vae.set_params(callbacks=lambda epoch, history: inside.set())
        threading.Thread(target=vae.fit, args=(X,), daemon=True).start()
        inside.wait(30)
        pid = os.fork()
        if pid == 0:
            try:
                pickle.dumps(vae)
                os._exit(1)
            except RuntimeError as error:
                os._exit(0 if "forked" in str(error) else 2)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        os._exit(0)
    """, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"


# ---- 6. Ctrl-C ---------------------------------------------------------------------------

def test_ctrl_c_stops_a_long_loss_and_grad_promptly():
    """Before: n_samples=2**20 on 6,400 rows ignored SIGINT (killed after
    40 s), and a fit heard it only between minibatches. Now the calls poll
    every 20 ms of work, between chunks, layers and phases; the bound allows
    for a loaded machine."""
    result = run_script("""
        import os, signal, threading, time
        import numpy as np
        import hvae
        X = np.tile(X, (4, 1))[:6400]
        m = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,))
        calls = {"loss_and_grad": lambda: m.loss_and_grad(X, n_samples=2**20),
                 "fit": lambda: m.fit(X[:1024], batch_size=256, n_samples=2**12),
                 "elbo": lambda: m.elbo(np.tile(X, (400, 1))),
                 "encode": lambda: m.encode(np.tile(X, (400, 1)))}
        for name, call in calls.items():
            sent = []
            def interrupt():
                time.sleep(0.5)
                sent.append(time.perf_counter())
                os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=interrupt).start()
            try:
                call()
                print(name, "finished")
            except KeyboardInterrupt:
                print(name, "%.3f" % (time.perf_counter() - sent[0]))
        print("after", m.encode(X[:2])[0][0].shape)
    """, timeout=100)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert float(lines["loss_and_grad"]) < 2.0
    assert float(lines["fit"]) < 2.0  # within a minibatch of 2**20 draws
    assert lines["after"] == "(2, 4)"
    for name in ("elbo", "encode"):  # fast enough to finish first, or stopped at once
        assert lines[name] == "finished" or float(lines[name]) < 2.0
