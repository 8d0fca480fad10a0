"""The PyTorch peer of hvae: the same hierarchical VAE, written in PyTorch.

Used for side-by-side benchmarks (CPU, float32) and as a test oracle (in
float64, with the weights and noise copied from hvae). hvae itself never
imports this module.

The model, identical to hvae's (see csrc/hvae.h):

- data ``x = z_0`` in R^D, latent layers ``z_1..z_T`` of sizes
  ``latent_dims``;
- encoder block i maps ``z_{i-1}`` through an MLP over ``hidden_dims`` to the
  heads ``mu_i`` and ``logvar_i`` of ``q(z_i | z_{i-1})``, and training uses
  ``z_i = mu_i + exp(logvar_i / 2) * eps_i``;
- decoder block i maps ``z_i`` through an MLP over ``reversed(hidden_dims)``
  to ``p(z_{i-1} | z_i)``: a diagonal Gaussian for i >= 2, and for i = 1 a
  Bernoulli (``logits`` head) or Gaussian (``mu``, ``logvar`` heads)
  likelihood; with ``decoder_variance='unit'`` decoders have no ``logvar``
  heads and their variance is 1; every ``logvar`` head (encoders and
  decoders) is clipped to [-20, 20], as in hvae;
- ``ELBO = log p(x|z_1) - KL(q(z_T|z_{T-1}) || N(0, I))
  - sum_{i<T} [log q(z_i|z_{i-1}) - log p(z_i|z_{i+1})]``: the top layer's
  KL in closed form, every lower layer's term as the log-density ratio at the
  sampled z_i (one sample; see `TorchHVAE.elbo_terms`).

Typical use::

    import torch
    from peer_torch import TorchHVAE, Trainer, make_optimizer, score_samples

    torch.manual_seed(0)
    model = TorchHVAE(64, latent_dims=(8,), hidden_dims=(64,))
    optimizer = make_optimizer(model, learning_rate=1e-3)   # fused Adam
    generator = torch.Generator().manual_seed(0)
    trainer = Trainer(model, optimizer, 64, generator)       # compile=True: torch.compile
    trainer.warm_up(X)                                       # compiles, if compiling
    mean_elbo = trainer.epoch(X)
    elbo_per_row = score_samples(model, X)

It is written as a competent PyTorch user would write it for speed: the mean
and log-variance heads of a block fused into one ``nn.Linear`` (same init
distribution, see `_Block`), fused Adam, batch and noise buffers filled in
place, the training loss reduced straight to a scalar, in-place ReLU,
``inference_mode`` for evaluation; `Trainer` can also ``torch.compile`` the
loss. The per-row `TorchHVAE.elbo_terms`, `TorchHVAE.loss` and
`TorchHVAE.log_importance_weights` are the float64 test oracle.

Nothing here changes torch's thread count at import; the benchmark helpers
take an ``n_threads`` argument and restore the previous count afterwards.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TorchHVAE",
    "train_epoch",
    "transform",
    "score_samples",
    "decode",
    "sample",
    "make_model",
    "make_optimizer",
    "Trainer",
    "benchmark_training",
]

LOG_2PI = math.log(2.0 * math.pi)
# hvae's HVAE_LOGVAR_BOUND: every log-variance head is clipped to +-20.
LOGVAR_BOUND = 20.0

ACTIVATIONS = {
    # In place: a Linear's output is not needed by its own backward, and relu's
    # backward needs only its result, so this saves an allocation per layer.
    "relu": lambda h: F.relu(h, inplace=True),
    "tanh": torch.tanh,
    "leaky_relu": lambda h: F.leaky_relu(h, negative_slope=0.01),
    "elu": F.elu,
    "softplus": F.softplus,
}
LIKELIHOODS = ("bernoulli", "gaussian")
DECODER_VARIANCES = ("learned", "unit")


def _kl_terms(mu_q, logvar_q, mu_p=None, logvar_p=None):
    """Elementwise 2 KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p)))."""
    squared_distance = mu_q.square() if mu_p is None else (mu_q - mu_p).square()
    if logvar_p is None:
        return logvar_q.exp() + squared_distance - 1.0 - logvar_q
    return (
        logvar_p
        - logvar_q
        + (logvar_q.exp() + squared_distance) * torch.exp(-logvar_p)
        - 1.0
    )


def gaussian_kl(mu_q, logvar_q, mu_p=None, logvar_p=None):
    """Per-row KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))).

    Parameters
    ----------
    mu_q, logvar_q : Tensor of shape (n, d)
    mu_p, logvar_p : Tensor of shape (n, d) or None
        None stands for zeros: a standard-normal prior, or unit variance.

    Returns
    -------
    kl : Tensor of shape (n,)
        Summed over the d dimensions.
    """
    return 0.5 * _kl_terms(mu_q, logvar_q, mu_p, logvar_p).sum(dim=1)


def _log_ratio_terms(z, eps, logvar_q, mu_p, logvar_p=None):
    """Elementwise 2 (log q(z) - log p(z)); see `gaussian_log_ratio`."""
    squared_distance = (z - mu_p).square()
    if logvar_p is None:
        return squared_distance - logvar_q - eps.square()
    return logvar_p - logvar_q - eps.square() + squared_distance * torch.exp(-logvar_p)


def gaussian_log_ratio(z, eps, logvar_q, mu_p, logvar_p=None):
    """Per-row ``log q(z) - log p(z)`` at a reparameterised sample.

    ``q = N(mu_q, exp(logvar_q))`` and ``z = mu_q + exp(logvar_q / 2) * eps``,
    so ``(z - mu_q)^2 / exp(logvar_q) = eps^2`` and mu_q is not needed; this is
    hvae's ``hvae_gaussian_logratio_forward``, term for term:
    ``sum_j (logvar_p - logvar_q - eps^2 + (z - mu_p)^2 exp(-logvar_p)) / 2``
    (the log 2 pi constants cancel). Its gradient is the pathwise one: along
    the path, log q(z) depends on logvar_q only through ``-logvar_q / 2``.

    Parameters
    ----------
    z, eps, logvar_q, mu_p : Tensor of shape (n, d)
    logvar_p : Tensor of shape (n, d) or None
        None stands for unit variance.

    Returns
    -------
    log_ratio : Tensor of shape (n,)
    """
    return 0.5 * _log_ratio_terms(z, eps, logvar_q, mu_p, logvar_p).sum(dim=1)


def gaussian_log_density(x, mu=None, logvar=None):
    """Per-row log N(x; mu, exp(logvar)) in nats, constants included.

    Parameters
    ----------
    x : Tensor of shape (n, d)
    mu, logvar : Tensor of shape (n, d) or None
        None stands for zeros (mean 0, unit variance).

    Returns
    -------
    log_density : Tensor of shape (n,)
    """
    residual = x if mu is None else x - mu
    if logvar is None:
        terms = LOG_2PI + residual.square()
    else:
        terms = LOG_2PI + logvar + residual.square() * torch.exp(-logvar)
    return -0.5 * terms.sum(dim=1)


def bernoulli_log_likelihood(x, logits):
    """Per-row sum of ``x * logits - softplus(logits)``, for x in [0, 1].

    Parameters
    ----------
    x, logits : Tensor of shape (n, D)

    Returns
    -------
    log_likelihood : Tensor of shape (n,)
    """
    # binary_cross_entropy_with_logits is exactly softplus(l) - x * l,
    # computed without overflow for large |l|.
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)


class _Block(nn.Module):
    """An MLP trunk (Linear then activation per hidden layer) and its heads.

    The heads (mu and logvar, or logits) are one ``nn.Linear`` whose output
    columns are split, so that a block runs one product for all of them. Its
    default initialisation is the separate heads' own: ``nn.Linear`` draws
    every weight and bias entry i.i.d. uniform in +-1/sqrt(fan_in), and the
    fan-in (the trunk's width) is the same for the fused layer as for each
    head; only the order in which torch's generator fills the entries
    differs. The rows of the fused weight are hvae's heads in hvae's order
    (see `TorchHVAE.hvae_linears`).

    Parameters
    ----------
    n_inputs : int
    hidden_dims : sequence of int
        Widths of the hidden layers, in forward order.
    head_sizes : dict of str to int
        Output size of each head, in hvae's buffer order (mu, logvar; or
        logits).
    activation : callable
    dtype : torch.dtype
    """

    def __init__(self, n_inputs, hidden_dims, head_sizes, activation, dtype):
        super().__init__()
        self.activation = activation
        self.hidden = nn.ModuleList()
        for width in hidden_dims:
            self.hidden.append(nn.Linear(n_inputs, width, dtype=dtype))
            n_inputs = width
        self.head_names = tuple(head_sizes)
        self.head_sizes = tuple(int(size) for size in head_sizes.values())
        self.heads = nn.Linear(n_inputs, sum(self.head_sizes), dtype=dtype)

    def head_rows(self):
        """Each head's rows of the fused head weight: dict of str to slice."""
        rows, start = {}, 0
        for name, size in zip(self.head_names, self.head_sizes):
            rows[name] = slice(start, start + size)
            start += size
        return rows

    def forward(self, inputs):
        """Map inputs (n, n_inputs) to a dict of head outputs (n, size).

        A ``logvar`` head is clipped to +-LOGVAR_BOUND, as hvae clips every
        log-variance head (no gradient flows outside the range). Head outputs
        are column views of the fused head's output.
        """
        h = inputs
        for layer in self.hidden:
            h = self.activation(layer(h))
        fused = self.heads(h)
        if len(self.head_sizes) == 1:
            return {self.head_names[0]: fused}
        outputs = dict(zip(self.head_names, fused.split(self.head_sizes, dim=1)))
        if "logvar" in outputs:
            outputs["logvar"] = outputs["logvar"].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
        return outputs


