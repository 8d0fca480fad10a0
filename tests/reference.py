"""An independent float64 NumPy reference of the hvae model, for the tests.

Written from the model's specification only: it shares no code with the
package. Parameters come as a dict name -> float64 array with the names and
shapes of ``parameter_shapes(config)`` (the same as ``Model.named_parameters``).

Model (x = z_0 in R^D, latent layers z_1..z_T of sizes d_1..d_T):

* encoder block i maps z_{i-1} through dense layers of widths hidden_dims
  (y = act(x @ W + b), W of shape (in, out)) to linear heads mu_i, logvar_i;
  z_i = mu_i + exp(logvar_i / 2) * eps_i;
* decoder block i maps z_i through dense layers of widths reversed(hidden_dims)
  to linear heads for p(z_{i-1} | z_i): Gaussian mu (and logvar when the
  decoder variance is learned, else logvar = 0); for i = 1 and a Bernoulli
  likelihood a single logits head;
* ELBO = log p(x | z_1) - KL(q(z_T | z_{T-1}) || N(0, I))
         - sum_{i<T} [log q(z_i | z_{i-1}) - log p(z_i | z_{i+1})]
  at the sampled z's: the top layer's KL in closed form, each lower layer's
  term as the single-sample log-density ratio (its prior depends on z_{i+1},
  drawn given z_i, so a closed-form KL there would be biased).
* prior="gmm" (VaDE): p(z_T) = sum_c softmax(pi_logits)_c N(mu_c, exp(logvar_c)),
  tensors prior.pi_logits (K,), prior.mu (K, d_T), prior.logvar (K, d_T);
  the top layer's term sum_c gamma_c [KL(q || N(mu_c, var_c)) + log gamma_c
  - log p(c)] with gamma_c = p(c | z_T) at the sampled z_T (see gmm_term).
  With prior_covariance_type="full", N(mu_c, Lambda_c^-1), the precision
  Lambda_c = P_c P_c^T from tensors prior.prec_log_diag (K, d_T), log of
  P_c's diagonal, and prior.prec_lower (K, d_T (d_T - 1) / 2), its
  strictly-lower entries row by row (see gmm_precisions); the densities and
  KLs are written with the matrices (slogdet, traces), not with P.

Categorical layers (``Config.latent_families``): layer i holds M_i =
latent_dims[i] variables of K_i = n_categories[i] classes, z_i of M_i * K_i
columns (column m*K + k); encoder block i has one head 'logits' (M_i K_i),
q = softmax per variable, and decoder block i + 1 a head 'logits' for the
prior p(z_i | z_{i+1}) (uniform 1/K at the top). Noise g is standard Gumbel;
z = onehot(argmax(l + g)) (exact: temperature None), softmax((l + g) / tau)
(relaxed). Terms: sum_k q_k (log q_k - log p_k) (closed form, where the
Gaussian takes it) or sum_k z_k (log q_k - log p_k) (sampled).

The bottom of the file has small helpers the test modules share (random
parameters and data, and a comparison that reports its largest difference).
"""

from dataclasses import dataclass

import numpy as np

LOG_2PI = np.log(2.0 * np.pi)

# The hvae_activation enum of csrc/hvae.h.
ACTIVATION_CODES = {
    "relu": 0,
    "tanh": 1,
    "leaky_relu": 2,
    "elu": 3,
    "softplus": 4,
    "identity": 5,
    "logvar_clip": 6,
}
# Every log-variance head is clipped to [-LOGVAR_BOUND, LOGVAR_BOUND].
LOGVAR_BOUND = 20.0
LEAKY_SLOPE = 0.01
# Activations with a kink at 0 (finite differences must not straddle one).
KINKED_ACTIVATIONS = ("relu", "leaky_relu")


# --------------------------------------------------------------------------
# Elementwise functions


def central_differences(loss, params, h=1e-6):
    """The gradient of loss (a function of a flat float64 vector) at params
    by central differences, one coordinate at a time."""
    params = np.asarray(params, dtype=np.float64)
    grad, flat = np.empty_like(params), params.copy()
    for k in range(flat.size):
        flat[k] = params[k] + h
        plus = loss(flat)
        flat[k] = params[k] - h
        minus = loss(flat)
        flat[k] = params[k]
        grad[k] = (plus - minus) / (2 * h)
    return grad


