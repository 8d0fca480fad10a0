"""log p(z_T) of the top layer's prior (hvae_prior_log_density,
Model.prior_log_density, HierarchicalVAE.prior_log_density).

Each prior is held to an independent float64 NumPy/SciPy reference built from
the model's own tensors (the mixtures' weights, means and covariances, the
VampPrior's pseudo-inputs encoded by the model, the density ratio's
discriminator); the normalised priors integrate to 1 over a grid in d = 2, and
their density matches a histogram of the model's own prior draws. Rows are
computed alone: bit for bit the same whatever the other rows and the thread
count.
"""
import pickle
import tracemalloc

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import hvae
from hvae import HierarchicalVAE, VaDE
from hvae.datasets import load_digits

PRIORS = {
    "standard": {},
    "gmm-diag": {"prior": "gmm", "n_components": 4},
    "gmm-full": {"prior": "gmm", "n_components": 4, "prior_covariance_type": "full"},
    "vamp": {"prior": "vamp", "n_pseudo_inputs": 6},
    "density_ratio": {"prior": "density_ratio", "discriminator_hidden": (16, 16)},
}


def scramble(model, seed=0, spread=1.0):
    """Random prior tensors (the initial ones are too regular to catch a
    mix-up: equal weights, unit variances)."""
    rng = np.random.default_rng(seed)
    for name, value in model.named_parameters():
        if name == "prior.pi_logits":
            value[:] = rng.normal(size=value.shape)
        elif name == "prior.mu":
            value[:] = spread * rng.uniform(-2, 2, size=value.shape)
        elif name in ("prior.logvar", "prior.prec_log_diag"):
            value[:] = rng.uniform(-1.0, 0.6, size=value.shape)
        elif name == "prior.prec_lower":
            value[:] = 0.5 * rng.normal(size=value.shape)
        elif name == "prior.pseudo_inputs":
            value[:] = rng.uniform(-0.5, 1.5, size=value.shape)  # some clipped (Bernoulli)
        elif name.startswith("enc"):
            value[:] = 0.7 * rng.normal(size=value.shape)
        elif name == "discriminator.out.W":
            value *= 4.0                     # a T of a few nats' range
        elif name == "discriminator.out.b":
            value[:] = 0.7
    return model


def make_model(key, D=5, latent_dims=(3,), hidden_dims=(8,), seed=0, **extra):
    options = dict(PRIORS[key], latent_dims=latent_dims, hidden_dims=hidden_dims, seed=seed)
    options.update(extra)
    return scramble(hvae.Model(D, **options), seed=seed)


