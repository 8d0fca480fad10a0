"""The PyTorch peer of hvae's categorical VAE (bench only; hvae never imports it).

The same model and training as ``hvae.Model(D, (M,), hidden,
likelihood='bernoulli', latent_family='categorical', n_categories=K)``
trained with ``Model.fit(temperature=tau0, temperature_min=tau_min,
temperature_decay=rate)``:

- encoder: ``x`` through dense ReLU layers ``hidden`` to M*K logits ``l``;
  q(z_m = k | x) = softmax(l_m)_k;
- training sample: Gumbel-softmax z_m = softmax((l_m + g_m) / tau), g
  standard Gumbel, tau = max(tau_min, tau0 * exp(-rate * step)) for
  optimizer step ``step`` = 0, 1, ... (Jang et al. 2017);
- decoder: z (M*K) through dense ReLU layers ``reversed(hidden)`` to D
  Bernoulli logits;
- loss: -(log p(x | z) - KL(q || uniform)) averaged over the minibatch, the
  KL in closed form sum_mk q_mk (log q_mk + log K);
- Adam (fused), PyTorch's default Linear initialisation;
- eager, or (``Trainer(compile=True)``) with the loss, forward and backward,
  through ``torch.compile`` (default mode, one static graph per batch shape,
  compiled by ``Trainer.warm_up`` before any timed epoch; the temperature
  enters the graph as a tensor, so that annealing recompiles nothing). The
  optimizer step stays eager (fused Adam), as in bench/peer_torch.py.

The training step allocates no buffers of its own: the minibatch, its
Gumbel noise and the permutation live in tensors made once, filled in place
(autograd's activations are PyTorch's own business).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchCategoricalVAE", "Trainer", "score_samples", "log_likelihood"]


class TorchCategoricalVAE(nn.Module):
    """M categorical variables of K classes, Bernoulli likelihood."""

    def __init__(self, n_features, M=30, K=10, hidden=(512, 256)):
        super().__init__()
        self.M, self.K = M, K
        widths = [n_features, *hidden, M * K]
        self.encoder = nn.Sequential(*[m for a, b in zip(widths[:-1], widths[1:])
                                       for m in (nn.Linear(a, b), nn.ReLU())][:-1])
        widths = [M * K, *reversed(hidden), n_features]
        self.decoder = nn.Sequential(*[m for a, b in zip(widths[:-1], widths[1:])
                                       for m in (nn.Linear(a, b), nn.ReLU())][:-1])

    def log_q(self, x):
        logits = self.encoder(x).view(-1, self.M, self.K)
        return F.log_softmax(logits, dim=-1)

    def terms(self, x, z, log_q):
        """(reconstruction, KL to the uniform prior) per row."""
        out = self.decoder(z.reshape(x.shape[0], -1))
        rec = -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.K))).sum(dim=(1, 2))
        return rec, kl

    def loss(self, x, gumbel, tau, straight_through=False):
        log_q = self.log_q(x)
        y = F.softmax((log_q + gumbel) / tau, dim=-1)
        if straight_through:
            hard = F.one_hot(y.argmax(dim=-1), self.K).to(y.dtype)
            y = hard + y - y.detach()
        rec, kl = self.terms(x, y, log_q)
        return -(rec - kl).mean()


class Trainer:
    """Epochs of minibatch Adam over X (a float32 tensor), with the
    temperature annealed per step as in hvae.

    With ``compile=True`` the loss (forward and, through AOTAutograd,
    backward) runs as ``torch.compile(model.loss, mode=compile_mode,
    dynamic=False)``; call `warm_up` before timing. ``compile_seconds`` is
    the wall time `warm_up` spent compiling (0 when eager).
    """

    def __init__(self, model, X, batch_size=128, lr=1e-3, tau0=1.0, tau_min=0.5,
                 rate=3e-5, seed=0, compile=False, compile_mode=None):
        self.model, self.X, self.batch_size = model, X, batch_size
        self.tau0, self.tau_min, self.rate = tau0, tau_min, rate
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        n, D = X.shape
        self.order = torch.empty(n, dtype=torch.int64)
        self.batch = torch.empty(batch_size, D)
        self.gumbel = torch.empty(batch_size, model.M, model.K)
        self.compiled = bool(compile)
        self.compile_seconds = 0.0
        self.loss_fn = model.loss
        if self.compiled:
            self.loss_fn = torch.compile(model.loss, mode=compile_mode, dynamic=False)
        self.tau = torch.empty(())  # the step's temperature, filled in place

    def warm_up(self):
        """Compile (when compiling) the loss and its backward for every batch
        shape an epoch has, leaving the model, the optimizer and the
        generator as they were; returns the seconds it took."""
        if not self.compiled:
            return 0.0
        n = self.X.shape[0]
        sizes = {min(self.batch_size, n)} | ({n % self.batch_size} if n % self.batch_size
                                              else set())
        start = time.perf_counter()
        self.tau.fill_(self.tau0)
        for B in sorted(sizes, reverse=True):
            self.batch[:B].copy_(self.X[:B])
            self.gumbel[:B].zero_()
            self.loss_fn(self.batch[:B], self.gumbel[:B], self.tau).backward()
        self.optimizer.zero_grad(set_to_none=False)
        self.compile_seconds += time.perf_counter() - start
        return time.perf_counter() - start

    def epoch(self):
        """One pass; returns (mean training ELBO, seconds)."""
        start = time.perf_counter()
        n = self.X.shape[0]
        torch.randperm(n, generator=self.generator, out=self.order)
        total = 0.0
        for s in range(0, n, self.batch_size):
            idx = self.order[s:s + self.batch_size]
            B = idx.shape[0]
            x = torch.index_select(self.X, 0, idx, out=self.batch[:B])
            g = self.gumbel[:B]
            g.exponential_(generator=self.generator).log_().neg_()  # -log Exp(1): Gumbel
            self.tau.fill_(max(self.tau_min, self.tau0 * math.exp(-self.rate * self.step)))
            loss = self.loss_fn(x, g, self.tau)
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            total += float(loss.detach()) * B
        return -total / n, time.perf_counter() - start


@torch.no_grad()
def score_samples(model, X, seed=0, chunk=1000):
    """Per-row ELBO with one exact (Gumbel-max) sample, KL in closed form."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, X.shape[0], chunk):
        x = X[s:s + chunk]
        log_q = model.log_q(x)
        gumbel = -torch.empty_like(log_q).exponential_(generator=g).log_()
        z = F.one_hot((log_q + gumbel).argmax(dim=-1), model.K).to(x.dtype)
        rec, kl = model.terms(x, z, log_q)
        out.append(rec - kl)
    return torch.cat(out)


