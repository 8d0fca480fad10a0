"""HierarchicalVAE(prior='vamp'): scikit-learn's checks, the pseudo-inputs'
start at training rows, evaluation, save/load, pickle, partial_fit and
warm_start, bad input."""
import pickle

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from hvae import HierarchicalVAE
from hvae.datasets import load_digits


@parametrize_with_checks([HierarchicalVAE(prior="vamp", n_pseudo_inputs=7, latent_dims=(3,),
                                          hidden_dims=(16,), n_epochs=3)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, _ = load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:600]], X[order[600:900]]


def vamp_vae(**params):
    defaults = dict(latent_dims=(6,), hidden_dims=(48,), likelihood="bernoulli", n_epochs=4,
                    batch_size=64, random_state=0, n_threads=1, prior="vamp",
                    n_pseudo_inputs=20)
    defaults.update(params)
    return HierarchicalVAE(**defaults)


def pseudo_inputs(vae):
    return dict(vae.model_.named_parameters())["prior.pseudo_inputs"]


def test_pseudo_inputs_start_at_training_rows_and_learn(digits):
    X, _ = digits
    untrained = vamp_vae(n_epochs=0).fit(X)
    P = pseudo_inputs(untrained)
    assert P.shape == (20, X.shape[1])
    # Every pseudo-input is one of the training rows, 20 distinct ones.
    matches = [np.flatnonzero((X == row).all(axis=1)) for row in P]
    assert all(m.size for m in matches)
    assert len({int(m[0]) for m in matches}) == len(np.unique(X[[m[0] for m in matches]],
                                                             axis=0))
    trained = vamp_vae().fit(X)
    assert not np.array_equal(pseudo_inputs(trained), P)
    assert trained.model_.prior == "vamp" and trained.model_.n_pseudo_inputs == 20
    # More pseudo-inputs than rows: drawn with replacement.
    assert pseudo_inputs(vamp_vae(n_epochs=0, n_pseudo_inputs=50).fit(X[:30])).shape == (50, 64)


def test_evaluation_and_sampling(digits):
    X, X_test = digits
    vae = vamp_vae().fit(X)
    ll = vae.log_likelihood(X_test[:50], n_samples=200)
    elbo = vae.score_samples(X_test[:50])
    assert np.all(np.isfinite(ll)) and np.isfinite(vae.score(X_test))
    assert np.mean(ll) > np.mean(elbo)
    samples = vae.sample(30, random_state=1)
    assert samples.shape == (30, X.shape[1]) and np.all((samples >= 0) & (samples <= 1))
    np.testing.assert_array_equal(samples, vae.sample(30, random_state=1))
    assert vae.transform(X_test).shape == (len(X_test), 6)


def test_save_load_and_pickle_round_trip(digits, tmp_path):
    from hvae import load

    X, X_test = digits
    vae = vamp_vae().fit(X)
    path = tmp_path / "vamp.npz"
    vae.save(path)
    loaded = load(path)
    assert loaded.prior == "vamp" and loaded.model_.n_pseudo_inputs == 20
    np.testing.assert_array_equal(loaded.model_.parameters, vae.model_.parameters)
    np.testing.assert_array_equal(loaded.transform(X_test), vae.transform(X_test))
    assert loaded.score(X_test) == vae.score(X_test)
    np.testing.assert_array_equal(loaded.log_likelihood(X_test[:5], n_samples=50),
                                  vae.log_likelihood(X_test[:5], n_samples=50))
    clone = pickle.loads(pickle.dumps(vae))
    np.testing.assert_array_equal(clone.model_.parameters, vae.model_.parameters)
    # Both continue training identically.
    loaded.set_params(warm_start=True, n_epochs=1).fit(X)
    vae.set_params(warm_start=True, n_epochs=1).fit(X)
    np.testing.assert_array_equal(loaded.model_.parameters, vae.model_.parameters)


def test_partial_fit_and_warm_start_keep_the_vamp_model(digits):
    X, _ = digits
    vae = vamp_vae()
    vae.partial_fit(X[:200])
    first = pseudo_inputs(vae).copy()
    vae.partial_fit(X[200:400])
    assert vae.n_iter_ == 2 and not np.array_equal(pseudo_inputs(vae), first)
    with pytest.raises(ValueError, match="n_pseudo_inputs"):
        vae.set_params(n_pseudo_inputs=5).partial_fit(X[:100])
    # With the standard prior, n_pseudo_inputs means nothing: a warm start
    # continues whatever its value.
    std = vamp_vae(prior="standard", warm_start=True, n_epochs=1).fit(X)
    model = std.model_
    std.set_params(n_pseudo_inputs=3).fit(X)
    assert std.model_ is model and std.n_iter_ == 2


@pytest.mark.parametrize("params, message", [
    ({"n_pseudo_inputs": 0}, "n_pseudo_inputs"),
    ({"n_pseudo_inputs": 2.5}, "n_pseudo_inputs"),
    ({"prior": "vampprior"}, "prior"),
    ({"conditional": True}, "conditional"),
])
def test_bad_parameters_raise_before_any_work(params, message):
    X = np.random.default_rng(0).random((10, 3))
    vae = HierarchicalVAE(**{"prior": "vamp", **params})
    with pytest.raises(ValueError, match=message):
        vae.fit(X, np.arange(10) % 2)
    assert not hasattr(vae, "model_")


def test_every_crafted_model_or_parameter_field_of_a_vamp_file_is_refused_or_trains(tmp_path):
    """tests/test_crafted_files.py's judgement on a VampPrior model's file:
    each field of its model arguments and parameters, replaced by other
    types, edge values and nonsense (n_pseudo_inputs and prior among them),
    is refused with a message naming the file, or loads as a model that
    describes itself and trains."""
    import test_crafted_files as crafted

    X, y = crafted.make_data()
    vae = HierarchicalVAE(latent_dims=(3,), hidden_dims=(5,), likelihood="bernoulli",
                          n_epochs=2, batch_size=16, random_state=0, n_threads=1,
                          prior="vamp", n_pseudo_inputs=4).fit(X)
    vae.save(tmp_path / "vamp.hvae")
    metadata, members = crafted.read((tmp_path / "vamp.hvae").read_bytes())
    path = tmp_path / "crafted.hvae"
    outcomes = {"refused": 0, "trains": 0}
    fields = [w for w in crafted.leaves(metadata) if w and w[0] in ("model", "params")]
    assert ("model", "n_pseudo_inputs") in fields and ("params", "n_pseudo_inputs") in fields
    for where in fields:
        parent, key = crafted.get(metadata, where[:-1]), where[-1]
        original = parent[key]
        for value in crafted.replacements(original) + (["standard"] if key == "prior" else []):
            parent[key] = value
            crafted.write(path, metadata, members)
            parent[key] = original
            outcomes[crafted.judge(path, X, y, False, (where, value))] += 1
    assert outcomes["refused"] > 50 and outcomes["trains"] > 5, outcomes
