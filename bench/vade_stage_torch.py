"""Does VaDE's training stage move the clusters it starts from? An oracle in
PyTorch (a benchmark peer only; hvae does not depend on torch).

    python bench/vade_stage_torch.py [--epochs 30] [--prior-lr 2e-3] [--lr 2e-3]
        [--adam-eps 1e-8] [--detach-gamma] [--softmax-pi] [--logvar-head random|copy]
        [--label-start] [--batch-size 100] [--pretrain-epochs 15] [--hidden 500,500]

On the 10,000 MNIST test images (/work/shared/data/mnist-test or HVAE_MNIST):
an autoencoder (Bernoulli reconstruction, Adam 1e-3, seed 0) is pretrained
once and cached in /tmp; a diagonal GaussianMixture (seed 0) on its codes
starts the mixture prior (or, with --label-start, each class's codes do: a
start at the labels' clustering, to see whether training keeps it); then
VaDE's stage trains the whole model with the authors' objective
(slim1017/VaDE, VaDE.py ``vae_loss``; GuHongyang/VaDE-pytorch ``ELBO_Loss``):

    sum_x BCE + sum_c gamma_c [KL(q(z|x) || N(mu_c, var_c)) + log gamma_c - log pi_c],

gamma = p(c | z) at the sampled z, gradients through gamma (--detach-gamma
stops them), pi the raw weights as in both references (--softmax-pi: hvae's
softmax of logits), the encoder's log-variance head left at its random
initialisation as in the Keras code (--logvar-head copy: a copy of the mean
head, as the PyTorch port does). Prints the clustering accuracy (Hungarian)
of argmax_c p(c | z = posterior mean) at the start and every 5 epochs.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hvae.datasets import load_mnist  # noqa: E402
from hvae.metrics import clustering_accuracy as accuracy  # noqa: E402



def mlp(dims):
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Model(nn.Module):
    def __init__(self, hidden, d=10):
        super().__init__()
        self.body = nn.Sequential(mlp([784] + hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden[-1], d), nn.Linear(hidden[-1], d)
        self.decoder = mlp([d] + hidden[::-1] + [784])   # logits

    def encode(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def log_normal(z, mu, logvar):
    """log N(z_b; mu_c, exp(logvar_c)), shape (B, K)."""
    return -0.5 * (np.log(2 * np.pi) + logvar[None] +
                   (z[:, None] - mu[None]) ** 2 / logvar[None].exp()).sum(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--hidden", default="500,500")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--prior-lr", type=float, default=2e-3)
    ap.add_argument("--adam-eps", type=float, default=1e-8)
    ap.add_argument("--detach-gamma", action="store_true")
    ap.add_argument("--softmax-pi", action="store_true")
    ap.add_argument("--logvar-head", choices=("random", "copy"), default="random")
    ap.add_argument("--label-start", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    X, y = load_mnist("test")
    X, y = torch.tensor(np.asarray(X, np.float32)), np.asarray(y)
    n = len(X)
    hidden = [int(h) for h in args.hidden.split(",")]

    torch.manual_seed(0)
    model = Model(hidden)
    tag = "_".join(map(str, hidden))
    cache = Path("/tmp") / f"vade_stage_torch_{tag}_{args.pretrain_epochs}.pt"
    if not cache.exists():
        opt = torch.optim.Adam([p for name, p in model.named_parameters()
                                if not name.startswith("logvar")], 1e-3)
        for _ in range(args.pretrain_epochs):
            for idx in torch.randperm(n).split(100):
                x = X[idx]
                loss = F.binary_cross_entropy_with_logits(model.decoder(model.encode(x)[0]), x,
                                                          reduction="sum") / len(x)
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.save(model.state_dict(), cache)
    model.load_state_dict(torch.load(cache))
    if args.logvar_head == "copy":
        model.logvar.load_state_dict(model.mu.state_dict())

    with torch.no_grad():
        Z = model.encode(X)[0].numpy().astype(np.float64)
    if args.label_start:
        weights = np.array([np.mean(y == k) for k in range(10)])
        means = np.stack([Z[y == k].mean(0) for k in range(10)])
        variances = np.stack([Z[y == k].var(0) for k in range(10)])
    else:
        gmm = GaussianMixture(10, covariance_type="diag", random_state=0).fit(Z)
        weights, means, variances = gmm.weights_, gmm.means_, gmm.covariances_
    as_param = lambda a: nn.Parameter(torch.tensor(a, dtype=torch.float32))  # noqa: E731
    pi = as_param(np.log(weights) if args.softmax_pi else weights)
    mu_c, logvar_c = as_param(means), as_param(np.log(variances))

    def log_pi():
        return torch.log_softmax(pi, 0) if args.softmax_pi else torch.log(pi)

    def predict():
        with torch.no_grad():
            joint = log_pi()[None] + log_normal(model.encode(X)[0], mu_c, logvar_c)
            return joint.argmax(1).numpy()

    opt = torch.optim.Adam([{"params": model.parameters(), "lr": args.lr},
                            {"params": [pi, mu_c, logvar_c], "lr": args.prior_lr}],
                           eps=args.adam_eps)
    torch.manual_seed(1)   # the same draws whether the pretraining ran now or was cached
    print(f"epoch 0 accuracy {accuracy(y, predict()):.4f}", flush=True)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for idx in torch.randperm(n).split(args.batch_size):
            x = X[idx]
            mu, logvar = model.encode(x)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            rec = F.binary_cross_entropy_with_logits(model.decoder(z), x, reduction="none").sum(1)
            gamma = torch.softmax(log_pi()[None] + log_normal(z, mu_c, logvar_c), 1)
            if args.detach_gamma:
                gamma = gamma.detach()
            # KL(q(z|x) || N(mu_c, var_c)) per row and component, (B, K).
            kl_c = 0.5 * (logvar_c[None] - logvar[:, None] - 1
                          + (logvar[:, None] - logvar_c[None]).exp()
                          + (mu[:, None] - mu_c[None]) ** 2 / logvar_c[None].exp()).sum(2)
            term = (gamma * (kl_c + torch.log(gamma + 1e-10) - log_pi()[None])).sum(1)
            loss = (rec + term).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        if epoch % 5 == 0 or epoch == 1:
            print(f"epoch {epoch} loss {total / n:.2f} accuracy {accuracy(y, predict()):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
