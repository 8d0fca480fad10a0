"""HierarchicalVAE with categorical latent layers: scikit-learn's checks,
training, the outputs of a categorical layer, save/load, pickle,
partial_fit and the estimator options' validation."""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import hvae
from hvae import HierarchicalVAE
from hvae.datasets import load_digits


@parametrize_with_checks([HierarchicalVAE(latent_dims=(2,), latent_types="categorical",
                                          n_categories=3, hidden_dims=(16,), n_epochs=3)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, _ = load_digits()
    return X[:600]


def cat_vae(**params):
    base = dict(latent_dims=(4,), latent_types="categorical", n_categories=5,
                hidden_dims=(32,), likelihood="bernoulli", n_epochs=4, batch_size=50,
                random_state=0, n_threads=1, temperature_decay=1e-3)
    base.update(params)
    return HierarchicalVAE(**base)


def test_categorical_vae_learns_and_reports_class_probabilities(digits):
    vae = cat_vae().fit(digits)
    history = vae.history_["elbo"]
    assert history[-1] > history[0] + 2  # it learns (seen: 3.8 nats in 4 epochs)
    Z = vae.transform(digits[:7])
    assert Z.shape == (7, 20)
    np.testing.assert_allclose(Z.reshape(7, 4, 5).sum(axis=2), 1.0, atol=1e-5)
    assert vae.get_feature_names_out().shape == (20,)
    (probs, log_probs), = vae.encode(digits[:7])
    np.testing.assert_allclose(np.exp(log_probs), probs, rtol=1e-5, atol=1e-7)
    ll = vae.log_likelihood(digits[:20], n_samples=200)
    elbo = vae.score_samples(digits[:20])
    assert np.mean(ll) > np.mean(elbo) - 1.0  # the bound is tighter on average
    samples = vae.sample(5, random_state=1)
    assert samples.shape == (5, 64) and np.all((samples >= 0) & (samples <= 1))
    # One-hot codes decode (inverse_transform takes M*K columns).
    onehot = np.eye(5, dtype=np.float32)[np.random.default_rng(0).integers(0, 5, (3, 4))]
    assert vae.inverse_transform(onehot.reshape(3, 20)).shape == (3, 64)
    with pytest.raises(ValueError, match=r"\(n_samples, 20\)"):
        vae.inverse_transform(np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("params", [
    dict(gradient_estimator="score_function"),
    dict(gradient_estimator="score_function", score_baseline="leave_one_out",
         n_mc_samples=3),
    dict(straight_through=True),
    dict(latent_dims=(4, 3), latent_types=("categorical", "gaussian"), n_categories=(5, 2)),
    dict(latent_dims=(6, 3), latent_types=("gaussian", "categorical"), n_categories=4),
], ids=["score", "score-loo", "straight-through", "cat-over-gauss", "gauss-over-cat"])
def test_estimator_variants_train(digits, params):
    vae = cat_vae(**params).fit(digits)
    assert np.all(np.isfinite(vae.history_["elbo"]))
    assert vae.history_["elbo"][-1] > vae.history_["elbo"][0]


def test_save_load_pickle_and_partial_fit(digits, tmp_path):
    vae = cat_vae(latent_dims=(3, 2), latent_types=("categorical", "categorical"),
                  n_categories=(4, 3)).fit(digits)
    path = tmp_path / "cat.npz"
    vae.save(path)
    loaded = hvae.load(path)
    copy = pickle.loads(pickle.dumps(vae))
    for other in (loaded, copy):
        assert other.model_.latent_family == "categorical"
        assert other.model_.n_categories == (4, 3)
        np.testing.assert_array_equal(other.score_samples(digits), vae.score_samples(digits))
        np.testing.assert_array_equal(other.transform(digits), vae.transform(digits))
    # Training continues identically from the loaded file.
    vae.partial_fit(digits)
    loaded.partial_fit(digits)
    np.testing.assert_array_equal(loaded.model_.parameters, vae.model_.parameters)
    # The latent layers are part of the model.
    vae.set_params(n_categories=(4, 4))
    with pytest.raises(ValueError, match="n_categories"):
        vae.partial_fit(digits)
    vae.set_params(warm_start=True).fit(digits)
    assert vae.model_.n_categories == (4, 4) and vae.n_iter_ == 4


def test_a_file_with_a_bad_n_categories_is_refused(digits, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_crafted_files import read, write

    vae = cat_vae(n_epochs=1).fit(digits)
    path = tmp_path / "cat.npz"
    vae.save(path)
    metadata, members = read(path.read_bytes())
    assert metadata["model"]["n_categories"] == {"__tuple__": [5]}
    write(tmp_path / "same.npz", metadata, members)
    assert hvae.load(tmp_path / "same.npz").model_.n_categories == (5,)
    for bad in ([1], [-5], ["5"], [5, 5], 5, [10**9]):
        crafted = dict(metadata, model=dict(metadata["model"],
                                            n_categories={"__tuple__": bad}
                                            if isinstance(bad, list) else bad))
        with pytest.raises(ValueError):
            hvae.load(write(tmp_path / "bad.npz", crafted, members))
    crafted = dict(metadata, model=dict(metadata["model"],
                                        latent_family={"__tuple__": ["categorical", 3]}))
    with pytest.raises(ValueError):
        hvae.load(write(tmp_path / "bad.npz", crafted, members))


@pytest.mark.parametrize("params,match", [
    (dict(latent_types="poisson"), "latent_types must be one of"),
    (dict(latent_types=("categorical",) * 3), "one per latent layer"),
    (dict(n_categories=1), "n_categories must be an int between 2 and"),
    (dict(temperature=0.0), "temperature must be a number > 0 that is finite"),
    (dict(gradient_estimator="reparameterization"), "cannot pass through a categorical"),
    (dict(gradient_estimator="score_function", objective="iwae"), "objective='elbo'"),
    (dict(gradient_estimator="score_function", score_baseline="leave_one_out"),
     "n_mc_samples >= 2"),
    (dict(inference="ladder"), "inference='markov'"),
])
def test_invalid_settings_are_refused_before_any_work(params, match):
    vae = cat_vae(latent_dims=(2, 2), **params)
    with pytest.raises(ValueError, match=match):
        vae.fit(np.zeros((10, 64)))
    assert not hasattr(vae, "model_")


def test_gumbel_softmax_needs_a_categorical_layer():
    vae = HierarchicalVAE(gradient_estimator="gumbel_softmax")
    with pytest.raises(ValueError, match="needs a categorical latent layer"):
        vae.fit(np.zeros((10, 4)))


def test_gradient_variance_takes_a_fitted_estimator(digits):
    vae = cat_vae(n_epochs=1).fit(digits)
    summary = hvae.gradient_variance(vae, digits[:32], n_draws=5)
    assert summary["mean"].shape == (vae.model_.n_params,)
    assert summary["total_variance"] > 0
    with pytest.raises(TypeError, match="hvae.Model or a fitted"):
        hvae.gradient_draws(object(), digits[:4])
