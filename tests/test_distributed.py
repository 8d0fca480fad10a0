"""Data-parallel training in the C core and the extension, without MPI.

Model.fit(X_shard, reduce=..., n_global=..., shard_start=...) is driven here
by several Models in threads whose `reduce` sums through shared memory (a
stand-in for MPI_Allreduce), so the algorithm is checked on any machine:
shards of any sizes give the single-process parameters up to float rounding,
for every objective; every rank holds the same state; errors surface. The
real MPI runs (mpirun -n 2) are in tests/test_mpi.py.
"""
import threading

import numpy as np
import pytest

from hvae import Model
from hvae.datasets import load_digits


def make(**kwargs):
    options = dict(latent_dims=(8, 4), hidden_dims=(32,), likelihood="bernoulli", seed=3)
    options.update(kwargs)
    n_features = options.pop("n_features", 64)
    return Model(n_features, **options)


class ThreadComm:
    """Sums arrays across P threads, in place, like MPI_Allreduce(SUM) in
    rank order."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size
        self.calls = [0] * size

    def reducer(self, rank):
        def reduce(grads, values):
            self.calls[rank] += 1
            self.slots[rank] = (None if grads is None else grads.copy(), values.copy())
            self.barrier.wait()
            if grads is not None:
                grads[:] = sum(slot[0] for slot in self.slots)
            values[:] = sum(slot[1] for slot in self.slots)
            self.barrier.wait()
        return reduce


def fit_sharded(make_model, X, bounds, cond=None, **fit_kwargs):
    """Fits one model per shard X[bounds[r]:bounds[r+1]] in threads, in lock
    step; returns the models and their records."""
    size = len(bounds) - 1
    comm = ThreadComm(size)
    models = [make_model() for _ in range(size)]
    records, errors = [None] * size, []

    def run(rank):
        lo, hi = bounds[rank], bounds[rank + 1]
        try:
            records[rank] = models[rank].fit(
                X[lo:hi], cond=None if cond is None else cond[lo:hi],
                reduce=comm.reducer(rank), n_global=len(X), shard_start=lo, **fit_kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            comm.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return models, records, errors, comm


@pytest.fixture(scope="module")
def X():
    return load_digits()[0][:600]


CASES = {
    "elbo": dict(),
    "no_shuffle": dict(shuffle=False),
    "free_bits": dict(free_bits=0.2),
    "beta": dict(beta=0.5),
    "iwae": dict(objective="iwae", n_samples=3),
    "mc_samples": dict(n_samples=2),
    "sgd": dict(optimizer="sgd", learning_rate=0.05, momentum=0.9),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bounds", [(0, 300, 600), (0, 17, 350, 600)], ids=["2even", "3uneven"])
def test_shards_train_like_one_process(X, case, bounds):
    kwargs = dict(n_epochs=2, batch_size=50, **CASES[case])
    single = make()
    single_records = single.fit(X, **kwargs)
    models, records, errors, comm = fit_sharded(make, X, bounds, **kwargs)
    assert not errors, errors
    # Every rank holds the same state, bit for bit ...
    for m in models[1:]:
        np.testing.assert_array_equal(m.parameters, models[0].parameters)
        assert m.rng_state == models[0].rng_state
        assert m.optimizer_steps == models[0].optimizer_steps == single.optimizer_steps
    # ... which is the single process's up to float rounding (sums in
    # another order), and so are the recorded epoch means.
    np.testing.assert_allclose(models[0].parameters, single.parameters, rtol=0, atol=2e-5)
    assert models[0].rng_state == single.rng_state
    for rank_records in records:
        for mine, theirs in zip(rank_records, single_records):
            assert mine["n_rows"] == theirs["n_rows"] == len(X)
            assert mine["n_batches"] == theirs["n_batches"] == 12
            for key in ("loss", "objective", "elbo", "reconstruction"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6)
            np.testing.assert_allclose(mine["kl"], theirs["kl"], rtol=1e-6, atol=1e-6)
    # One reduction per step (plus one per step for free bits' layer means).
    per_step = 2 if case == "free_bits" else 1
    assert comm.calls == [per_step * 24] * comm.size


def test_conditional_shards_train_like_one_process(X):
    cond = np.eye(3, dtype=np.float32)[np.arange(len(X)) % 3]
    single = make(n_conditions=3)
    single.fit(X, cond=cond, n_epochs=2, batch_size=64)
    models, _, errors, _ = fit_sharded(lambda: make(n_conditions=3), X, (0, 250, 600),
                                       cond=cond, n_epochs=2, batch_size=64)
    assert not errors, errors
    np.testing.assert_allclose(models[1].parameters, single.parameters, rtol=0, atol=2e-5)


def test_a_rank_may_hold_fewer_rows_than_a_minibatch(X):
    # Rank 0 holds 3 rows: most minibatches have none of them.
    single = make()
    single.fit(X, n_epochs=1, batch_size=100)
    models, _, errors, _ = fit_sharded(make, X, (0, 3, 600), n_epochs=1, batch_size=100)
    assert not errors, errors
    np.testing.assert_allclose(models[0].parameters, single.parameters, rtol=0, atol=2e-5)


def test_a_failing_reduction_stops_the_fit_and_keeps_the_model(X):
    m = make()
    before = m.parameters.copy()
    calls = []

    def reduce(grads, values):
        calls.append(1)
        if len(calls) == 3:
            raise TimeoutError("the other ranks are gone")
        # one process: summing over itself changes nothing

    history = []
    with pytest.raises(TimeoutError, match="the other ranks are gone"):
        m.fit(X, n_epochs=2, batch_size=100, reduce=reduce, n_global=len(X),
              shard_start=0, history=history)
    assert m.optimizer_steps == 2  # the two steps before the failed reduction
    assert not np.array_equal(m.parameters, before) and np.all(np.isfinite(m.parameters))
    assert len(history) == 1 and history[0]["n_batches"] == 2 and not history[0]["complete"]
    m.fit(X, n_epochs=1, batch_size=100)  # still trainable


def test_reduce_works_on_the_gradient_buffer_itself(X):
    """The gradient handed to reduce is a view of the C buffer (no copy):
    what reduce writes there is what the optimizer applies."""
    m = make()
    before = m.parameters.copy()
    seen = []

    def reduce(grads, values):
        if grads is not None:
            seen.append((grads.dtype, grads.shape, grads.flags.writeable,
                         grads.flags.c_contiguous, grads.flags.owndata))
            grads[:] = 0.0

    m.fit(X, n_epochs=1, batch_size=300, reduce=reduce, n_global=len(X), shard_start=0,
          optimizer="sgd", learning_rate=0.1)
    assert seen == [(np.float32, (m.n_params,), True, True, False)] * 2
    np.testing.assert_array_equal(m.parameters, before)  # zero gradient, no step


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_global=600, shard_start=0), "pass reduce with n_global"),
    (dict(reduce=lambda g, v: None), "pass reduce with n_global >= 1"),
    (dict(reduce=lambda g, v: None, n_global=600, shard_start=-1), "shard_start >= 0"),
    (dict(reduce=lambda g, v: None, n_global=500, shard_start=0), "beyond n_global=500"),
    (dict(reduce=lambda g, v: None, n_global=700, shard_start=101), "beyond n_global=700"),
])
def test_bad_data_parallel_arguments(X, kwargs, message):
    m = make()
    before = m.parameters.copy()
    with pytest.raises(ValueError, match=message):
        m.fit(X, n_epochs=1, **kwargs)
    np.testing.assert_array_equal(m.parameters, before)


def test_reduce_must_be_callable(X):
    with pytest.raises(TypeError, match="reduce must be callable"):
        make().fit(X, reduce=3, n_global=600)
