"""The discriminator's optimizer state across save/load/pickle, and
beta-TCVAE's terms in history_ (issue 15's follow-ups)."""
import pickle

import numpy as np
import pytest

import hvae
from hvae.datasets import load_digits
from hvae._native import TCVAE_RECORD_KEYS


def _digits(n=400):
    return load_digits()[0][:n]


def test_tcvae_terms_are_recorded_per_epoch_and_sum_to_the_kl():
    """history_ holds the epoch means of the three terms as trained; their
    sum is the sampled estimate of the top layer's KL at the training
    draws, whose mean over the epoch's rows matches the closed-form KL
    recorded in history_['kl'] within its Monte Carlo error."""
    X = _digits(1797)
    vae = hvae.HierarchicalVAE(latent_dims=(4,), hidden_dims=(32,), likelihood="bernoulli",
                               n_epochs=3, batch_size=50, random_state=0, n_threads=1,
                               learning_rate=3e-3, tcvae_weights=(1.0, 2.0, 1.0)).fit(X)
    assert TCVAE_RECORD_KEYS == ("mutual_information", "total_correlation",
                                 "dimension_wise_kl")
    terms = np.array([vae.history_[key] for key in TCVAE_RECORD_KEYS])  # (3, epochs)
    assert terms.shape == (3, 3) and np.all(np.isfinite(terms))
    # Minibatch-weighted sampling bounds MI by log(N B) (the row's own
    # density in the logsumexp).
    assert np.all(terms[0] <= np.log(len(X) * 50) + 1e-6)
    kl = np.array(vae.history_["kl"])[:, -1]
    # The per-row spread of the sampled KL at the final model bounds the
    # Monte Carlo error of an epoch's mean over its rows (0.07 nats here,
    # against a KL of about 0.6).
    per_row = [vae.model_.tcvae_terms(X[i:i + 50], float(len(X)))
               for i in range(0, len(X), 50)]
    sampled = np.concatenate([sum(t[key] for key in TCVAE_RECORD_KEYS) for t in per_row])
    tolerance = 4 * sampled.std() / np.sqrt(len(X))
    assert kl[-1] > 5 * tolerance
    assert np.all(np.abs(terms.sum(axis=0) - kl) < tolerance), (terms.sum(axis=0), kl,
                                                               tolerance)
    # A later pass without beta-TCVAE records NaN; the file keeps the keys.
    vae.set_params(tcvae_weights=None).partial_fit(X)
    assert all(len(vae.history_[key]) == 4 and np.isnan(vae.history_[key][-1])
               for key in TCVAE_RECORD_KEYS)


def _fitted_with_discriminator(params):
    return hvae.HierarchicalVAE(latent_dims=(3,), hidden_dims=(32,), likelihood="bernoulli",
                                n_epochs=2, batch_size=50, random_state=0, n_threads=1,
                                discriminator_hidden=(16,), **params).fit(_digits())


_DISC_MODELS = [dict(tc_weight=4.0), dict(prior="density_ratio")]


@pytest.mark.parametrize("params", _DISC_MODELS, ids=["factorvae", "density-ratio"])
def test_discriminator_optimizer_state_round_trips(params, tmp_path):
    """save/load and pickle keep the discriminator's Adam moments and step
    count, so partial_fit continues bit for bit as without the round trip."""
    X = _digits()
    vae = _fitted_with_discriminator(params)
    state = vae.model_.__getstate__()["discriminator_optimizer"]
    assert state["step"] == 2 * 8  # 400 rows, batch 50, 2 epochs
    assert (state["beta1"], state["beta2"]) == (0.5, float(np.float32(0.9)))
    n_disc = sum(v.size for name, v in vae.model_.named_parameters()
                 if name.startswith("discriminator."))
    assert state["m"].shape == state["v"].shape == (n_disc,) and np.any(state["m"])
    vae.save(tmp_path / "m.hvae")
    copies = [hvae.load(tmp_path / "m.hvae"), pickle.loads(pickle.dumps(vae))]
    for other in copies:
        loaded = other.model_.__getstate__()["discriminator_optimizer"]
        assert loaded["step"] == state["step"]
        np.testing.assert_array_equal(loaded["m"], state["m"])
        np.testing.assert_array_equal(loaded["v"], state["v"])
    vae.partial_fit(X)
    for other in copies:
        other.partial_fit(X)
        np.testing.assert_array_equal(other.model_.parameters, vae.model_.parameters)
        key = "discriminator_accuracy"
        assert other.history_[key] == vae.history_[key]
    # Without the moments (the old files' state) the continuation differs:
    # the test can tell.
    fresh = pickle.loads(pickle.dumps(_fitted_with_discriminator(params)))
    old_state = fresh.model_.__getstate__()
    del old_state["discriminator_optimizer"]
    fresh.model_.__setstate__(old_state)
    fresh.partial_fit(X)
    assert not np.array_equal(fresh.model_.parameters, vae.model_.parameters)


def test_damaged_discriminator_optimizer_state_is_refused(tmp_path):
    from hvae.file_format import _check_discriminator_optimizer

    vae = _fitted_with_discriminator(dict(tc_weight=4.0))
    good = vae.model_.__getstate__()["discriminator_optimizer"]
    _check_discriminator_optimizer(good, vae.model_)
    _check_discriminator_optimizer(None, vae.model_)
    bad = [
        (dict(good, v=-good["v"] - 1), "second moments"),
        (dict(good, m=good["m"] + 1e30), "first moments"),
        (dict(good, m=good["m"][:-1]), "float32 array"),
        (dict(good, beta1=1.0), "beta1"),
        (dict(good, step=-1), "step count"),
        (dict(good, learning_rate=0.0), "learning_rate"),
        ({k: v for k, v in good.items() if k != "eps"}, "keys"),
    ]
    for state, message in bad:
        with pytest.raises(ValueError, match=message):
            _check_discriminator_optimizer(state, vae.model_)
    plain = hvae.HierarchicalVAE(latent_dims=(3,), hidden_dims=(32,), n_epochs=1,
                                 random_state=0).fit(_digits())
    with pytest.raises(ValueError, match="no discriminator"):
        _check_discriminator_optimizer(good, plain.model_)
    with pytest.raises(ValueError, match="no discriminator"):
        plain.model_.__setstate__(dict(plain.model_.__getstate__(),
                                       discriminator_optimizer=good))
