"""The float64 reference (tests/reference.py) extended to the VampPrior.

Written from the prior's specification (csrc/hvae.h, HVAE_PRIOR_VAMP):
p(z_T) = (1/K) sum_k N(z_T; m_k, diag(exp(l_k))), (m_k, l_k) the top
encoder block's heads at the pseudo-input u_k, reached through encoder
blocks 1..T at the means (block i reads block i-1's mean head). The
pseudo-inputs are the free tensor P of shape (K, D) after the model's
parameters: u = P for a Gaussian likelihood, u = clip(P, 0, 1) for a
Bernoulli one. The top layer's ELBO term is log q(z_T | .) - log p(z_T) at
the sample, in training as in evaluation.
"""

import numpy as np

import reference as ref


def parameter_shapes(cfg, K):
    """The model's (name, shape) list with the prior's tensor at the end."""
    return ref.parameter_shapes(cfg) + [("prior.pseudo_inputs", (K, cfg.n_features))]


def n_params(cfg, K):
    return sum(int(np.prod(shape)) for _, shape in parameter_shapes(cfg, K))


def unflatten(flat, cfg, K):
    params, offset = {}, 0
    for name, shape in parameter_shapes(cfg, K):
        size = int(np.prod(shape))
        params[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    assert offset == flat.size, (offset, flat.size)
    return params


def pseudo_inputs(params, cfg):
    P = params["prior.pseudo_inputs"]
    return np.clip(P, 0.0, 1.0) if cfg.likelihood == "bernoulli" else P


def components(params, cfg):
    """(m, l) of shape (K, d_T): the top posterior at each pseudo-input,
    through the encoder chain at the means."""
    h = pseudo_inputs(params, cfg)
    for i in range(1, cfg.n_layers + 1):
        mu, logvar = ref.encoder(params, cfg, i, h)
        h = mu
    return mu, logvar


def log_prior(params, cfg, z):
    """log p(z) per row of z (n, d_T), a stable log-sum-exp over components."""
    m, lv = components(params, cfg)
    a = np.stack([ref.gaussian_loglik(z, m[k], lv[k]) for k in range(m.shape[0])], axis=1)
    top = a.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.mean(np.exp(a - top), axis=1))


def top_posterior(params, cfg, x, zs):
    """(mu_q, logvar_q) of the top layer given the samples of ref.forward."""
    T = cfg.n_layers
    if cfg.inference == "ladder":
        h = x
        for i in range(1, T + 1):
            mu, logvar = ref.encoder(params, cfg, i, h)
            h = mu
        return mu, logvar
    return ref.encoder(params, cfg, T, x if T == 1 else zs[T - 2])


def forward(params, cfg, x, noise, sampled=False, prior_params=None):
    """ref.forward's terms with the VampPrior's top-layer term (its
    components from prior_params when given: a detached prior)."""
    x = np.asarray(x, np.float64)
    out = ref.forward(params, cfg, x, noise, sampled=sampled)
    T = cfg.n_layers
    z_top = out["z"][T - 1]
    mu_q, lv_q = top_posterior(params, cfg, x, out["z"])
    prior = params if prior_params is None else prior_params
    term = ref.gaussian_loglik(z_top, mu_q, lv_q) - log_prior(prior, cfg, z_top)
    kl = out["kl"].copy()
    kl[:, T - 1] = term
    return {"elbo": out["reconstruction"] - kl.sum(axis=1),
            "reconstruction": out["reconstruction"], "kl": kl, "z": out["z"],
            "preactivations": out["preactivations"]}


def objective_loss(params, cfg, x, noise, n_samples=1, objective="elbo"):
    """-mean ELBO (mean over the S draws of each row) or the IWAE loss."""
    S = n_samples
    out = forward(params, cfg, np.repeat(np.asarray(x, np.float64), S, axis=0), noise,
                  sampled=objective == "iwae")
    if objective == "iwae":
        log_w = out["elbo"].reshape(-1, S)
        top = log_w.max(axis=1, keepdims=True)
        return -np.mean(top[:, 0] + np.log(np.mean(np.exp(log_w - top), axis=1)))
    return -np.mean(out["elbo"])