@torch.no_grad()
def log_likelihood(model, X, n_samples=1000, seed=0, draws_per_pass=250):
    """log (1/S) sum_s p(x, z_s) / q(z_s | x), z_s exact draws from q."""
    g = torch.Generator().manual_seed(seed)
    result = torch.empty(X.shape[0], dtype=torch.float64)
    log_K = math.log(model.K)
    for r in range(X.shape[0]):
        x = X[r:r + 1]
        log_q = model.log_q(x)
        log_w = []
        for s0 in range(0, n_samples, draws_per_pass):
            S = min(draws_per_pass, n_samples - s0)
            lq = log_q.expand(S, -1, -1)
            gumbel = -torch.empty_like(lq).exponential_(generator=g).log_()
            k = (lq + gumbel).argmax(dim=-1)
            z = F.one_hot(k, model.K).to(x.dtype)
            out = model.decoder(z.reshape(S, -1))
            rec = -F.binary_cross_entropy_with_logits(out, x.expand(S, -1),
                                                      reduction="none").sum(dim=1)
            log_ratio = (lq.gather(-1, k.unsqueeze(-1)).squeeze(-1) + log_K).sum(dim=1)
            log_w.append((rec - log_ratio).double())
        log_w = torch.cat(log_w)
        result[r] = torch.logsumexp(log_w, 0) - math.log(n_samples)
    return result
