"""hvae.VaDE, the clusterer on the mixture prior: scikit-learn's checks,
clustering quality on synthetic clusters and on the digits against KMeans,
the clustering interface, saving, pickling and bad input."""
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, make_scorer, normalized_mutual_info_score
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

import hvae
from hvae import HierarchicalVAE, VaDE
from hvae.datasets import load_digits
from hvae.metrics import clustering_accuracy


def small_vade(**params):
    # The clusters from the codes themselves: the t-SNE map (the default,
    # tested below) would add seconds to every fit of these small checks.
    defaults = dict(n_components=3, latent_dims=(2,), hidden_dims=(16,), n_epochs=20,
                    pretrain_epochs=20, batch_size=32, random_state=0, n_threads=1,
                    init_params="codes")
    defaults.update(params)
    return VaDE(**defaults)


# On scikit-learn's 50 blobs (check_clustering) the network needs a few
# hundred steps of pretraining; there, a VAE's own codes (pretrain_beta=1)
# leave no component empty when five noise points are added.
@parametrize_with_checks([small_vade(pretrain_epochs=200, n_epochs=100, batch_size=16,
                                     pretrain_beta=1.0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)



def synthetic_clusters(n=600, K=4, seed=0):
    """Well-separated Gaussian clusters in 2-D pushed through a fixed random
    MLP (tanh) to 20 features."""
    rng = np.random.default_rng(seed)
    centres = 6.0 * np.array([[np.cos(a), np.sin(a)]
                              for a in 2 * np.pi * np.arange(K) / K])
    y = rng.integers(0, K, n)
    z = centres[y] + rng.standard_normal((n, 2))
    W1, W2 = rng.standard_normal((2, 32)) / 2, rng.standard_normal((32, 20)) / 4
    X = np.tanh(z @ W1) @ W2 + 0.05 * rng.standard_normal((n, 20))
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32), y


def test_recovers_well_separated_clusters():
    X, y = synthetic_clusters()
    vade = small_vade(n_components=4, latent_dims=(2,), hidden_dims=(32,), n_epochs=30,
                      pretrain_epochs=30).fit(X)
    ari = adjusted_rand_score(y, vade.labels_)
    assert ari > 0.9, ari
    np.testing.assert_array_equal(vade.labels_, vade.predict(X))
    assert vade.labels_.dtype == np.int64


def test_against_kmeans_on_the_digits():
    """The issue's test: on the 1797 digits, VaDE's clustering accuracy
    against KMeans' on the same rows (0.792), at the bench's budget (100 +
    20 epochs, one run; the t-SNE map takes most of the time). With the
    defaults (clusters found on a t-SNE map of the codes, full-covariance
    prior) six seeds of this recipe on one thread scored 0.81 to 0.93, mean
    0.87 (NMI 0.85 to 0.89 against KMeans' 0.742); the former recipe (the
    codes' own GaussianMixture, diagonal prior, 30 pretraining epochs)
    scored 0.78 to 0.92, mean 0.83, once below KMeans."""
    X, y = load_digits()
    kmeans = KMeans(10, n_init=10, random_state=0).fit_predict(X)
    vade = VaDE(10, latent_dims=(8,), likelihood="bernoulli", pretrain_epochs=100,
                n_epochs=20, batch_size=32, n_init=1, random_state=0, n_threads=2).fit(X)
    acc_vade, acc_kmeans = clustering_accuracy(y, vade.labels_), clustering_accuracy(y, kmeans)
    nmi_vade = normalized_mutual_info_score(y, vade.labels_)
    nmi_kmeans = normalized_mutual_info_score(y, kmeans)
    print(f"digits: VaDE accuracy {acc_vade:.3f} NMI {nmi_vade:.3f}; "
          f"KMeans accuracy {acc_kmeans:.3f} NMI {nmi_kmeans:.3f}")
    assert acc_vade > acc_kmeans + 0.01, (acc_vade, acc_kmeans)
    assert nmi_vade > nmi_kmeans + 0.08, (nmi_vade, nmi_kmeans)


def test_tsne_initialisation():
    """init_params='tsne' (the default): the initial clusters from a t-SNE
    map of the codes recover well-separated clusters; beyond TSNE_MAX_ROWS
    a seeded random subset of rows is mapped, and its codes alone
    initialise the prior."""
    X, y = synthetic_clusters(n=400, K=4, seed=4)
    vade = small_vade(n_components=4, latent_dims=(2,), hidden_dims=(32,), n_epochs=20,
                      pretrain_epochs=30, init_params="tsne").fit(X)
    assert adjusted_rand_score(y, vade.labels_) > 0.9
    mu = vade.model_.encode(X)[-1][0].astype(np.float64)
    rows, resp = hvae.clustering._initial_clusters(mu, 4, "tsne", "full", 7, 1)
    np.testing.assert_array_equal(rows, np.arange(len(X)))
    assert adjusted_rand_score(y, resp.argmax(1)) > 0.9
    np.testing.assert_allclose(resp.sum(1), 1.0)


def test_tsne_initialisation_maps_a_subset_of_large_data(monkeypatch):
    X, y = synthetic_clusters(n=300, K=3, seed=5)
    monkeypatch.setattr(hvae.clustering, "TSNE_MAX_ROWS", 120)
    mu = np.random.default_rng(0).standard_normal((300, 2)) + 8.0 * np.eye(3, 2)[y]
    rows, resp = hvae.clustering._initial_clusters(mu, 3, "tsne", "full", 3, 1)
    assert rows.shape == (120,) and np.all(np.diff(rows) > 0)
    assert resp.shape == (120, 3)
    again, _ = hvae.clustering._initial_clusters(mu, 3, "tsne", "full", 3, 1)
    np.testing.assert_array_equal(rows, again)  # seeded
    assert adjusted_rand_score(y[rows], resp.argmax(1)) > 0.9
    vade = small_vade(init_params="tsne", n_epochs=2, pretrain_epochs=2).fit(X)
    assert vade.labels_.shape == (300,)


@pytest.fixture(scope="module")
def fitted():
    # The diagonal prior's interface (variances, the same model as
    # HierarchicalVAE's default prior_covariance_type); the full one's is
    # tests/test_prior_gmm_full.py's.
    X, y = synthetic_clusters(n=300, K=3, seed=1)
    return small_vade(covariance_type="diag").fit(X), X, y


def test_the_clustering_interface(fitted):
    vade, X, _ = fitted
    proba = vade.predict_proba(X)
    assert proba.shape == (len(X), 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(vade.predict(X), np.argmax(proba, axis=1))
    assert vade.weights_.shape == (3,) and abs(vade.weights_.sum() - 1.0) < 1e-9
    assert vade.means_.shape == (3, 2) and vade.covariances_.shape == (3, 2)
    assert np.all(vade.covariances_ > 0)
    assert vade.transform(X).shape == (len(X), 2)
    assert np.isfinite(vade.score(X))
    assert vade.n_iter_ == 20 and len(vade.history_["elbo"]) == 20
    # q(c|x) is the mixture's p(c|z) at the posterior mean.
    z = vade.transform(X).astype(np.float64)
    log_p = (np.log(vade.weights_)
             - 0.5 * np.sum(np.log(2 * np.pi * vade.covariances_)[None]
                            + (z[:, None] - vade.means_[None]) ** 2
                            / vade.covariances_[None], axis=2))
    expected = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, expected, atol=1e-4)


def test_samples_of_one_component_fall_in_it(fitted):
    vade, X, _ = fitted
    for c in range(3):
        samples = vade.sample(200, random_state=c, component=c)
        assert samples.shape == (200, X.shape[1])
        # Encoded back, most samples of a component are assigned to it
        # (decoder means, so up to the model's reconstruction).
        assert np.mean(vade.predict(samples) == c) > 0.7, c
    np.testing.assert_array_equal(vade.sample(5, random_state=1, component=0),
                                  vade.sample(5, random_state=1, component=0))
    assert vade.sample(4, random_state=0).shape == (4, X.shape[1])
    with pytest.raises(ValueError, match="component"):
        vade.sample(2, component=3)


def test_n_init_keeps_the_best_elbo():
    """The restarts draw their seeds from random_state; the kept run is the
    one of the best ELBO on X."""
    X, _ = synthetic_clusters(n=200, K=3, seed=2)
    best = small_vade(n_init=3, random_state=0, n_epochs=5, pretrain_epochs=5).fit(X)
    seeds = np.random.RandomState(0).randint(np.iinfo(np.int32).max, size=3)
    scores = [VaDE._one_run(clone(best), X, int(s)).score(X) for s in seeds]
    assert len(set(scores)) == 3  # the restarts differ
    assert best.score(X) == pytest.approx(max(scores))


def test_save_load_and_pickle_round_trip(fitted, tmp_path):
    vade, X, _ = fitted
    path = tmp_path / "vade.npz"
    vade.save(path)
    loaded = hvae.load(path)
    assert type(loaded) is VaDE
    np.testing.assert_array_equal(loaded.predict_proba(X), vade.predict_proba(X))
    np.testing.assert_array_equal(loaded.labels_, vade.labels_)
    np.testing.assert_array_equal(loaded.means_, vade.means_)
    restored = pickle.loads(pickle.dumps(vade))
    np.testing.assert_array_equal(restored.predict(X), vade.predict(X))
    # Both continue training identically.
    a, b = loaded.partial_fit(X), restored.partial_fit(X)
    np.testing.assert_array_equal(a.model_.parameters, b.model_.parameters)
    assert a.n_iter_ == vade.n_iter_ + 1


def test_a_damaged_labels_attribute_is_refused(fitted, tmp_path):
    from hvae.file_format import _ESTIMATORS
    check = _ESTIMATORS["VaDE"].attribute_checks["labels_"]
    model = fitted[0].model_
    assert check(np.array([0, 1, 2]), model) is None
    assert "outside" in check(np.array([0, 3]), model)
    assert "integer" in check(np.array([0.5]), model)


def test_partial_fit_continues(fitted):
    vade, X, _ = fitted
    vade = clone(vade).fit(X)
    before = np.array(vade.model_.parameters)
    vade.partial_fit(X)
    assert vade.n_iter_ == 21
    assert not np.array_equal(before, vade.model_.parameters)


def test_works_with_clustering_metrics_and_grid_search():
    X, y = synthetic_clusters(n=240, K=3, seed=3)
    search = GridSearchCV(small_vade(n_epochs=10, pretrain_epochs=10),
                          {"n_components": [2, 3]}, cv=2,
                          scoring=make_scorer(adjusted_rand_score))
    search.fit(X, y)
    assert search.best_params_ == {"n_components": 3}
    # Without a scorer, GridSearchCV ranks by score (the ELBO).
    GridSearchCV(small_vade(n_epochs=2, pretrain_epochs=2), {"latent_dims": [(2,), (3,)]},
                 cv=2).fit(X)


def test_hierarchical_vae_with_the_mixture_prior_is_the_same_model(fitted):
    vade, X, _ = fitted
    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(16,), prior="gmm", n_components=3,
                          n_epochs=2, random_state=0, n_threads=1).fit(X)
    assert vae.model_.prior == "gmm" and vae.model_.n_components == 3
    assert [n for n, _ in vae.model_.named_parameters()] == \
        [n for n, _ in vade.model_.named_parameters()]
    vae.model_.parameters[:] = vade.model_.parameters
    np.testing.assert_array_equal(vae.transform(X), vade.transform(X))
    np.testing.assert_array_equal(vae.score_samples(X), vade.score_samples(X))
    np.testing.assert_array_equal(vae.model_.responsibilities(X), vade.predict_proba(X))
    ll = vae.log_likelihood(X[:20], n_samples=50)
    assert ll.shape == (20,) and np.all(np.isfinite(ll))
    # A hierarchy with the mixture on its top layer, both inference modes.
    for inference in ("markov", "ladder"):
        deep = small_vade(latent_dims=(4, 2), inference=inference, n_epochs=3,
                          pretrain_epochs=3).fit(X)
        assert deep.means_.shape == (3, 2)
        assert deep.sample(3, random_state=0, component=1).shape == (3, X.shape[1])
        assert np.isfinite(deep.score(X))


@pytest.mark.parametrize("params, message", [
    (dict(n_components=0), "n_components must be an int between 1 and"),
    (dict(n_components=2.5), "n_components must be an int between 1 and"),
    (dict(n_init=0), "n_init must be an int between 1 and"),
    (dict(pretrain_epochs=-1), "pretrain_epochs must be an int between 0 and"),
    (dict(init_covariance_type="spherical"), "init_covariance_type must be one of"),
    (dict(init_params="umap"), "init_params must be one of"),
    (dict(prior_learning_rate=0.0), "prior_learning_rate must be"),
    (dict(n_components=50), "n_components=50 must be at most the number of rows, 40"),
])
def test_bad_input_is_refused_before_any_work(params, message):
    X = np.random.default_rng(0).standard_normal((40, 5)).astype(np.float32)
    vade = small_vade(**params)
    with pytest.raises(ValueError, match=message):
        vade.fit(X)
    assert not hasattr(vade, "model_") and not hasattr(vade, "n_features_in_")
    with pytest.raises(ValueError, match="prior must be one of"):
        HierarchicalVAE(prior="mixture").fit(X)
