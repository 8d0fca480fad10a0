"""The mixture prior with full-covariance components (prior='gmm',
prior_covariance_type='full'; csrc/prior_gmm_full.c): its ELBO term and
every gradient against the float64 reference (tests/reference.py, written
with the precision matrices rather than their factors) and by finite
differences (test_gradients.py's two checks); the diagonal prior as its
special case; K = 1 at N(0, I) against the standard prior; IWAE and
log-likelihood with the full marginal; responsibilities; sampling by a
statistical test; the estimators (HierarchicalVAE, VaDE): save/load,
pickle, partial_fit, bad input, clustering."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402
import test_gradients as tg  # noqa: E402
# The two gradient checks, run here on the full-covariance problems below.
from test_gradients import (test_gradient_matches_float64_reference,  # noqa: E402,F401
                            test_gradient_matches_own_finite_differences)
# The diagonal prior's reference check, run here on this module's problems.
from test_prior_gmm import (GmmProblem, check_iwae_against_the_reference,  # noqa: E402
                            test_elbo_terms_and_log_weights_match_the_reference,  # noqa: F401
                            test_responsibilities_are_p_c_given_the_posterior_mean)  # noqa: F401
from test_vade import small_vade, synthetic_clusters  # noqa: E402

import hvae  # noqa: E402
import hvae.datasets  # noqa: E402
from hvae import _native, file_format  # noqa: E402
from hvae.clustering import _full_moments, precision_factor  # noqa: E402

FULL = dict(prior="gmm", prior_covariance_type="full")
FULL_CASES = [
    Config(6, (3,), (5,), "gaussian", "tanh", "learned", n_components=3, **FULL),
    Config(8, (4, 3), (6,), "bernoulli", "softplus", "learned", n_components=2, **FULL),
    Config(6, (4, 3), (5,), "gaussian", "elu", "unit", inference="ladder", n_components=2,
           **FULL),
    Config(6, (1,), (5,), "gaussian", "tanh", "learned", n_components=2, **FULL),
]


def full_id(cfg):
    return f"{tg.case_id(cfg)}-{cfg.inference}-full{cfg.n_components}"


def prior_values(cfg, rng):
    """Mixture tensors with correlated components whose responsibilities are
    neither 0/1 nor flat."""
    K, d = cfg.n_components, cfg.latent_dims[-1]
    values = {"prior.pi_logits": rng.normal(0.0, 0.7, K),
              "prior.mu": rng.normal(0.0, 0.8, (K, d)),
              "prior.prec_log_diag": rng.uniform(-0.3, 0.3, (K, d))}
    if d > 1:
        values["prior.prec_lower"] = rng.normal(0.0, 0.4, (K, d * (d - 1) // 2))
    return values


def FullProblem(cfg, seed=0):
    """test_gradients.Problem with the full-covariance mixture on top."""
    return GmmProblem(cfg, seed, values=prior_values, case_id=full_id)


@pytest.fixture(scope="module", params=FULL_CASES, ids=full_id)
def problem(request):
    return FullProblem(request.param)


def test_the_prior_tensors_are_named_parameters(problem):
    cfg, model = problem.cfg, problem.model
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in ref.parameter_shapes(cfg)]
    K, d = cfg.n_components, cfg.latent_dims[-1]
    expected = ["prior.pi_logits", "prior.mu", "prior.prec_log_diag"]
    expected += ["prior.prec_lower"] if d > 1 else []
    assert names[-len(expected):] == expected
    assert model.prior_offset == model.n_params - K * (1 + 2 * d + d * (d - 1) // 2)
    assert model.prior_covariance_type == "full"
    # The gradient reaches every prior tensor's entries.
    assert np.all(problem.grad0[model.prior_offset:] != 0.0)


@pytest.mark.parametrize("case", [0, 2])
def test_iwae_loss_and_gradient_match_the_reference(case):
    """objective='iwae' (the sampled term with the full marginal, several
    draws per row): the loss against the reference, the gradient against
    the reference's central differences."""
    check_iwae_against_the_reference(FullProblem(FULL_CASES[case], seed=3),
                                     "IWAE gradient, full covariances")


