"""Data-parallel training of categorical layers over real MPI (`mpirun -n
2`): Gumbel-softmax with an annealed temperature, straight-through, a
hierarchy of two categorical layers, and the score-function estimator with
its running-mean and leave-one-out baselines. As tests/test_mpi.py asserts
for the Gaussian model: every rank ends with the same model and generator,
bit for bit, and that model is the single process's fit of all the rows up
to float rounding (the gradient's sums run in another order), with the same
training and validation ELBO history.

The running-mean baseline is the one piece of state a step builds from its
rows' learning signals: it must move by the whole minibatch's mean signal,
summed over the ranks, or each rank would centre its rows by its own shard's
mean and the fit would differ from the single process's.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpi_categorical_settings import SCENARIOS, data  # noqa: E402
from mpi_probe import mpi_missing  # noqa: E402

from hvae import HierarchicalVAE  # noqa: E402

WORKER = Path(__file__).with_name("mpi_worker_categorical.py")
# The workers must import this checkout's hvae, not an installed one (the
# worker's directory, not the checkout, heads their sys.path).
ROOT = Path(__file__).resolve().parent.parent

_SKIP = mpi_missing()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


@pytest.fixture(scope="module")
def mpi_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi_categorical")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    run = subprocess.run(["mpirun", "-n", "2", sys.executable, str(WORKER), str(out)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return {name: [np.load(out / f"{name}_rank{r}.npz") for r in range(2)]
            for name in SCENARIOS}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_train_categorical_layers_like_one(mpi_results, name):
    results = mpi_results[name]
    X, X_val = data()
    single = HierarchicalVAE(**SCENARIOS[name]).fit(X, validation_data=X_val)
    np.testing.assert_array_equal(results[1]["parameters"], results[0]["parameters"])
    np.testing.assert_array_equal(results[1]["rng"], results[0]["rng"])
    np.testing.assert_allclose(results[0]["parameters"], single.model_.parameters,
                               rtol=0, atol=2e-6)
    np.testing.assert_array_equal(results[0]["rng"],
                                  np.array(single.model_.rng_state, dtype=np.uint64))
    np.testing.assert_allclose(results[0]["elbo"], single.history_["elbo"], rtol=1e-5)
    np.testing.assert_allclose(results[1]["val_elbo"], single.history_["val_elbo"],
                               rtol=1e-5)
    assert int(results[0]["n_iter"]) == single.n_iter_
