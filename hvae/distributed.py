"""Data-parallel training over MPI (mpi4py), for ``fit(X, comm=...)``.

Every process (rank) holds a shard of the rows and runs the same fit: the
same parameters, optimizer state and random generator on every rank, the
same order of all the rows and the same noise draws. Each step, a rank
computes the loss and gradient of the rows of the global minibatch that it
holds (scaled for the whole minibatch), and one Allreduce over the flat
gradient buffer (straight from the C buffer, no copy) sums them, so every
rank applies the same Adam step. The result equals one process holding
all the rows with the same ``batch_size`` and seed, up to float rounding.

A typical script, run with ``mpirun -n 4 python train.py``::

    from mpi4py import MPI
    import numpy as np
    import hvae

    comm = MPI.COMM_WORLD
    X = np.load("data.npy", mmap_mode="r")           # every rank maps the file
    X_local = X[hvae.distributed.shard_rows(len(X), comm)]  # ... and reads its rows
    vae = hvae.HierarchicalVAE(latent_dims=(32,), n_threads=1, random_state=0)
    vae.fit(X_local, comm=comm)
    if comm.rank == 0:
        vae.save("model.npz")

mpi4py is an optional dependency (``pip install hvae[mpi]``); hvae imports
it only when a communicator is passed.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np

__all__ = ["DistributedError", "Session", "shard_rows"]


class DistributedError(RuntimeError):
    """The processes of a data-parallel fit disagree (data widths, settings)."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError("data-parallel training needs mpi4py and an MPI library "
                          "(pip install 'hvae[mpi]'; Debian: apt-get install "
                          "openmpi-bin)") from exc
    return MPI


