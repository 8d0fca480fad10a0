"""Data-parallel training over real MPI: `mpirun -n 2` on this machine.

Each test launches tests/mpi_worker.py under mpirun and compares every
rank's result with the same fit in this single process. Skipped where
mpirun or mpi4py is missing (CI installs Open MPI and mpi4py).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpi_probe import mpi_missing  # noqa: E402

from hvae import HierarchicalVAE
from hvae._native import DISCRIMINATOR_RECORD_KEYS, TCVAE_RECORD_KEYS
from hvae.datasets import load_digits
from mpi_settings import SETTINGS, VARIANTS  # noqa: E402

WORKER = Path(__file__).with_name("mpi_worker.py")


_SKIP = mpi_missing()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def mpirun(scenario, tmp_path, n=2, timeout=120):
    # PYTHONPATH: the workers import this checkout's hvae, not an installed one.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.run(["mpirun", "-n", str(n), sys.executable, str(WORKER), scenario,
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ranks(tmp_path, n=2):
    return [np.load(tmp_path / f"rank{r}.npz") for r in range(n)]


@pytest.fixture(scope="module")
def data():
    X = load_digits()[0]
    return X[:1000], X[1000:1300]


def assert_matches(results, single):
    # Every rank holds the same model, bit for bit, and the same generator...
    for r in results[1:]:
        np.testing.assert_array_equal(r["parameters"], results[0]["parameters"])
        np.testing.assert_array_equal(r["rng"], results[0]["rng"])
    # ... which is the single process's, up to float rounding (the sums of
    # the gradient run in another order).
    np.testing.assert_allclose(results[0]["parameters"], single.model_.parameters,
                               rtol=0, atol=2e-6)
    np.testing.assert_array_equal(results[0]["rng"],
                                  np.array(single.model_.rng_state, dtype=np.uint64))
    np.testing.assert_allclose(results[0]["elbo"], single.history_["elbo"], rtol=1e-5)
    assert int(results[0]["n_iter"]) == single.n_iter_


def test_two_processes_train_like_one(tmp_path, data):
    X, X_val = data
    run = mpirun("fit", tmp_path)
    assert run.returncode == 0, run.stderr
    single = HierarchicalVAE(**SETTINGS).fit(X, validation_data=X_val)
    results = ranks(tmp_path)
    assert_matches(results, single)
    # Validation terms are summed over the ranks' validation shards.
    np.testing.assert_allclose(results[1]["val_elbo"], single.history_["val_elbo"], rtol=1e-5)


def test_warm_started_fits_continue_together(tmp_path, data):
    X, _ = data
    run = mpirun("warm_start", tmp_path)
    assert run.returncode == 0, run.stderr
    single = HierarchicalVAE(**SETTINGS, warm_start=True).fit(X)
    single.set_params(n_epochs=1).fit(X)
    assert_matches(ranks(tmp_path), single)


def test_partial_fit_streams_together(tmp_path, data):
    X, _ = data
    run = mpirun("partial_fit", tmp_path)
    assert run.returncode == 0, run.stderr
    # Call k trains on every rank's k-th chunk: in rank order, one pass.
    shards = [X[:500], X[500:]]
    single = HierarchicalVAE(**SETTINGS)
    for k in range(2):
        single.partial_fit(np.concatenate([np.array_split(s, 2)[k] for s in shards]))
    results = ranks(tmp_path)
    assert_matches(results, single)
    assert [int(r["n_watchdogs"]) for r in results] == [1, 1]




@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_processes_train_a_discriminator_or_tcvae_like_one(tmp_path, data, variant):
    """FactorVAE, the density-ratio prior (the discriminator's gradient
    summed over the ranks) and beta-TCVAE (the minibatch gathered, N the
    rows of both ranks) train on two ranks as on one process: the same
    parameters on every rank, the discriminator's included (they close the
    parameter buffer), equal to the single process's up to rounding, and
    the same recorded terms."""
    X, _ = data
    run = mpirun(variant, tmp_path)
    assert run.returncode == 0, run.stderr
    single = HierarchicalVAE(**dict(SETTINGS, **VARIANTS[variant])).fit(X)
    results = ranks(tmp_path)
    assert_matches(results, single)
    n_disc = sum(v.size for name, v in single.model_.named_parameters()
                 if name.startswith("discriminator."))
    assert n_disc > 0 or variant == "tcvae"
    extra = [key for key in single.history_
             if key in DISCRIMINATOR_RECORD_KEYS + TCVAE_RECORD_KEYS]
    assert len(extra) == (3 if variant == "tcvae" else 2)
    for key in extra:
        for r in results:
            np.testing.assert_allclose(r[key], single.history_[key], rtol=1e-4, atol=1e-5,
                                       err_msg=key)


def reports(tmp_path, n=2):
    return [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(n)]


def test_bad_input_on_one_rank_stops_every_rank_before_training(tmp_path):
    run = mpirun("bad_input", tmp_path)
    assert run.returncode == 0, run.stderr
    for lines in reports(tmp_path):
        assert lines[0].startswith("ValueError") and "NaN" in lines[0]
        assert lines[1] == "fitted: False"
    # The other rank names the one whose data were bad.
    assert "another rank (rank 1: ValueError" in reports(tmp_path)[0][0]


def test_different_settings_on_two_ranks_are_refused_on_both(tmp_path):
    run = mpirun("mismatch", tmp_path)
    assert run.returncode == 0, run.stderr
    for lines in reports(tmp_path):
        assert lines[0].startswith("DistributedError")
        assert "parameters differ between ranks" in lines[0] and "batch_size" in lines[0]


def test_a_callback_stopping_on_one_rank_stops_all(tmp_path):
    run = mpirun("stop", tmp_path)
    assert run.returncode == 0, run.stderr
    results = ranks(tmp_path)
    assert [int(r["n_iter"]) for r in results] == [2, 2]
    np.testing.assert_array_equal(results[0]["parameters"], results[1]["parameters"])


@pytest.mark.parametrize("scenario, expected", [
    # A killed rank: mpirun itself ends the job and says so.
    ("dies", ("signal 9", "Killed")),
    # A hung rank: the other's watchdog aborts the job after comm_timeout.
    ("hangs", ("hvae.distributed: rank 0 of 2:",)),
])
def test_a_dead_or_hung_rank_stops_the_others(tmp_path, scenario, expected):
    run = mpirun(scenario, tmp_path, timeout=90)
    assert run.returncode != 0
    assert "which it should not have" not in run.stdout
    output = run.stdout + run.stderr
    assert any(text in output for text in expected), output[-2000:]
    if scenario == "hangs":
        assert "did not complete within 3 s" in output, output[-2000:]
