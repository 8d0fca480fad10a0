"""The discriminator mechanism (csrc/discriminator.c), FactorVAE's penalty,
the density-ratio prior and beta-TCVAE (csrc/tcvae.c).

1. Gradients of the training loss with each new term, at a fixed
   discriminator, against central differences of the float64 reference
   (tests/reference.py, extended_loss), with the bound of
   tests/test_gradients.py (1e-3 relative plus 1e-5 of max |gradient|); the
   discriminator's own coordinates get no gradient from the model's loss.
2. The discriminator recovers a known log-ratio: q = N(m, s^2 I) against
   p = N(0, I) in 2 dimensions, KL(q || p) = 0.711 nats in closed form; after
   1000 Adam steps of a (32, 32) discriminator, the mean of T over fresh
   q-samples is within 0.15 nats of it (seen: within 0.09 over seeds 0-4,
   and a correlation of T with the true log-ratio above 0.996). The
   tolerance covers the Monte-Carlo error of the mean over 4000 samples
   (~0.02) and what 1000 steps leave of the fit's error.
3. FactorVAE's permutation keeps every column's values exactly and breaks
   the dependence between columns.
4. beta-TCVAE's three terms sum to the sampled KL estimate of the same rows,
   and match the float64 reference term by term.
5. Models with a discriminator save, load, pickle and partial_fit with it.
"""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402

import hvae  # noqa: E402
import hvae.datasets  # noqa: E402
from hvae import _core  # noqa: E402

N_ROWS = 9
DISC_HIDDEN = (6,)


def _model(cfg, prior="standard", disc=DISC_HIDDEN):
    return hvae.Model(cfg.n_features, cfg.latent_dims, cfg.hidden_dims,
                      likelihood=cfg.likelihood, activation=cfg.activation,
                      decoder_variance=cfg.decoder_variance, inference=cfg.inference,
                      prior=prior, discriminator_hidden=disc, seed=0)


CASES = {
    "factorvae": (Config(6, (4,), (6,), "gaussian", "tanh"),
                  dict(prior="standard"), dict(tc_weight=3.0)),
    "factorvae-T2-bernoulli": (Config(8, (4, 3), (5,), "bernoulli", "softplus"),
                               dict(prior="standard"), dict(tc_weight=0.7)),
    "density-ratio": (Config(6, (4,), (6,), "gaussian", "tanh"),
                      dict(prior="density_ratio"), dict()),
    "density-ratio-ladder": (Config(8, (4, 3), (5,), "bernoulli", "tanh",
                                    inference="ladder"),
                             dict(prior="density_ratio"), dict(beta=2.0)),
    "tcvae": (Config(6, (4,), (6,), "gaussian", "tanh"), dict(disc=None),
              dict(tcvae_weights=(1.0, 4.0, 2.0), n_data=100.0)),
    "tcvae-T2": (Config(8, (4, 3), (5,), "bernoulli", "elu"), dict(disc=None),
                 dict(tcvae_weights=(0.5, 6.0, 1.5), n_data=40.0, beta=3.0)),
}


def _reference_kwargs(fit_kwargs, prior):
    kw = dict(beta=fit_kwargs.get("beta", 1.0), tc_weight=fit_kwargs.get("tc_weight", 0.0),
              density_ratio=prior == "density_ratio")
    if "tcvae_weights" in fit_kwargs:
        kw.update(tcvae_weights=fit_kwargs["tcvae_weights"], n_data=fit_kwargs["n_data"])
    return kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_with_discriminator_terms_matches_reference(case):
    cfg, model_kwargs, fit_kwargs = CASES[case]
    rng = np.random.default_rng(list(case.encode()))
    disc = model_kwargs.get("disc", DISC_HIDDEN)
    prior = model_kwargs.get("prior", "standard")
    model = _model(cfg, prior=prior, disc=disc)
    n_vae = ref.n_params(cfg)
    p0 = (rng.standard_normal(model.n_params) * 0.6).astype(np.float32)
    p0[:n_vae] = ref.random_parameters(cfg, rng, scale=1.5)
    model.parameters[:] = p0
    x = ref.random_data(cfg, N_ROWS, rng)
    noise = ref.random_noise(cfg, N_ROWS, rng)
    loss, grad = model.loss_and_grad(x, noise=noise, **fit_kwargs)
    grad = np.array(grad, dtype=np.float64)
    hidden = disc or ()
    ref_kwargs = _reference_kwargs(fit_kwargs, prior)

    def ref_loss(flat):
        params = ref.unflatten_all(flat, cfg, hidden) if disc is not None else \
            ref.unflatten(flat, cfg)
        return ref.extended_loss(params, cfg, x, noise, **ref_kwargs)

    def disc_signs(flat):
        if disc is None:
            return None
        params = ref.unflatten_all(flat, cfg, hidden)
        z_top = ref.forward(params, cfg, x, noise)["z"][-1]
        pre = []
        ref.discriminator(params, z_top, pre)
        return np.concatenate([(p > 0).ravel() for p in pre]) if pre else None

    p64 = p0.astype(np.float64)
    loss_ref = ref_loss(p64)
    assert abs(float(loss) - loss_ref) <= 1e-4 * (1 + abs(loss_ref)), (float(loss), loss_ref)
    # The discriminator is fixed: the model's loss gives it no gradient.
    assert np.all(grad[n_vae:] == 0.0)
    h, numeric, skipped = 1e-6, np.zeros(n_vae), 0
    signs0 = disc_signs(p64)
    for k in range(n_vae):
        hi, lo = p64.copy(), p64.copy()
        hi[k] += h
        lo[k] -= h
        if signs0 is not None and not (np.array_equal(disc_signs(hi), signs0)
                                       and np.array_equal(disc_signs(lo), signs0)):
            numeric[k] = grad[k]  # a leaky-ReLU kink between: no difference quotient
            skipped += 1
            continue
        numeric[k] = (ref_loss(hi) - ref_loss(lo)) / (2 * h)
    assert skipped <= n_vae // 20, skipped
    scale = np.max(np.abs(numeric))
    err = np.abs(grad[:n_vae] - numeric)
    worst = int(np.argmax(err / (1e-3 * np.abs(numeric) + 1e-5 * scale)))
    print(f"{case}: largest difference {err.max():.3g} (max |g| {scale:.3g})")
    assert np.all(err <= 1e-3 * np.abs(numeric) + 1e-5 * scale), (
        worst, grad[worst], numeric[worst])


