"""The mixture-of-Gaussians prior (prior='gmm', VaDE) in the C core: its
ELBO term and gradients against the float64 reference (tests/reference.py,
gmm_term) and finite differences, reusing test_gradients.py's two checks;
K = 1 at N(0, I) against the standard prior; responsibilities, sampling
and the optimizer's learning-rate group."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402
import test_gradients as tg  # noqa: E402
# The two gradient checks, run here on the mixture-prior problems below.
from test_gradients import (test_gradient_matches_float64_reference,  # noqa: E402,F401
                            test_gradient_matches_own_finite_differences)

import hvae  # noqa: E402

GMM_CASES = [
    Config(6, (3,), (5,), "gaussian", "tanh", "learned", prior="gmm", n_components=3),
    Config(8, (4, 3), (6,), "bernoulli", "softplus", "learned", prior="gmm", n_components=4),
    Config(6, (4, 2), (5,), "gaussian", "elu", "unit", inference="ladder", prior="gmm",
           n_components=2),
    Config(6, (3,), (), "gaussian", "tanh", "learned", prior="gmm", n_components=1),
]


def gmm_id(cfg):
    return f"{tg.case_id(cfg)}-{cfg.inference}-gmm{cfg.n_components}"


def prior_values(cfg, rng):
    """Mixture tensors that make the responsibilities neither 0/1 nor flat."""
    K, d = cfg.n_components, cfg.latent_dims[-1]
    return {"prior.pi_logits": rng.normal(0.0, 0.7, K),
            "prior.mu": rng.normal(0.0, 0.8, (K, d)),
            "prior.logvar": rng.uniform(-0.6, 0.4, (K, d))}


class GmmProblem(tg.Problem):
    """test_gradients.Problem with a mixture prior on the top layer, its
    tensors drawn by values(cfg, rng) (the diagonal prior's by default; the
    full-covariance tests pass their own, and their case_id)."""

    def __init__(self, cfg, seed=0, values=prior_values, case_id=gmm_id):
        self.cfg = cfg
        rng = np.random.default_rng(list(f"{seed}:{case_id(cfg)}".encode()))
        self.model = hvae.Model(seed=seed, **cfg.model_kwargs())
        self.p0 = ref.random_parameters(cfg, rng, scale=1.5)
        params = ref.unflatten(self.p0, cfg)
        for name, value in values(cfg, rng).items():
            params[name][...] = value
        self.model.parameters[:] = self.p0
        self.x = ref.random_data(cfg, tg.N_ROWS, rng)
        self.noise = ref.random_noise(cfg, tg.N_ROWS, rng)
        loss, grad = self.model.loss_and_grad(self.x, noise=self.noise)
        self.loss0 = float(loss)
        self.grad0 = np.array(grad, dtype=np.float64)
        self.kinked = (cfg.activation in ref.KINKED_ACTIVATIONS
                       and len(cfg.hidden_dims) > 0)


@pytest.fixture(scope="module", params=GMM_CASES, ids=gmm_id)
def problem(request):
    return GmmProblem(request.param)


def test_the_prior_tensors_are_named_parameters(problem):
    names = [name for name, _ in problem.model.named_parameters()]
    assert names == [name for name, _ in ref.parameter_shapes(problem.cfg)]
    assert names[-3:] == ["prior.pi_logits", "prior.mu", "prior.logvar"]
    assert problem.model.prior_offset == problem.model.n_params - problem.cfg.n_components * (
        1 + 2 * problem.cfg.latent_dims[-1])
    # The gradient reaches every prior tensor (one component's weight is 1
    # whatever its logit).
    K = problem.cfg.n_components
    first = problem.model.prior_offset + (K if K == 1 else 0)
    assert np.all(problem.grad0[first:] != 0.0)


def test_elbo_terms_and_log_weights_match_the_reference(problem):
    cfg, params = problem.cfg, ref.unflatten(problem.p0.astype(np.float64), problem.cfg)
    terms = problem.model.elbo_terms(problem.x, noise=problem.noise)
    out = ref.forward(params, cfg, problem.x, problem.noise)
    ref.assert_close(terms["kl"], out["kl"], 1e-5, 1e-5, "per-layer terms")
    ref.assert_close(terms["elbo"], out["elbo"], 1e-5, 1e-5, "elbo")
    # The sampled path (IWAE's log-weights): log q(z) - log p(z), p the
    # mixture's marginal (diagonal or full: test_prior_gmm_full runs this
    # test on its own problems).
    sampled = ref.forward(params, cfg, problem.x, problem.noise, sampled=True)
    loss_iwae, _ = problem.model.loss_and_grad(problem.x, noise=problem.noise,
                                               objective="iwae", n_samples=1)
    assert abs(loss_iwae + sampled["elbo"].mean()) <= 1e-5 * (1 + abs(loss_iwae))


def check_iwae_against_the_reference(problem, what, S=3):
    """objective='iwae' on problem (a GmmProblem): the loss against the
    reference's, the gradient against the reference's central differences."""
    cfg = problem.cfg
    rng = np.random.default_rng(5)
    noise = [rng.standard_normal((tg.N_ROWS * S, d)).astype(np.float32)
             for d in cfg.latent_dims]
    loss, grad = problem.model.loss_and_grad(problem.x, noise=noise, objective="iwae",
                                             n_samples=S)
    grad = np.array(grad, np.float64)
    p64 = problem.p0.astype(np.float64)

    def ref_loss(flat):
        return ref.objective_loss(ref.unflatten(flat, cfg), cfg, problem.x, noise,
                                  n_samples=S, objective="iwae")

    assert abs(loss - ref_loss(p64)) <= 1e-5 * (1 + abs(loss))
    g_ref = ref.central_differences(ref_loss, p64)
    scale = np.abs(g_ref).max()
    ref.assert_close(grad, g_ref, 1e-3, 1e-5 * scale, what)


def test_iwae_gradient_matches_reference_finite_differences():
    """objective='iwae' differentiates the sampled log-ratio (its own backward)."""
    check_iwae_against_the_reference(GmmProblem(GMM_CASES[0], seed=3),
                                     "IWAE gradient with the mixture prior")


@pytest.mark.parametrize("inference", ["markov", "ladder"])
def test_one_standard_component_is_the_standard_prior_exactly(inference):
    """K = 1 with the component at N(0, I): the same ELBO (bit for bit) and
    the same gradient of every network parameter as prior='standard'."""
    kw = dict(n_features=6, latent_dims=(4, 3), hidden_dims=(5,), inference=inference, seed=2)
    standard = hvae.Model(**kw)
    gmm = hvae.Model(prior="gmm", n_components=1, **kw)
    P = standard.n_params
    assert gmm.prior_offset == P and gmm.n_params == P + 1 + 2 * 3
    gmm.parameters[:P] = standard.parameters
    gmm.parameters[P:] = 0.0  # logit 0 (weight 1), mean 0, log-variance 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    noise = [rng.standard_normal((20, d)).astype(np.float32) for d in (4, 3)]
    np.testing.assert_array_equal(gmm.elbo(x, noise=noise), standard.elbo(x, noise=noise))
    np.testing.assert_array_equal(gmm.elbo(x, seed=7), standard.elbo(x, seed=7))
    loss_s, grad_s = standard.loss_and_grad(x, noise=noise)
    grad_s = np.array(grad_s)
    loss_g, grad_g = gmm.loss_and_grad(x, noise=noise)
    assert loss_g == loss_s
    np.testing.assert_array_equal(np.array(grad_g)[:P], grad_s)
    # log-likelihood: the same marginal up to the rounding of log 2pi terms.
    ll_s = standard.log_likelihood(x, n_samples=50, seed=1)
    ll_g = gmm.log_likelihood(x, n_samples=50, seed=1)
    np.testing.assert_allclose(ll_g, ll_s, rtol=1e-5, atol=1e-4)


def test_responsibilities_are_p_c_given_the_posterior_mean(problem):
    cfg = problem.cfg
    params = ref.unflatten(problem.p0.astype(np.float64), cfg)
    gamma = problem.model.responsibilities(problem.x)
    assert gamma.shape == (tg.N_ROWS, cfg.n_components) and gamma.dtype == np.float64
    mu_top = ref.encode(params, cfg, problem.x)[-1][0]
    expected = ref.gmm_responsibilities(params, mu_top)
    ref.assert_close(gamma, expected, 1e-4, 1e-6, "responsibilities")
    np.testing.assert_allclose(gamma.sum(axis=1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="prior with components"):
        hvae.Model(6, (3,), (5,)).responsibilities(problem.x[:, :6])


def test_prior_samples_follow_the_mixture():
    """sample_top decodes given codes; the prior's own draws of z_T (seen
    through a linear unit-variance decoder of identity weights) have the
    mixture's mean and variance."""
    model = hvae.Model(2, (2,), (), decoder_variance="unit", prior="gmm", n_components=2,
                       seed=0)
    params = dict(model.named_parameters())
    params["dec1.mu.W"][...] = np.eye(2)
    params["dec1.mu.b"][...] = 0.0
    params["prior.pi_logits"][...] = np.log([0.25, 0.75])
    params["prior.mu"][...] = [[-4.0, 0.0], [4.0, 1.0]]
    params["prior.logvar"][...] = np.log([[0.25, 1.0], [1.0, 0.25]])
    n = 40000
    z = model.sample(n, seed=3).astype(np.float64)
    w = np.array([0.25, 0.75])
    mu = np.array([[-4.0, 0.0], [4.0, 1.0]])
    var = np.array([[0.25, 1.0], [1.0, 0.25]])
    mean = w @ mu
    second = w @ (var + mu ** 2)
    np.testing.assert_allclose(z.mean(axis=0), mean,
                               atol=float(np.max(5 * np.sqrt((second - mean ** 2) / n))))
    frac_right = np.mean(z[:, 0] > 0)
    assert abs(frac_right - 0.75) < 5 * np.sqrt(0.75 * 0.25 / n)
    np.testing.assert_allclose(model.sample_top(np.array([[1.0, 2.0]], np.float32)),
                               [[1.0, 2.0]], rtol=1e-6)