def diagonal_twin(inference="markov", K=3, seed=4):
    """A diagonal-prior model and a full one with the same networks and
    P_c = diag(exp(-logvar_c / 2)): the same distribution."""
    kw = dict(n_features=6, latent_dims=(4, 3), hidden_dims=(5,), inference=inference,
              prior="gmm", n_components=K, seed=seed)
    diag, full = hvae.Model(**kw), hvae.Model(prior_covariance_type="full", **kw)
    rng = np.random.default_rng(seed)
    off = diag.prior_offset
    assert full.prior_offset == off
    full.parameters[:off] = diag.parameters[:off]
    d_tensors, f_tensors = dict(diag.named_parameters()), dict(full.named_parameters())
    d_tensors["prior.pi_logits"][...] = rng.normal(0.0, 0.5, K)
    d_tensors["prior.mu"][...] = rng.normal(0.0, 0.7, (K, 3))
    d_tensors["prior.logvar"][...] = rng.uniform(-0.6, 0.6, (K, 3))
    f_tensors["prior.pi_logits"][...] = d_tensors["prior.pi_logits"]
    f_tensors["prior.mu"][...] = d_tensors["prior.mu"]
    f_tensors["prior.prec_log_diag"][...] = -0.5 * d_tensors["prior.logvar"]
    f_tensors["prior.prec_lower"][...] = 0.0
    x = rng.standard_normal((20, 6)).astype(np.float32)
    noise = [rng.standard_normal((20, d)).astype(np.float32) for d in (4, 3)]
    return diag, full, x, noise


