"""The VampPrior against the standard prior on Fashion-MNIST, at an equal budget.

    python bench/vamp.py [--epochs 10] [--pseudo-inputs 500 100] [--ll-rows 1000]

Trains, from the same seed and with the same budget as bench/quality.py's
T=1 model (latent (32,), hidden (512, 256), Bernoulli likelihood, Adam 1e-3,
batch 128, --epochs epochs on the 60,000 training images):

  standard       prior='standard'    p(z) = N(0, I)
  vamp K=...     prior='vamp'        p(z) = (1/K) sum_k q(z | u_k), K learned
                                     pseudo-inputs, started at random
                                     training rows

and reports the mean test ELBO (10,000 test images, one draw each, averaged
over 5 seeds), the importance-sampled log-likelihood with --ll-samples draws
on the first --ll-rows test images (nats per image; higher is better), the
training and evaluation wall times and the active units. Writes
bench/results/vamp.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hvae  # noqa: E402
from data import fashion_mnist_split, quality_arguments  # noqa: E402


def main(argv=None):
    parser = quality_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                               "vamp.json")
    parser.add_argument("--pseudo-inputs", type=int, nargs="+", default=[500])
    args = parser.parse_args(argv)

    X_train, X_test = fashion_mnist_split(args.train_rows)
    models = [("standard", dict(prior="standard"))]
    models += [(f"vamp K={K}", dict(prior="vamp", n_pseudo_inputs=K))
               for K in args.pseudo_inputs]
    print(f"Fashion-MNIST: {len(X_train)} train, {len(X_test)} test; {args.epochs} epochs "
          f"each; log-likelihood on {args.ll_rows} test images with {args.ll_samples} draws")
    print(f"{'model':<12} {'train s':>8} {'eval s':>7} {'test ELBO':>10} {'log p(x)':>10} "
          f"{'active':>7}")
    rows = []
    for name, params in models:
        vae = hvae.HierarchicalVAE(latent_dims=(32,), hidden_dims=(512, 256),
                                   likelihood="bernoulli", n_epochs=args.epochs,
                                   batch_size=128, learning_rate=1e-3, random_state=0,
                                   n_threads=args.threads, **params)
        start = time.perf_counter()
        vae.fit(X_train)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        elbo = float(np.mean([vae.model_.elbo(X_test, seed=s).mean() for s in range(5)]))
        ll = float(vae.log_likelihood(X_test[:args.ll_rows], n_samples=args.ll_samples).mean())
        eval_seconds = time.perf_counter() - start
        active = vae.active_units(X_test)
        rows.append(dict(model=name, train_seconds=train_seconds, eval_seconds=eval_seconds,
                         test_elbo=elbo, test_log_likelihood=ll, active_units=active,
                         train_elbo_last_epoch=vae.history_["elbo"][-1], params=params))
        print(f"{name:<12} {train_seconds:8.1f} {eval_seconds:7.1f} {elbo:10.2f} {ll:10.2f} "
              f"{str(active):>7}", flush=True)
    out = dict(epochs=args.epochs, train_rows=len(X_train), ll_rows=args.ll_rows,
               ll_samples=args.ll_samples, threads=args.threads, blas=hvae.blas_info(),
               architecture=dict(latent_dims=[32], hidden_dims=[512, 256],
                                 likelihood="bernoulli", batch_size=128,
                                 learning_rate=1e-3, random_state=0),
               results=rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
