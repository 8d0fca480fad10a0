"""hvae.Model's ELBO, its terms, encode and decode against the float64 NumPy
reference in tests/reference.py, from the model's own named parameters and
fixed noise.

Tolerances: the model computes in float32 (rounding 6e-8 a step) and sums the
per-row terms in float64. Through a few layers and exp(logvar) the float32
error of a term stays near 1e-6 of its size (seen: at most 8e-6 relative);
3e-5 relative plus 3e-5 absolute (for terms near zero) leaves a margin for
other BLAS builds, while any mistake in a formula (a missing constant, a
swapped head, the wrong decoder feeding a KL) moves a term by far more.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402

import hvae  # noqa: E402  (a missing build must fail, not skip)

RTOL, ATOL = 3e-5, 3e-5

LATENT = {1: (4,), 2: (5, 3), 3: (6, 4, 2)}
HIDDEN = [(), (8,), (7, 5)]
ACTS = ["tanh", "relu", "elu", "softplus", "leaky_relu"]


def _grid():
    """Every T x likelihood x decoder variance, with hidden layouts and
    activations rotated so each T meets every hidden layout ((), one and two
    hidden layers) and every activation appears."""
    cases = []
    k = 0
    for T in (1, 2, 3):
        for likelihood in ("gaussian", "bernoulli"):
            for variance in ("learned", "unit"):
                D = 7 if likelihood == "gaussian" else 10
                cases.append(Config(D, LATENT[T], HIDDEN[(k + T) % 3],
                                    likelihood, ACTS[k % len(ACTS)], variance))
                k += 1
    # Every activation once more on a two-layer model with two hidden layers.
    for act in ACTS:
        cases.append(Config(6, (4, 3), (5, 4), "gaussian", act, "learned"))
    # Linear blocks everywhere, deeper hierarchy.
    cases.append(Config(5, (4, 3, 3, 2), (), "bernoulli", "relu", "learned"))
    return cases


CASES = _grid()
assert {c.hidden_dims for c in CASES if c.n_layers == 3} == set(HIDDEN)


def case_id(cfg):
    hidden = "x".join(map(str, cfg.hidden_dims)) or "linear"
    return (f"T{cfg.n_layers}-{cfg.likelihood}-{cfg.decoder_variance}-"
            f"{cfg.activation}-h{hidden}")


def make_model(cfg, seed=0):
    """An hvae.Model with random parameters of our own (not the model's
    initialisation, so that these tests do not depend on it)."""
    model = hvae.Model(cfg.n_features, cfg.latent_dims, cfg.hidden_dims,
                       likelihood=cfg.likelihood, activation=cfg.activation,
                       decoder_variance=cfg.decoder_variance, seed=seed)
    flat = ref.random_parameters(cfg, np.random.default_rng(seed + 1), scale=1.5)
    model.parameters[:] = flat
    return model


def reference_params(model):
    """name -> float64 copy, read through Model.named_parameters()."""
    return {name: np.array(view, dtype=np.float64)
            for name, view in model.named_parameters()}


# --------------------------------------------------------------------------
# The parameter layout the reference reads


@pytest.mark.parametrize("cfg", CASES, ids=case_id)
def test_named_parameters_follow_the_spec_and_tile_the_buffer(cfg):
    model = hvae.Model(cfg.n_features, cfg.latent_dims, cfg.hidden_dims,
                       likelihood=cfg.likelihood, activation=cfg.activation,
                       decoder_variance=cfg.decoder_variance, seed=3)
    named = model.named_parameters()
    expected = ref.parameter_shapes(cfg)
    assert [(n, tuple(v.shape)) for n, v in named] == expected
    assert model.n_params == ref.n_params(cfg) == model.parameters.size
    assert model.parameters.dtype == np.float32 and model.parameters.ndim == 1

    # PyTorch's Linear initialisation: uniform in +-1/sqrt(n_in), W and b.
    n_in = None
    for name, view in named:
        if name.endswith(".W"):
            n_in = view.shape[0]
        bound = 1 / np.sqrt(n_in)
        assert np.all(np.abs(view) <= bound * (1 + 1e-6)), name
        if view.size >= 32:  # all 32 inside half the bound: p = 2^-32
            assert np.abs(view).max() > 0.5 * bound, f"{name}: too narrow"
    same = hvae.Model(cfg.n_features, cfg.latent_dims, cfg.hidden_dims,
                      likelihood=cfg.likelihood, activation=cfg.activation,
                      decoder_variance=cfg.decoder_variance, seed=3)
    other = hvae.Model(cfg.n_features, cfg.latent_dims, cfg.hidden_dims,
                       likelihood=cfg.likelihood, activation=cfg.activation,
                       decoder_variance=cfg.decoder_variance, seed=4)
    np.testing.assert_array_equal(same.parameters, model.parameters)
    assert not np.array_equal(other.parameters, model.parameters)

    # The views tile the flat buffer in order: write through one, read
    # through the other.
    model.parameters[:] = np.arange(model.n_params, dtype=np.float32)
    tiled = np.concatenate([np.asarray(v).ravel() for _, v in model.named_parameters()])
    np.testing.assert_array_equal(tiled, np.arange(model.n_params))
    name, view = model.named_parameters()[-1]
    view[...] = -1.0
    assert np.all(model.parameters[-view.size:] == -1.0), name


# --------------------------------------------------------------------------
# The ELBO


def _check_terms(model, cfg, x, noise, what):
    terms = model.elbo_terms(x, noise=noise)
    expected = ref.forward(reference_params(model), cfg, x, noise)
    T = cfg.n_layers
    assert set(terms) >= {"elbo", "reconstruction", "kl"}
    for key in ("elbo", "reconstruction", "kl"):
        assert terms[key].dtype == np.float64, key
    assert terms["kl"].shape == (x.shape[0], T)
    largest = {}
    for key in ("elbo", "reconstruction"):
        largest[key] = ref.assert_close(terms[key], expected[key], RTOL, ATOL,
                                        what=f"{what} {key}")
    for i in range(T):
        largest[f"kl{i + 1}"] = ref.assert_close(
            terms["kl"][:, i], expected["kl"][:, i], RTOL, ATOL,
            what=f"{what} kl of layer {i + 1}")
    # elbo() is the same number as elbo_terms()['elbo'].
    ref.assert_close(model.elbo(x, noise=noise), terms["elbo"], 1e-12, 1e-12,
                     what=f"{what} elbo() vs elbo_terms()")
    return terms, expected, largest


@pytest.mark.parametrize("cfg", CASES, ids=case_id)
def test_elbo_terms_match_reference(cfg):
    rng = np.random.default_rng(17)
    n = 9
    model = make_model(cfg)
    x = ref.random_data(cfg, n, rng)
    noise = ref.random_noise(cfg, n, rng)
    terms, expected, largest = _check_terms(model, cfg, x, noise, case_id(cfg))
    # Guard against a vacuous pass: the terms are of a size where a missing
    # constant or factor would show: the top layer's closed-form KL is
    # positive, and the lower layers' sampled log-ratios are not negligible.
    assert np.all(expected["kl"][:, -1] > 0)
    assert np.all(np.abs(expected["kl"][:, :-1]) > 1e-3)
    assert np.all(np.abs(expected["reconstruction"]) > 0.1)
    print(f"{case_id(cfg)}: largest |diff| " +
          ", ".join(f"{k} {v:.2e}" for k, v in largest.items()))


def test_elbo_terms_match_reference_on_many_rows():
    """Enough rows that the model works through them in chunks."""
    cfg = Config(8, (5, 3), (6,), "gaussian", "tanh", "learned")
    rng = np.random.default_rng(5)
    n = 1500
    model = make_model(cfg)
    x = ref.random_data(cfg, n, rng)
    noise = ref.random_noise(cfg, n, rng)
    _check_terms(model, cfg, x, noise, "1500 rows")


def test_noise_enters_as_eps():
    """Zero noise gives the ELBO at the posterior means, and the noise of
    each layer is used for that layer (swapping it changes the result as the
    reference says)."""
    cfg = Config(6, (3, 3), (5,), "gaussian", "softplus", "learned")
    rng = np.random.default_rng(8)
    model = make_model(cfg)
    x = ref.random_data(cfg, 9, rng)
    zeros = [np.zeros((9, d), np.float32) for d in cfg.latent_dims]
    _check_terms(model, cfg, x, zeros, "zero noise")
    noise = ref.random_noise(cfg, 9, rng)
    _check_terms(model, cfg, x, noise[::-1], "swapped noise")
    # float64 and non-contiguous noise arrays mean the same numbers.
    noise64 = [np.asfortranarray(e.astype(np.float64)) for e in noise]
    ref.assert_close(model.elbo(x, noise=noise64), model.elbo(x, noise=noise),
                     1e-12, 1e-12, what="float64 Fortran-ordered noise")


@pytest.mark.parametrize("cfg", [CASES[0], CASES[7], CASES[11]], ids=case_id)
def test_loss_is_minus_mean_elbo(cfg):
    rng = np.random.default_rng(23)
    model = make_model(cfg)
    x = ref.random_data(cfg, 9, rng)
    noise = ref.random_noise(cfg, 9, rng)
    loss, grad = model.loss_and_grad(x, noise=noise)
    elbo = model.elbo(x, noise=noise)
    assert abs(loss + elbo.mean()) <= 1e-6 * (1 + abs(loss)), (loss, -elbo.mean())
    expected = ref.loss(reference_params(model), cfg, x, noise)
    assert abs(loss - expected) <= RTOL * abs(expected) + ATOL, (loss, expected)


def test_elbo_without_noise_is_deterministic_per_row():
    """With noise=None a row's noise is drawn from the row's own values: the
    same row gives the same ELBO wherever it sits in X, and the noise is
    really there (not zero)."""
    cfg = Config(6, (4, 2), (5,), "gaussian", "tanh", "learned")
    rng = np.random.default_rng(4)
    model = make_model(cfg)
    x = ref.random_data(cfg, 9, rng)
    first = model.elbo(x)
    np.testing.assert_array_equal(model.elbo(x), first)
    perm = rng.permutation(9)
    ref.assert_close(model.elbo(x[perm]), first[perm], 1e-5, 1e-6,
                     what="shuffled rows")
    ref.assert_close(model.elbo(x[[3, 3, 0]]), first[[3, 3, 0]], 1e-5, 1e-6,
                     what="repeated rows")
    ref.assert_close(model.elbo(np.concatenate([x, x])), np.concatenate([first, first]),
                     1e-5, 1e-6, what="stacked twice")
    at_mean = model.elbo(x, noise=[np.zeros((9, d), np.float32)
                                   for d in cfg.latent_dims])
    assert np.all(np.abs(first - at_mean) > 1e-6), "noise=None used no noise"


# --------------------------------------------------------------------------
# encode and decode


@pytest.mark.parametrize("cfg", CASES, ids=case_id)
def test_encode_matches_reference(cfg):
    rng = np.random.default_rng(29)
    model = make_model(cfg)
    x = ref.random_data(cfg, 9, rng)
    got = model.encode(x)
    expected = ref.encode(reference_params(model), cfg, x)
    assert len(got) == cfg.n_layers
    for i, ((mu, logvar), (mu_ref, logvar_ref)) in enumerate(zip(got, expected), 1):
        ref.assert_close(mu, mu_ref, RTOL, 1e-5, what=f"{case_id(cfg)} encode mu{i}")
        ref.assert_close(logvar, logvar_ref, RTOL, 1e-5,
                         what=f"{case_id(cfg)} encode logvar{i}")


@pytest.mark.parametrize("cfg", CASES, ids=case_id)
def test_decode_matches_reference(cfg):
    rng = np.random.default_rng(31)
    model = make_model(cfg)
    z1 = rng.standard_normal((9, cfg.latent_dims[0])).astype(np.float32)
    got = model.decode(z1)
    expected = ref.decode(reference_params(model), cfg, z1)
    ref.assert_close(got, expected, RTOL, 1e-5, what=f"{case_id(cfg)} decode")
    if cfg.likelihood == "bernoulli":
        assert np.all((got >= 0) & (got <= 1))


# --------------------------------------------------------------------------
# The reference itself, on formulas it does not share code with


def test_reference_kl_is_expected_log_ratio():
    """KL(q || p) = E_q[log q(z) - log p(z)], by Monte Carlo."""
    rng = np.random.default_rng(0)
    d, n = 3, 200_000
    mu_q, lv_q = rng.standard_normal(d), rng.uniform(-1, 1, d)
    mu_p, lv_p = rng.standard_normal(d), rng.uniform(-1, 1, d)
    z = mu_q + np.exp(lv_q / 2) * rng.standard_normal((n, d))
    log_ratio = (ref.gaussian_loglik(z, mu_q, lv_q)
                 - ref.gaussian_loglik(z, mu_p, lv_p))
    kl = ref.gaussian_kl(mu_q[None], lv_q[None], mu_p[None], lv_p[None])[0]
    stderr = log_ratio.std() / np.sqrt(n)
    assert abs(log_ratio.mean() - kl) < 5 * stderr, (log_ratio.mean(), kl, stderr)


def test_reference_likelihoods_by_hand():
    x = np.array([[0.0, 1.0, 0.25]])
    logits = np.array([[-2.0, 3.0, 40.0]])
    by_hand = (np.log(1 - 1 / (1 + np.exp(2.0))) + np.log(1 / (1 + np.exp(-3.0)))
               + 0.25 * 40.0 - (40.0 + np.log1p(np.exp(-40.0))))
    assert abs(ref.bernoulli_loglik(x, logits)[0] - by_hand) < 1e-12
    mu, lv = np.array([[0.5, -1.0, 0.0]]), np.array([[0.0, np.log(4.0), -1.0]])
    by_hand = sum(-0.5 * np.log(2 * np.pi * s2) - (xi - m) ** 2 / (2 * s2)
                  for xi, m, s2 in zip(x[0], mu[0], np.exp(lv[0])))
    assert abs(ref.gaussian_loglik(x, mu, lv)[0] - by_hand) < 1e-12
