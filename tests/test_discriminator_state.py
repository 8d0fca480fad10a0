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
