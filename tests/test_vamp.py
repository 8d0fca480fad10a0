"""The VampPrior (prior='vamp', csrc/prior_vamp.c) in the low-level Model.

Its ELBO terms against the float64 reference extended to it
(tests/reference_vamp.py); its gradient, with respect to every parameter
(the pseudo-inputs and, through their encoder pass, the encoder weights
included), against central differences of that reference (smooth
activations, so no kinks; the tolerance argument is test_gradients.py's);
the sampler by statistical tests; bad arguments; pickling and the
importance-sampled log-likelihood.
"""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
import reference_vamp as vref  # noqa: E402
from reference import Config  # noqa: E402

import hvae  # noqa: E402

N_ROWS = 6

CASES = [
    (Config(6, (3,), (5,), "gaussian", "tanh"), 4),
    (Config(7, (3,), (5,), "bernoulli", "softplus"), 3),
    (Config(6, (3,), (), "gaussian", "elu", "unit"), 1),
    (Config(6, (3, 2), (5,), "gaussian", "tanh"), 3),
    (Config(6, (3, 2), (4,), "bernoulli", "softplus", "learned", "ladder"), 4),
    (Config(5, (3, 2, 2), (4,), "gaussian", "tanh", "learned", "markov"), 2),
]


def cid(case):
    cfg, K = case
    return (f"{cfg.inference}-T{cfg.n_layers}-{cfg.likelihood}-{cfg.decoder_variance}"
            f"-h{len(cfg.hidden_dims)}-K{K}")


def make(cfg, K, seed=0, scale=1.2):
    """A vamp model with our own random parameters: pseudo-inputs inside
    (0.1, 0.9) for a Bernoulli likelihood (away from the clip's kinks) but
    for two entries outside [0, 1] (clipped: no gradient), N(0, 1) else."""
    rng = np.random.default_rng(seed)
    model = hvae.Model(**{**cfg.model_kwargs(), "prior": "vamp", "n_pseudo_inputs": K}, seed=seed)
    blocks = ref.random_parameters(cfg, rng, scale=scale)
    if cfg.likelihood == "bernoulli":
        P = rng.uniform(0.1, 0.9, size=(K, cfg.n_features))
        P.flat[0], P.flat[-1] = -0.3, 1.4
    else:
        P = rng.standard_normal((K, cfg.n_features))
    p = np.concatenate([blocks, P.ravel()]).astype(np.float32)
    assert p.size == model.n_params == vref.n_params(cfg, K)
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in vref.parameter_shapes(cfg, K)]
    model.parameters[:] = p
    x = ref.random_data(cfg, N_ROWS, rng)
    return model, p, x, rng


def noise_for(cfg, rows, rng):
    return [rng.standard_normal((rows, d)).astype(np.float32) for d in cfg.latent_dims]


@pytest.mark.parametrize("case", CASES, ids=cid)
def test_terms_match_reference(case):
    cfg, K = case
    model, p, x, rng = make(cfg, K)
    noise = noise_for(cfg, N_ROWS, rng)
    params = vref.unflatten(p.astype(np.float64), cfg, K)
    expected = vref.forward(params, cfg, x, noise)
    terms = model.elbo_terms(x, noise=noise)
    for key in ("elbo", "reconstruction", "kl"):
        ref.assert_close(terms[key], expected[key], rtol=1e-4, atol=1e-4, what=key)
    # The top term is a sampled log-ratio, not a KL: it takes both signs.
    assert model.prior == "vamp" and model.n_pseudo_inputs == K