def test_discriminator_recovers_a_known_log_ratio():
    d, mean, std = 2, np.array([1.0, 0.5]), 0.8
    kl = 0.5 * np.sum(std ** 2 + mean ** 2 - 1.0 - np.log(std ** 2))
    model = hvae.Model(5, [d], [8], prior="density_ratio", discriminator_hidden=(32, 32),
                       seed=3)
    model.n_threads = 1  # small products: threads only contend
    rng = np.random.default_rng(0)
    for step in range(1000):
        zq = (mean + std * rng.standard_normal((256, d))).astype(np.float32)
        zp = rng.standard_normal((256, d)).astype(np.float32)
        model.discriminator_step(zq, zp, learning_rate=2e-3, adam_betas=(0.5, 0.9))
    zq = (mean + std * rng.standard_normal((4000, d))).astype(np.float32)
    estimate = float(np.mean(model.discriminator_log_ratio(zq)))
    print(f"KL {kl:.4f}, mean T over q {estimate:.4f}")
    assert abs(estimate - kl) < 0.15, (estimate, kl)
    # And pointwise: T(z) against the true log-ratio on q's bulk.
    z = zq[:500].astype(np.float64)
    true = (np.sum(-0.5 * ((z - mean) / std) ** 2 - np.log(std), axis=1)
            + 0.5 * np.sum(z ** 2, axis=1))
    t = model.discriminator_log_ratio(zq[:500]).astype(np.float64)
    assert np.corrcoef(t, true)[0, 1] > 0.95


def test_permutation_keeps_each_dimension_exactly():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 1))
    Z = np.hstack([base, 2 * base + 0.01 * rng.standard_normal((300, 1)), base ** 3,
                   rng.standard_normal((300, 1))]).astype(np.float32)
    P = _core.permute_dims(Z, seed=7)
    assert P.shape == Z.shape and P.dtype == np.float32
    for j in range(Z.shape[1]):
        assert np.array_equal(np.sort(P[:, j]), np.sort(Z[:, j])), j
        assert not np.array_equal(P[:, j], Z[:, j]), j  # moved (300! orders)
    # The first three columns were dependent; permuted, they no longer are.
    assert abs(np.corrcoef(Z[:, 0], Z[:, 1])[0, 1]) > 0.99
    assert abs(np.corrcoef(P[:, 0], P[:, 1])[0, 1]) < 0.2
    # Another seed, another permutation.
    assert not np.array_equal(_core.permute_dims(Z, seed=8), P)


def test_tcvae_terms_sum_to_the_sampled_kl():
    cfg = Config(8, (5,), (6,), "bernoulli", "tanh")
    rng = np.random.default_rng(2)
    model = hvae.Model(8, (5,), (6,), likelihood="bernoulli", activation="tanh", seed=0)
    model.parameters[:] = ref.random_parameters(cfg, rng, scale=1.0)
    x = ref.random_data(cfg, 32, rng)
    noise = ref.random_noise(cfg, 32, rng)
    terms = model.tcvae_terms(x, 500.0, noise=noise)
    mi, tc, dw = (terms[k] for k in ("mutual_information", "total_correlation",
                                     "dimension_wise_kl"))
    params = ref.unflatten(model.parameters.astype(np.float64), cfg)
    out = ref.forward(params, cfg, x, noise, sampled=True)
    sampled_kl = out["kl"][:, -1]  # log q(z|x) - log N(z; 0, I) at the same z
    np.testing.assert_allclose(mi + tc + dw, sampled_kl, rtol=1e-5, atol=1e-4)
    r_mi, r_tc, r_dw = ref.tcvae_terms(out["z"][-1], noise[-1].astype(np.float64),
                                       out["mu"][-1], out["logvar"][-1], 500.0)
    for name, c, r in (("MI", mi, r_mi), ("TC", tc, r_tc), ("DW", dw, r_dw)):
        np.testing.assert_allclose(c, r, rtol=1e-4, atol=1e-3, err_msg=name)