def codes(n, d, seed=1, scale=2.0):
    return (scale * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


# ---- float64 references ------------------------------------------------------

def tensors(model):
    return {name: np.array(value, dtype=np.float64) for name, value in model.named_parameters()}


def precision_factor(log_diag, lower):
    """P (K, d, d), lower triangular: diag exp(log_diag), strictly-lower
    entries packed row by row (P_10, P_20, P_21, ...)."""
    K, d = log_diag.shape
    P = np.zeros((K, d, d))
    rows, cols = np.tril_indices(d, -1)          # row-major: (1,0), (2,0), (2,1), ...
    for k in range(K):
        P[k][np.diag_indices(d)] = np.exp(log_diag[k])
        if lower is not None:
            P[k][rows, cols] = lower[k]
    return P


def mixture_reference(weights, means, covariances, Z):
    Z = np.asarray(Z, dtype=np.float64)
    per = [np.log(w) + stats.multivariate_normal(m, c).logpdf(Z)
           for w, m, c in zip(weights, means, covariances)]
    return logsumexp(np.stack(per, axis=-1), axis=-1)


def reference(model, Z):
    """log p(Z) in float64 from the model's tensors, as the prior defines it."""
    t = tensors(model)
    Z64 = np.asarray(Z, dtype=np.float64)
    d = Z64.shape[1]
    if model.prior == "standard":
        return stats.multivariate_normal(np.zeros(d), np.eye(d)).logpdf(Z64)
    if model.prior == "gmm":
        w = np.exp(t["prior.pi_logits"] - logsumexp(t["prior.pi_logits"]))
        if model.prior_covariance_type == "diag":
            cov = [np.diag(np.exp(lv)) for lv in t["prior.logvar"]]
        else:
            P = precision_factor(t["prior.prec_log_diag"], t.get("prior.prec_lower"))
            cov = [np.linalg.inv(p @ p.T) for p in P]
        return mixture_reference(w, t["prior.mu"], cov, Z64)
    if model.prior == "vamp":
        # The components are the encoder's posteriors of the pseudo-inputs
        # (clipped to [0, 1] for a Bernoulli likelihood), at the top layer.
        U = t["prior.pseudo_inputs"]
        if model.likelihood == "bernoulli":
            U = np.clip(U, 0.0, 1.0)
        mu, logvar = model.encode(U.astype(np.float32))[-1]
        K = U.shape[0]
        cov = [np.diag(np.exp(lv)) for lv in logvar.astype(np.float64)]
        return mixture_reference(np.full(K, 1.0 / K), mu.astype(np.float64), cov, Z64)
    if model.prior == "density_ratio":
        log_normal = stats.multivariate_normal(np.zeros(d), np.eye(d)).logpdf(Z64)
        return log_normal + model.discriminator_log_ratio(Z).astype(np.float64)
    raise AssertionError(model.prior)


@pytest.mark.parametrize("key", list(PRIORS))
@pytest.mark.parametrize("d", [1, 3])
def test_matches_the_float64_reference(key, d):
    model = make_model(key, latent_dims=(d,), likelihood="bernoulli")
    Z = codes(400, d)
    got = model.prior_log_density(Z)
    want = reference(model, Z)
    assert got.dtype == np.float64 and got.shape == (400,)
    # density_ratio: T in float32 through BLAS (discriminator_log_ratio) vs
    # the rowwise products; the rest: float32 inputs, float64 sums.
    err = np.max(np.abs(got - want))
    assert err < 1e-6 * max(1.0, np.max(np.abs(want))), (key, d, err)


def test_vamp_through_a_two_layer_encoder_chain():
    """T = 2: the pseudo-inputs' top posterior at the first layer's mean,
    as encode gives it."""
    model = make_model("vamp", D=6, latent_dims=(4, 2), hidden_dims=(8,))
    Z = codes(300, 2)
    np.testing.assert_allclose(model.prior_log_density(Z), reference(model, Z),
                               rtol=1e-6, atol=1e-5)


def test_vade_weights_means_covariances_are_its_density():
    X, _ = load_digits()
    vade = VaDE(n_components=3, latent_dims=(2,), hidden_dims=(16,), n_epochs=2,
                pretrain_epochs=2, init_params="codes", random_state=0, n_threads=1)
    vade.fit(X[:300])
    Z = 2 * vade.encode(X[300:500])[-1][0]
    want = mixture_reference(vade.weights_, vade.means_, vade.covariances_, Z)
    np.testing.assert_allclose(vade.prior_log_density(Z), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("key", ["standard", "gmm-diag", "gmm-full", "vamp"])
def test_integrates_to_one_in_two_dimensions(key):
    model = make_model(key, latent_dims=(2,))
    h = 0.025
    axis = np.arange(-9.0, 9.0, h) + h / 2
    gx, gy = np.meshgrid(axis, axis)
    grid = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float32)
    mass = np.exp(model.prior_log_density(grid)).sum() * h * h
    assert abs(mass - 1.0) < 2e-3, (key, mass)


def test_the_density_ratio_prior_is_unnormalised():
    """log N + T: its mass over the plane is E_N[exp T], not 1, for an
    untrained discriminator (the README's caveat)."""
    model = make_model("density_ratio", latent_dims=(2,))
    h = 0.05
    axis = np.arange(-8.0, 8.0, h) + h / 2
    gx, gy = np.meshgrid(axis, axis)
    grid = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float32)
    mass = np.exp(model.prior_log_density(grid)).sum() * h * h
    normaliser = np.mean(np.exp(model.discriminator_log_ratio(codes(200000, 2, scale=1.0))))
    assert abs(mass - 1.0) > 0.5, mass
    assert abs(mass - normaliser) < 0.02 * normaliser, (mass, normaliser)