OBJECTIVES = [dict(objective="elbo", n_samples=1), dict(objective="elbo", n_samples=2),
              dict(objective="iwae", n_samples=3)]


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: f"{o['objective']}{o['n_samples']}")
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_gradient_against_float64_finite_differences(case, obj):
    cfg, K = case
    if obj["n_samples"] > 1 and cfg.n_layers > 2:
        pytest.skip("the deep case runs with one sample (time)")
    model, p, x, rng = make(cfg, K)
    S = obj["n_samples"]
    noise = noise_for(cfg, N_ROWS * S, rng)
    loss, grad = model.loss_and_grad(x, noise=noise, **obj)
    p64 = p.astype(np.float64)

    def ref_loss(flat):
        return vref.objective_loss(vref.unflatten(flat, cfg, K), cfg, x, noise, S,
                                   obj["objective"])

    assert loss == pytest.approx(ref_loss(p64), rel=1e-4, abs=1e-4)
    g_ref = ref.central_differences(ref_loss, p64)
    scale = np.abs(g_ref).max()
    err = np.abs(grad - g_ref)
    worst = int(np.argmax(err / (1e-3 * np.abs(g_ref) + 1e-5 * scale)))
    names = [n for n, shape in vref.parameter_shapes(cfg, K) for _ in range(int(np.prod(shape)))]
    print(f"{cid(case)} {obj}: max |diff|/max|g| {err.max() / scale:.2e}")
    assert np.all(err <= 1e-3 * np.abs(g_ref) + 1e-5 * scale), (
        f"largest error {err[worst]:.3e} at {names[worst]} (grad {grad[worst]:.6g}, "
        f"reference {g_ref[worst]:.6g}, max |g| {scale:.3g})")
    # The pseudo-inputs' gradients, smaller than the largest (deep chains),
    # held to the same bound relative to their own scale.
    n_P = K * cfg.n_features
    scale_P = np.abs(g_ref[-n_P:]).max()
    assert scale_P > 1e-4 * scale, "the pseudo-inputs' gradient vanishes"
    ref.assert_close(grad[-n_P:], g_ref[-n_P:], rtol=1e-3, atol=1e-5 * scale_P,
                     what="pseudo-input gradient")
    if cfg.likelihood == "bernoulli":  # clipped entries take no gradient
        assert grad[-n_P] == 0.0 and grad[-1] == 0.0


def test_gradient_reaches_the_encoder_through_the_pseudo_inputs():
    """The encoder's weights get a gradient from the pseudo-inputs' encoder
    pass as well as from q: the reference's gradient with the prior's
    components detached (held at the initial parameters) differs clearly
    from the full one, and the model's matches the full one."""
    cfg, K = CASES[0]
    model, p, x, rng = make(cfg, K)
    noise = noise_for(cfg, N_ROWS, rng)
    _, grad = model.loss_and_grad(x, noise=noise)
    p64 = p.astype(np.float64)
    frozen = vref.unflatten(p64.copy(), cfg, K)

    def loss(flat, detached):
        params = vref.unflatten(flat, cfg, K)
        out = vref.forward(params, cfg, x, noise, prior_params=frozen if detached else None)
        return -np.mean(out["elbo"])

    shapes = vref.parameter_shapes(cfg, K)
    names = [n for n, _ in shapes]
    start = sum(int(np.prod(s)) for _, s in shapes[:names.index("enc1.hidden1.W")])
    stop = sum(int(np.prod(s)) for _, s in shapes[:names.index("dec1.hidden1.W")])
    h, flat = 1e-6, p64.copy()
    full, detached = np.empty(stop - start), np.empty(stop - start)
    for k in range(start, stop):
        for out, det in ((full, False), (detached, True)):
            flat[k] = p64[k] + h
            plus = loss(flat, det)
            flat[k] = p64[k] - h
            minus = loss(flat, det)
            flat[k] = p64[k]
            out[k - start] = (plus - minus) / (2 * h)
    scale = np.abs(full).max()
    assert np.abs(full - detached).max() > 0.05 * scale
    ref.assert_close(grad[start:stop], full, rtol=1e-3, atol=1e-5 * scale,
                     what="encoder gradient with the pseudo-input pass")


