"""Run under mpirun by tests/test_mpi_categorical.py: every scenario of
CATEGORICAL_SCENARIOS in one launch.

    mpirun -n 2 python tests/mpi_worker_categorical.py OUT_DIR

Every rank fits each scenario's model on its shard of the rows and writes
OUT_DIR/<scenario>_rank<r>.npz, so that the test can compare each rank's
result with the same fit in a single process.
"""
import os
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

import hvae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpi_categorical_settings import SCENARIOS, data  # noqa: E402

from hvae import HierarchicalVAE  # noqa: E402
from hvae.distributed import shard_rows  # noqa: E402

# The test puts its checkout first on PYTHONPATH; say so if it did not win.
assert Path(hvae.__file__).resolve().parent.parent == Path(__file__).resolve().parent.parent, (
    f"imported {hvae.__file__}, not this checkout's hvae")
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
out_dir = sys.argv[1]
X, X_val = data()
local = X[shard_rows(len(X), comm)]
local_val = X_val[shard_rows(len(X_val), comm)]

for name, settings in SCENARIOS.items():
    vae = HierarchicalVAE(**settings).fit(local, comm=comm, validation_data=local_val)
    np.savez(os.path.join(out_dir, f"{name}_rank{rank}.npz"),
             parameters=vae.model_.parameters, elbo=np.array(vae.history_["elbo"]),
             val_elbo=np.array(vae.history_["val_elbo"]), n_iter=vae.n_iter_,
             rng=np.array(vae.model_.rng_state, dtype=np.uint64))