class TorchHVAE(nn.Module):
    """hvae's hierarchical VAE in PyTorch.

    Parameters
    ----------
    n_features : int
        D, the size of a data row.
    latent_dims : sequence of int
        Sizes d_1..d_T of the latent layers, bottom (next to x) first.
    hidden_dims : sequence of int, default=()
        Hidden widths of every encoder block; decoder blocks use them reversed.
    likelihood : {"bernoulli", "gaussian"}, default="bernoulli"
        The distribution p(x | z_1).
    activation : {"relu", "tanh", "leaky_relu", "elu", "softplus"}, default="relu"
        Applied after every hidden layer (leaky_relu has slope 0.01, elu
        alpha 1); heads are linear.
    decoder_variance : {"learned", "unit"}, default="learned"
        Whether decoders have log-variance heads or a variance fixed to 1.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype; use torch.float64 for gradient checks.

    Attributes
    ----------
    encoders : ModuleList of length T
        ``encoders[i - 1]`` is hvae's ``enc{i}``.
    decoders : ModuleList of length T
        ``decoders[i - 1]`` is hvae's ``dec{i}``, giving p(z_{i-1} | z_i).

    Notes
    -----
    Parameters are created with PyTorch's default ``nn.Linear`` init (the one
    hvae documents), from torch's global generator: call
    ``torch.manual_seed`` first for a reproducible model. They are not the
    same numbers hvae draws for the same seed; copy them with
    `load_named_parameters` to compare the two.
    """

    def __init__(
        self,
        n_features,
        latent_dims,
        hidden_dims=(),
        likelihood="bernoulli",
        activation="relu",
        decoder_variance="learned",
        dtype=torch.float32,
    ):
        super().__init__()
        latent_dims = tuple(int(d) for d in latent_dims)
        hidden_dims = tuple(int(h) for h in hidden_dims)
        if int(n_features) < 1:
            raise ValueError(f"n_features must be positive, got {n_features}")
        if not latent_dims or min(latent_dims) < 1:
            raise ValueError(f"latent_dims must be non-empty and positive, got {latent_dims}")
        if hidden_dims and min(hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be positive, got {hidden_dims}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if decoder_variance not in DECODER_VARIANCES:
            raise ValueError(
                f"decoder_variance must be one of {DECODER_VARIANCES}, got {decoder_variance!r}"
            )
        self.n_features = int(n_features)
        self.latent_dims = latent_dims
        self.hidden_dims = hidden_dims
        self.likelihood = likelihood
        self.activation = activation
        self.decoder_variance = decoder_variance
        self.dtype = dtype
        act = ACTIVATIONS[activation]

        # layer_sizes[i] is the size of z_i, with z_0 = x.
        layer_sizes = (self.n_features,) + latent_dims
        self.encoders = nn.ModuleList(
            _Block(layer_sizes[i - 1], hidden_dims, {"mu": d, "logvar": d}, act, dtype)
            for i, d in enumerate(latent_dims, start=1)
        )
        self.decoders = nn.ModuleList()
        for i in range(1, len(latent_dims) + 1):
            target_size = layer_sizes[i - 1]
            if i == 1 and likelihood == "bernoulli":
                heads = {"logits": target_size}
            elif decoder_variance == "learned":
                heads = {"mu": target_size, "logvar": target_size}
            else:
                heads = {"mu": target_size}
            self.decoders.append(_Block(layer_sizes[i], hidden_dims[::-1], heads, act, dtype))

    @property
    def n_layers(self):
        """T, the number of latent layers."""
        return len(self.latent_dims)

    # -- hvae's parameter names ------------------------------------------

    def hvae_linears(self):
        """The linear layers under their hvae names, in hvae's buffer order.

        Returns
        -------
        linears : list of (str, nn.Linear, slice)
            Prefixes such as ``"enc1.hidden1"`` or ``"dec1.logits"``: encoder
            blocks enc1..encT, then decoder blocks dec1..decT; within a block
            hidden1..hiddenH, then the heads. The slice selects the layer's
            rows of ``linear.weight`` and ``linear.bias``: all of them for a
            hidden layer, a head's own rows of its block's fused head layer.
        """
        linears = []
        for kind, blocks in (("enc", self.encoders), ("dec", self.decoders)):
            for i, block in enumerate(blocks, start=1):
                for j, layer in enumerate(block.hidden, start=1):
                    linears.append((f"{kind}{i}.hidden{j}", layer, slice(None)))
                for head_name, rows in block.head_rows().items():
                    linears.append((f"{kind}{i}.{head_name}", block.heads, rows))
        return linears

    def named_parameters_numpy(self):
        """The parameters as NumPy arrays in hvae's names and layout.

        Returns
        -------
        pairs : list of (str, ndarray)
            ``"<prefix>.W"`` of shape (n_in, n_out) (torch's weight rows
            transposed) and ``"<prefix>.b"`` of shape (n_out,), in hvae's
            buffer order; C-contiguous copies in the model's dtype.
        """
        return self._hvae_named(lambda linear: (linear.weight, linear.bias))

    def named_gradients_numpy(self):
        """The parameters' ``.grad`` in hvae's names and layout (as
        `named_parameters_numpy`); ``concatenate([g.ravel() for _, g in ...])``
        is aligned with hvae's flat gradient."""
        return self._hvae_named(lambda linear: (linear.weight.grad, linear.bias.grad))

    def _hvae_named(self, tensors_of):
        pairs = []
        for prefix, linear, rows in self.hvae_linears():
            weight, bias = tensors_of(linear)
            weight = weight.detach()[rows].cpu().numpy()
            pairs.append((f"{prefix}.W", np.ascontiguousarray(weight.T)))
            pairs.append((f"{prefix}.b", bias.detach()[rows].cpu().numpy().copy()))
        return pairs

    def load_named_parameters(self, pairs, strict=True):
        """Copy parameters given under hvae's names into this model.

        Parameters
        ----------
        pairs : iterable of (str, array_like), or a mapping
            ``"<prefix>.W"`` arrays of shape (n_in, n_out) and ``"<prefix>.b"``
            arrays of shape (n_out,), as `named_parameters_numpy` returns.
        strict : bool, default=True
            Require every parameter of the model to be given.

        Raises
        ------
        ValueError
            On an unknown or repeated name, a shape mismatch, or (when
            ``strict``) a missing name. Nothing is copied in that case.
        """
        if isinstance(pairs, Mapping):
            pairs = pairs.items()
        targets = {}
        for prefix, linear, rows in self.hvae_linears():
            # Views of the parameters' storage, so that copy_ writes into them.
            weight, bias = linear.weight.detach()[rows], linear.bias.detach()[rows]
            targets[f"{prefix}.W"] = (weight, (weight.shape[1], weight.shape[0]))
            targets[f"{prefix}.b"] = (bias, (bias.shape[0],))

        # Validate everything before copying anything.
        updates = []
        seen = set()
        for name, value in pairs:
            if name not in targets:
                raise ValueError(f"unknown parameter name {name!r}")
            if name in seen:
                raise ValueError(f"parameter {name!r} given twice")
            seen.add(name)
            parameter, shape = targets[name]
            array = np.asarray(value)
            if array.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
            # hvae stores W as (in, out); torch's weight is (out, in).
            tensor = torch.as_tensor(array.T if name.endswith(".W") else array)
            updates.append((parameter, tensor))
        missing = [name for name in targets if name not in seen]
        if strict and missing:
            raise ValueError(f"missing parameters: {', '.join(missing)}")
        with torch.no_grad():
            for parameter, tensor in updates:
                parameter.copy_(tensor)

    # -- the model ---------------------------------------------------------

    def as_tensor(self, X):
        """X (n, D) as a tensor of the model's dtype (no copy when possible)."""
        if isinstance(X, torch.Tensor):
            return X.to(self.dtype)
        return torch.as_tensor(np.asarray(X), dtype=self.dtype)

    def draw_noise(self, n_rows, generator=None):
        """Standard-normal eps_i of shape (n_rows, d_i) for every layer."""
        return [
            torch.randn(n_rows, d, generator=generator, dtype=self.dtype)
            for d in self.latent_dims
        ]

    def _check_noise(self, noise, n_rows):
        if len(noise) != self.n_layers:
            raise ValueError(f"noise must hold {self.n_layers} tensors, got {len(noise)}")
        checked = []
        for i, (eps, d) in enumerate(zip(noise, self.latent_dims), start=1):
            eps = self.as_tensor(eps)
            if tuple(eps.shape) != (n_rows, d):
                raise ValueError(f"noise[{i - 1}] must have shape {(n_rows, d)}, got {tuple(eps.shape)}")
            checked.append(eps)
        return checked

    def encode(self, x, noise=None):
        """Run the inference network bottom-up.

        Parameters
        ----------
        x : Tensor of shape (n, D)
        noise : list of T Tensors of shape (n, d_i), or None
            eps_i for the reparameterised samples; None evaluates every layer
            at the posterior mean of the layer below (no sampling).

        Returns
        -------
        mu, logvar, z : lists of T Tensors of shape (n, d_i)
            Parameters of q(z_i | z_{i-1}) and the value of z_i used above.
        """
        mus, logvars, zs = [], [], []
        h = x
        for i, encoder in enumerate(self.encoders):
            heads = encoder(h)
            mu, logvar = heads["mu"], heads["logvar"]
            z = mu if noise is None else torch.addcmul(mu, torch.exp(0.5 * logvar), noise[i])
            mus.append(mu)
            logvars.append(logvar)
            zs.append(z)
            h = z
        return mus, logvars, zs

    def log_likelihood(self, x, z1):
        """Per-row log p(x | z_1), shape (n,)."""
        heads = self.decoders[0](z1)
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, heads["logits"])
        return gaussian_log_density(x, heads["mu"], heads.get("logvar"))

    def elbo_terms(self, x, noise=None, generator=None):
        """The reconstruction and KL terms of the ELBO, per row.

        Parameters
        ----------
        x : array_like or Tensor of shape (n, D)
        noise : list of T array_like of shape (n, d_i), optional
            The eps_i of the reparameterised samples; drawn from
            ``generator`` when None.
        generator : torch.Generator, optional

        Returns
        -------
        reconstruction : Tensor of shape (n,)
            log p(x | z_1).
        kl : Tensor of shape (n, T)
            ``kl[:, i]`` is the KL term of layer i + 1, as in hvae's
            ``hvae_elbo``: for the top layer T the closed form
            ``KL(q(z_T | z_{T-1}) || N(0, I))``; for a layer i < T the
            single-sample ratio ``log q(z_i | z_{i-1}) - log p(z_i | z_{i+1})``
            at the sampled z_i and z_{i+1}.

        Notes
        -----
        This is hvae's objective, reproduced exactly. A lower layer's prior
        ``p(z_i | z_{i+1})`` is evaluated at a z_{i+1} drawn from
        ``q(z_{i+1} | z_i)``, which depends on z_i; the closed-form
        ``KL(q(z_i | z_{i-1}) || p(z_i | z_{i+1}))`` at that z_{i+1} would
        average over a z_i drawn independently of it, and so is not an
        unbiased estimate of the ELBO. The log-density ratio is: the mean of
        ``reconstruction - kl.sum(1)`` over the noise is the ELBO for every T,
        as is the mean of `log_importance_weights` (the two differ only in
        the top layer, closed form here, sampled there).
        """
        x = self.as_tensor(x)
        n_rows = x.shape[0]
        noise = self.draw_noise(n_rows, generator) if noise is None else self._check_noise(noise, n_rows)
        mus, logvars, zs = self.encode(x, noise)
        reconstruction = self.log_likelihood(x, zs[0])
        kls = []
        for i in range(self.n_layers - 1):
            # p(z_{i+1} | z_{i+2}) in 1-based terms: decoder i+2 at the sample z_{i+2}.
            prior = self.decoders[i + 1](zs[i + 1])
            kls.append(gaussian_log_ratio(zs[i], noise[i], logvars[i], prior["mu"],
                                          prior.get("logvar")))
        kls.append(gaussian_kl(mus[-1], logvars[-1]))
        return reconstruction, torch.stack(kls, dim=1)

    def elbo(self, x, noise=None, generator=None):
        """Per-row ELBO, shape (n,); arguments as in `elbo_terms`."""
        reconstruction, kl = self.elbo_terms(x, noise, generator)
        return reconstruction - kl.sum(dim=1)

    forward = elbo

    def loss(self, x, noise=None, beta=1.0, generator=None):
        """The training loss ``-mean(reconstruction - beta * sum of KLs)``.

        Parameters
        ----------
        x : array_like or Tensor of shape (n, D)
        noise : list of T array_like of shape (n, d_i), optional
        beta : float, default=1.0
            Weight of the KL terms; 1 gives the negative mean ELBO.
        generator : torch.Generator, optional

        Returns
        -------
        loss : Tensor of shape ()
        """
        reconstruction, kl = self.elbo_terms(x, noise, generator)
        return -(reconstruction - beta * kl.sum(dim=1)).mean()

    def training_loss(self, x, noise, beta=1.0):
        """`loss` for training: the same objective, reduced straight to scalars.

        Sums over rows and dimensions at once instead of forming the per-row
        terms of `elbo_terms` (fewer kernels per step); the value equals
        `loss` up to float rounding.

        Parameters
        ----------
        x : Tensor of shape (n, D), the model's dtype
        noise : sequence of T Tensors of shape (n, d_i)
            eps_i; not checked (the caller's buffers).
        beta : float, default=1.0

        Returns
        -------
        loss : Tensor of shape ()
            ``-(sum of reconstruction - beta * sum of KL terms) / n``.
        negative_elbo_sum : Tensor of shape (), no gradient
            ``-(sum over rows of the ELBO)`` at this noise.
        """
        mus, logvars, zs = self.encode(x, noise)
        heads = self.decoders[0](zs[0])
        if self.likelihood == "bernoulli":
            negative_reconstruction = F.binary_cross_entropy_with_logits(
                heads["logits"], x, reduction="sum")
        else:
            negative_reconstruction = -gaussian_log_density(
                x, heads["mu"], heads.get("logvar")).sum()
        kl = 0.5 * _kl_terms(mus[-1], logvars[-1]).sum()
        for i in range(self.n_layers - 1):
            prior = self.decoders[i + 1](zs[i + 1])
            kl = kl + 0.5 * _log_ratio_terms(zs[i], noise[i], logvars[i], prior["mu"],
                                             prior.get("logvar")).sum()
        negative_elbo_sum = negative_reconstruction + kl
        objective = negative_elbo_sum if beta == 1.0 else negative_reconstruction + beta * kl
        return objective / x.shape[0], negative_elbo_sum.detach()

    def log_importance_weights(self, x, noise=None, generator=None):
        """Per-row ``log p(x, z_1..z_T) - log q(z_1..z_T | x)`` at one sample.

        Its mean over noise is the ELBO; a log-mean-exp over K samples is the
        importance-weighted bound that `score_samples` returns for K > 1.

        Parameters
        ----------
        x, noise, generator
            As in `elbo_terms`.

        Returns
        -------
        log_weight : Tensor of shape (n,)
        """
        x = self.as_tensor(x)
        n_rows = x.shape[0]
        noise = self.draw_noise(n_rows, generator) if noise is None else self._check_noise(noise, n_rows)
        mus, logvars, zs = self.encode(x, noise)
        log_weight = self.log_likelihood(x, zs[0]) + gaussian_log_density(zs[-1])
        for i in range(self.n_layers):
            log_weight = log_weight - gaussian_log_density(zs[i], mus[i], logvars[i])
            if i < self.n_layers - 1:
                prior = self.decoders[i + 1](zs[i + 1])
                log_weight = log_weight + gaussian_log_density(zs[i], prior["mu"], prior.get("logvar"))
        return log_weight