def _linear_identity_model(K, d=3, seed=0):
    cfg = Config(d, (d,), (), "gaussian", "tanh", "unit")
    model, p, _, rng = make(cfg, K, seed=seed, scale=1.0)
    names = dict(model.named_parameters())
    names["dec1.mu.W"][:] = np.eye(d, dtype=np.float32)
    names["dec1.mu.b"][:] = 0.0
    return cfg, model, names


@pytest.mark.parametrize("K", [1, 3])
def test_sample_draws_from_the_mixture_of_pseudo_input_posteriors(K):
    """With K = 1 the prior is q(z | u_1): its samples have that mean and
    variance; with K = 3 each coordinate follows the mixture's CDF (KS)."""
    cfg, model, names = _linear_identity_model(K)
    u = names["prior.pseudo_inputs"]
    (m, lv), = model.encode(np.ascontiguousarray(u))
    m, sd = m.astype(np.float64), np.exp(0.5 * lv.astype(np.float64))
    n = 20000
    z = model.sample(n, seed=3).astype(np.float64)
    assert z.shape == (n, cfg.n_features)
    if K == 1:
        se = sd[0] / np.sqrt(n)
        assert np.all(np.abs(z.mean(axis=0) - m[0]) < 5 * se), (z.mean(axis=0), m[0])
        # var's standard error for a normal sample: var * sqrt(2 / (n - 1)).
        ratio = z.var(axis=0, ddof=1) / sd[0] ** 2
        assert np.all(np.abs(ratio - 1) < 5 * np.sqrt(2 / (n - 1))), ratio
    for j in range(cfg.n_features):
        def cdf(v, j=j):
            return np.mean([stats.norm.cdf(v, m[k, j], sd[k, j]) for k in range(K)], axis=0)
        p_value = stats.kstest(z[:, j], cdf).pvalue
        assert p_value > 1e-3, (j, p_value)


def test_sample_with_pseudo_inputs_far_apart_picks_components_uniformly():
    cfg, model, names = _linear_identity_model(4)
    # Far-apart, narrow components: each sample is near one component mean.
    names["enc1.logvar.W"][:] = 0.0
    names["enc1.logvar.b"][:] = -8.0
    names["enc1.mu.W"][:] = np.eye(3, dtype=np.float32) * 0.0
    names["prior.pseudo_inputs"][:] = 0.0
    means = np.array([[10, 0, 0], [-10, 0, 0], [0, 10, 0], [0, 0, -10]], np.float32)
    # enc1.mu.b is shared; make the components differ through the inputs.
    names["enc1.mu.W"][:] = np.eye(3, dtype=np.float32)
    names["prior.pseudo_inputs"][:] = means
    mu_of_u, _ = model.encode(means)[0]
    z = model.sample(4000, seed=5)
    nearest = np.argmin(((z[:, None, :] - mu_of_u[None]) ** 2).sum(axis=2), axis=1)
    counts = np.bincount(nearest, minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    assert np.abs(z - mu_of_u[nearest]).max() < 0.2


def test_log_likelihood_bounds_and_matches_the_reference_importance_sum():
    cfg, K = CASES[0]
    model, p, x, rng = make(cfg, K)
    ll = model.log_likelihood(x, n_samples=2000)
    elbo = model.elbo(x)
    # log p(x) >= E[ELBO]; with 2000 draws the estimate is above one draw's
    # ELBO on average.
    assert np.mean(ll) > np.mean(elbo)
    # One draw: the same hashed noise as elbo(), whose top term is the
    # sampled log-ratio already (T = 1), so the same number.
    np.testing.assert_allclose(model.log_likelihood(x, n_samples=1), elbo, rtol=1e-5, atol=1e-4)
    # The reference's importance sum with its own draws agrees within
    # Monte Carlo error: the relative standard error of a mean of S weights
    # is sd(w) / mean(w) / sqrt(S), measured on the reference's weights.
    params = vref.unflatten(p.astype(np.float64), cfg, K)
    S = 20000
    noise = [rng.standard_normal((N_ROWS * S, d)) for d in cfg.latent_dims]
    out = vref.forward(params, cfg, np.repeat(x, S, axis=0), noise, sampled=True)
    log_w = out["elbo"].reshape(N_ROWS, S)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    ll_ref = np.log(w.mean(axis=1)) + log_w.max(axis=1)
    spread = w.std(axis=1) / w.mean(axis=1)
    tolerance = 5 * spread * (1 / np.sqrt(2000) + 1 / np.sqrt(S)) + 1e-3
    print("log p(x)", ll, "reference", ll_ref, "tolerance", tolerance)
    assert np.all(np.abs(ll - ll_ref) < tolerance), (ll, ll_ref, tolerance)


def test_bad_arguments_are_refused():
    kw = dict(n_features=5, latent_dims=(2,), hidden_dims=(3,))
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="n_pseudo_inputs"):
            hvae.Model(**kw, prior="vamp", n_pseudo_inputs=bad)
    with pytest.raises(ValueError, match="n_pseudo_inputs"):
        hvae.Model(**kw, prior="standard", n_pseudo_inputs=3)
    with pytest.raises(ValueError, match="condition"):
        hvae.Model(**kw, prior="vamp", n_pseudo_inputs=3, n_conditions=2)
    with pytest.raises(ValueError, match="'vamp'"):
        hvae.Model(**kw, prior="vampire", n_pseudo_inputs=3)
    assert "vamp" in hvae._native.PRIORS


