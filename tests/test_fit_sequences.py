"""Property-based: any sequence of valid and invalid ``set_params`` + ``fit``
/ ``partial_fit`` calls leaves the estimator either exactly as it was (the
call failed before training) or valid with a consistent state: ``n_iter_``
epochs, every list of ``history_`` that long, no more optimizer steps than
the minibatches recorded, finite parameters; and a valid fit works after
any sequence (issue 16). Hypothesis, the derandomized 'ci' profile of
conftest.py; small data and models, so the whole test takes seconds.
"""
import math
import pickle

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, settings, strategies as st  # noqa: E402

import hvae  # noqa: E402
from hvae import HierarchicalVAE  # noqa: E402

BASE = dict(latent_dims=(3,), hidden_dims=(8,), n_epochs=2, batch_size=32, random_state=0,
            n_threads=1, likelihood="bernoulli", learning_rate=1e-3)

# Each parameter with valid and invalid values (and some that train but may
# diverge, like learning_rate=50).
CHANGES = {
    "learning_rate": [1e-3, 3e-2, 50.0, 1e39, -1.0, math.nan, 0.0],
    "beta": [1.0, 0.5, 1e39, -0.5],
    "weight_decay": [0.0, 1e-4, 1e39],
    "free_bits": [0.0, 0.1, 1e39],
    "batch_size": [16, 40, 0, 2**31],
    "n_mc_samples": [1, 2, 2**20 + 1, 0],
    "n_threads": [1, 2, 2000, 0],
    "latent_dims": [(3,), (2,), (2, 2), ()],
    "hidden_dims": [(8,), (), (0,)],
    "warm_start": [False, True],
    "early_stopping": [False, True],
    "validation_fraction": [None, 0.25, 1.5],
    "objective": ["elbo", "iwae", "nope"],
    "kl_warmup_epochs": [0, 2, -1],
    "n_epochs": [1, 2, 0, -1],
}
ALLOWED = (ValueError, MemoryError, hvae.DivergenceError)

change = st.sampled_from(sorted(CHANGES)).flatmap(
    lambda name: st.sampled_from(CHANGES[name]).map(lambda value: {name: value}))
step = st.tuples(st.lists(change, max_size=2), st.sampled_from(["fit", "partial_fit"]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.random((90, 12)) < 0.4).astype(np.float32)


def snapshot(vae):
    model = vae.__dict__.get("model_")
    return (sorted(key for key in vae.__dict__ if key.endswith("_")), model,
            None if model is None else model.parameters.copy(),
            None if model is None else model.optimizer_steps,
            None if model is None else model.rng_state,
            vae.__dict__.get("n_iter_"), pickle.dumps(vae.__dict__.get("history_")),
            vae.__dict__.get("best_epoch_"))


def unchanged(vae, before):
    after = snapshot(vae)
    return (after[0] == before[0] and after[1] is before[1]
            and (before[1] is None or np.array_equal(after[2], before[2]))
            and after[3:] == before[3:])


def assert_consistent(vae):
    if not hasattr(vae, "model_"):
        assert not [key for key in vae.__dict__ if key.endswith("_")]
        return
    history = vae.history_
    assert all(len(values) == vae.n_iter_ for values in history.values()), \
        {key: len(values) for key, values in history.items()}
    assert vae.model_.optimizer_steps <= sum(history["n_batches"])
    assert np.all(np.isfinite(vae.model_.parameters))
    assert vae.best_epoch_ is None or 0 <= vae.best_epoch_ < vae.n_iter_


@settings(max_examples=30)
@given(steps=st.lists(step, min_size=1, max_size=4))
def test_any_sequence_of_calls_leaves_a_consistent_estimator(data, steps):
    vae = HierarchicalVAE(**BASE)
    for changes, method in steps:
        for params in changes:
            vae.set_params(**params)
        before = snapshot(vae)
        note(f"{method} with {vae.get_params()}")
        try:
            getattr(vae, method)(data)
        except ALLOWED as error:
            assert str(error).strip()
            note(f"-> {type(error).__name__}: {error}")
            if not isinstance(error, hvae.DivergenceError):
                # A setting or an allocation that fails: nothing changed.
                assert unchanged(vae, before), f"{type(error).__name__}: {error}"
        assert_consistent(vae)
    # A valid fit works after whatever came before.
    vae.set_params(**BASE, warm_start=False, early_stopping=False, validation_fraction=None,
                   objective="elbo", beta=1.0, weight_decay=0.0, free_bits=0.0,
                   n_mc_samples=1, kl_warmup_epochs=0)
    vae.fit(data)
    assert vae.n_iter_ == 2
    assert_consistent(vae)
    assert vae.model_.optimizer_steps == sum(vae.history_["n_batches"])