def identity_decoder_model(key, seed):
    """D = d = 2, no hidden layer, Gaussian likelihood, decoder mean z @ I + 0:
    sample()'s means ARE its top-layer draws, bit for bit."""
    model = make_model(key, D=2, latent_dims=(2,), hidden_dims=(), likelihood="gaussian",
                       seed=seed)
    params = dict(model.named_parameters())
    params["dec1.mu.W"][:] = np.eye(2)
    params["dec1.mu.b"][:] = 0.0
    return model


@pytest.mark.parametrize("key", ["gmm-full", "vamp"])
def test_density_matches_a_histogram_of_the_prior_draws(key):
    """Pearson's chi-square of 20000 draws from sample() against the bins'
    probabilities, integrated from exp(prior_log_density) on a 16 x 16
    subgrid per bin; bins expecting fewer than 5 draws pooled with the mass
    outside the grid. Rejects at p < 1e-4 (the test of a correct sampler
    fails once in 10^4 runs; the seed is fixed, so never here)."""
    model = identity_decoder_model(key, seed=3)
    n = 20000
    z = model.sample(n, seed=11).astype(np.float64)
    edges = np.linspace(-6.0, 6.0, 25)
    counts, _, _ = np.histogram2d(z[:, 0], z[:, 1], bins=[edges, edges])
    sub = 16
    width = edges[1] - edges[0]
    fine = edges[0] + (np.arange(24 * sub) + 0.5) * width / sub
    fx, fy = np.meshgrid(fine, fine, indexing="ij")
    density = np.exp(model.prior_log_density(
        np.column_stack([fx.ravel(), fy.ravel()]).astype(np.float32)))
    prob = density.reshape(24, sub, 24, sub).sum(axis=(1, 3)) * (width / sub) ** 2
    expected = n * prob.ravel()
    observed = counts.ravel()
    small = expected < 5
    outside = n - observed.sum()
    exp_rest = n * (1.0 - prob.sum()) + expected[small].sum()
    obs_rest = outside + observed[small].sum()
    f_exp = np.append(expected[~small], exp_rest)
    f_obs = np.append(observed[~small], obs_rest)
    f_exp *= f_obs.sum() / f_exp.sum()   # the integration's last digits
    result = stats.chisquare(f_obs, f_exp)
    assert result.pvalue > 1e-4, (key, result)
    # And a density that is wrong by a shift fails the same test.
    shifted = np.roll(prob, 1, axis=0).ravel() * n
    assert stats.chisquare(observed[~small],
                           shifted[~small] * observed[~small].sum()
                           / max(shifted[~small].sum(), 1e-9)).pvalue < 1e-4


@pytest.mark.parametrize("key", list(PRIORS))
def test_a_row_does_not_depend_on_the_other_rows(key):
    model = make_model(key, latent_dims=(3,))
    Z = codes(700, 3)
    full = model.prior_log_density(Z)
    assert np.array_equal(model.prior_log_density(Z[::-1].copy())[::-1], full)
    assert np.array_equal(model.prior_log_density(Z[:333]), full[:333])
    for r in (0, 17, 699):
        assert np.array_equal(model.prior_log_density(Z[r:r + 1]), full[r:r + 1])


@pytest.mark.parametrize("key", list(PRIORS))
def test_the_same_bits_on_one_and_two_threads(key):
    # Large enough that the VampPrior's rows and its pseudo-inputs' products,
    # and the discriminator's, are split between threads.
    extra = {"n_pseudo_inputs": 300} if key == "vamp" else {}
    if key == "density_ratio":
        extra["discriminator_hidden"] = (256, 256)
    model = make_model(key, D=64, latent_dims=(8,), hidden_dims=(128,), **extra)
    Z = codes(5000, 8)
    results = []
    for threads in (1, 2):
        model.n_threads = threads
        results.append(model.prior_log_density(Z))
    assert np.array_equal(results[0], results[1])


