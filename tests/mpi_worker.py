"""Run under mpirun by tests/test_mpi.py: one scenario per call.

    mpirun -n 2 python tests/mpi_worker.py SCENARIO OUT_DIR

Every rank writes OUT_DIR/rank<r>.npz (or prints), so that the test can
compare each rank's result with a single-process fit.
"""
import os
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

# This checkout's hvae before any installed one (python puts tests/, not
# the checkout, first on sys.path), as bench/mpi.py does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hvae import HierarchicalVAE
from hvae._native import DISCRIMINATOR_RECORD_KEYS, TCVAE_RECORD_KEYS
from hvae.datasets import load_digits
from mpi_settings import SETTINGS, VARIANTS  # noqa: E402 - tests/, the script's folder
from hvae.distributed import shard_rows

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
scenario, out_dir = sys.argv[1], sys.argv[2]

X = load_digits()[0][:1000]
X_val = load_digits()[0][1000:1300]
local = X[shard_rows(len(X), comm)]
local_val = X_val[shard_rows(len(X_val), comm)]





def report(text):
    """One line per rank in its own file (mpirun interleaves the ranks'
    output)."""
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "a") as f:
        f.write(text.replace("\n", " ") + "\n")


def save(vae, **extra):
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), parameters=vae.model_.parameters,
             elbo=np.array(vae.history_["elbo"]), n_iter=vae.n_iter_,
             rng=np.array(vae.model_.rng_state, dtype=np.uint64), **extra)


if scenario == "fit":
    vae = HierarchicalVAE(**SETTINGS).fit(local, comm=comm, validation_data=local_val)
    save(vae, val_elbo=np.array(vae.history_["val_elbo"]))
elif scenario == "warm_start":
    vae = HierarchicalVAE(**SETTINGS, warm_start=True).fit(local, comm=comm)
    vae.set_params(n_epochs=1).fit(local, comm=comm)
    save(vae)
elif scenario == "partial_fit":
    vae = HierarchicalVAE(**SETTINGS)
    for chunk in np.array_split(local, 2):
        vae.partial_fit(chunk, comm=comm)
    # Every call makes a Session; one watchdog thread serves them all.
    save(vae, n_watchdogs=sum(t.name == "hvae-mpi-watchdog" for t in threading.enumerate()))
elif scenario in VARIANTS:
    vae = HierarchicalVAE(**dict(SETTINGS, **VARIANTS[scenario])).fit(local, comm=comm)
    save(vae, **{key: np.array(vae.history_[key])
                 for key in DISCRIMINATOR_RECORD_KEYS + TCVAE_RECORD_KEYS
                 if key in vae.history_})
elif scenario == "bad_input":
    data = local.copy()
    if rank == 1:
        data[3, 5] = np.nan
    vae = HierarchicalVAE(**SETTINGS)
    try:
        vae.fit(data, comm=comm)
    except ValueError as exc:
        report(f"ValueError: {exc}")
    report(f"fitted: {hasattr(vae, 'model_')}")
elif scenario == "mismatch":
    vae = HierarchicalVAE(**dict(SETTINGS, batch_size=100 if rank == 0 else 50))
    try:
        vae.fit(local, comm=comm)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report(f"{type(exc).__name__}: {exc}")
elif scenario == "stop":
    # Only rank 1's callback asks to stop, after the second epoch.
    vae = HierarchicalVAE(**dict(SETTINGS, n_epochs=5),
                          callbacks=[lambda epoch, history: not (rank == 1 and epoch == 1)])
    vae.fit(local, comm=comm)
    save(vae)
elif scenario in ("dies", "hangs"):
    def callback(epoch, history):
        if rank == 1 and epoch == 1:
            if scenario == "dies":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)

    vae = HierarchicalVAE(**SETTINGS, callbacks=[callback])
    vae.fit(local, comm=comm, comm_timeout=3)
    print(f"rank {rank} finished, which it should not have", flush=True)
else:
    raise SystemExit(f"unknown scenario {scenario}")
