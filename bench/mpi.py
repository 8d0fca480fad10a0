"""W2 trained data-parallel over MPI: throughput and the communication share.

Run under MPI, one thread per process::

    mpirun -n 2 python bench/mpi.py --json /tmp/mpi2.json

Every rank holds its shard of the Fashion-MNIST training rows and trains
the W2 model (latent (32,), hidden (512, 256), batch 128 global, Adam) as
``HierarchicalVAE.fit(X_shard, comm=comm)`` does: hvae.Model.fit with
hvae.distributed.Session's reduction, one Allreduce of the flat gradient
per step. Rank 0 writes one JSON object: the epoch times (after warm-up),
samples per second (median epoch), the time the reductions took (waiting
for the slower rank included) and, measured separately after a barrier, one
Allreduce of the gradient buffer alone, whence the communication share of a
step. ``bench/run.py`` runs this with 1 and 2 processes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# This checkout's hvae before any installed one (as bench/run.py does): an
# installed hvae from another tree fails to import against this extension.
for _path in (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import data  # noqa: E402

import hvae  # noqa: E402
from hvae.distributed import Session, shard_rows  # noqa: E402

LEARNING_RATE = 1e-3
SEED = 0


def allreduce_seconds(session, n_params, repeats=30):
    """Median time of one Allreduce of n_params floats, after a barrier."""
    MPI = session.MPI
    buffer = np.ones(n_params, dtype=np.float32)
    times = []
    for _ in range(repeats):
        session.comm.Barrier()
        start = time.perf_counter()
        session.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="W2", choices=data.WORKLOAD_NAMES)
    parser.add_argument("--rows", type=int, default=None, help="training rows (default all)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per process")
    parser.add_argument("--json", help="where rank 0 writes the results (default: stdout)")
    args = parser.parse_args(argv)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    session = Session(comm, timeout=600)
    workload = data.workloads([args.workload])[0]
    X = workload["X_train"] if args.rows is None else workload["X_train"][:args.rows]
    rows = shard_rows(len(X), comm)
    X_local = np.ascontiguousarray(X[rows])
    model = hvae.Model(X.shape[1], workload["latent_dims"], workload["hidden_dims"],
                       likelihood=workload["likelihood"], activation="relu", seed=SEED)
    model.n_threads = args.threads
    batch_size = workload["batch_size"]
    n_steps = -(-len(X) // batch_size)

    def epoch():
        reductions, reduce_time = session.n_reductions, session.reduce_seconds
        comm.Barrier()
        start = time.perf_counter()
        record = model.fit(X_local, n_epochs=1, batch_size=batch_size,
                           learning_rate=LEARNING_RATE, reduce=session.reduce,
                           n_global=len(X), shard_start=rows.start)[-1]
        seconds = time.perf_counter() - start
        return (seconds, session.reduce_seconds - reduce_time,
                session.n_reductions - reductions, record["elbo"])

    for _ in range(args.warmup):
        epoch()
    epochs = [epoch() for _ in range(args.epochs)]
    allreduce = allreduce_seconds(session, model.n_params)
    # Rank 0 reports; the reduce time is the slowest rank's view too.
    gathered = comm.gather([e[1] for e in epochs], root=0)
    if comm.rank != 0:
        return
    seconds = [e[0] for e in epochs]
    median_seconds = float(np.median(seconds))
    reduce_per_rank = [float(np.median(r)) for r in gathered]
    result = {
        "workload": args.workload,
        "n_processes": comm.size,
        "threads_per_process": args.threads,
        "n_rows": len(X),
        "rows_per_process": [int(c) for c in np.diff([r * len(X) // comm.size
                                                      for r in range(comm.size + 1)])],
        "batch_size": batch_size,
        "n_params": int(model.n_params),
        "steps_per_epoch": n_steps,
        "epoch_seconds": seconds,
        "samples_per_s": len(X) / median_seconds,
        "step_seconds": median_seconds / n_steps,
        "reduce_seconds_per_epoch": reduce_per_rank,
        "reduce_share": [r / median_seconds for r in reduce_per_rank],
        "allreduce_seconds": allreduce,
        "allreduce_bytes": 4 * int(model.n_params),
        "communication_share": allreduce * n_steps / median_seconds,
        "elbo_last_epoch": float(epochs[-1][3]),
        "mpi_library": MPI.Get_library_version().splitlines()[0],
    }
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