def test_bad_input_is_refused_before_any_work():
    model = make_model("gmm-diag", latent_dims=(3,))
    for bad, match in [(np.zeros((4, 2), np.float32), "columns"),
                       (np.zeros(3, np.float32), "2-D"),
                       (np.zeros((2, 3, 1), np.float32), "2-D"),
                       (np.zeros((0, 3), np.float32), "0 rows"),
                       (np.array([[0.0, np.nan, 0.0]]), "NaN"),
                       (np.array([[0.0, np.inf, 0.0]]), "NaN or infinity"),
                       (np.array([[0.0, 1e39, 0.0]]), "NaN or infinity"),
                       (np.array([["a", "b", "c"]]), "real numbers")]:
        with pytest.raises(ValueError, match=match), np.errstate(over="ignore"):
            model.prior_log_density(bad)
    with pytest.raises(TypeError):
        model.prior_log_density()


def test_any_layout_and_dtype_gives_the_same_values():
    model = make_model("vamp", latent_dims=(3,))
    Z = codes(50, 3)
    want = model.prior_log_density(Z)
    for variant in (Z.astype(np.float64), np.asfortranarray(Z), Z.tolist(),
                    np.repeat(Z, 2, axis=0)[::2]):
        assert np.array_equal(model.prior_log_density(variant), want)


def test_float32_c_contiguous_codes_are_not_copied():
    model = make_model("gmm-diag", latent_dims=(8,))
    Z = codes(200000, 8)                     # 6.4 MB; the output is 1.6 MB
    model.prior_log_density(Z[:10])          # the workspace, ahead
    tracemalloc.start()
    model.prior_log_density(Z)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < Z.nbytes / 2, peak


def test_a_categorical_top_layer_is_refused_by_name():
    model = hvae.Model(5, latent_dims=(2,), hidden_dims=(8,), latent_family="categorical")
    with pytest.raises(ValueError, match="Gaussian top layer.*categorical"):
        model.prior_log_density(np.zeros((1, 20), np.float32))
    X, _ = load_digits()
    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(16,), latent_types="categorical",
                          n_epochs=1, random_state=0).fit(X[:100])
    with pytest.raises(ValueError, match="categorical"):
        vae.prior_log_density(np.zeros((1, 20)))


@pytest.fixture(scope="module")
def digits():
    X, _ = load_digits()
    return X[:300], X[300:400]


@pytest.mark.parametrize("key", list(PRIORS))
def test_estimator_values_survive_save_load_and_pickle(key, digits, tmp_path):
    X, X_test = digits
    options = dict(PRIORS[key])
    options.pop("discriminator_hidden", None)
    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(16,), n_epochs=2, random_state=0,
                          discriminator_hidden=(16,), **options).fit(X)
    Z = vae.transform(X_test)
    want = vae.prior_log_density(Z)
    assert want.shape == (len(Z),) and np.all(np.isfinite(want))
    np.testing.assert_array_equal(vae.model_.prior_log_density(Z), want)
    vae.save(tmp_path / "model.hvae")
    np.testing.assert_array_equal(hvae.load(tmp_path / "model.hvae").prior_log_density(Z), want)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(vae)).prior_log_density(Z), want)


def test_estimator_checks_fitted_and_shape(digits):
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        HierarchicalVAE().prior_log_density(np.zeros((1, 16)))
    vae = HierarchicalVAE(latent_dims=(4, 2), hidden_dims=(16,), n_epochs=1,
                          random_state=0).fit(digits[0])
    with pytest.raises(ValueError, match=r"shape \(n_samples, 2\)"):
        vae.prior_log_density(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        vae.prior_log_density([[np.nan, 0.0]])
    np.testing.assert_allclose(vae.prior_log_density([[0.0, 0.0]]), [-np.log(2 * np.pi)])
