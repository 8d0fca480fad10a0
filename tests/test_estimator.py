"""HierarchicalVAE: scikit-learn's own checks, conventions, training, bad input."""
import pickle
import tracemalloc

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

import hvae
from hvae import HierarchicalVAE
from hvae.datasets import load_digits


@parametrize_with_checks([HierarchicalVAE()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits_split():
    X, y = load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:1400]], X[order[1400:]], y[order[:1400]], y[order[1400:]]


def small_vae(**params):
    defaults = dict(latent_dims=(8,), hidden_dims=(64,), likelihood="bernoulli",
                    n_epochs=3, batch_size=64, random_state=0, n_threads=1)
    defaults.update(params)
    return HierarchicalVAE(**defaults)


def test_training_improves_held_out_elbo(digits_split):
    X_train, X_test, _, _ = digits_split
    untrained = small_vae(n_epochs=0).fit(X_train)
    trained = small_vae(n_epochs=25).fit(X_train)
    before, after = untrained.score(X_test), trained.score(X_test)
    # An untrained model scores about -45 nats on these 64-pixel digits; 25
    # epochs reach about -27. Demand a gain of at least 10 nats per image.
    assert after > before + 10.0, (before, after)
    assert after > -32.0, after
    elbo = np.array(trained.history_["elbo"])
    assert elbo[-1] > elbo[0] + 5.0


def test_same_seed_gives_identical_parameters(digits_split):
    X_train = digits_split[0]
    a = small_vae(n_epochs=2).fit(X_train).model_.parameters
    b = small_vae(n_epochs=2).fit(X_train).model_.parameters
    c = small_vae(n_epochs=2, random_state=1).fit(X_train).model_.parameters
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hierarchy_history_and_shapes(digits_split):
    X_train, X_test, _, _ = digits_split
    vae = small_vae(latent_dims=(8, 4, 2), n_epochs=2).fit(X_train)
    assert vae.n_iter_ == 2
    assert set(vae.history_) == {"loss", "objective", "elbo", "reconstruction", "kl", "beta",
                                 "seconds", "n_batches"}
    kl = np.array(vae.history_["kl"])
    assert kl.shape == (2, 3)
    np.testing.assert_allclose(np.array(vae.history_["reconstruction"]) - kl.sum(axis=1),
                               vae.history_["elbo"], rtol=1e-9)
    assert vae.transform(X_test).shape == (len(X_test), 8)
    layers = vae.encode(X_test[:5])
    assert [mu.shape for mu, _ in layers] == [(5, 8), (5, 4), (5, 2)]
    samples = vae.sample(7, random_state=3)
    assert samples.shape == (7, 64) and samples.dtype == np.float32
    assert np.all((samples >= 0) & (samples <= 1))
    assert np.array_equal(samples, vae.sample(7, random_state=3))
    binary = vae.sample(5, random_state=3, observation_noise=True)
    assert set(np.unique(binary)) <= {0.0, 1.0}
    assert vae.inverse_transform(vae.transform(X_test[:4])).shape == (4, 64)
    assert vae.reconstruct(X_test[:4]).shape == (4, 64)
    scores = vae.score_samples(X_test)
    assert scores.shape == (len(X_test),) and scores.dtype == np.float64
    assert vae.score(X_test) == pytest.approx(scores.mean())


def test_warm_start_continues_training(digits_split):
    X_train = digits_split[0]
    once = small_vae(n_epochs=4).fit(X_train)
    twice = small_vae(n_epochs=2, warm_start=True).fit(X_train).fit(X_train)
    assert twice.n_iter_ == 4 and len(twice.history_["elbo"]) == 4
    np.testing.assert_array_equal(once.model_.parameters, twice.model_.parameters)
    cold = small_vae(n_epochs=2).fit(X_train).fit(X_train)
    assert cold.n_iter_ == 2


def test_pickle_and_clone_round_trip(digits_split):
    X_train, X_test, _, _ = digits_split
    vae = small_vae(latent_dims=(6, 3)).fit(X_train)
    restored = pickle.loads(pickle.dumps(vae))
    np.testing.assert_array_equal(restored.transform(X_test), vae.transform(X_test))
    np.testing.assert_array_equal(restored.score_samples(X_test), vae.score_samples(X_test))
    assert restored.history_ == vae.history_
    # Training continues identically after unpickling (optimizer and RNG state).
    vae.set_params(warm_start=True, n_epochs=1)
    restored.set_params(warm_start=True, n_epochs=1)
    np.testing.assert_array_equal(vae.fit(X_train).model_.parameters,
                                  restored.fit(X_train).model_.parameters)
    cloned = clone(vae)
    assert cloned.get_params() == vae.get_params()
    assert not hasattr(cloned, "model_")


