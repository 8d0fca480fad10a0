"""Tests for the PyTorch peer (bench/peer_torch.py): its gradients against
finite differences, its ELBO against an independent NumPy evaluation of the
formula on hvae's parameter layout, and its hvae-named weight copy."""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

# bench/ is not a package and not installed: load the module from its file.
PEER_PATH = Path(__file__).resolve().parents[1] / "bench" / "peer_torch.py"
_spec = importlib.util.spec_from_file_location("peer_torch", PEER_PATH)
peer = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("peer_torch", peer)
_spec.loader.exec_module(peer)

ACTIVATIONS = ["relu", "tanh", "leaky_relu", "elu", "softplus"]


def tiny_model(likelihood, latent_dims=(3, 2), hidden_dims=(4,), activation="tanh",
               decoder_variance="learned", n_features=5, seed=0):
    torch.manual_seed(seed)
    return peer.TorchHVAE(n_features, latent_dims, hidden_dims, likelihood=likelihood,
                          activation=activation, decoder_variance=decoder_variance,
                          dtype=torch.float64)


def tiny_data(likelihood, n_rows=6, n_features=5, seed=0):
    rng = np.random.default_rng(seed)
    if likelihood == "bernoulli":
        return rng.uniform(0.0, 1.0, size=(n_rows, n_features))
    return rng.standard_normal((n_rows, n_features))


def fixed_noise(model, n_rows, seed=1):
    rng = np.random.default_rng(seed)
    return [torch.as_tensor(rng.standard_normal((n_rows, d))) for d in model.latent_dims]


# -- gradients ---------------------------------------------------------------


