"""Data-parallel training over MPI (mpi4py), for ``fit(X, comm=...)``.

Every process (rank) holds a shard of the rows and runs the same fit: the
same parameters, optimizer state and random generator on every rank, the
same order of all the rows and the same noise draws. Each step, a rank
computes the loss and gradient of the rows of the global minibatch that it
holds (scaled for the whole minibatch), and one Allreduce over the flat
gradient buffer (straight from the C buffer, no copy) sums them, so every
rank applies the same Adam step. The result equals one process holding
all the rows with the same ``batch_size`` and seed, up to float rounding.

A model with a discriminator (FactorVAE's ``tc_weight``, the density-ratio
prior) trains it the same way: every rank gathers the minibatch's top-layer
samples (an Allreduce of each rank's rows at their places, zeros elsewhere),
draws the same counterparts (permuted or N(0, I) rows), differentiates the
discriminator's loss on its own rows, and the discriminator's gradient is
summed over the ranks, so every rank takes the same step. beta-TCVAE gathers
the minibatch's (mu, logvar) likewise, so that every row's terms are
estimated against the whole minibatch, with N the rows of all ranks, and
sums the gradients of the gathered rows before each rank takes its own.

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
        """The C core's reduction: sums ``values`` (float64, maybe empty)
        and ``grads`` (float32: the model's gradient buffer itself, the
        discriminator's, a gather of the minibatch's rows, or None) over all
        ranks, in place."""
        t0 = time.perf_counter()
        if values.size:
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


# ---- the agreements of a data-parallel fit or partial_fit ---------------------------

#: Estimator parameters that may differ between the ranks of a data-parallel
#: call (the seed of a new model is rank 0's).
UNSHARED_PARAMS = ("callbacks", "verbose", "n_threads", "random_state")


def shared_settings(estimator):
    """The parameters every rank of a data-parallel call must share, as
    reprs by name."""
    return {key: repr(value) for key, value in sorted(estimator.get_params().items())
            if key not in UNSHARED_PARAMS}


def model_digest(estimator):
    """A SHA-256 of the fitted model's parameters, generator, optimizer step
    count and the estimator's n_iter_: equal on ranks continuing one model."""
    import hashlib

    m = estimator.model_
    digest = hashlib.sha256(np.ascontiguousarray(m.parameters).tobytes())
    digest.update(repr((m.rng_state, m.optimizer_steps, estimator.n_iter_)).encode())
    return digest.hexdigest()


def agree_on_settings(session, estimator, continuing, has_validation, new_seed,
                      labels_of=None, same=None):
    """The first agreement of a data-parallel call: the same parameters,
    the same model to continue (or none), validation rows on all ranks or
    none, and the same values of ``same`` (a dict). ``new_seed()`` draws
    this rank's seed for a new model; ``labels_of()``, if given, returns
    this rank's class labels or None. Returns (rank 0's seed, the union of
    the ranks' class labels or None)."""
    def facts():
        labels = labels_of() if labels_of is not None else None
        return None, {"settings": shared_settings(estimator), "continuing": continuing,
                      "model": model_digest(estimator) if continuing else None,
                      "validation": has_validation, "labels": labels,
                      "seed": new_seed(), "same": same}

    _, gathered = session.agree("checking the settings", facts)
    for key, what in (("settings", "the estimator's parameters"),
                      ("continuing", "whether the call continues a fitted model"),
                      ("model", "the models being continued (parameters, optimizer "
                                "or generator)"),
                      ("validation", "whether validation_data is given"),
                      ("same", "the call's arguments")):
        session.require_same([g[key] for g in gathered], what)
    labels = [g["labels"] for g in gathered if g["labels"] is not None]
    classes = np.unique(np.concatenate(labels)) if labels else None
    return gathered[0]["seed"], classes


def agree_on_rows(session, estimator, compute):
    """The second agreement: ``compute()`` makes this rank's (training rows,
    validation rows or None, condition code); every rank must have
    succeeded, with the same numbers of features and condition columns.
    Marks the rows as this rank's shard and returns compute()'s result."""
    def rows():
        train, val, code = compute()
        return (train, val, code), (estimator.n_features_in_, code.n_conditions,
                                    train.n_rows)

    (train, val, code), gathered = session.agree("checking the data", rows)
    session.require_same([g[0] for g in gathered], "the numbers of features")
    session.require_same([g[1] for g in gathered], "the numbers of condition columns")
    n_global, shard_start = session.shard([g[2] for g in gathered], session.rank)
    train.parallel = (session, n_global, shard_start)
    if val is not None:
        val.parallel = (session, None, None)
    return train, val, code


def local_validation_data(validation_data):
    """One rank's validation_data (X_val, or (X_val, y_val)) with X_val as
    :func:`local_rows` makes it."""
    if isinstance(validation_data, tuple) and len(validation_data) == 2:
        return (local_rows(validation_data[0], "validation_data"), validation_data[1])
    if validation_data is not None:
        return local_rows(validation_data, "validation_data")
    return None