def softplus(a):
    """log(1 + exp(a)) without overflow."""
    return np.logaddexp(0.0, a)


def sigmoid(a):
    """1 / (1 + exp(-a)) without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def activation(name, pre):
    """The activation `name` applied to the pre-activation `pre`."""
    if name == "relu":
        return np.maximum(pre, 0.0)
    if name == "tanh":
        return np.tanh(pre)
    if name == "leaky_relu":
        return np.where(pre > 0, pre, LEAKY_SLOPE * pre)
    if name == "elu":
        return np.where(pre > 0, pre, np.expm1(np.minimum(pre, 0.0)))
    if name == "softplus":
        return softplus(pre)
    if name == "identity":
        return pre.copy()
    if name == "logvar_clip":
        return np.clip(pre, -LOGVAR_BOUND, LOGVAR_BOUND)
    raise ValueError(f"unknown activation {name!r}")


def activation_derivative(name, pre):
    """d act / d pre, evaluated at the pre-activation `pre`."""
    if name == "relu":
        return (pre > 0).astype(np.float64)
    if name == "tanh":
        return 1.0 - np.tanh(pre) ** 2
    if name == "leaky_relu":
        return np.where(pre > 0, 1.0, LEAKY_SLOPE)
    if name == "elu":
        return np.where(pre > 0, 1.0, np.exp(np.minimum(pre, 0.0)))
    if name == "softplus":
        return sigmoid(pre)
    if name == "identity":
        return np.ones_like(pre)
    if name == "logvar_clip":
        return (np.abs(pre) < LOGVAR_BOUND).astype(np.float64)
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------
# Per-row densities and divergences (rows are samples, columns dimensions)


def gaussian_kl(mu_q, logvar_q, mu_p=0.0, logvar_p=0.0):
    """Per-row KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p)))."""
    terms = (logvar_p - logvar_q
             + (np.exp(logvar_q) + (mu_q - mu_p) ** 2) * np.exp(-logvar_p)
             - 1.0)
    return 0.5 * np.sum(terms, axis=1)


def gaussian_loglik(x, mu, logvar=0.0):
    """Per-row log N(x; mu, exp(logvar)), constants included."""
    terms = LOG_2PI + logvar + (x - mu) ** 2 * np.exp(-logvar)
    return -0.5 * np.sum(np.broadcast_to(terms, np.broadcast(x, mu).shape),
                         axis=1)


def bernoulli_loglik(x, logits):
    """Per-row sum of x * l - softplus(l)."""
    return np.sum(x * logits - softplus(logits), axis=1)


# --------------------------------------------------------------------------
# The architecture


@dataclass(frozen=True)
class Config:
    """The model's architecture, as given to hvae.Model."""

    n_features: int
    latent_dims: tuple
    hidden_dims: tuple = ()
    likelihood: str = "gaussian"
    activation: str = "relu"
    decoder_variance: str = "learned"
    inference: str = "markov"
    n_conditions: int = 0
    markov_kl: str = "sampled"
    latent_families: tuple = ()   # per layer; () for every layer Gaussian
    n_categories: tuple = ()      # per layer, K for categorical layers
    prior: str = "standard"
    n_components: int = 1
    prior_covariance_type: str = "diag"

    @property
    def n_layers(self):
        return len(self.latent_dims)

    def categorical(self, i):
        """Whether layer i (1-based) is categorical."""
        return bool(self.latent_families) and self.latent_families[i - 1] == "categorical"

    def width(self, i):
        """Columns of z_i (1-based): d_i, or M_i * K_i."""
        d = self.latent_dims[i - 1]
        return d * self.n_categories[i - 1] if self.categorical(i) else d

    def model_kwargs(self):
        """Keyword arguments for hvae.Model."""
        return dict(n_features=self.n_features,
                    latent_dims=tuple(self.latent_dims),
                    hidden_dims=tuple(self.hidden_dims),
                    likelihood=self.likelihood,
                    activation=self.activation,
                    decoder_variance=self.decoder_variance,
                    inference=self.inference,
                    n_conditions=self.n_conditions,
                    markov_kl=self.markov_kl,
                    prior=self.prior,
                    n_components=self.n_components,
                    **(dict(prior_covariance_type=self.prior_covariance_type)
                       if self.prior_covariance_type != "diag" else {}),
                    **(dict(latent_family=tuple(self.latent_families),
                            n_categories=tuple(self.n_categories))
                       if self.latent_families else {}))