def test_pickle_and_training_keep_the_pseudo_inputs():
    cfg, K = CASES[1]
    model, p, x, rng = make(cfg, K)
    X = ref.random_data(cfg, 200, rng)
    before = dict(model.named_parameters())["prior.pseudo_inputs"].copy()
    model.fit(X, n_epochs=3, batch_size=32, learning_rate=1e-2)
    after = dict(model.named_parameters())["prior.pseudo_inputs"]
    assert not np.array_equal(before, after), "training leaves the pseudo-inputs alone"
    clone = pickle.loads(pickle.dumps(model))
    assert clone.n_pseudo_inputs == K and clone.prior == "vamp"
    np.testing.assert_array_equal(clone.parameters, model.parameters)
    np.testing.assert_array_equal(clone.elbo(X), model.elbo(X))
    np.testing.assert_array_equal(clone.sample(5, seed=1), model.sample(5, seed=1))
    assert "n_pseudo_inputs=3" in repr(model)


@pytest.mark.parametrize("objective", [dict(), dict(objective="iwae", n_samples=3)],
                         ids=["elbo", "iwae"])
def test_data_parallel_shards_train_like_one_process(objective):
    """The prior's gradients (pseudo-inputs, and the encoder through their
    pass) are sums over each rank's rows, reduced with the rest: shards give
    the single process's parameters, a rank with fewer rows than a
    minibatch included."""
    from test_distributed import fit_sharded
    from hvae.datasets import load_digits

    X = np.ascontiguousarray(load_digits()[0][:300])

    def make_model():
        return hvae.Model(64, (6,), (24,), likelihood="bernoulli", seed=3, prior="vamp",
                          n_pseudo_inputs=7)

    kwargs = dict(n_epochs=2, batch_size=40, **objective)
    single = make_model()
    single.fit(X, **kwargs)
    models, _, errors, _ = fit_sharded(make_model, X, (0, 17, 180, 300), **kwargs)
    assert not errors, errors
    for m in models[1:]:
        np.testing.assert_array_equal(m.parameters, models[0].parameters)
    np.testing.assert_allclose(models[0].parameters, single.parameters, rtol=0, atol=2e-5)
    P = dict(single.named_parameters())["prior.pseudo_inputs"]
    assert not np.array_equal(P, dict(make_model().named_parameters())["prior.pseudo_inputs"])
