"""Model quality on Fashion-MNIST: test ELBO and importance-sampled log-likelihood.

    python bench/quality.py [--epochs 10] [--ll-rows 1000] [--ll-samples 1000]

Trains four models from the same initialisation family at an equal budget
(the same epochs, batch size, learning rate and architecture: hidden (512, 256),
Bernoulli likelihood, Adam 1e-3, batch 128):

  T=1            latent (32,)                    ELBO
  T=2 markov     latent (32, 16)                 ELBO
  T=2 ladder     latent (32, 16), ladder         ELBO
  IWAE k=5       latent (32,)                    IWAE bound, 5 draws

and reports, on the 10k test images, the mean ELBO (one draw per image,
averaged over 5 seeds) and, on the first --ll-rows test images, the
importance-sampled log-likelihood with --ll-samples draws (nats per image;
higher is better). Writes bench/results/quality.json.
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

MODELS = [
    ("T=1", dict(latent_dims=(32,))),
    ("T=2 markov", dict(latent_dims=(32, 16))),
    ("T=2 ladder", dict(latent_dims=(32, 16), inference="ladder")),
    ("IWAE k=5", dict(latent_dims=(32,), objective="iwae", n_importance_samples=5)),
]


def main(argv=None):
    parser = quality_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                               "quality.json")
    args = parser.parse_args(argv)

    X_train, X_test = fashion_mnist_split(args.train_rows)
    rows = []
    print(f"Fashion-MNIST: {len(X_train)} train, {len(X_test)} test; {args.epochs} epochs "
          f"each; log-likelihood on {args.ll_rows} test images with {args.ll_samples} draws")
    print(f"{'model':<12} {'train s':>8} {'test ELBO':>10} {'log p(x)':>10} {'active':>10}")
    for name, params in MODELS:
        vae = hvae.HierarchicalVAE(hidden_dims=(512, 256), likelihood="bernoulli",
                                   n_epochs=args.epochs, batch_size=128, learning_rate=1e-3,
                                   random_state=0, n_threads=args.threads, **params)
        start = time.perf_counter()
        vae.fit(X_train)
        seconds = time.perf_counter() - start
        elbo = float(np.mean([vae.model_.elbo(X_test, seed=s).mean() for s in range(5)]))
        ll = float(vae.log_likelihood(X_test[:args.ll_rows], n_samples=args.ll_samples).mean())
        active = vae.active_units(X_test)
        rows.append(dict(model=name, train_seconds=seconds, test_elbo=elbo,
                         test_log_likelihood=ll, active_units=active, params=
                         {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}))
        print(f"{name:<12} {seconds:8.1f} {elbo:10.2f} {ll:10.2f} {str(active):>10}", flush=True)
    out = dict(epochs=args.epochs, train_rows=len(X_train), ll_rows=args.ll_rows,
               ll_samples=args.ll_samples, threads=args.threads, blas=hvae.blas_info(),
               results=rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
