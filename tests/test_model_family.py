"""The model family beyond the single-sample Markov ELBO: ladder inference,
multi-sample ELBO and IWAE, beta and free bits, conditions, and the
importance-sampled log-likelihood.

Every objective is checked against the independent float64 reference
(tests/reference.py), its gradient against central differences of that
reference (smooth activations, so no kinks; the tolerance argument is the one
in test_gradients.py), and the estimators against known mathematics.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402

import hvae  # noqa: E402

N_ROWS = 6


def make(cfg, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    model = hvae.Model(**cfg.model_kwargs(), seed=seed)
    p = ref.random_parameters(cfg, rng, scale=scale)
    model.parameters[:] = p
    x = ref.random_data(cfg, N_ROWS, rng)
    cond = rng.normal(size=(N_ROWS, cfg.n_conditions)) if cfg.n_conditions else None
    return model, p, x, cond, rng


def noise_for(cfg, rows, rng):
    return [rng.standard_normal((rows, d)) for d in cfg.latent_dims]


FAMILY = [
    Config(5, (3,), (4,), "gaussian", "tanh", "learned", "ladder"),
    Config(5, (3, 2), (4,), "gaussian", "tanh", "learned", "ladder"),
    Config(6, (4, 3, 2), (5,), "bernoulli", "softplus", "learned", "ladder"),
    Config(6, (3, 2), (), "gaussian", "elu", "unit", "ladder"),
    Config(5, (3, 2), (4,), "gaussian", "tanh", "learned", "markov", 3),
    Config(6, (3, 2), (), "bernoulli", "softplus", "learned", "ladder", 2),
    Config(6, (3, 2), (4, 3), "gaussian", "softplus", "unit", "markov", 2),
]


def fid(cfg):
    return (f"{cfg.inference}-T{cfg.n_layers}-{cfg.likelihood}-{cfg.decoder_variance}"
            f"-h{len(cfg.hidden_dims)}-c{cfg.n_conditions}")


@pytest.mark.parametrize("cfg", FAMILY, ids=fid)
def test_terms_encode_decode_match_reference(cfg):
    model, p, x, cond, rng = make(cfg)
    noise = noise_for(cfg, N_ROWS, rng)
    params = ref.unflatten(p.astype(np.float64), cfg)
    expected = ref.forward(params, cfg, x, noise, cond)
    terms = model.elbo_terms(x, noise=noise, cond=cond)
    for key in ("elbo", "reconstruction", "kl"):
        ref.assert_close(terms[key], expected[key], rtol=1e-4, atol=1e-4, what=key)
    for (mu, lv), (mu_r, lv_r) in zip(model.encode(x, cond=cond), ref.encode(params, cfg, x, cond)):
        ref.assert_close(mu, mu_r, rtol=1e-4, atol=1e-5, what="encode mu")
        ref.assert_close(lv, lv_r, rtol=1e-4, atol=1e-5, what="encode logvar")
    z1 = rng.normal(size=(N_ROWS, cfg.latent_dims[0]))
    ref.assert_close(model.decode(z1, cond=cond), ref.decode(params, cfg, z1, cond),
                     rtol=1e-4, atol=1e-5, what="decode")


OBJECTIVES = [
    dict(objective="elbo", n_samples=3),
    dict(objective="elbo", n_samples=2, beta=0.3),
    dict(objective="iwae", n_samples=4),
    dict(objective="iwae", n_samples=1),
]


def oid(o):
    return "-".join(f"{k}{v}" for k, v in o.items())


@pytest.mark.parametrize("obj", OBJECTIVES, ids=oid)
@pytest.mark.parametrize("cfg", [FAMILY[1], FAMILY[2], FAMILY[4],
                                 Config(5, (3, 2), (4,), "gaussian", "tanh")], ids=fid)
def test_objective_gradient_against_float64_finite_differences(cfg, obj):
    model, p, x, cond, rng = make(cfg, scale=1.2)
    S = obj["n_samples"]
    noise = noise_for(cfg, N_ROWS * S, rng)
    loss, grad = model.loss_and_grad(x, noise=noise, cond=cond, **obj)
    kw = {k: v for k, v in obj.items() if k != "n_samples"}
    p64 = p.astype(np.float64)

    def ref_loss(flat):
        return ref.objective_loss(ref.unflatten(flat, cfg), cfg, x, noise, S, cond=cond, **kw)

    assert loss == pytest.approx(ref_loss(p64), rel=1e-4, abs=1e-4)
    g_ref = ref.central_differences(ref_loss, p64)
    scale = np.abs(g_ref).max()
    err = np.abs(grad - g_ref)
    worst = int(np.argmax(err / (1e-3 * np.abs(g_ref) + 1e-5 * scale)))
    assert np.all(err <= 1e-3 * np.abs(g_ref) + 1e-5 * scale), (
        f"largest error {err[worst]:.3e} at {worst} (grad {grad[worst]:.6g}, "
        f"reference {g_ref[worst]:.6g}, max |g| {scale:.3g})")


def test_free_bits_and_beta_change_the_objective_exactly_as_documented():
    cfg = Config(5, (3, 2), (4,), "gaussian", "tanh")
    model, p, x, _, rng = make(cfg)
    noise = noise_for(cfg, N_ROWS, rng)
    terms = model.elbo_terms(x, noise=noise)
    rec, kl_means = terms["reconstruction"].mean(), terms["kl"].mean(axis=0)
    for beta, free_bits in [(1.0, 0.0), (0.25, 0.0), (1.0, 1e6), (0.5, float(kl_means.min()) + 1e-3)]:
        loss, grad = model.loss_and_grad(x, noise=noise, beta=beta, free_bits=free_bits)
        floored = np.maximum(kl_means, free_bits) if free_bits > 0 else kl_means
        assert loss == pytest.approx(-(rec - beta * floored.sum()), rel=1e-5), (beta, free_bits)
    # A floor above every layer's KL leaves only the reconstruction's gradient:
    # the gradient equals that of beta = 0.
    _, g_floor = model.loss_and_grad(x, noise=noise, free_bits=1e6)
    _, g_beta0 = model.loss_and_grad(x, noise=noise, beta=0.0)
    np.testing.assert_array_equal(g_floor, g_beta0)
    # The top layer's closed-form KL is positive, so the floor's effect is visible.
    assert kl_means[-1] > 0


def test_iwae_is_tighter_than_elbo_and_grows_with_k():
    from hvae.datasets import load_digits
    X = load_digits()[0][:300]
    model = hvae.Model(64, (6, 3), (32,), likelihood="bernoulli", seed=0)
    model.n_threads = 1
    model.fit(X, n_epochs=5, batch_size=64)
    elbo = np.mean([model.elbo(X, seed=s).mean() for s in range(20)])
    bounds = [model.log_likelihood(X, n_samples=k).mean() for k in (1, 5, 50, 500)]
    # One draw is the ELBO with every term sampled: the same in expectation.
    assert abs(bounds[0] - elbo) < 1.0, (bounds[0], elbo)
    assert bounds[1] > elbo and bounds[2] > bounds[1] and bounds[3] > bounds[2], (elbo, bounds)
    # The estimate is streamed: more draws than the workspace holds work.
    assert np.isfinite(model.log_likelihood(X[:2], n_samples=3000)).all()


def test_log_likelihood_of_probabilistic_pca_matches_closed_form():
    # A linear Gaussian decoder with a constant variance is probabilistic PCA:
    # x = z @ W + b + noise, z ~ N(0, I), noise ~ N(0, diag(s2)), so
    # x ~ N(b, W^T W + diag(s2)) exactly. Train the encoder (the proposal) and
    # compare the importance-sampled estimate with that density.
    rng = np.random.default_rng(0)
    D, d, n = 6, 2, 400
    W_true = rng.normal(size=(d, D))
    X = (rng.normal(size=(n, d)) @ W_true + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
    model = hvae.Model(D, (d,), (), likelihood="gaussian", seed=1)
    model.n_threads = 1
    named = dict(model.named_parameters())
    model.fit(X, n_epochs=200, batch_size=50, learning_rate=1e-2)
    # The decoder's variance must not depend on z: zero its weights, keep
    # the bias (a constant learned variance per feature), and refit briefly.
    named["dec1.logvar.W"][:] = 0.0
    model.fit(X, n_epochs=1, batch_size=400, learning_rate=1e-12)
    named["dec1.logvar.W"][:] = 0.0
    W, b = named["dec1.mu.W"].astype(np.float64), named["dec1.mu.b"].astype(np.float64)
    s2 = np.exp(named["dec1.logvar.b"].astype(np.float64))
    cov = W.T @ W + np.diag(s2)
    diff = X.astype(np.float64) - b
    _, logdet = np.linalg.slogdet(cov)
    exact = -0.5 * (D * np.log(2 * np.pi) + logdet
                    + np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff))
    estimate = model.log_likelihood(X[:100], n_samples=1000)
    gap = np.abs(estimate - exact[:100])
    assert gap.max() < 0.5, f"largest gap {gap.max():.3f} nats (mean {gap.mean():.3f})"
    # And it is above the ELBO (averaged over draws), as a tighter bound must be.
    elbo = np.mean([model.elbo(X[:100], seed=s).mean() for s in range(50)])
    assert estimate.mean() > elbo, (estimate.mean(), elbo)


def test_conditional_model_requires_and_uses_its_condition():
    cfg = Config(5, (2,), (4,), "gaussian", "tanh", n_conditions=3)
    model, p, x, cond, rng = make(cfg)
    with pytest.raises(ValueError, match="conditional"):
        model.elbo(x)
    with pytest.raises(ValueError, match="cond has 2 rows"):
        model.elbo(x, cond=cond[:2])
    with pytest.raises(ValueError, match=r"cond contains NaN"):
        model.elbo(x, cond=np.full_like(cond, np.nan))
    plain = hvae.Model(5, (2,), (4,))
    with pytest.raises(ValueError, match="no conditions"):
        plain.elbo(x, cond=cond)
    # Changing the condition changes every output that depends on it.
    other = cond + 1.0
    assert not np.allclose(model.encode(x, cond=cond)[0][0], model.encode(x, cond=other)[0][0])
    assert not np.allclose(model.sample(4, seed=0, cond=cond[:4]),
                           model.sample(4, seed=0, cond=other[:4]))
    assert [n for n, _ in model.named_parameters()][:2] == ["enc1.hidden1.W", "enc1.hidden1.b"]
    assert dict(model.named_parameters())["enc1.hidden1.W"].shape == (5 + 3, 4)
    assert dict(model.named_parameters())["dec1.hidden1.W"].shape == (2 + 3, 4)


def test_ladder_trains_and_pickles():
    from hvae.datasets import load_digits
    import pickle
    X = load_digits()[0]
    model = hvae.Model(64, (8, 4), (32,), likelihood="bernoulli", inference="ladder", seed=0)
    model.n_threads = 1
    before = model.elbo(X).mean()
    records = model.fit(X, n_epochs=5, batch_size=64, objective="iwae", n_samples=3)
    assert all(r["objective"] >= r["elbo"] - 0.5 for r in records)
    assert model.elbo(X).mean() > before + 5
    clone = pickle.loads(pickle.dumps(model))
    assert clone.inference == "ladder"
    np.testing.assert_array_equal(clone.elbo(X[:20]), model.elbo(X[:20]))


# ---- the estimator -----------------------------------------------------------

def test_conditional_digit_samples_are_recognised_as_their_class():
    from sklearn.linear_model import LogisticRegression
    from hvae import HierarchicalVAE
    from hvae.datasets import load_digits
    X, y = load_digits()
    vae = HierarchicalVAE(latent_dims=(8,), hidden_dims=(128,), likelihood="bernoulli",
                          conditional=True, n_epochs=60, batch_size=64, learning_rate=2e-3,
                          random_state=0, n_threads=1).fit(X, y)
    assert list(vae.classes_) == list(range(10)) and vae.model_.n_conditions == 10
    classifier = LogisticRegression(max_iter=2000).fit(X, y)
    labels = np.repeat(np.arange(10), 30)
    samples = vae.sample(len(labels), random_state=0, y=labels)
    accuracy = np.mean(classifier.predict(samples) == labels)
    print(f"conditional samples recognised: {accuracy:.3f}")
    assert accuracy >= 0.8, accuracy
    # One label for every draw works too, and an unseen label is refused.
    assert np.mean(classifier.predict(vae.sample(20, random_state=1, y=3)) == 3) >= 0.8
    with pytest.raises(ValueError, match="labels not seen in fit"):
        vae.sample(2, y=11)
    with pytest.raises(ValueError, match="fitted with conditions"):
        vae.transform(X[:3])
    assert vae.transform(X[:3], y[:3]).shape == (3, 8)
    assert vae.fit_transform(X[:100], y[:100]).shape == (100, 8)


def test_kl_warmup_schedule_is_exactly_as_documented():
    from hvae import HierarchicalVAE
    from hvae.datasets import load_digits
    X = load_digits()[0][:256]
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(16,), likelihood="bernoulli",
                          n_epochs=6, beta=0.5, kl_warmup_epochs=4, random_state=0,
                          n_threads=1).fit(X)
    assert vae.history_["beta"] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    # The recorded training loss is -(reconstruction - beta * KL) of each epoch.
    for loss, rec, kl, beta in zip(vae.history_["loss"], vae.history_["reconstruction"],
                                   vae.history_["kl"], vae.history_["beta"]):
        assert loss == pytest.approx(-(rec - beta * sum(kl)), rel=1e-9)
    # Warm-up counts every epoch of a warm-started model.
    vae.set_params(warm_start=True, n_epochs=1, beta=1.0)
    vae.fit(X)
    assert vae.history_["beta"][-1] == 1.0


@pytest.mark.parametrize("params", [
    dict(inference="ladder", latent_dims=(6, 3)),
    dict(objective="iwae", n_importance_samples=4, latent_dims=(6, 3)),
    dict(n_mc_samples=3, free_bits=0.5),
])
def test_estimator_variants_train_and_report(params):
    from hvae import HierarchicalVAE
    from hvae.datasets import load_digits
    X = load_digits()[0]
    base = dict(hidden_dims=(32,), likelihood="bernoulli", n_epochs=4, batch_size=64,
                random_state=0, n_threads=1)
    vae = HierarchicalVAE(**{**base, **params}).fit(X)
    h = vae.history_
    assert h["elbo"][-1] > h["elbo"][0]
    if params.get("objective") == "iwae":
        assert all(o >= e for o, e in zip(h["objective"], h["elbo"]))
    units = vae.active_units(X)
    assert len(units) == len(vae.model_.latent_dims)
    assert all(0 <= u <= d for u, d in zip(units, vae.model_.latent_dims))
    ll = vae.log_likelihood(X[:50], n_samples=100)
    elbo = np.mean([vae.model_.elbo(X[:50], seed=s).mean() for s in range(10)])
    assert ll.mean() > elbo


def test_iwae_parameters_are_validated():
    from hvae import HierarchicalVAE
    X = np.random.default_rng(0).random((10, 3))
    for params in (dict(objective="iwae", beta=0.5), dict(objective="iwae", free_bits=1.0),
                   dict(objective="iwae", kl_warmup_epochs=3), dict(objective="vi"),
                   dict(n_importance_samples=0), dict(inference="top-down")):
        with pytest.raises(ValueError):
            HierarchicalVAE(**params).fit(X)