@pytest.mark.parametrize("inference", ["markov", "ladder"])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_diagonal_factor_is_the_diagonal_prior(inference, objective):
    """With no off-diagonal entries and P = diag(exp(-logvar / 2)) the term
    and every gradient are the diagonal prior's to float rounding (the
    log-diagonal's gradient is -2 times the log-variance's)."""
    diag, full, x, noise = diagonal_twin(inference)
    np.testing.assert_allclose(full.elbo(x, noise=noise), diag.elbo(x, noise=noise),
                               rtol=1e-5, atol=1e-5)
    S = 1 if objective == "elbo" else 2
    noise_s = [np.repeat(e, S, axis=0) for e in noise]
    loss_d, grad_d = diag.loss_and_grad(x, noise=noise_s, objective=objective, n_samples=S)
    loss_f, grad_f = full.loss_and_grad(x, noise=noise_s, objective=objective, n_samples=S)
    assert abs(loss_f - loss_d) <= 1e-5 * (1 + abs(loss_d))
    grad_d, grad_f = np.array(grad_d, np.float64), np.array(grad_f, np.float64)
    off, K, d = diag.prior_offset, 3, 3
    scale = np.abs(grad_d).max()
    np.testing.assert_allclose(grad_f[:off + K + K * d], grad_d[:off + K + K * d],
                               rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(grad_f[off + K + K * d:off + K + 2 * K * d],
                               -2.0 * grad_d[off + K + K * d:], rtol=1e-4, atol=1e-5 * scale)
    # Same draws, same marginal: the same log-likelihood estimate.
    np.testing.assert_allclose(full.log_likelihood(x, n_samples=30, seed=2),
                               diag.log_likelihood(x, n_samples=30, seed=2),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(full.responsibilities(x), diag.responsibilities(x),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("inference", ["markov", "ladder"])
def test_one_standard_component_is_the_standard_prior(inference):
    """K = 1 at N(0, I) (identity precision): the standard prior's ELBO,
    network gradients and log-likelihood, to float rounding."""
    kw = dict(n_features=6, latent_dims=(4, 3), hidden_dims=(5,), inference=inference, seed=2)
    standard = hvae.Model(**kw)
    full = hvae.Model(n_components=1, **FULL, **kw)
    P = standard.n_params
    assert full.prior_offset == P and full.n_params == P + 1 + 3 + 3 + 3
    full.parameters[:P] = standard.parameters
    full.parameters[P:] = 0.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    noise = [rng.standard_normal((20, d)).astype(np.float32) for d in (4, 3)]
    np.testing.assert_allclose(full.elbo(x, noise=noise), standard.elbo(x, noise=noise),
                               rtol=1e-6, atol=1e-5)
    loss_s, grad_s = standard.loss_and_grad(x, noise=noise)
    loss_f, grad_f = full.loss_and_grad(x, noise=noise)
    assert abs(loss_f - loss_s) <= 1e-6 * abs(loss_s)
    grad_s = np.array(grad_s)
    np.testing.assert_allclose(np.array(grad_f)[:P], grad_s, rtol=1e-4,
                               atol=1e-6 * np.abs(grad_s).max())
    np.testing.assert_allclose(full.log_likelihood(x, n_samples=50, seed=1),
                               standard.log_likelihood(x, n_samples=50, seed=1),
                               rtol=1e-5, atol=1e-4)


def identity_decoder_model(pi, means, covariances):
    """A 2-D full-covariance mixture seen through a linear unit-variance
    decoder of identity weights (its samples are the prior's z)."""
    K = len(pi)
    model = hvae.Model(2, (2,), (), decoder_variance="unit", n_components=K, seed=0, **FULL)
    params = dict(model.named_parameters())
    params["dec1.mu.W"][...] = np.eye(2)
    params["dec1.mu.b"][...] = 0.0
    P = np.linalg.cholesky(np.linalg.inv(covariances))
    params["prior.pi_logits"][...] = np.log(pi)
    params["prior.mu"][...] = means
    params["prior.prec_log_diag"][...] = np.log(P[:, [0, 1], [0, 1]])
    params["prior.prec_lower"][...] = P[:, 1:, 0]
    return model


def test_prior_samples_follow_the_full_components():
    """The prior's draws: the component weights, and within each component
    the mean and covariance (correlation 0.8 and -0.5), each within five
    standard errors."""
    pi = np.array([0.3, 0.7])
    means = np.array([[-6.0, 0.0], [6.0, 1.0]])
    cov = np.array([[[1.0, 0.8], [0.8, 1.0]], [[0.25, -0.25], [-0.25, 1.0]]])
    model = identity_decoder_model(pi, means, cov)
    n = 40000
    z = model.sample(n, seed=3).astype(np.float64)
    right = z[:, 0] > 0
    assert abs(right.mean() - 0.7) < 5 * np.sqrt(0.21 / n)
    for c, rows in enumerate((z[~right], z[right])):
        m = len(rows)
        sd = np.sqrt(np.diag(cov[c]))
        np.testing.assert_allclose(rows.mean(axis=0), means[c], atol=float(5 * sd.max()
                                                                          / np.sqrt(m)))
        # Var of a sample covariance entry: (S_ii S_jj + S_ij^2) / m.
        se = np.sqrt((np.outer(np.diag(cov[c]), np.diag(cov[c])) + cov[c] ** 2) / m)
        assert np.all(np.abs(np.cov(rows.T) - cov[c]) < 5 * se), (c, np.cov(rows.T))


def test_moment_matching_is_the_law_of_total_covariance():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((500, 3)) @ np.array([[1.0, 0.5, 0.0], [0, 1, 0.3], [0, 0, 1]])
    logvar = rng.uniform(-2, 0, (500, 3))
    resp = rng.dirichlet([1.0, 1.0], 500)
    tensors = _full_moments(mu, logvar, resp, reg_covar=0.0)
    P = precision_factor(tensors["prior.prec_log_diag"], tensors["prior.prec_lower"])
    for c in range(2):
        r = resp[:, c]
        mean = r @ mu / r.sum()
        cov = (np.cov(mu.T, aweights=r, bias=True)
               + np.diag(r @ np.exp(logvar) / r.sum()))
        np.testing.assert_allclose(tensors["prior.mu"][c], mean, rtol=1e-10)
        np.testing.assert_allclose(np.linalg.inv(P[c] @ P[c].T), cov, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(np.exp(tensors["prior.pi_logits"]), resp.mean(axis=0))


def test_the_prior_learning_rate_reaches_every_factor_entry():
    """prior_lr_scale covers the full prior's tensors (they close the
    buffer): Adam's first step is lr * scale on each of them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    model = hvae.Model(5, (3,), (4,), n_components=2, seed=1, **FULL)
    before = np.array(model.parameters)
    model.fit(x, n_epochs=1, batch_size=16, learning_rate=1e-2, shuffle=False,
              prior_lr_scale=0.25)
    step = np.abs(np.array(model.parameters) - before)[model.prior_offset:]
    assert step.size == 2 * (1 + 3 + 3 + 3)
    np.testing.assert_allclose(step, 0.25e-2, rtol=1e-3)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_data_parallel_shards_train_like_one_process(objective):
    """The prior's tensors are reduced with the rest (test_distributed.py's
    thread-backed stand-in for MPI_Allreduce): two shards give one process's
    parameters up to float rounding, every rank the same."""
    from test_distributed import fit_sharded, make
    X = hvae.datasets.load_digits()[0][:200]

    def model():
        return make(n_components=3, **FULL)

    kwargs = dict(n_epochs=2, batch_size=50, objective=objective,
                  n_samples=3 if objective == "iwae" else 1, prior_lr_scale=0.5)
    single = model()
    single.fit(X, **kwargs)
    models, _, errors, _ = fit_sharded(model, X, (0, 77, 200), **kwargs)
    assert not errors, errors
    np.testing.assert_array_equal(models[1].parameters, models[0].parameters)
    np.testing.assert_allclose(models[0].parameters, single.parameters, rtol=0, atol=2e-5)
    assert np.any(models[0].parameters[single.prior_offset:]
                  != model().parameters[single.prior_offset:])


# ---- the estimators ------------------------------------------------------------------


def small_full_vae(**params):
    defaults = dict(latent_dims=(3,), hidden_dims=(8,), n_epochs=2, batch_size=20,
                    random_state=0, n_threads=1, n_components=2, **FULL)
    defaults.update(params)
    return hvae.HierarchicalVAE(**defaults)


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).standard_normal((60, 5)).astype(np.float32)


def test_names_come_from_the_core():
    assert _native.COVARIANCE_TYPES == ("diag", "full")
    for name in _native.COVARIANCE_TYPES:
        model = hvae.Model(4, (2,), (3,), prior="gmm", prior_covariance_type=name)
        assert model.prior_covariance_type == name
        assert f"prior_covariance_type='{name}'" in repr(model)
        again = pickle.loads(pickle.dumps(model))
        assert again.prior_covariance_type == name
        np.testing.assert_array_equal(again.parameters, model.parameters)
    assert hvae.Model(4, (2,), (3,)).prior_covariance_type == "diag"
    with pytest.raises(ValueError, match="prior_covariance_type must be one of 'diag', "
                                         "'full'; got 'tied'"):
        hvae.Model(4, (2,), (3,), prior="gmm", prior_covariance_type="tied")


@pytest.mark.parametrize("params, message", [
    (dict(prior_covariance_type="tied"), r"prior_covariance_type must be one of \('diag', "
                                         r"'full'\); got 'tied'"),
    (dict(prior="standard"), "prior_covariance_type='full' is the mixture prior's: it "
                             "needs prior='gmm'; got prior='standard'"),
    (dict(prior="vamp"), "needs prior='gmm'; got prior='vamp'"),
    (dict(latent_dims=(600,)), "at most 512 units; got 600"),
])
def test_bad_input_is_refused_before_any_work(data, params, message):
    vae = small_full_vae(**params)
    with pytest.raises(ValueError, match=message):
        vae.fit(data)
    assert not hasattr(vae, "model_") and not hasattr(vae, "n_features_in_")
    with pytest.raises(ValueError, match=message.split(":")[0].split(" must")[0]):
        vae.partial_fit(data)
    assert not hasattr(vae, "model_")
    # The core refuses the same on its own.
    if "prior" in params or "latent_dims" in params:
        with pytest.raises(ValueError, match="prior_covariance_type='full'"):
            hvae.Model(5, params.get("latent_dims", (3,)), (8,),
                       prior=params.get("prior", "gmm"), prior_covariance_type="full")
    with pytest.raises(ValueError, match="covariance_type must be one of"):
        hvae.VaDE(covariance_type="spherical").fit(data)


def test_save_load_pickle_partial_fit_and_warm_start(data, tmp_path):
    vae = small_full_vae().fit(data)
    assert vae.model_.prior_covariance_type == "full"
    path = tmp_path / "full.hvae"
    vae.save(path)
    loaded = hvae.load(path)
    assert loaded.get_params()["prior_covariance_type"] == "full"
    np.testing.assert_array_equal(loaded.model_.parameters, vae.model_.parameters)
    np.testing.assert_array_equal(loaded.score_samples(data), vae.score_samples(data))
    np.testing.assert_array_equal(loaded.sample(4, random_state=1), vae.sample(4, random_state=1))
    copy = pickle.loads(pickle.dumps(vae))
    np.testing.assert_array_equal(copy.model_.responsibilities(data),
                                  vae.model_.responsibilities(data))
    # Both continue training alike.
    loaded.partial_fit(data)
    copy.partial_fit(data)
    np.testing.assert_array_equal(loaded.model_.parameters, copy.model_.parameters)
    assert loaded.n_iter_ == 3
    vae.set_params(warm_start=True, n_epochs=1).fit(data)
    assert vae.n_iter_ == 3
    # A different covariance is another model: partial_fit refuses it,
    # warm_start starts afresh.
    with pytest.raises(ValueError, match="prior_covariance_type"):
        loaded.set_params(prior_covariance_type="diag").partial_fit(data)
    vae.set_params(prior_covariance_type="diag").fit(data)
    assert vae.model_.prior_covariance_type == "diag" and vae.n_iter_ == 1


def rewritten(path, out, edit):
    """A copy of the model file at path, its metadata changed by edit(meta)
    and its checksum recomputed."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(bytes(arrays["metadata"]).decode())
    edit(meta)
    meta[file_format._DIGEST] = file_format._metadata_digest(meta)
    arrays["metadata"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(out, "wb") as file:
        np.savez(file, **arrays)
    return out


def test_a_file_claiming_another_covariance_is_refused(data, tmp_path):
    path = tmp_path / "full.hvae"
    small_full_vae().fit(data).save(path)

    def claim_diag(meta):
        meta["params"]["prior_covariance_type"] = "diag"

    with pytest.raises(ValueError, match="prior_covariance_type"):
        hvae.load(rewritten(path, tmp_path / "bad.hvae", claim_diag))


# ---- VaDE ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_vade():
    X, y = synthetic_clusters(n=300, K=3, seed=1)
    return small_vade(covariance_type="full").fit(X), X, y


def test_vade_recovers_well_separated_clusters():
    X, y = synthetic_clusters()
    vade = small_vade(n_components=4, latent_dims=(2,), hidden_dims=(32,), n_epochs=30,
                      pretrain_epochs=30, covariance_type="full").fit(X)
    assert adjusted_rand_score(y, vade.labels_) > 0.9
    assert vade.model_.prior_covariance_type == "full"


def test_vade_full_interface(fitted_vade):
    vade, X, _ = fitted_vade
    K, d = 3, 2
    cov, P = vade.covariances_, vade.precisions_cholesky_
    assert cov.shape == (K, d, d) and P.shape == (K, d, d)
    np.testing.assert_allclose(cov, np.transpose(cov, (0, 2, 1)))
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    assert np.all(np.triu(P, 1) == 0) and np.all(np.diagonal(P, axis1=1, axis2=2) > 0)
    np.testing.assert_allclose(np.linalg.inv(cov), P @ np.transpose(P, (0, 2, 1)),
                               rtol=1e-6, atol=1e-9)
    # q(c|x) is the full mixture's p(c|z) at the posterior mean.
    z = vade.transform(X).astype(np.float64)
    diff = z[:, None] - vade.means_[None]
    log_p = (np.log(vade.weights_) - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1][None]
             - 0.5 * np.einsum("nki,kij,nkj->nk", diff, np.linalg.inv(cov), diff))
    expected = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(vade.predict_proba(X), expected, atol=1e-4)


def test_vade_samples_one_full_component(fitted_vade, tmp_path):
    """sample(component=c) draws z from N(mu_c, Sigma_c): seen through an
    identity decoder, the draws' mean and covariance within five standard
    errors."""
    vade, X, _ = fitted_vade
    vade = pickle.loads(pickle.dumps(vade))
    # Read the draws of z through a linear identity decoder.
    twin = small_vade(covariance_type="full", hidden_dims=(), decoder_variance="unit",
                      n_epochs=0, pretrain_epochs=0).fit(X[:, :2].copy())
    tensors = dict(twin.model_.named_parameters())
    tensors["dec1.mu.W"][...] = np.eye(2)
    tensors["dec1.mu.b"][...] = 0.0
    for name, value in dict(vade.model_.named_parameters()).items():
        if name.startswith("prior."):
            tensors[name][...] = value
    n = 20000
    for c in range(3):
        z = twin.sample(n, random_state=c, component=c).astype(np.float64)
        cov = vade.covariances_[c]
        np.testing.assert_allclose(z.mean(axis=0), vade.means_[c],
                                   atol=float(5 * np.sqrt(np.diag(cov)).max() / np.sqrt(n)))
        se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
        assert np.all(np.abs(np.cov(z.T) - cov) < 5 * se), c
    samples = vade.sample(200, random_state=0, component=1)
    assert samples.shape == (200, X.shape[1])
    assert np.mean(vade.predict(samples) == 1) > 0.7


def test_vade_full_save_load_and_pickle(fitted_vade, tmp_path):
    vade, X, _ = fitted_vade
    path = tmp_path / "vade.hvae"
    vade.save(path)
    for copy in (hvae.load(path), pickle.loads(pickle.dumps(vade))):
        assert copy.covariance_type == "full"
        np.testing.assert_array_equal(copy.predict_proba(X), vade.predict_proba(X))
        np.testing.assert_array_equal(copy.covariances_, vade.covariances_)
    copy.partial_fit(X)
    assert copy.n_iter_ == vade.n_iter_ + 1


def test_a_vade_file_from_before_covariance_type_is_diagonal(tmp_path):
    """Files written before covariance_type existed hold diagonal models;
    they load as covariance_type='diag' (not the default)."""
    X, _ = synthetic_clusters(n=120, K=3, seed=2)
    vade = small_vade(covariance_type="diag", n_epochs=1, pretrain_epochs=1).fit(X)
    path = tmp_path / "old.hvae"
    vade.save(path)

    def forget_covariance(meta):
        del meta["params"]["covariance_type"]
        del meta["model"]["prior_covariance_type"]

    loaded = hvae.load(rewritten(path, tmp_path / "older.hvae", forget_covariance))
    assert loaded.covariance_type == "diag" and loaded.covariances_.shape == (3, 2)
    np.testing.assert_array_equal(loaded.predict(X), vade.predict(X))
