"""markov_kl='analytic': every lower Markov layer's ELBO term is the closed-form
KL(q(z_i|z_{i-1}) || p(z_i|z_{i+1})) at the sampled z_{i+1}. Held to the float64
reference (tests/reference.py); IWAE and log_likelihood keep the sampled ratio."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402

import hvae  # noqa: E402

CASES = [
    Config(7, (4, 3), (6,), "gaussian", "tanh", "learned", markov_kl="analytic"),
    Config(10, (4, 3, 2), (5, 4), "bernoulli", "softplus", "unit", markov_kl="analytic"),
    Config(6, (3,), (5,), "gaussian", "elu", "learned", markov_kl="analytic"),
]


def _pair(cfg, seed=0):
    """The same random parameters in a sampled and an analytic model."""
    flat = ref.random_parameters(cfg, np.random.default_rng(seed + 1), scale=1.5)
    models = {}
    for kind in ("sampled", "analytic"):
        kwargs = cfg.model_kwargs()
        kwargs["markov_kl"] = kind
        models[kind] = hvae.Model(seed=seed, **kwargs)
        models[kind].parameters[:] = flat
    return models, flat


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"T{c.n_layers}-{c.likelihood}")
def test_analytic_elbo_terms_match_the_reference(cfg):
    models, flat = _pair(cfg)
    rng = np.random.default_rng(5)
    x = ref.random_data(cfg, 11, rng)
    noise = ref.random_noise(cfg, 11, rng)
    terms = models["analytic"].elbo_terms(x, noise=noise)
    elbo, rec, kl = terms["elbo"], terms["reconstruction"], terms["kl"]
    expected = ref.forward(ref.unflatten(np.asarray(flat, np.float64), cfg), cfg, x, noise)
    scale = np.abs(expected["elbo"]).max()
    ref.assert_close(kl, expected["kl"], 1e-4, 1e-5 * scale, what="analytic kl")
    ref.assert_close(elbo, expected["elbo"], 1e-4, 1e-5 * scale, what="analytic elbo")
    # The top layer and the reconstruction are the same under both.
    sampled = models["sampled"].elbo_terms(x, noise=noise)
    s_rec, s_kl = sampled["reconstruction"], sampled["kl"]
    np.testing.assert_array_equal(rec, s_rec)
    np.testing.assert_array_equal(kl[:, -1], s_kl[:, -1])
    if cfg.n_layers > 1:
        assert not np.array_equal(kl[:, :-1], s_kl[:, :-1])


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"T{c.n_layers}-{c.likelihood}")
def test_importance_weighted_paths_keep_the_sampled_ratio(cfg):
    models, _ = _pair(cfg)
    rng = np.random.default_rng(6)
    x = ref.random_data(cfg, 7, rng)
    a, s = models["analytic"], models["sampled"]
    np.testing.assert_array_equal(a.log_likelihood(x, n_samples=8, seed=3),
                                  s.log_likelihood(x, n_samples=8, seed=3))
    la, ga = a.loss_and_grad(x, objective="iwae", n_samples=3, seed=2)
    ga = np.array(ga)
    ls, gs = s.loss_and_grad(x, objective="iwae", n_samples=3, seed=2)
    assert la == ls
    np.testing.assert_array_equal(ga, np.array(gs))


def test_analytic_loss_matches_the_reference_objective():
    cfg = CASES[1]
    models, flat = _pair(cfg)
    rng = np.random.default_rng(7)
    x = ref.random_data(cfg, 6, rng)
    noise = ref.random_noise(cfg, 6, rng)
    loss, _ = models["analytic"].loss_and_grad(x, noise=noise, beta=1.5)
    expected = ref.objective_loss(ref.unflatten(np.asarray(flat, np.float64), cfg), cfg, x,
                                  noise, beta=1.5)
    assert abs(loss - expected) <= 1e-4 * abs(expected) + 1e-5