@pytest.mark.parametrize("decoder_variance", ["learned", "unit"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_gradient_matches_finite_differences(likelihood, activation, decoder_variance):
    model = tiny_model(likelihood, activation=activation, decoder_variance=decoder_variance)
    x = torch.as_tensor(tiny_data(likelihood)).requires_grad_(True)
    noise = [eps.requires_grad_(True) for eps in fixed_noise(model, x.shape[0])]
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    n_noise = len(noise)

    def elbo_of(x, *rest):
        eps, params = list(rest[:n_noise]), rest[n_noise:]
        return torch.func.functional_call(model, dict(zip(names, params)), (x,), {"noise": eps})

    assert torch.autograd.gradcheck(elbo_of, (x, *noise, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_weights_the_kl_terms_by_beta(likelihood):
    model = tiny_model(likelihood)
    x = tiny_data(likelihood)
    noise = fixed_noise(model, x.shape[0])
    with torch.no_grad():
        reconstruction, kl = model.elbo_terms(x, noise)
        expected = -(reconstruction - 0.3 * kl.sum(dim=1)).mean()
        torch.testing.assert_close(model.loss(x, noise, beta=0.3), expected)
        torch.testing.assert_close(model.loss(x, noise), -model.elbo(x, noise).mean())


# -- the ELBO itself, against NumPy on hvae's layout ---------------------------


NUMPY_ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, 0.0),
    "tanh": np.tanh,
    "leaky_relu": lambda h: np.where(h > 0, h, 0.01 * h),
    "elu": lambda h: np.where(h > 0, h, np.expm1(np.minimum(h, 0.0))),
    "softplus": lambda h: np.logaddexp(0.0, h),
}


def numpy_elbo_terms(params, config, x, noise):
    """The ELBO formula evaluated directly from hvae-named (in, out) weights."""
    act = NUMPY_ACTIVATIONS[config["activation"]]
    T = len(config["latent_dims"])
    n_hidden = len(config["hidden_dims"])

    def block(prefix, h, heads):
        for j in range(1, n_hidden + 1):
            h = act(h @ params[f"{prefix}.hidden{j}.W"] + params[f"{prefix}.hidden{j}.b"])
        out = {head: h @ params[f"{prefix}.{head}.W"] + params[f"{prefix}.{head}.b"]
               for head in heads if f"{prefix}.{head}.W" in params}
        if "logvar" in out:
            out["logvar"] = np.clip(out["logvar"], -20.0, 20.0)
        return out

    def log_normal(v, mu, logvar):
        return -0.5 * np.sum(np.log(2 * np.pi) + logvar + (v - mu) ** 2 / np.exp(logvar), axis=1)

    def kl(mu_q, lv_q, mu_p, lv_p):
        return 0.5 * np.sum(lv_p - lv_q + (np.exp(lv_q) + (mu_q - mu_p) ** 2) / np.exp(lv_p) - 1,
                            axis=1)

    mus, lvs, zs = [], [], []
    h = x
    for i in range(1, T + 1):
        q = block(f"enc{i}", h, ["mu", "logvar"])
        z = q["mu"] + np.exp(q["logvar"] / 2) * noise[i - 1]
        mus.append(q["mu"]), lvs.append(q["logvar"]), zs.append(z)
        h = z
    p_x = block("dec1", zs[0], ["logits", "mu", "logvar"])
    if config["likelihood"] == "bernoulli":
        logits = p_x["logits"]
        reconstruction = np.sum(x * logits - np.logaddexp(0.0, logits), axis=1)
    else:
        reconstruction = log_normal(x, p_x["mu"], p_x.get("logvar", np.zeros_like(x)))
    kls = []
    for i in range(1, T):
        # Lower layers: the sampled log-density ratio log q(z_i|.) - log p(z_i|z_{i+1}).
        prior = block(f"dec{i + 1}", zs[i], ["mu", "logvar"])
        kls.append(log_normal(zs[i - 1], mus[i - 1], lvs[i - 1])
                   - log_normal(zs[i - 1], prior["mu"],
                                prior.get("logvar", np.zeros_like(prior["mu"]))))
    kls.append(kl(mus[-1], lvs[-1], 0.0, np.zeros_like(mus[-1])))
    return reconstruction, np.stack(kls, axis=1)


@pytest.mark.parametrize("decoder_variance", ["learned", "unit"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("latent_dims, hidden_dims", [((3,), ()), ((3, 2), (4,)), ((4, 3, 2), (6, 5))])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_elbo_matches_numpy_formula(activation, latent_dims, hidden_dims, likelihood,
                                    decoder_variance):
    model = tiny_model(likelihood, latent_dims, hidden_dims, activation, decoder_variance)
    x = tiny_data(likelihood)
    noise = [eps.numpy() for eps in fixed_noise(model, x.shape[0])]
    config = dict(activation=activation, latent_dims=latent_dims, hidden_dims=hidden_dims,
                  likelihood=likelihood)
    expected_reconstruction, expected_kl = numpy_elbo_terms(
        dict(model.named_parameters_numpy()), config, x, noise)

    with torch.no_grad():
        reconstruction, kl = model.elbo_terms(x, noise)
        elbo = model.elbo(x, noise)
    np.testing.assert_allclose(reconstruction.numpy(), expected_reconstruction, rtol=1e-12)
    np.testing.assert_allclose(kl.numpy(), expected_kl, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(elbo.numpy(), expected_reconstruction - expected_kl.sum(1),
                               rtol=1e-12)


@pytest.mark.parametrize("latent_dims", [(2,), (3, 2), (3, 2, 2)])
def test_importance_weights_average_to_the_elbo(latent_dims):
    # The ELBO estimate (top layer's KL in closed form, lower layers sampled)
    # and the log importance weight (every layer sampled) have the same
    # expectation for every T, which checks the constants of both.
    model = tiny_model("gaussian", latent_dims=latent_dims, hidden_dims=(3,))
    x = np.repeat(tiny_data("gaussian", n_rows=1), 40000, axis=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        elbo = model.elbo(x, generator=generator).numpy()
        log_weights = model.log_importance_weights(x, generator=generator).numpy()
    standard_error = math.hypot(elbo.std(), log_weights.std()) / math.sqrt(len(x))
    assert abs(elbo.mean() - log_weights.mean()) < 5 * standard_error


@pytest.mark.parametrize("latent_dims", [(2,), (3, 2), (3, 2, 2)])
def test_elbo_and_log_weight_differ_only_in_the_top_layer(latent_dims):
    # At the same noise, log w - ELBO = KL_T(closed) - (log q(z_T) - log N(z_T; 0, I)).
    model = tiny_model("bernoulli", latent_dims=latent_dims, hidden_dims=(4,))
    x = tiny_data("bernoulli")
    noise = fixed_noise(model, x.shape[0])
    with torch.no_grad():
        _, kl = model.elbo_terms(x, noise)
        mus, logvars, zs = model.encode(torch.as_tensor(x), noise)
        top_log_ratio = (peer.gaussian_log_density(zs[-1], mus[-1], logvars[-1])
                         - peer.gaussian_log_density(zs[-1]))
        difference = model.log_importance_weights(x, noise) - model.elbo(x, noise)
    torch.testing.assert_close(difference, kl[:, -1] - top_log_ratio, rtol=1e-10, atol=1e-12)


def test_log_importance_weights_match_numpy_formula():
    model = tiny_model("bernoulli", latent_dims=(3, 2), hidden_dims=(4,))
    x = tiny_data("bernoulli")
    noise = [eps.numpy() for eps in fixed_noise(model, x.shape[0])]
    params = dict(model.named_parameters_numpy())

    def block(prefix, h, heads):
        h = np.tanh(h @ params[f"{prefix}.hidden1.W"] + params[f"{prefix}.hidden1.b"])
        return [h @ params[f"{prefix}.{head}.W"] + params[f"{prefix}.{head}.b"] for head in heads]

    def log_normal(v, mu, logvar):
        return -0.5 * np.sum(np.log(2 * np.pi) + logvar + (v - mu) ** 2 / np.exp(logvar), axis=1)

    mu1, lv1 = block("enc1", x, ["mu", "logvar"])
    z1 = mu1 + np.exp(lv1 / 2) * noise[0]
    mu2, lv2 = block("enc2", z1, ["mu", "logvar"])
    z2 = mu2 + np.exp(lv2 / 2) * noise[1]
    (logits,) = block("dec1", z1, ["logits"])
    prior_mu1, prior_lv1 = block("dec2", z2, ["mu", "logvar"])
    expected = (np.sum(x * logits - np.logaddexp(0.0, logits), axis=1)
                + log_normal(z1, prior_mu1, prior_lv1) + log_normal(z2, 0.0, np.zeros_like(z2))
                - log_normal(z1, mu1, lv1) - log_normal(z2, mu2, lv2))
    with torch.no_grad():
        log_weights = model.log_importance_weights(x, noise).numpy()
    np.testing.assert_allclose(log_weights, expected, rtol=1e-12)


# -- hvae's names and layout ---------------------------------------------------


def test_hvae_names_in_buffer_order():
    model = tiny_model("bernoulli", latent_dims=(3, 2), hidden_dims=(4, 5))
    names = [name for name, _ in model.named_parameters_numpy()]
    blocks = {
        "enc1": ["hidden1", "hidden2", "mu", "logvar"],
        "enc2": ["hidden1", "hidden2", "mu", "logvar"],
        "dec1": ["hidden1", "hidden2", "logits"],
        "dec2": ["hidden1", "hidden2", "mu", "logvar"],
    }
    expected = [f"{block}.{layer}.{p}" for block, layers in blocks.items()
                for layer in layers for p in ("W", "b")]
    assert names == expected
    shapes = dict(model.named_parameters_numpy())
    assert shapes["enc1.hidden1.W"].shape == (5, 4)
    assert shapes["enc1.hidden2.W"].shape == (4, 5)
    assert shapes["enc2.hidden1.W"].shape == (3, 4)
    assert shapes["dec1.hidden1.W"].shape == (3, 5)  # decoders reverse hidden_dims
    assert shapes["dec1.logits.W"].shape == (4, 5)
    assert shapes["dec2.mu.W"].shape == (4, 3)


def test_unit_variance_decoders_have_no_logvar_heads():
    model = tiny_model("gaussian", decoder_variance="unit")
    names = [name for name, _ in model.named_parameters_numpy()]
    assert not [name for name in names if name.startswith("dec") and ".logvar." in name]
    assert "enc2.logvar.W" in names


def test_load_named_parameters_round_trip():
    source = tiny_model("gaussian", seed=0)
    target = tiny_model("gaussian", seed=1)
    x = tiny_data("gaussian")
    noise = fixed_noise(source, x.shape[0])
    target.load_named_parameters(source.named_parameters_numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(target.elbo(x, noise).numpy(), source.elbo(x, noise).numpy())
    for (name, a), (_, b) in zip(source.named_parameters_numpy(), target.named_parameters_numpy()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_load_named_parameters_rejects_bad_input():
    model = tiny_model("bernoulli")
    pairs = model.named_parameters_numpy()
    before = [p.detach().clone() for p in model.parameters()]
    scrambled = [(name, value + 1.0) for name, value in pairs]
    with pytest.raises(ValueError, match="shape"):
        model.load_named_parameters([(pairs[0][0], pairs[0][1].T + 1.0)] + scrambled[1:])
    with pytest.raises(ValueError, match="unknown"):
        model.load_named_parameters(scrambled + [("dec1.logvar.W", np.zeros((4, 5)))])
    with pytest.raises(ValueError, match="missing"):
        model.load_named_parameters(scrambled[1:])
    # Nothing was copied by the failed calls.
    for old, new in zip(before, model.parameters()):
        torch.testing.assert_close(old, new.detach(), rtol=0, atol=0)
    # Without strict, a partial set is copied and the rest left alone.
    model.load_named_parameters(scrambled[1:], strict=False)
    weight, bias = list(model.parameters())[:2]  # enc1.hidden1.W and .b
    torch.testing.assert_close(weight.detach(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(bias.detach(), before[1] + 1.0, rtol=0, atol=0)


# -- the helpers ---------------------------------------------------------------


def test_train_epoch_improves_the_elbo():
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(size=(4, 12)) > 0.5
    X = prototypes[rng.integers(0, 4, size=256)].astype(np.float32)
    torch.manual_seed(0)
    model = peer.TorchHVAE(12, (3, 2), (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    history = [peer.train_epoch(model, optimizer, X, 32, generator) for _ in range(15)]
    assert all(math.isfinite(value) for value in history)
    assert history[-1] > history[0] + 1.0
    scores = peer.score_samples(model, X)
    assert scores.shape == (256,) and scores.dtype == np.float64
    np.testing.assert_array_equal(scores, peer.score_samples(model, X))  # seeded by default
    iwae = peer.score_samples(model, X, n_importance_samples=20)
    assert iwae.mean() > scores.mean()


def test_transform_returns_chained_posterior_means():
    model = tiny_model("bernoulli", latent_dims=(3, 2))
    x = tiny_data("bernoulli")
    means = peer.transform(model, x, all_layers=True, batch_size=4)
    with torch.no_grad():
        mu1 = model.encoders[0](torch.as_tensor(x))["mu"]
        mu2 = model.encoders[1](mu1)["mu"]
    np.testing.assert_allclose(means[0], mu1.numpy(), rtol=1e-12)
    np.testing.assert_allclose(means[1], mu2.numpy(), rtol=1e-12)
    np.testing.assert_array_equal(peer.transform(model, x), means[0])


def test_decode_and_sample_shapes_and_ranges():
    model = tiny_model("bernoulli", latent_dims=(3, 2))
    x_mean = peer.decode(model, np.zeros((7, 3)))
    assert x_mean.shape == (7, 5) and np.all((x_mean > 0) & (x_mean < 1))
    samples = peer.sample(model, 9, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (9, 5) and np.all((samples > 0) & (samples < 1))


def test_noise_shape_is_checked():
    model = tiny_model("bernoulli")
    x = tiny_data("bernoulli")
    with pytest.raises(ValueError, match="noise"):
        model.elbo(x, fixed_noise(model, x.shape[0])[:1])
    with pytest.raises(ValueError, match="shape"):
        model.elbo(x, fixed_noise(model, x.shape[0] + 1))


def test_torch_threads_restores_thread_count():
    before = torch.get_num_threads()
    with peer.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# -- the peer against hvae itself ----------------------------------------------


def hvae_and_peer(likelihood, latent_dims, decoder_variance="learned", dtype=torch.float32,
                  n_features=20, hidden_dims=(16, 8)):
    """An hvae.Model and a peer holding hvae's parameters (copied by name)."""
    hvae = pytest.importorskip("hvae")
    model = hvae.Model(n_features, latent_dims, hidden_dims, likelihood=likelihood,
                       activation="tanh", decoder_variance=decoder_variance, seed=3)
    twin = peer.TorchHVAE(n_features, latent_dims, hidden_dims, likelihood=likelihood,
                          activation="tanh", decoder_variance=decoder_variance, dtype=dtype)
    twin.load_named_parameters(model.named_parameters())
    rng = np.random.default_rng(0)
    n_rows = 50
    if likelihood == "bernoulli":
        x = rng.uniform(size=(n_rows, n_features)).astype(np.float32)
    else:
        x = rng.standard_normal((n_rows, n_features)).astype(np.float32)
    noise = [rng.standard_normal((n_rows, d)).astype(np.float32) for d in latent_dims]
    return model, twin, x, noise


@pytest.mark.parametrize("decoder_variance", ["learned", "unit"])
@pytest.mark.parametrize("latent_dims", [(5,), (5, 3), (6, 4, 3)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_terms_match_hvae(likelihood, latent_dims, decoder_variance):
    # Same parameters, same noise, both in float32: every per-row term agrees
    # to float32 precision (hvae sums in float64, torch in float32).
    model, twin, x, noise = hvae_and_peer(likelihood, latent_dims, decoder_variance)
    terms = model.elbo_terms(x, noise=noise)
    with torch.no_grad():
        reconstruction, kl = twin.elbo_terms(x, noise)
        elbo = twin.elbo(x, noise)
    scale = max(1.0, float(np.abs(terms["reconstruction"]).max()))
    differences = {
        "reconstruction": np.abs(reconstruction.numpy() - terms["reconstruction"]).max(),
        "kl": np.abs(kl.numpy() - terms["kl"]).max(),
        "elbo": np.abs(elbo.numpy() - terms["elbo"]).max(),
    }
    print(f"largest differences (scale {scale:.1f}): {differences}")
    assert terms["kl"].shape == (x.shape[0], len(latent_dims))
    for name, difference in differences.items():
        assert difference < 1e-5 * scale, name


@pytest.mark.parametrize("latent_dims", [(5,), (5, 3), (6, 4, 3)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_gradient_matches_hvae(likelihood, latent_dims):
    # hvae's hand-written backward pass (float32) against autograd (float64).
    model, twin, x, noise = hvae_and_peer(likelihood, latent_dims, dtype=torch.float64)
    loss, grad = model.loss_and_grad(x, noise=noise, beta=0.7)
    twin_loss = twin.loss(x, [eps.astype(np.float64) for eps in noise], beta=0.7)
    twin_loss.backward()
    twin_grad = np.concatenate([g.ravel() for _, g in twin.named_gradients_numpy()])
    assert twin_grad.shape == grad.shape
    largest = np.abs(twin_grad - grad).max()
    print(f"largest gradient difference {largest:.2e} (largest entry {np.abs(twin_grad).max():.2f})")
    assert abs(loss - twin_loss.item()) < 1e-5 * max(1.0, abs(loss))
    assert largest < 1e-5 * max(1.0, np.abs(twin_grad).max())


@pytest.mark.parametrize("latent_dims", [(5,), (5, 3)])
def test_clipped_log_variances_match_hvae(latent_dims):
    # Push every log-variance head past hvae's bound of +-20 (both signs):
    # the clipped terms must still agree.
    model, twin, x, noise = hvae_and_peer("gaussian", latent_dims)
    params = dict(model.named_parameters())
    for name, value in params.items():
        if ".logvar.b" in name:
            value[::2] = 35.0 if name.startswith("enc") else -35.0
            value[1::2] = -35.0 if name.startswith("enc") else 35.0
    twin.load_named_parameters(model.named_parameters())
    terms = model.elbo_terms(x, noise=noise)
    with torch.no_grad():
        reconstruction, kl = twin.elbo_terms(x, noise)
        logvar = twin.encoders[0](torch.as_tensor(x))["logvar"]
    assert logvar.abs().max() == peer.LOGVAR_BOUND
    assert np.all(np.isfinite(terms["elbo"]))
    np.testing.assert_allclose(reconstruction.numpy(), terms["reconstruction"], rtol=1e-5)
    np.testing.assert_allclose(kl.numpy(), terms["kl"], rtol=1e-5,
                               atol=1e-5 * np.abs(terms["kl"]).max())


# -- the fast training path ------------------------------------------------------


@pytest.mark.parametrize("decoder_variance", ["learned", "unit"])
@pytest.mark.parametrize("latent_dims", [(3,), (3, 2), (4, 3, 2)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_training_loss_is_the_loss(likelihood, latent_dims, decoder_variance):
    # training_loss sums straight to scalars; it must be `loss` and minus the
    # summed ELBO, values and gradients (float64).
    model = tiny_model(likelihood, latent_dims, decoder_variance=decoder_variance)
    x = torch.as_tensor(tiny_data(likelihood))
    noise = fixed_noise(model, x.shape[0])
    for beta in (1.0, 0.3):
        model.zero_grad()
        expected = model.loss(x, noise, beta=beta)
        expected.backward()
        expected_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss, negative_elbo_sum = model.training_loss(x, noise, beta=beta)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(negative_elbo_sum, -model.elbo(x, noise).sum(),
                                       rtol=1e-12, atol=1e-12)
        for name, (p, g) in zip([n for n, _ in model.named_parameters()],
                                zip(model.parameters(), expected_grads)):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("latent_dims", [(5,), (5, 3)])
def test_training_loss_gradient_matches_hvae(latent_dims):
    model, twin, x, noise = hvae_and_peer("bernoulli", latent_dims, dtype=torch.float64)
    loss, grad = model.loss_and_grad(x, noise=noise, beta=0.7)
    twin_loss, _ = twin.training_loss(torch.as_tensor(x, dtype=torch.float64),
                                      [torch.as_tensor(e, dtype=torch.float64) for e in noise],
                                      beta=0.7)
    twin_loss.backward()
    twin_grad = np.concatenate([g.ravel() for _, g in twin.named_gradients_numpy()])
    assert abs(loss - twin_loss.item()) < 1e-5 * max(1.0, abs(loss))
    assert np.abs(twin_grad - grad).max() < 1e-5 * max(1.0, np.abs(twin_grad).max())


def test_fused_heads_keep_nn_linear_init():
    # The fused head layer draws from nn.Linear's own init for the heads'
    # fan-in: every entry uniform in +-1/sqrt(fan_in), as two separate heads.
    torch.manual_seed(0)
    model = peer.TorchHVAE(784, (200,), (300,))
    head = model.encoders[0].heads
    assert head.weight.shape == (400, 300)
    bound = 1.0 / math.sqrt(300)
    for rows in model.encoders[0].head_rows().values():
        for tensor in (head.weight[rows], head.bias[rows]):
            assert tensor.abs().max() <= bound
        weight = head.weight[rows].detach().numpy().ravel()
        # Uniform(-b, b): mean 0, variance b^2 / 3 (60,000 draws per head).
        assert abs(weight.mean()) < 0.01 * bound
        assert abs(weight.var() / (bound ** 2 / 3) - 1) < 0.02
    separate = torch.nn.Linear(300, 200)
    assert separate.weight.abs().max() <= bound


def train_three_epochs(compile):
    rng = np.random.default_rng(0)
    X = (rng.uniform(size=(100, 12)) > 0.5).astype(np.float32)
    torch.manual_seed(0)
    model = peer.TorchHVAE(12, (3, 2), (16,))
    trainer = peer.Trainer(model, peer.make_optimizer(model, 1e-2), 32,
                           torch.Generator().manual_seed(0), compile=compile)
    trainer.warm_up(X)  # must not change the model or the generator
    return [trainer.epoch(X) for _ in range(3)], model, X


def test_trainer_is_train_epoch_with_fused_adam():
    eager_history, _, X = train_three_epochs(False)
    torch.manual_seed(0)
    model = peer.TorchHVAE(12, (3, 2), (16,))
    optimizer = peer.make_optimizer(model, 1e-2)
    generator = torch.Generator().manual_seed(0)
    history = [peer.train_epoch(model, optimizer, X, 32, generator) for _ in range(3)]
    assert history == eager_history
    assert optimizer.defaults.get("fused")


@pytest.mark.skipif(not os.environ.get("HVAE_TEST_COMPILE"),
                    reason="torch.compile takes about a minute here: set HVAE_TEST_COMPILE=1")
def test_compiled_trainer_matches_eager():
    # The benchmark's compiled peer trains the same model: same noise, same
    # trajectory up to float rounding.
    eager_history, eager, _ = train_three_epochs(False)
    compiled_history, compiled, _ = train_three_epochs(True)
    np.testing.assert_allclose(compiled_history, eager_history, rtol=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