# -- training and evaluation -------------------------------------------------


def make_optimizer(model, learning_rate=1e-3):
    """Adam with PyTorch's defaults but the step size, in its fastest form.

    ``fused=True`` (one kernel over every parameter; on the CPU since
    PyTorch 2.4), else ``foreach=True`` on a PyTorch without the fused CPU
    kernel. Same update either way: the Adam of Kingma and Ba with bias
    correction, as hvae's.

    Returns
    -------
    optimizer : torch.optim.Adam
        Its ``defaults`` say which form (``fused`` or ``foreach``) is used.
    """
    try:
        return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=learning_rate, foreach=True)


class Trainer:
    """Shuffled minibatch training of a TorchHVAE, without per-step allocations
    beyond autograd's own.

    Each step gathers its rows with ``index_select`` into a batch buffer and
    fills one noise buffer in place with ``torch.randn(out=...)`` (the eps_i
    are column views of it: standard normal, as hvae's), then minimises
    `TorchHVAE.training_loss`, zeroes the gradients with ``set_to_none`` and
    steps the optimizer. The running ELBO is summed in a tensor, so no step
    converts a tensor to a Python number.

    Parameters
    ----------
    model : TorchHVAE
    optimizer : torch.optim.Optimizer
        `make_optimizer` gives the fastest Adam.
    batch_size : int
        Rows per step; the last step of an epoch holds the remainder.
    generator : torch.Generator
        Source of the row order and of the noise.
    beta : float, default=1.0
        KL weight in the loss that is minimised.
    compile : bool, default=False
        Run the loss (forward and, through AOTAutograd, backward) as
        ``torch.compile(model.training_loss, mode=compile_mode,
        dynamic=False)``: one graph per batch shape (the full batch and the
        remainder). The optimizer step stays eager (fused Adam). Call
        `warm_up` first to compile outside any timed region.
    compile_mode : str or None, default=None
        torch.compile's ``mode`` (None is its default).

    Attributes
    ----------
    compile_seconds : float
        Wall time `warm_up` spent compiling (0 before, and when eager).
    """

    def __init__(self, model, optimizer, batch_size, generator, beta=1.0, compile=False,
                 compile_mode=None):
        self.model = model
        self.optimizer = optimizer
        self.batch_size = int(batch_size)
        self.generator = generator
        self.beta = float(beta)
        self.compiled = bool(compile)
        self.compile_mode = compile_mode
        self.compile_seconds = 0.0
        self.loss_fn = model.training_loss
        if compile:
            self.loss_fn = torch.compile(model.training_loss, mode=compile_mode, dynamic=False)
        self._batch = torch.empty(self.batch_size, model.n_features, dtype=model.dtype)
        self._noise = torch.empty(self.batch_size, sum(model.latent_dims), dtype=model.dtype)
        self._views = {}  # rows -> (batch rows, noise rows, eps_i column views)
        self._elbo_sum = torch.zeros((), dtype=torch.float64)

    def _buffers(self, n_rows):
        views = self._views.get(n_rows)
        if views is None:
            noise = self._noise[:n_rows]
            views = (self._batch[:n_rows], noise, noise.split(self.model.latent_dims, dim=1))
            self._views[n_rows] = views
        return views

    def warm_up(self, X):
        """Compile (when compiling) the loss and its backward for every batch
        shape an epoch on X has, without changing the model, the optimizer
        or the generator; returns and records the seconds it took."""
        if not self.compiled:
            return 0.0
        X = self.model.as_tensor(X)
        n_rows = X.shape[0]
        sizes = {min(self.batch_size, n_rows)}
        if n_rows % self.batch_size:
            sizes.add(n_rows % self.batch_size)
        start = time.perf_counter()
        self.model.train()
        for size in sorted(sizes, reverse=True):
            batch, noise, eps = self._buffers(size)
            batch.copy_(X[:size])
            noise.zero_()
            loss, _ = self.loss_fn(batch, eps, self.beta)
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        self.compile_seconds += time.perf_counter() - start
        return time.perf_counter() - start

    def epoch(self, X):
        """One pass of shuffled minibatch steps over X (n, D).

        Returns
        -------
        mean_elbo : float
            The mean over all rows of the ELBO (beta = 1, whatever ``beta``
            is) measured on each batch before its update.
        """
        X = self.model.as_tensor(X)
        n_rows = X.shape[0]
        self.model.train()
        order = torch.randperm(n_rows, generator=self.generator)
        elbo_sum = self._elbo_sum.zero_()
        loss_fn, optimizer, generator, beta = self.loss_fn, self.optimizer, self.generator, self.beta
        for start in range(0, n_rows, self.batch_size):
            rows = order[start : start + self.batch_size]
            batch, noise, eps = self._buffers(rows.shape[0])
            torch.index_select(X, 0, rows, out=batch)
            torch.randn(noise.shape, generator=generator, out=noise)
            loss, negative_elbo_sum = loss_fn(batch, eps, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elbo_sum.sub_(negative_elbo_sum)
        return float(elbo_sum) / n_rows


def train_epoch(model, optimizer, X, batch_size, generator, beta=1.0):
    """One pass of shuffled minibatch steps over X (an eager `Trainer` epoch).

    Parameters
    ----------
    model : TorchHVAE
    optimizer : torch.optim.Optimizer
        Typically ``make_optimizer(model, lr)``.
    X : array_like or Tensor of shape (n, D)
    batch_size : int
        Rows per step; the last batch holds the remainder.
    generator : torch.Generator
        Source of the row order and the reparameterisation noise.
    beta : float, default=1.0
        KL weight in the loss that is minimised.

    Returns
    -------
    mean_elbo : float
        The mean over all rows of the ELBO (beta = 1, whatever ``beta`` is)
        measured on each batch before its update.
    """
    return Trainer(model, optimizer, batch_size, generator, beta).epoch(X)


def _batches(model, X, batch_size):
    X = model.as_tensor(X)
    for start in range(0, X.shape[0], batch_size):
        yield X[start : start + batch_size]


def transform(model, X, all_layers=False, batch_size=1024, encode=None):
    """Posterior means of the latent layers (no sampling).

    Layers above the first are evaluated at the posterior mean of the layer
    below, as in hvae's ``hvae_encode``.

    Parameters
    ----------
    model : TorchHVAE
    X : array_like or Tensor of shape (n, D)
    all_layers : bool, default=False
        Return the means of every layer instead of only z_1's.
    batch_size : int, default=1024
        Rows per forward pass, to bound memory.
    encode : callable, optional
        Stands in for ``model.encode`` (x) -> (mus, logvars, zs), e.g. its
        `compile_inference` form.

    Returns
    -------
    mean : ndarray of shape (n, d_1)
        The mean of q(z_1 | x). With ``all_layers``, a list of T arrays of
        shape (n, d_i) instead.
    """
    encode = model.encode if encode is None else encode
    model.eval()
    per_layer = [[] for _ in model.latent_dims]
    with torch.inference_mode():
        for batch in _batches(model, X, batch_size):
            mus, _, _ = encode(batch)
            for chunks, mu in zip(per_layer, mus):
                chunks.append(mu.numpy())
    means = [np.concatenate(chunks) for chunks in per_layer]
    return means if all_layers else means[0]


def score_samples(model, X, n_importance_samples=1, generator=None, batch_size=1024, elbo=None):
    """Per-row ELBO, or the importance-weighted bound, without gradients.

    Parameters
    ----------
    model : TorchHVAE
    X : array_like or Tensor of shape (n, D)
    n_importance_samples : int, default=1
        K. With 1, the ELBO estimate at one noise draw (as `elbo`: the top
        layer's KL in closed form, the lower layers' sampled);
        with K > 1, ``log mean_k exp(log_importance_weights)``.
    generator : torch.Generator, optional
        Source of the noise; a generator seeded with 0 when None, so that
        repeated calls agree.
    batch_size : int, default=1024
        Rows per forward pass.
    elbo : callable, optional
        Stands in for ``model.elbo`` (x, noise) -> per-row ELBO when K = 1,
        e.g. its `compile_inference` form; same noise either way.

    Returns
    -------
    scores : ndarray of shape (n,), dtype float64
    """
    if n_importance_samples < 1:
        raise ValueError(f"n_importance_samples must be >= 1, got {n_importance_samples}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    model.eval()
    scores = []
    with torch.inference_mode():
        for batch in _batches(model, X, batch_size):
            if n_importance_samples == 1:
                noise = model.draw_noise(batch.shape[0], generator)
                scores.append((model.elbo if elbo is None else elbo)(batch, noise).double())
                continue
            log_weights = torch.stack(
                [
                    model.log_importance_weights(batch, generator=generator).double()
                    for _ in range(n_importance_samples)
                ]
            )
            scores.append(torch.logsumexp(log_weights, dim=0) - math.log(n_importance_samples))
    return torch.cat(scores).numpy()


def compile_inference(model, mode=None):
    """``torch.compile`` forms of ``model.encode`` and ``model.elbo`` for
    `transform` and `score_samples` (their ``encode=`` and ``elbo=``).

    One graph per batch shape (``dynamic=False``); the first call with each
    shape compiles. The noise is drawn outside the graph, so scores equal
    the eager ones up to float rounding.

    Returns
    -------
    functions : dict
        ``"encode"``: x -> (mus, logvars, zs); ``"elbo"``: (x, noise) -> (n,).
    """
    return {"encode": torch.compile(model.encode, mode=mode, dynamic=False),
            "elbo": torch.compile(model.elbo, mode=mode, dynamic=False)}


def decode(model, Z1, batch_size=1024):
    """The mean of p(x | z_1): sigmoid(logits) or the Gaussian mean.

    Parameters
    ----------
    model : TorchHVAE
    Z1 : array_like of shape (n, d_1)
    batch_size : int, default=1024

    Returns
    -------
    x_mean : ndarray of shape (n, D)
    """
    model.eval()
    chunks = []
    with torch.inference_mode():
        for batch in _batches(model, Z1, batch_size):
            heads = model.decoders[0](batch)
            mean = torch.sigmoid(heads["logits"]) if "logits" in heads else heads["mu"]
            chunks.append(mean.numpy())
    return np.concatenate(chunks)


def sample(model, n_samples, generator=None):
    """Ancestral samples: z_T ~ N(0, I), z_{i-1} ~ p(z_{i-1} | z_i), x's mean.

    Parameters
    ----------
    model : TorchHVAE
    n_samples : int
    generator : torch.Generator, optional

    Returns
    -------
    x_mean : ndarray of shape (n_samples, D)
        The mean of p(x | z_1) at the sampled z_1.
    """
    model.eval()
    with torch.inference_mode():
        z = torch.randn(n_samples, model.latent_dims[-1], generator=generator, dtype=model.dtype)
        for i in range(model.n_layers - 1, 0, -1):
            heads = model.decoders[i](z)
            eps = torch.randn(heads["mu"].shape, generator=generator, dtype=model.dtype)
            std = torch.exp(0.5 * heads["logvar"]) if "logvar" in heads else 1.0
            z = heads["mu"] + std * eps
        return decode(model, z)


# -- benchmark helpers -------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n_threads):
    """Run the enclosed block with torch's intra-op thread count set to n_threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_model(workload, activation="relu", decoder_variance="learned", seed=0):
    """A float32 TorchHVAE for a workload dict from ``bench/data.py``.

    Parameters
    ----------
    workload : dict
        With keys X_train, latent_dims, hidden_dims and likelihood.
    activation, decoder_variance : str
        As in `TorchHVAE`.
    seed : int, default=0
        Seeds torch's global generator before the parameters are drawn.

    Returns
    -------
    model : TorchHVAE
    """
    torch.manual_seed(seed)
    return TorchHVAE(
        workload["X_train"].shape[1],
        workload["latent_dims"],
        workload["hidden_dims"],
        likelihood=workload["likelihood"],
        activation=activation,
        decoder_variance=decoder_variance,
    )


def benchmark_training(
    workload,
    n_epochs=1,
    n_threads=1,
    learning_rate=1e-3,
    seed=0,
    activation="relu",
    decoder_variance="learned",
    evaluate=True,
    compile=False,
    compile_mode=None,
):
    """Train the peer on a workload with Adam and time every epoch.

    Parameters
    ----------
    workload : dict
        From ``bench/data.py``'s ``workloads()``: name, X_train, X_test,
        latent_dims, hidden_dims, batch_size, likelihood.
    n_epochs : int, default=1
    n_threads : int, default=1
        torch's intra-op threads during the run (restored afterwards).
    learning_rate : float, default=1e-3
        Adam's step size (other Adam settings are PyTorch's defaults).
    seed : int, default=0
        Seeds the parameters, the row order and the noise.
    activation, decoder_variance : str
        As in `TorchHVAE`.
    evaluate : bool, default=True
        Also compute the mean test ELBO (noise seeded with ``seed``).
    compile, compile_mode
        As in `Trainer`; compilation happens before the first timed epoch.

    Returns
    -------
    result : dict
        ``name``, ``n_threads``, ``n_train``, ``epoch_seconds`` (list),
        ``samples_per_s`` (list, per epoch), ``train_elbo`` (list, per
        epoch), ``compile_seconds``, ``test_elbo`` (float, or None without
        ``evaluate``), ``model``.
    """
    X_train = np.ascontiguousarray(workload["X_train"], dtype=np.float32)
    with torch_threads(n_threads):
        model = make_model(workload, activation, decoder_variance, seed)
        optimizer = make_optimizer(model, learning_rate)
        generator = torch.Generator().manual_seed(seed)
        X_tensor = torch.from_numpy(X_train)
        trainer = Trainer(model, optimizer, workload["batch_size"], generator,
                          compile=compile, compile_mode=compile_mode)
        trainer.warm_up(X_tensor)
        epoch_seconds, train_elbo = [], []
        for _ in range(n_epochs):
            start = time.perf_counter()
            train_elbo.append(trainer.epoch(X_tensor))
            epoch_seconds.append(time.perf_counter() - start)
        test_elbo = None
        if evaluate:
            scores = score_samples(
                model, workload["X_test"], generator=torch.Generator().manual_seed(seed)
            )
            test_elbo = float(scores.mean())
    n_train = X_train.shape[0]
    return {
        "name": workload.get("name"),
        "n_threads": int(n_threads),
        "n_train": n_train,
        "epoch_seconds": epoch_seconds,
        "samples_per_s": [n_train / seconds for seconds in epoch_seconds],
        "train_elbo": train_elbo,
        "compile_seconds": trainer.compile_seconds,
        "test_elbo": test_elbo,
        "model": model,
    }
