"""Evaluation with weights packed once per parameter version (csrc/packed.c)
and one parallel region per chunk of rows: every row's result is independent
of the other rows bit for bit, and the packed weights follow every way the
parameters change (training steps, partial_fit, early stopping's restore,
writes through the Python views, pickling and loading)."""
import pickle

import numpy as np
import pytest

import hvae
from hvae import HierarchicalVAE
from hvae.datasets import load_digits

# Calls of 2048 rows or more read packed weights; smaller ones copy panels.
LARGE, PACKED, SMALL = 2400, 2100, 40


@pytest.fixture(scope="module")
def digits():
    """LARGE rows: the digits, then some of them again, shifted a little."""
    X = load_digits()[0]
    return np.ascontiguousarray(np.vstack([X, 0.9 * X[:LARGE - len(X)]]), dtype=np.float32)


def make(threads=1, **kw):
    args = dict(n_features=64, latent_dims=(6, 3), hidden_dims=(40, 24), likelihood="bernoulli",
                seed=0)
    args.update(kw)
    m = hvae.Model(**args)
    m.n_threads = threads
    return m


def fresh_copy(model):
    """The same parameters in a model that has never packed anything."""
    copy = pickle.loads(pickle.dumps(model))
    copy.n_threads = model.n_threads
    return copy


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("inference", ["markov", "ladder"])
def test_rows_are_independent_of_the_other_rows(digits, threads, inference):
    m = make(threads, inference=inference)
    X = digits[:LARGE]
    elbo, mu = m.elbo(X), m.encode(X)[0][0]
    order = np.random.default_rng(1).permutation(LARGE)
    for rows in (order[:PACKED], order[:SMALL], order[-1:]):  # packed, copied, one row
        part = np.ascontiguousarray(X[rows])
        np.testing.assert_array_equal(m.elbo(part), elbo[rows])
        np.testing.assert_array_equal(m.encode(part)[0][0], mu[rows])


def test_one_and_two_threads_agree(digits):
    X = digits[:LARGE]
    one, two = make(1), make(2)
    np.testing.assert_array_equal(one.elbo(X), two.elbo(X))
    for a, b in zip(one.encode(X), two.encode(X)):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("threads", [1, 2])
def test_writes_through_the_views_reach_evaluation(digits, threads):
    m = make(threads)
    X = digits[:LARGE]
    before = m.elbo(X), m.encode(X)[0][0]
    m.parameters[20 * 40 + 5] += 0.5  # the first layer's W at pixel 20 (never blank)
    _, view = m.named_parameters()[-4]  # a decoder tensor, through its own view
    view[...] *= 1.5
    after = m.elbo(X), m.encode(X)[0][0]
    reference = fresh_copy(m)
    np.testing.assert_array_equal(after[0], reference.elbo(X))
    np.testing.assert_array_equal(after[1], reference.encode(X)[0][0])
    assert not np.array_equal(after[0], before[0]) and not np.array_equal(after[1], before[1])
    # Back to the first parameters: the first results again.
    m.parameters[:] = make().parameters
    np.testing.assert_array_equal(m.elbo(X), before[0])
    np.testing.assert_array_equal(m.encode(X)[0][0], before[1])
    # Re-initialised in place, and another model's state set into this one.
    m.init_parameters(seed=5)
    np.testing.assert_array_equal(m.elbo(X), make(seed=5).elbo(X))
    other = make(seed=9)
    m.__setstate__(other.__getstate__())
    np.testing.assert_array_equal(m.elbo(X), other.elbo(X))


def test_training_steps_reach_evaluation(digits):
    m = make(2)
    X = digits[:LARGE]
    first = m.elbo(X)
    m.fit(X[:256], n_epochs=1, batch_size=64)
    np.testing.assert_array_equal(m.elbo(X), fresh_copy(m).elbo(X))
    assert not np.array_equal(m.elbo(X), first)


def test_partial_fit_early_stopping_and_load(digits, tmp_path):
    X = digits[:LARGE]
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(32,), likelihood="bernoulli",
                          n_epochs=3, batch_size=128, random_state=0, n_threads=2,
                          early_stopping=True, validation_fraction=0.2, n_iter_no_change=1)
    vae.fit(X)  # scores the held-out rows each epoch, may restore the best parameters
    scores, codes = vae.score_samples(X), vae.transform(X)
    reference = fresh_copy(vae.model_)
    np.testing.assert_array_equal(scores, reference.elbo(X))
    vae.partial_fit(X[:300])
    after = vae.score_samples(X)
    assert not np.array_equal(after, scores)
    np.testing.assert_array_equal(after, fresh_copy(vae.model_).elbo(X))
    assert not np.array_equal(vae.transform(X), codes)
    path = tmp_path / "vae.hvae"
    vae.save(path)
    loaded = hvae.file_format.load(path)
    np.testing.assert_array_equal(loaded.score_samples(X), after)
    # Parameters set from another model's, in place, through the view.
    vae.model_.parameters[:] = reference.parameters
    np.testing.assert_array_equal(vae.score_samples(X), scores)
    np.testing.assert_array_equal(vae.transform(X), codes)
