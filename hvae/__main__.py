"""python -m hvae: train a VAE on scikit-learn's bundled digits.

Prints the ELBO of every epoch and the held-out ELBO, and writes a picture of
samples and reconstructions. Nothing is downloaded.
"""
import argparse
import time

import numpy as np

from . import HierarchicalVAE, blas_info
from ._png import tile_images, write_png
from .datasets import load_digits


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvae", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[8])
    parser.add_argument("--hidden-dims", type=int, nargs="*", default=[128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="hvae_digits_samples.png",
                        help="PNG file for the samples and reconstructions")
    args = parser.parse_args(argv)

    X, y = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X))
    X_train, X_test = X[order[:1500]], X[order[1500:]]
    print(f"hvae on scikit-learn digits: {X_train.shape[0]} train / {X_test.shape[0]} test "
          f"rows of {X.shape[1]} pixels; BLAS: {blas_info()}")
    vae = HierarchicalVAE(latent_dims=tuple(args.latent_dims), hidden_dims=tuple(args.hidden_dims),
                          likelihood="bernoulli", n_epochs=args.epochs, batch_size=64,
                          random_state=args.seed, verbose=2)
    start = time.perf_counter()
    vae.fit(X_train)
    seconds = time.perf_counter() - start
    print(f"trained {vae.n_iter_} epochs in {seconds:.2f} s "
          f"({vae.n_iter_ * len(X_train) / seconds:,.0f} samples/s)")
    print(f"held-out ELBO: {vae.score(X_test):.3f} nats per image "
          f"(training ELBO in the last epoch: {vae.history_['elbo'][-1]:.3f})")

    samples = vae.sample(32, random_state=args.seed)
    reconstructions = vae.reconstruct(X_test[:16])
    grid = np.vstack([tile_images(samples, (8, 8), 16),
                      tile_images(np.vstack([X_test[:16], reconstructions]), (8, 8), 16)])
    write_png(args.output, np.kron(grid, np.ones((4, 4))))
    print(f"wrote {args.output}: two rows of samples, then 16 test digits and their "
          "reconstructions")


if __name__ == "__main__":
    main()