def _digits():
    X, _ = hvae.datasets.load_digits()
    return X[:400]


@pytest.mark.parametrize("params", [dict(tc_weight=4.0, discriminator_hidden=(16,)),
                                    dict(prior="density_ratio", discriminator_hidden=(16,))],
                         ids=["factorvae", "density-ratio"])
def test_discriminator_is_saved_loaded_pickled_and_trained_on(params, tmp_path):
    X = _digits()
    vae = hvae.HierarchicalVAE(latent_dims=(3,), hidden_dims=(32,), likelihood="bernoulli",
                               n_epochs=2, batch_size=50, random_state=0, n_threads=1,
                               **params).fit(X)
    names = [name for name, _ in vae.model_.named_parameters()]
    assert names[-2:] == ["discriminator.out.W", "discriminator.out.b"]
    acc = vae.history_["discriminator_accuracy"]
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
    assert all(np.isfinite(vae.history_["discriminator_log_ratio"]))
    z = vae.transform(X[:20])
    t = vae.model_.discriminator_log_ratio(z)
    path = tmp_path / "m.hvae"
    vae.save(path)
    for other in (hvae.load(path), pickle.loads(pickle.dumps(vae))):
        assert np.array_equal(other.model_.parameters, vae.model_.parameters)
        assert np.array_equal(other.model_.discriminator_log_ratio(z), t)
        assert other.score(X) == vae.score(X)
        before = other.model_.parameters.copy()
        other.partial_fit(X)
        assert len(other.history_["discriminator_accuracy"]) == 3
        n_disc = sum(v.size for name, v in other.model_.named_parameters()
                     if name.startswith("discriminator."))
        disc = slice(other.model_.n_params - n_disc, None)
        assert not np.array_equal(other.model_.parameters[disc], before[disc])


def test_discriminator_settings_are_refused_clearly():
    X = _digits()
    with pytest.raises(ValueError, match="tc_weight"):
        hvae.HierarchicalVAE(tc_weight=1.0, objective="iwae").fit(X)
    with pytest.raises(ValueError, match="tcvae_weights"):
        hvae.HierarchicalVAE(tcvae_weights=(1, 2, 1), prior="density_ratio").fit(X)
    with pytest.raises(ValueError, match="weight_decay"):
        hvae.HierarchicalVAE(tc_weight=1.0, weight_decay=1e-4).fit(X)
    with pytest.raises(ValueError, match="discriminator_betas"):
        hvae.HierarchicalVAE(tc_weight=1.0, discriminator_betas=(0.5, 1.0)).fit(X)
    # MPI training of a discriminator works now (tests/test_mpi.py); a
    # non-communicator is still refused before any work.
    with pytest.raises(TypeError, match="communicator"):
        hvae.HierarchicalVAE(tc_weight=1.0).fit(X, comm=object())
    model = hvae.Model(64, [3], [8], likelihood="bernoulli")
    with pytest.raises(ValueError, match="discriminator"):
        model.fit(X, n_epochs=1, tc_weight=1.0)
    with pytest.raises(ValueError, match="no discriminator"):
        model.discriminator_log_ratio(np.zeros((2, 3), np.float32))


def test_density_ratio_prior_samples_by_resampling():
    """sample() keeps the N(0, I) draws the discriminator favours: with T
    trained towards q = N(m, s^2 I), the samples' top-layer mean moves to m."""
    d, mean, std = 2, np.array([1.5, -1.0]), 0.5
    model = hvae.Model(4, [d], [], prior="density_ratio", discriminator_hidden=(32, 32),
                       seed=1)
    model.n_threads = 1
    rng = np.random.default_rng(4)
    for _ in range(800):
        zq = (mean + std * rng.standard_normal((256, d))).astype(np.float32)
        zp = rng.standard_normal((256, d)).astype(np.float32)
        model.discriminator_step(zq, zp, learning_rate=2e-3)
    # With a linear unit-variance decoder, x's mean is an affine map of z:
    # decode the drawn x's mean back through a least-squares fit of that map.
    Z = rng.standard_normal((200, d)).astype(np.float32)
    Xm = model.decode(Z)
    A, *_ = np.linalg.lstsq(np.hstack([Z, np.ones((200, 1))]), Xm, rcond=None)
    drawn = model.sample(600, seed=5)
    z_drawn = np.linalg.lstsq(A[:d].T, (drawn - A[d]).T, rcond=None)[0].T
    assert np.all(np.abs(z_drawn.mean(axis=0) - mean) < 0.25), z_drawn.mean(axis=0)
    assert np.all(z_drawn.std(axis=0) < 0.8)
