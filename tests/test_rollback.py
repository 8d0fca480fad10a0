"""Divergence handling lives in the C training loop (hvae_train_epoch): the
Python binding sees a model, optimizer and generator back at the start of the
diverging epoch, bit for bit, and the reduction sizes come from C."""
import numpy as np
import pytest

import hvae
from hvae._native import Model


def _state_arrays(model):
    state = model.__getstate__()
    opt = state["optimizer"]
    return (np.array(model.parameters), np.array(opt["m"]), np.array(opt["v"]),
            opt["step"], tuple(state["rng_state"]))


def _diverge_one_epoch_at_a_time(model, X):
    """Single-epoch fits at a huge learning rate until one diverges; returns
    the state before that fit."""
    for _ in range(50):
        before = _state_arrays(model)
        try:
            model.fit(X, n_epochs=1, batch_size=16, learning_rate=1e6)
        except hvae.DivergenceError as error:
            assert "start of that epoch" in str(error)
            return before
    pytest.fail("no divergence in 50 epochs")


def test_a_diverging_epoch_returns_everything_to_its_start():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    model = Model(5, [3, 2], [8], seed=1)
    model.fit(X, n_epochs=2, batch_size=16)
    before = _diverge_one_epoch_at_a_time(model, X * 1e4)
    for a, b in zip(before, _state_arrays(model)):
        np.testing.assert_array_equal(a, b)
    records = model.fit(X, n_epochs=1, batch_size=16)
    assert records[0]["complete"] and np.isfinite(records[0]["loss"])


def test_reduce_sizes_come_from_c():
    """The data-parallel reduce callback receives the C core's value counts
    (hvae_train_reduce_values): T + 1 for free bits, 5 + T for the sums."""
    X = np.random.default_rng(1).random((16, 4), dtype=np.float32)
    model = Model(4, [3, 2, 2], [6], seed=2)
    sizes = set()

    def reduce(grads, values):
        sizes.add(values.shape[0])

    model.fit(X, n_epochs=1, batch_size=8, free_bits=0.1, reduce=reduce, n_global=16,
              shard_start=0)
    assert sizes == {3 + 1, 5 + 3}


def test_a_diverging_epoch_returns_the_discriminators_optimizer_too():
    """FactorVAE's discriminator steps inside the epoch; its Adam moments and
    step count go back with the model's (its weights are the model's last
    tensors)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    model = Model(5, [3], [8], seed=1, discriminator_hidden=(4,))
    model.fit(X, n_epochs=2, batch_size=16, tc_weight=1.0)

    def disc_state():
        d = model.__getstate__()["discriminator_optimizer"]
        return np.array(d["m"]), np.array(d["v"]), d["step"]

    for _ in range(50):
        before, disc_before = _state_arrays(model), disc_state()
        try:
            model.fit(X * 1e4, n_epochs=1, batch_size=16, learning_rate=1e6, tc_weight=1.0)
        except hvae.DivergenceError:
            break
    else:
        pytest.fail("no divergence in 50 epochs")
    for a, b in zip(before + disc_before, _state_arrays(model) + disc_state()):
        np.testing.assert_array_equal(a, b)
    assert disc_before[2] > 0
