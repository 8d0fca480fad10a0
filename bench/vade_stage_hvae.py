"""Does hvae.VaDE's training stage move the clusters it starts from? The
companion of bench/vade_stage_torch.py, on hvae's own pipeline.

    python bench/vade_stage_hvae.py [--epochs 30] [--prior-lr 2e-4] [--seed 0]
                                    [--label-start]

On the 10,000 MNIST test images: VaDE's recipe of bench/clustering.py
(latent (10,), hidden (500, 500), Bernoulli, 20 epochs of pretraining with
KL weight 0.01, batch 100, one thread), its initialisation
(hvae.clustering._initial_clusters with init_params='codes': the
full-covariance GaussianMixture's clusters of the codes, as measured in
bench/results/vade_stage_diagnosis.json; then _mixture_init's
moment-matched diagonal components) or, with --label-start, each
class's codes as one component (a start at the labels' clustering). Prints
the clustering accuracy of argmax q(c | x) at the start and every 5 epochs
of the final stage, with the training ELBO.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hvae.clustering import VaDE, _initial_clusters, _mixture_init  # noqa: E402
from hvae.datasets import load_mnist  # noqa: E402
from hvae.metrics import clustering_accuracy as accuracy  # noqa: E402



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--prior-lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-start", action="store_true")
    args = ap.parse_args()
    X, y = load_mnist("test")
    X, y = np.ascontiguousarray(X, np.float32), np.asarray(y)
    vade = VaDE(10, latent_dims=(10,), hidden_dims=(500, 500), likelihood="bernoulli",
                covariance_type="diag",
                pretrain_epochs=20, n_epochs=args.epochs, batch_size=100, n_threads=1,
                prior_learning_rate=args.prior_lr, init_params="codes")
    # VaDE._one_run, step by step, to score the start.
    quiet = dict(random_state=args.seed, warm_start=False, validation_fraction=None,
                 early_stopping=False, callbacks=None)
    pre = vade._stage(prior="standard", n_epochs=vade.pretrain_epochs, beta=vade.pretrain_beta,
                      kl_warmup_epochs=0, **quiet).fit(X)
    run = vade._stage(n_epochs=0, **quiet).fit(X)
    run.model_.parameters[:run.model_.prior_offset] = pre.model_.parameters
    mu, logvar = (a.astype(np.float64) for a in pre.model_.encode(X)[-1])
    rows, resp = _initial_clusters(mu, 10, vade.init_params, vade.init_covariance_type,
                                   args.seed, vade.n_threads)
    init = _mixture_init(mu[rows], logvar[rows], resp)
    pi_logits, means, log_variances = (init[f"prior.{name}"] for name in ("pi_logits", "mu",
                                                                          "logvar"))
    if args.label_start:
        pi_logits = np.log([np.mean(y == k) for k in range(10)])
        means = np.stack([mu[y == k].mean(0) for k in range(10)])
        log_variances = np.log(np.stack([mu[y == k].var(0) for k in range(10)]))
    tensors = dict(run.model_.named_parameters())
    tensors["prior.pi_logits"][...] = pi_logits
    tensors["prior.mu"][...] = means
    tensors["prior.logvar"][...] = log_variances
    print(f"epoch 0 accuracy {accuracy(y, run.model_.responsibilities(X).argmax(1)):.4f}",
          flush=True)

    def report(epoch, history):
        if epoch % 5 == 4 or epoch == 0:
            acc = accuracy(y, run.model_.responsibilities(X).argmax(1))
            print(f"epoch {epoch + 1} elbo {history['elbo'][-1]:.2f} accuracy {acc:.4f}",
                  flush=True)

    run.set_params(n_epochs=args.epochs, warm_start=True, callbacks=[report])
    run.fit(X)


if __name__ == "__main__":
    main()