def test_the_prior_learning_rate_scale_moves_only_the_prior():
    """fit(prior_lr_scale=s): the prior's tensors take Adam steps s times
    the others' (Adam's first step is lr * sign(g) for every entry)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    steps = {}
    for scale in (1.0, 0.25):
        model = hvae.Model(5, (3,), (4,), prior="gmm", n_components=2, seed=1)
        before = np.array(model.parameters)
        model.fit(x, n_epochs=1, batch_size=16, learning_rate=1e-2, shuffle=False,
                  prior_lr_scale=scale)
        steps[scale] = np.abs(np.array(model.parameters) - before)
        off = model.prior_offset
    np.testing.assert_allclose(steps[1.0][off:], 1e-2, rtol=1e-3)
    np.testing.assert_allclose(steps[0.25][off:], 0.25e-2, rtol=1e-3)
    np.testing.assert_array_equal(steps[0.25][:off], steps[1.0][:off])
    with pytest.raises(ValueError, match="prior_lr_scale"):
        hvae.Model(5, (3,), (4,), prior="gmm").fit(x, prior_lr_scale=0.0)


def test_bad_component_counts_are_refused():
    for k in (0, -1, 10 ** 6):
        with pytest.raises(ValueError, match="n_components"):
            hvae.Model(5, (3,), (4,), prior="gmm", n_components=k)
    assert hvae.Model(5, (3,), (4,)).n_components == 1  # the argument, unused