def shard_rows(n_rows, comm):
    """The rows of ``n_rows`` that rank ``comm.rank`` holds: a slice.

    Contiguous blocks, in rank order, as equal as possible (sizes differ by
    at most one), so that rank r holds rows r * n / P .. (r + 1) * n / P.
    Slicing an ``np.memmap`` or an h5py dataset with it reads only those rows.
    """
    n_rows, size, rank = int(n_rows), comm.Get_size(), comm.Get_rank()
    if n_rows < size:
        raise ValueError(f"{n_rows} rows cannot be shared by {size} processes: "
                         f"every process needs at least one row")
    return slice(rank * n_rows // size, (rank + 1) * n_rows // size)


class _Watchdog:
    """Aborts the MPI job when a collective call outlives its deadline.

    A blocking MPI call cannot be interrupted from Python, and its
    nonblocking form is several times slower for large buffers (Open MPI's
    libnbc), so a daemon thread watches the deadline instead: arming and
    disarming it costs one assignment each per step. When it fires it writes
    why to stderr and calls MPI_Abort, which ends every process of the job
    with that message instead of leaving them hanging. One thread serves the
    whole process (every Session, every fit), started on first use.
    """

    def __init__(self):
        self.armed = None  # (deadline, comm, timeout, what) while a call waits
        self.thread = None
        self.lock = threading.Lock()

    def _watch(self):
        while threading.main_thread().is_alive():
            armed = self.armed
            if armed is not None and time.monotonic() > armed[0]:
                _, comm, timeout, what = armed
                sys.stderr.write(
                    f"hvae.distributed: rank {comm.Get_rank()} of {comm.Get_size()}: "
                    f"{what} did not complete within {timeout:g} s: another rank has "
                    f"probably died, hangs or stopped training (its own error, if any, "
                    f"is in its output). Aborting the MPI job.\n")
                sys.stderr.flush()
                comm.Abort(70)
                return
            time.sleep(0.1 if armed is None else min(0.1, armed[2] / 10))

    def arm(self, comm, timeout, what):
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    self.thread = threading.Thread(target=self._watch,
                                                   name="hvae-mpi-watchdog", daemon=True)
                    self.thread.start()
        self.armed = (time.monotonic() + timeout, comm, timeout, what)

    def disarm(self):
        self.armed = None


_watchdog = _Watchdog()


class Session:
    """One data-parallel fit: the communicator, the checks that all ranks
    agree, and the reduction the C core calls every step.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The processes that train together (usually ``MPI.COMM_WORLD``).
    timeout : float
        Seconds any collective call may wait for the other ranks; past it,
        the rank writes why to stderr and aborts the MPI job (MPI_Abort), so
        that a dead or hung rank never leaves the others waiting forever.
    """

    def __init__(self, comm, timeout=300.0):
        MPI = _mpi()
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD); "
                            f"got {type(comm).__name__}")
        timeout = float(timeout)
        if not timeout > 0:
            raise ValueError(f"comm_timeout must be > 0 seconds; got {timeout}")
        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = timeout
        self.n_reductions = 0
        self.reduce_seconds = 0.0

    def _allreduce(self, array, what):
        _watchdog.arm(self.comm, self.timeout, what)
        try:
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        finally:
            _watchdog.disarm()

    def reduce(self, grads, values):
        """The C core's reduction: sums ``values`` (float64) and ``grads``
        (float32, the model's gradient buffer itself, or None) over all
        ranks, in place."""
        t0 = time.perf_counter()
        self._allreduce(values, "the Allreduce of a step's loss terms")
        if grads is not None:
            self._allreduce(grads, "the Allreduce of a step's gradient")
        self.n_reductions += 1
        self.reduce_seconds += time.perf_counter() - t0

    def allgather(self, value, what="exchanging settings"):
        """Every rank's picklable value, in rank order (with the deadline)."""
        import pickle

        payload = np.frombuffer(pickle.dumps(value), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        sizes[self.rank] = payload.size
        self._allreduce(sizes, what)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        buffer = np.zeros(int(offsets[-1]), dtype=np.uint8)
        buffer[offsets[self.rank]:offsets[self.rank + 1]] = payload
        self._allreduce(buffer, what)
        return [pickle.loads(buffer[offsets[r]:offsets[r + 1]].tobytes())
                for r in range(self.size)]

    def sum(self, values, what="summing validation terms"):
        """Elementwise float64 sums of ``values`` over the ranks."""
        array = np.array(values, dtype=np.float64)
        self._allreduce(array, what)
        return array

    def any(self, flag, what="agreeing to stop"):
        """True on every rank when ``flag`` is true on some rank."""
        return bool(self.sum([1.0 if flag else 0.0], what)[0] > 0)
    # ---- agreement --------------------------------------------------------------

    def agree(self, what, compute):
        """Runs ``compute()`` here, which returns (local, shared), and tells
        every rank every rank's outcome: returns (local, [shared of each
        rank]) when all succeeded. When some rank's compute raised, every
        rank raises: that rank its own exception, the others a ValueError
        naming it. One collective call whatever happens, so that no rank is
        left waiting."""
        try:
            local, shared = compute()
            error = None
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            local = shared = None
            error = exc
        message = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self.allgather((message, shared), what)
        failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
        if failed:
            if error is not None:
                raise error
            detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise ValueError(f"data-parallel fit: {what} failed on another rank ({detail}); "
                             f"every rank stops before training")
        return local, [s for _, s in gathered]

    @staticmethod
    def require_same(values, what):
        """Raises DistributedError (on every rank, as every rank sees the
        same values) unless the ranks' values are equal."""
        differing = [r for r, v in enumerate(values) if v != values[0]]
        if differing:
            raise DistributedError(
                f"data-parallel fit: {what} differ between ranks (rank 0: {values[0]!r}; "
                + "; ".join(f"rank {r}: {values[r]!r}" for r in differing)
                + "); every rank must make the same call")

    @staticmethod
    def shard(counts, rank):
        """(n_global, shard_start) of ``rank`` from every rank's row count:
        the shards follow each other in rank order."""
        return sum(counts), sum(counts[:rank])


def local_rows(X, name="X"):
    """One rank's rows as fit uses them: an ndarray-like in place (an
    np.memmap as a plain view of its mapping, so it is not read in chunks);
    data that can only be read in chunks are refused."""
    from ._chunks import is_out_of_core

    if isinstance(X, np.memmap):
        return X.view(np.ndarray)
    if is_out_of_core(X):
        raise ValueError(
            f"{name}: a data-parallel fit takes each rank's rows in memory or as an "
            f"np.memmap; a {type(X).__name__} would be read in chunks, whose order the "
            f"ranks cannot share. Load this rank's shard (X[hvae.distributed.shard_rows("
            f"len(X), comm)]) or stream it with partial_fit(chunk, comm=comm)")
    return X