def _block_shapes(prefix, n_in, widths, heads, n_cond=0):
    # A condition's rows follow the input's in the block's first layer
    # (hidden1, or every head of a block without hidden layers).
    shapes = []
    extra = n_cond
    for j, width in enumerate(widths, start=1):
        shapes.append((f"{prefix}.hidden{j}.W", (n_in + extra, width)))
        shapes.append((f"{prefix}.hidden{j}.b", (width,)))
        n_in, extra = width, 0
    for head, size in heads:
        shapes.append((f"{prefix}.{head}.W", (n_in + extra, size)))
        shapes.append((f"{prefix}.{head}.b", (size,)))
    return shapes


def parameter_shapes(cfg):
    """The ordered (name, shape) list that tiles the parameter buffer."""
    # dims[i] = columns of z_i
    dims = [cfg.n_features] + [cfg.width(i) for i in range(1, cfg.n_layers + 1)]
    learned = cfg.decoder_variance == "learned"
    shapes = []
    for i in range(1, cfg.n_layers + 1):
        heads = ([("logits", dims[i])] if cfg.categorical(i)
                 else [("mu", dims[i]), ("logvar", dims[i])])
        shapes += _block_shapes(f"enc{i}", dims[i - 1], cfg.hidden_dims, heads,
                                cfg.n_conditions)
    for i in range(1, cfg.n_layers + 1):
        if (i == 1 and cfg.likelihood == "bernoulli") or (i > 1 and cfg.categorical(i - 1)):
            heads = [("logits", dims[i - 1])]
        else:
            heads = [("mu", dims[i - 1])]
            if learned:
                heads.append(("logvar", dims[i - 1]))
        shapes += _block_shapes(f"dec{i}", dims[i],
                                tuple(reversed(cfg.hidden_dims)), heads, cfg.n_conditions)
    if cfg.prior == "gmm":
        K, d = cfg.n_components, dims[-1]
        shapes += [("prior.pi_logits", (K,)), ("prior.mu", (K, d))]
        if cfg.prior_covariance_type == "full":
            shapes.append(("prior.prec_log_diag", (K, d)))
            if d > 1:
                shapes.append(("prior.prec_lower", (K, d * (d - 1) // 2)))
        else:
            shapes.append(("prior.logvar", (K, d)))
    return shapes


def n_params(cfg):
    return sum(int(np.prod(shape)) for _, shape in parameter_shapes(cfg))


def unflatten(flat, cfg):
    """Views of the flat vector `flat` as a name -> array dict."""
    params, offset = {}, 0
    for name, shape in parameter_shapes(cfg):
        size = int(np.prod(shape))
        params[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    if offset != flat.size:
        raise ValueError(f"flat vector has {flat.size} entries, "
                         f"the model {offset}")
    return params


# --------------------------------------------------------------------------
# The model


def _with_cond(h, cond):
    return h if cond is None else np.hstack([h, np.asarray(cond, np.float64)])


def _mlp(params, prefix, h, cfg, preactivations, cond=None):
    """The hidden layers; returns (output, whether the condition is used up)."""
    j = 1
    while f"{prefix}.hidden{j}.W" in params:
        inp = _with_cond(h, cond) if j == 1 else h
        pre = inp @ params[f"{prefix}.hidden{j}.W"] + params[f"{prefix}.hidden{j}.b"]
        preactivations.append(pre)
        h = activation(cfg.activation, pre)
        j += 1
    return h, j > 1


def _head(params, prefix, head, h, cond=None):
    out = _with_cond(h, cond) @ params[f"{prefix}.{head}.W"] + params[f"{prefix}.{head}.b"]
    return activation("logvar_clip", out) if head == "logvar" else out


def encoder(params, cfg, i, inp, preactivations=None, cond=None):
    """(mu_i, logvar_i) of encoder block i at its input."""
    pre = [] if preactivations is None else preactivations
    h, used = _mlp(params, f"enc{i}", inp, cfg, pre, cond)
    c = None if used else cond
    if cfg.categorical(i):
        return _head(params, f"enc{i}", "logits", h, c), None
    return _head(params, f"enc{i}", "mu", h, c), _head(params, f"enc{i}", "logvar", h, c)


def decoder(params, cfg, i, z, preactivations=None, cond=None):
    """The heads of decoder block i at z_i: (mu, logvar) of p(z_{i-1} | z_i)
    with logvar = 0 for unit variance, or (logits, None) for a Bernoulli
    p(x | z_1)."""
    pre = [] if preactivations is None else preactivations
    h, used = _mlp(params, f"dec{i}", z, cfg, pre, cond)
    c = None if used else cond
    if (i == 1 and cfg.likelihood == "bernoulli") or (i > 1 and cfg.categorical(i - 1)):
        return _head(params, f"dec{i}", "logits", h, c), None
    mu = _head(params, f"dec{i}", "mu", h, c)
    if cfg.decoder_variance == "learned":
        return mu, _head(params, f"dec{i}", "logvar", h, c)
    return mu, np.zeros_like(mu)


def precision_merge(mu_hat, logvar_hat, mu_p, logvar_p):
    """The ladder's posterior: precisions add, means weight by precision."""
    prec_hat, prec_p = np.exp(-logvar_hat), np.exp(-logvar_p)
    var_q = 1.0 / (prec_hat + prec_p)
    return var_q * (mu_hat * prec_hat + mu_p * prec_p), np.log(var_q)


def log_softmax_groups(logits, K):
    """Per-variable log-softmax of (n, M*K) logits, shape kept."""
    a = logits.reshape(logits.shape[0], -1, K)
    mx = a.max(axis=2, keepdims=True)
    out = a - mx - np.log(np.sum(np.exp(a - mx), axis=2, keepdims=True))
    return out.reshape(logits.shape)


def categorical_sample(logits, gumbel, K, temperature=None):
    """Gumbel-max one-hot (temperature None) or Gumbel-softmax sample."""
    a = (logits + gumbel).reshape(logits.shape[0], -1, K)
    if temperature is None:
        z = (a == a.max(axis=2, keepdims=True)).astype(np.float64)
    else:
        z = np.exp(log_softmax_groups((a / temperature).reshape(logits.shape), K))
    return z.reshape(logits.shape)


def categorical_kl(logits_q, logits_p, K):
    """Per-row sum over variables of KL(q || p); logits_p None: uniform."""
    lq = log_softmax_groups(logits_q, K)
    lp = -np.log(K) if logits_p is None else log_softmax_groups(logits_p, K)
    return np.sum(np.exp(lq) * (lq - lp), axis=1)


def categorical_logratio(z, logits_q, logits_p, K):
    """Per-row sum_k z_k (log q_k - log p_k)."""
    lq = log_softmax_groups(logits_q, K)
    lp = -np.log(K) if logits_p is None else log_softmax_groups(logits_p, K)
    return np.sum(z * (lq - lp), axis=1)


def _logsumexp(a, axis):
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def gmm_precisions(params):
    """The full-covariance mixture's precisions Lambda_c = P_c P_c^T,
    shape (K, d, d), P_c lower triangular from its tensors."""
    log_diag = params["prior.prec_log_diag"]
    K, d = log_diag.shape
    P = np.zeros((K, d, d), dtype=log_diag.dtype)
    for c in range(K):
        P[c][np.diag_indices(d)] = np.exp(log_diag[c])
        if d > 1:
            P[c][np.tril_indices(d, -1)] = params["prior.prec_lower"][c]
    return P @ np.transpose(P, (0, 2, 1))


def gaussian_kl_full(mu_q, logvar_q, mu_p, precision):
    """Per-row KL(N(mu_q, diag exp(logvar_q)) || N(mu_p, precision^-1))."""
    d = mu_q.shape[1]
    u = mu_q - mu_p
    trace = np.exp(logvar_q) @ np.diag(precision)
    quad = np.einsum("ni,ij,nj->n", u, precision, u)
    return 0.5 * (trace + quad - d - np.linalg.slogdet(precision)[1]
                  - np.sum(logvar_q, axis=1))


def gmm_log_joint(params, z):
    """l_c = log p(c) + log N(z; mu_c, var_c), shape (n, K)."""
    logits = params["prior.pi_logits"]
    log_pi = logits - _logsumexp(logits, 0)
    if "prior.prec_log_diag" in params:
        mu, d = params["prior.mu"], z.shape[1]
        lam = gmm_precisions(params)
        diff = z[:, None, :] - mu[None]
        log_n = 0.5 * (-d * LOG_2PI + np.linalg.slogdet(lam)[1][None]
                       - np.einsum("nki,kij,nkj->nk", diff, lam, diff))
        return log_pi[None] + log_n, log_pi
    mu, logvar = params["prior.mu"], params["prior.logvar"]
    log_n = -0.5 * np.sum(LOG_2PI + logvar[None] + (z[:, None, :] - mu[None]) ** 2
                          * np.exp(-logvar[None]), axis=2)
    return log_pi[None] + log_n, log_pi


def gmm_term(params, mu_q, logvar_q, z, eps, sampled=False):
    """The mixture prior's top-layer term per row: VaDE's
    sum_c gamma_c [KL(q || N(mu_c, var_c)) + log gamma_c - log p(c)],
    gamma = softmax_c(l_c) at the sample z; with `sampled`, the log-density
    ratio log q(z) - log p(z), p(z) the mixture's marginal."""
    l, log_pi = gmm_log_joint(params, z)
    lse = _logsumexp(l, 1)
    if sampled:
        return gaussian_loglik(z, mu_q, logvar_q) - lse
    log_gamma = l - lse[:, None]
    if "prior.prec_log_diag" in params:
        lam = gmm_precisions(params)
        kl = np.stack([gaussian_kl_full(mu_q, logvar_q, params["prior.mu"][c], lam[c])
                       for c in range(l.shape[1])], axis=1)
        return np.sum(np.exp(log_gamma) * (kl + log_gamma - log_pi[None]), axis=1)
    kl = np.stack([gaussian_kl(mu_q, logvar_q, params["prior.mu"][c], params["prior.logvar"][c])
                   for c in range(l.shape[1])], axis=1)
    return np.sum(np.exp(log_gamma) * (kl + log_gamma - log_pi[None]), axis=1)


def gmm_responsibilities(params, z):
    """p(c | z), shape (n, K)."""
    l, _ = gmm_log_joint(params, z)
    return np.exp(l - _logsumexp(l, 1)[:, None])


def forward(params, cfg, x, noise, cond=None, sampled=False, temperature=None):
    """Per-row ELBO terms for data x (n, D) and noise eps_1..eps_T.

    Returns a dict with 'elbo' (n,), 'reconstruction' (n,), 'kl' (n, T)
    (column i-1 the KL term of layer i), 'z' (the samples z_1..z_T) and
    'preactivations' (every hidden layer's pre-activation, for finding
    kinks). A layer's KL term is closed-form where q and p condition on the
    same things (the top layer; every ladder layer) and the sampled
    log-density ratio log q(z) - log p(z) otherwise, or everywhere with
    `sampled` (then elbo is log p(x, z) - log q(z | x), an importance log-weight).
    Categorical layers draw exact one-hot samples, or Gumbel-softmax ones at
    `temperature` (Markov inference only).
    """
    x = np.asarray(x, dtype=np.float64)
    T = cfg.n_layers
    eps = [np.asarray(e, np.float64) for e in noise]
    pre = []
    mus, logvars, zs = [None] * T, [None] * T, [None] * T
    priors = [None] * T  # (mu_p, logvar_p) of z_i, i < T, from decoder i+1
    if cfg.inference == "markov":
        h = x
        for i in range(T):
            mus[i], logvars[i] = encoder(params, cfg, i + 1, h, pre, cond)
            if cfg.categorical(i + 1):
                zs[i] = categorical_sample(mus[i], eps[i], cfg.n_categories[i], temperature)
            else:
                zs[i] = mus[i] + np.exp(0.5 * logvars[i]) * eps[i]
            h = zs[i]
        for i in range(T - 1):
            priors[i] = decoder(params, cfg, i + 2, zs[i + 1], pre, cond)
    else:
        # Deterministic bottom-up pass through the means, then top-down.
        hats, h = [], x
        for i in range(T):
            mu_hat, logvar_hat = encoder(params, cfg, i + 1, h, pre, cond)
            hats.append((mu_hat, logvar_hat))
            h = mu_hat
        mus[T - 1], logvars[T - 1] = hats[T - 1]
        zs[T - 1] = mus[T - 1] + np.exp(0.5 * logvars[T - 1]) * eps[T - 1]
        for i in range(T - 2, -1, -1):
            priors[i] = decoder(params, cfg, i + 2, zs[i + 1], pre, cond)
            mus[i], logvars[i] = precision_merge(*hats[i], *priors[i])
            zs[i] = mus[i] + np.exp(0.5 * logvars[i]) * eps[i]

    kl = np.empty((x.shape[0], T))
    for i in range(T):
        mu_p, logvar_p = priors[i] if i < T - 1 else (0.0, 0.0)
        if i == T - 1 and cfg.prior == "gmm":
            kl[:, i] = gmm_term(params, mus[i], logvars[i], zs[i], eps[i], sampled)
            continue
        # markov_kl="analytic": the lecture notes' estimator, every lower
        # Markov layer's KL(q(z_i|z_{i-1}) || p(z_i|z_{i+1})) in closed form
        # at the sampled z_{i+1}.
        closed = not sampled and (i == T - 1 or cfg.inference == "ladder"
                                  or cfg.markov_kl == "analytic")
        if cfg.categorical(i + 1):
            K, lp = cfg.n_categories[i], priors[i][0] if i < T - 1 else None
            kl[:, i] = (categorical_kl(mus[i], lp, K) if closed
                        else categorical_logratio(zs[i], mus[i], lp, K))
        elif closed:
            kl[:, i] = gaussian_kl(mus[i], logvars[i], mu_p, logvar_p)
        else:
            kl[:, i] = (gaussian_loglik(zs[i], mus[i], logvars[i])
                        - gaussian_loglik(zs[i], np.broadcast_to(mu_p, zs[i].shape),
                                          logvar_p))

    out, logvar_x = decoder(params, cfg, 1, zs[0], pre, cond)
    if cfg.likelihood == "bernoulli":
        reconstruction = bernoulli_loglik(x, out)
    else:
        reconstruction = gaussian_loglik(x, out, logvar_x)

    return {"elbo": reconstruction - kl.sum(axis=1),
            "reconstruction": reconstruction,
            "kl": kl,
            "z": zs,
            "mu": mus,
            "logvar": logvars,
            "preactivations": pre}


def objective_loss(params, cfg, x, noise, n_samples=1, objective="elbo", beta=1.0,
                   free_bits=0.0, cond=None, temperature=None):
    """The training loss of hvae's objectives, noise rows b * S + s.

    elbo: -mean_b [ mean_s reconstruction - beta * sum_i max(free_bits,
    mean_{b,s} kl_i) ] (the max only when free_bits > 0); iwae:
    -mean_b log mean_s exp(log w_bs), log w = log p(x, z) - log q(z | x).
    """
    S = n_samples
    x_rep = np.repeat(np.asarray(x, np.float64), S, axis=0)
    c_rep = None if cond is None else np.repeat(np.asarray(cond, np.float64), S, axis=0)
    out = forward(params, cfg, x_rep, noise, c_rep, sampled=objective == "iwae",
                  temperature=temperature)
    if objective == "iwae":
        log_w = out["elbo"].reshape(-1, S)
        mx = log_w.max(axis=1, keepdims=True)
        bound = mx[:, 0] + np.log(np.mean(np.exp(log_w - mx), axis=1))
        return -np.mean(bound)
    kl_means = out["kl"].mean(axis=0)
    if free_bits > 0:
        kl_means = np.maximum(kl_means, free_bits)
    return -(out["reconstruction"].mean() - beta * kl_means.sum())


def loss(params, cfg, x, noise):
    """-mean ELBO, the training loss."""
    return -np.mean(forward(params, cfg, x, noise)["elbo"])


# --------------------------------------------------------------------------
# The discriminator T(z_T) and the objectives that use it (FactorVAE, the
# density-ratio prior), and beta-TCVAE's decomposition of the top layer's KL.


def discriminator_shapes(d, hidden):
    """The (name, shape) list of a discriminator over d units with hidden
    widths `hidden`: leaky-ReLU layers, then one linear output. It follows
    the model's tensors in the parameter buffer."""
    shapes, n_in = [], d
    for j, width in enumerate(hidden, start=1):
        shapes += [(f"discriminator.hidden{j}.W", (n_in, width)),
                   (f"discriminator.hidden{j}.b", (width,))]
        n_in = width
    return shapes + [("discriminator.out.W", (n_in, 1)), ("discriminator.out.b", (1,))]


def unflatten_all(flat, cfg, hidden):
    """unflatten for a model followed by a discriminator of widths hidden."""
    shapes = parameter_shapes(cfg) + discriminator_shapes(cfg.latent_dims[-1], hidden)
    params, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        params[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    if offset != flat.size:
        raise ValueError(f"flat vector has {flat.size} entries, the model {offset}")
    return params


def discriminator(params, z, preactivations=None):
    """T(z) (n,) for rows z (n, d): the logit of 'z came from q'."""
    h, j = np.asarray(z, np.float64), 1
    while f"discriminator.hidden{j}.W" in params:
        pre = h @ params[f"discriminator.hidden{j}.W"] + params[f"discriminator.hidden{j}.b"]
        if preactivations is not None:
            preactivations.append(pre)
        h = activation("leaky_relu", pre)
        j += 1
    return (h @ params["discriminator.out.W"] + params["discriminator.out.b"])[:, 0]


def tcvae_terms(z, eps, mu, logvar, n_data):
    """beta-TCVAE's (MI, TC, DW) per row of one minibatch (Chen et al. 2018,
    minibatch-weighted sampling from a data set of n_data rows):
    log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log(N B), likewise per unit;
    MI = log q(z|x) - log q(z), TC = log q(z) - sum_k log q_k(z_k),
    DW = sum_k log q_k(z_k) - log N(z; 0, I)."""
    B = z.shape[0]
    # a[i, j, k] = log N(z_ik; mu_jk, exp(logvar_jk))
    a = -0.5 * (LOG_2PI + logvar[None] + (z[:, None] - mu[None]) ** 2 * np.exp(-logvar[None]))
    log_nb = np.log(n_data * B)

    def lse(v, axis):
        m = v.max(axis=axis)
        return m + np.log(np.sum(np.exp(v - np.expand_dims(m, axis)), axis=axis))

    log_qz = lse(a.sum(axis=2), 1) - log_nb
    log_marginals = (lse(a, 1) - log_nb).sum(axis=1)
    log_q_given = np.sum(-0.5 * (LOG_2PI + logvar + eps ** 2), axis=1)
    log_p = np.sum(-0.5 * (LOG_2PI + z ** 2), axis=1)
    return log_q_given - log_qz, log_qz - log_marginals, log_marginals - log_p


def extended_loss(params, cfg, x, noise, beta=1.0, tc_weight=0.0, density_ratio=False,
                  tcvae_weights=None, n_data=None):
    """The training loss with the discriminator's and beta-TCVAE's terms:
    -mean_r [reconstruction - beta sum_{i<T} kl_i - top_r] where top_r is
    beta (KL_T - T(z_T) for the density-ratio prior, else KL_T), or with
    tcvae_weights (a, b, g) a MI + b TC + g DW; plus tc_weight mean_r T(z_T)
    (FactorVAE)."""
    out = forward(params, cfg, x, noise)
    z_top = out["z"][-1]
    kl = out["kl"].copy()
    if density_ratio:
        kl[:, -1] -= discriminator(params, z_top)
    rows = -out["reconstruction"] + beta * kl[:, :-1].sum(axis=1)
    if tcvae_weights is not None:
        mi, tc, dw = tcvae_terms(z_top, np.asarray(noise[-1], np.float64), out["mu"][-1],
                                 out["logvar"][-1], n_data)
        a, b, g = tcvae_weights
        rows = rows + a * mi + b * tc + g * dw
    else:
        rows = rows + beta * kl[:, -1]
    if tc_weight:
        rows = rows + tc_weight * discriminator(params, z_top)
    return float(np.mean(rows))


def encode(params, cfg, x, cond=None):
    """[(mu_i, logvar_i)] for i = 1..T. Markov: each layer above the first
    evaluated at the posterior mean of the layer below. Ladder: the
    bottom-up means, then top-down merges with the prior at the mean above."""
    h = np.asarray(x, dtype=np.float64)
    out = []
    for i in range(1, cfg.n_layers + 1):
        mu, logvar = encoder(params, cfg, i, h, None, cond)
        if cfg.categorical(i):  # the class probabilities and their logs
            logvar = log_softmax_groups(mu, cfg.n_categories[i - 1])
            mu = np.exp(logvar)
        out.append((mu, logvar))
        h = mu
    if cfg.inference == "ladder":
        for i in range(cfg.n_layers - 2, -1, -1):
            prior = decoder(params, cfg, i + 2, out[i + 1][0], None, cond)
            out[i] = precision_merge(*out[i], *prior)
    return out


def decode(params, cfg, z1, cond=None):
    """The mean of p(x | z_1)."""
    out, _ = decoder(params, cfg, 1, np.asarray(z1, dtype=np.float64), None, cond)
    return sigmoid(out) if cfg.likelihood == "bernoulli" else out


# --------------------------------------------------------------------------
# Helpers shared by the test modules


def random_parameters(cfg, rng, scale=1.0):
    """A flat float32 parameter vector drawn like PyTorch's Linear
    initialisation: W and b of a layer with n_in inputs uniform in
    +-scale/sqrt(n_in)."""
    chunks = []
    n_in = None
    for name, shape in parameter_shapes(cfg):
        if name.endswith(".W"):
            n_in = shape[0]  # the bias that follows shares this bound
        bound = scale / np.sqrt(n_in)
        chunks.append(rng.uniform(-bound, bound, size=shape).ravel())
    return np.concatenate(chunks).astype(np.float32)


def random_data(cfg, n, rng):
    """float32 data (n, D): standard normal for a Gaussian likelihood, and for
    a Bernoulli one values in [0, 1], half of them exactly 0 or 1."""
    shape = (n, cfg.n_features)
    if cfg.likelihood == "bernoulli":
        x = rng.uniform(0.0, 1.0, size=shape)
        binary = rng.uniform(size=shape) < 0.5
        x[binary] = np.round(x[binary])
        return x.astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def random_noise(cfg, n, rng):
    """eps_1..eps_T as float32 arrays (n, d_i): standard normal, or
    standard Gumbel for a categorical layer (n, M_i K_i)."""
    return [(rng.gumbel(size=(n, cfg.width(i))) if cfg.categorical(i)
             else rng.standard_normal((n, cfg.width(i)))).astype(np.float32)
            for i in range(1, cfg.n_layers + 1)]


def assert_close(actual, expected, rtol, atol, what):
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise
    (atol may be an array, for error bounds that scale with the data);
    returns the largest absolute difference, and the failure message names
    the largest absolute and relative differences and the worst entry."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}")
    assert np.all(np.isfinite(actual)), (
        f"{what}: {int(np.sum(~np.isfinite(actual)))} non-finite values")
    if actual.size == 0:
        return 0.0
    diff = np.abs(actual - expected)
    bound = np.broadcast_to(atol + rtol * np.abs(expected), diff.shape)
    if not np.all(diff <= bound):
        worst = int(np.argmax(diff / np.maximum(bound, 1e-300)))
        raise AssertionError(
            f"{what}: {int(np.sum(diff > bound))}/{diff.size} entries outside "
            f"the bound; max |diff| {diff.max():.3g}, max rel diff "
            f"{max_relative(actual, expected):.3g}; worst at flat index "
            f"{worst}: got {actual.ravel()[worst]!r}, expected "
            f"{expected.ravel()[worst]!r}, allowed {bound.ravel()[worst]:.3g}")
    return float(diff.max())


def max_relative(actual, expected, floor=1e-12):
    """max |a - e| / max(|e|, floor), for reports."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)
                        / np.maximum(np.abs(expected), floor)))