def test_pipeline_and_grid_search(digits_split):
    X_train, X_test, y_train, y_test = digits_split
    pipe = make_pipeline(small_vae(n_epochs=10), StandardScaler(),
                         LogisticRegression(max_iter=500))
    pipe.fit(X_train, y_train)
    # 8 latent means of 64-pixel digits still separate the classes well.
    assert pipe.score(X_test, y_test) > 0.8
    search = GridSearchCV(small_vae(n_epochs=2), {"latent_dims": [(2,), (8,)]}, cv=2)
    search.fit(X_train)
    assert search.best_params_["latent_dims"] in [(2,), (8,)]
    assert np.isfinite(search.best_score_)


def test_no_copy_of_float32_c_contiguous_input():
    rng = np.random.default_rng(0)
    X = rng.random((20000, 50), dtype=np.float32)  # 4 MB
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(16,), n_epochs=1, batch_size=256,
                          random_state=0, n_threads=1)
    tracemalloc.start()
    vae.fit(X)
    _, fit_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    vae.transform(X)
    vae.score_samples(X)
    _, eval_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A copy of X would allocate X.nbytes (4 MB); the shuffle order (160 kB)
    # and outputs are all that fit and transform may allocate.
    assert fit_peak < X.nbytes / 4, fit_peak
    assert eval_peak < X.nbytes / 4, eval_peak
    # And a float64 input is converted exactly once.
    tracemalloc.start()
    vae.transform(X.astype(np.float64))
    _, peak64 = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak64 < 2.2 * X.nbytes + X.nbytes * 2  # the float64 input + one float32 copy


@pytest.mark.parametrize("params, message", [
    ({"latent_dims": (0,)}, "latent_dims"),
    ({"latent_dims": ()}, "latent_dims"),
    ({"hidden_dims": (8, -1)}, "hidden_dims"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"n_epochs": -1}, "n_epochs"),
    ({"beta": -1.0}, "beta"),
    ({"likelihood": "poisson"}, "likelihood"),
    ({"activation": "gelu"}, "activation"),
    ({"decoder_variance": "fixed"}, "decoder_variance"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"n_threads": 0}, "n_threads"),
])
def test_bad_parameters_raise_before_any_work(params, message):
    X = np.random.default_rng(0).random((10, 3))
    vae = HierarchicalVAE(**params)
    with pytest.raises(ValueError, match=message):
        vae.fit(X)
    assert not hasattr(vae, "model_")


@pytest.mark.parametrize("X, message", [
    (np.array([[0.1, np.nan], [0.2, 0.3]]), "NaN"),
    (np.array([[0.1, np.inf], [0.2, 0.3]]), "infinity"),
    (np.zeros((0, 3)), "0 sample"),
    (np.zeros(5), "2D array"),
    (np.zeros((2, 2, 2)), "dim"),
])
def test_bad_data_raises_value_error(X, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalVAE(n_epochs=1).fit(X)


def test_bad_data_leaves_a_fitted_model_untouched(digits_split):
    X_train, X_test, _, _ = digits_split
    vae = small_vae(n_epochs=1).fit(X_train)
    params, history = vae.model_.parameters.copy(), dict(vae.history_)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        vae.fit(X_train * 2.0)  # Bernoulli needs [0, 1]
    with pytest.raises(ValueError, match="NaN"):
        vae.fit(np.full_like(X_train, np.nan))
    assert np.array_equal(vae.model_.parameters, params)
    assert vae.history_ == history
    with pytest.raises(ValueError, match="features"):
        vae.transform(X_test[:, :10])
    with pytest.raises(ValueError, match="features"):
        vae.score(X_test[:, :10])
    with pytest.raises(ValueError, match="Z must have shape"):
        vae.inverse_transform(np.zeros((2, 3)))


def test_divergence_keeps_last_finite_model_and_history(digits_split):
    X = digits_split[0] * 50.0  # unscaled data and a huge step diverge
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(32,), n_epochs=200,
                          learning_rate=1e3, random_state=0, n_threads=1)
    with pytest.raises(hvae.DivergenceError, match="start of that epoch"):
        vae.fit(X)
    # Rolled back to the start of the diverging epoch: finite parameters with
    # a finite loss, the completed epochs in history_, and training goes on.
    assert np.all(np.isfinite(vae.model_.parameters))
    assert len(vae.history_["elbo"]) < 200
    assert vae.n_iter_ == len(vae.history_["elbo"])
    assert np.all(np.isfinite(vae.score_samples(X[:10])))
    vae.set_params(warm_start=True, learning_rate=1e-3, n_epochs=1)
    vae.fit(X)
    assert np.isfinite(vae.history_["elbo"][-1])
