"""python -m hvae: train a VAE with a 2-D latent space on images, and show it.

Trains on scikit-learn's bundled 8x8 digits (or Fashion-MNIST with --data
fashion-mnist, when its files are on the machine), prints the ELBO as it goes
and the held-out ELBO, measures how recognisable the samples are, and writes a
picture: the ELBO curve, samples, test images with their reconstructions, and
the 2-D latent space of the test images coloured by label. Nothing is
downloaded.
"""
import argparse
import os
import sys
import time

import numpy as np

from . import HierarchicalVAE, blas_info
from ._png import tile_images, write_png
from .datasets import load_digits, load_fashion_mnist

# Per data set: the model and how to train it, chosen so that samples are
# recognisable in seconds. A 2-D latent layer needs no projection to be drawn,
# and on these images its samples are clearer than those of wider layers
# (measured: README, "Install and run").
SETTINGS = {
    "digits": dict(latent_dims=(2,), hidden_dims=(128, 128), n_epochs=200, batch_size=32,
                   image_shape=(8, 8)),
    "fashion-mnist": dict(latent_dims=(2,), hidden_dims=(256, 256), n_epochs=20,
                          batch_size=64, image_shape=(28, 28)),
}
FASHION_MNIST_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "boot"]
# A sample counts as recognisable when a logistic regression trained on the
# real images gives one class a probability above CONFIDENCE. Weakly
# regularised (C=100), so that it is confident on real images: 97% of the
# held-out digits pass (with scikit-learn's default C=1, only 82% do).
CONFIDENCE = 0.8
CLASSIFIER_C = 100.0


def _repository_fashion_mnist():
    """The project's copy beside a clone (../shared/data/fashion-mnist), or None."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(here), "shared", "data", "fashion-mnist")
    return path if os.path.isdir(path) else None


def load_data(name, seed, n_train=None):
    """(X_train, y_train, X_test, y_test, class names) of data set ``name``."""
    rng = np.random.default_rng(seed)
    if name == "digits":
        X, y = load_digits()
        order = rng.permutation(len(X))
        n_train = 1500 if n_train is None else n_train
        train, test = order[:n_train], order[n_train:]
        return X[train], y[train], X[test], y[test], [str(k) for k in range(10)]
    try:
        (X, y), (X_test, y_test) = load_fashion_mnist("train"), load_fashion_mnist("test")
    except FileNotFoundError as error:
        beside = _repository_fashion_mnist()
        if beside is None or os.environ.get("HVAE_FASHION_MNIST"):
            sys.exit(f"python -m hvae --data fashion-mnist: {error}")
        (X, y), (X_test, y_test) = (load_fashion_mnist("train", path=beside),
                                    load_fashion_mnist("test", path=beside))
    # A random subset keeps the job to seconds; --n-train 60000 uses them all.
    rows = rng.permutation(len(X))[:10000 if n_train is None else n_train]
    return X[rows], y[rows], X_test[:2000], y_test[:2000], FASHION_MNIST_CLASSES


def recognisable_fraction(samples, X, y):
    """(fraction, classifier): the fraction of ``samples`` that a logistic
    regression fitted to the real images (the first 2000 rows of X, y) assigns
    to some class with probability above CONFIDENCE, and that classifier."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    # 2000 rows are plenty for a linear classifier. One BLAS thread: on a
    # busy machine, NumPy's threads fighting over the cores made this fit
    # take 20 s instead of 1.5 s on Fashion-MNIST.
    with threadpool_limits(limits=1, user_api="blas"):
        classifier = LogisticRegression(C=CLASSIFIER_C, max_iter=5000).fit(X[:2000], y[:2000])
    fraction = float(np.mean(classifier.predict_proba(samples).max(axis=1) > CONFIDENCE))
    return fraction, classifier


def draw(vae, X_test, y_test, class_names, image_shape, path, seed):
    """Write the four-panel picture to ``path`` with matplotlib (no display)."""
    from matplotlib.figure import Figure

    from .plot import plot_history, plot_latent, plot_reconstructions, plot_samples

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    curve, samples, reconstructions, latent = (fig.add_subplot(grid[i, j])
                                               for i in range(2) for j in range(2))
    plot_history(vae, ax=curve)
    curve.set_title("ELBO per epoch (nats per image; higher is better)")
    plot_samples(vae, 64, n_cols=8, image_shape=image_shape, random_state=seed,
                 cmap="gray_r", ax=samples)
    samples.set_title("64 samples: z ~ N(0, I), then the mean of p(x | z)")
    plot_reconstructions(vae, X_test, n=32, n_cols=8, image_shape=image_shape, cmap="gray_r",
                         ax=reconstructions)
    reconstructions.set_title("32 test images, each row above its reconstructions")
    plot_latent(vae, X_test, np.asarray(class_names)[y_test], ax=latent, s=10)
    latent.set_title("posterior means of the test images, by label")
    fig.savefig(path, dpi=90)


def write_plain_png(vae, X_test, image_shape, path, seed):
    """Without matplotlib: samples, then test images and reconstructions."""
    samples = vae.sample(32, random_state=seed)
    reconstructions = vae.reconstruct(X_test[:16])
    grid = np.vstack([tile_images(samples, image_shape, 16),
                      tile_images(np.vstack([X_test[:16], reconstructions]), image_shape, 16)])
    write_png(path, np.kron(grid, np.ones((4, 4))))


def build_parser():
    """The command line of ``python -m hvae``."""
    parser = argparse.ArgumentParser(
        prog="python -m hvae", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--data", choices=sorted(SETTINGS), default="digits",
                        help="the images: scikit-learn's bundled digits (default), or "
                             "Fashion-MNIST read from $HVAE_FASHION_MNIST, "
                             "/usr/share/datasets/fashion-mnist (Debian's "
                             "dataset-fashion-mnist) or ../shared/data/fashion-mnist beside "
                             "the repository")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training images (default: 200 for the digits, "
                             "20 for Fashion-MNIST)")
    parser.add_argument("--latent-dims", type=int, nargs="+", default=None, metavar="D",
                        help="size of each latent layer, bottom to top (default: 2, "
                             "one layer drawn as is; wider layers are drawn through their "
                             "first two principal components)")
    parser.add_argument("--hidden-dims", type=int, nargs="*", default=None, metavar="H",
                        help="hidden layer sizes of every encoder and decoder block "
                             "(default: 128 128 for the digits, 256 256 for Fashion-MNIST)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per gradient step (default: 32 for the digits, 64 for "
                             "Fashion-MNIST)")
    parser.add_argument("--n-train", type=int, default=None,
                        help="training images (default: 1500 of the 1797 digits, the rest "
                             "held out; 10000 of Fashion-MNIST's 60000, tested on 2000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the initial parameters and the samples")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of hvae's own pool (default: 1; a network this small "
                             "gains little from more, and one thread stays fast on a busy "
                             "machine)")
    parser.add_argument("--output", default=None,
                        help="PNG file for the picture (default: hvae_digits.png or "
                             "hvae_fashion-mnist.png)")
    parser.add_argument("--quiet", action="store_true", help="no line per epoch")
    return parser


def main(argv=None):
    """Run the job; returns a dict of what it measured (for tests)."""
    args = build_parser().parse_args(argv)

    settings = dict(SETTINGS[args.data])
    image_shape = settings.pop("image_shape")
    for name in ("latent_dims", "hidden_dims"):
        if getattr(args, name) is not None:
            settings[name] = tuple(getattr(args, name))
    if args.epochs is not None:
        settings["n_epochs"] = args.epochs
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    output = args.output or f"hvae_{args.data}.png"

    X_train, y_train, X_test, y_test, class_names = load_data(args.data, args.seed, args.n_train)
    print(f"hvae on {args.data}: {X_train.shape[0]} train / {X_test.shape[0]} test images of "
          f"{X_train.shape[1]} pixels; BLAS: {blas_info()}")
    vae = HierarchicalVAE(likelihood="bernoulli", random_state=args.seed, n_threads=args.threads,
                          **settings)
    print(f"model: latent_dims={vae.latent_dims}, hidden_dims={vae.hidden_dims}, "
          f"{vae.n_epochs} epochs of batches of {vae.batch_size}")
    every = max(1, vae.n_epochs // 10)

    def report(epoch, history):
        if not args.quiet and (epoch + 1) % every == 0:
            print(f"epoch {epoch + 1:4d}/{vae.n_epochs}: ELBO {history['elbo'][epoch]:8.3f}, "
                  f"held-out {history['val_elbo'][epoch]:8.3f} nats per image")

    vae.set_params(callbacks=[report])
    start = time.perf_counter()
    vae.fit(X_train, validation_data=X_test)
    seconds = time.perf_counter() - start
    vae.set_params(callbacks=None)
    print(f"trained {vae.n_iter_} epochs in {seconds:.2f} s "
          f"({vae.n_iter_ * len(X_train) / seconds:,.0f} images/s)")
    test_elbo = vae.score(X_test)
    print(f"held-out ELBO: {test_elbo:.3f} nats per image "
          f"(training ELBO in the last epoch: {vae.history_['elbo'][-1]:.3f})")
    active = vae.active_units(X_test)
    print(f"active latent units per layer: {active} of {list(vae.latent_dims)}")

    samples = vae.sample(100, random_state=args.seed)
    fraction, classifier = recognisable_fraction(samples, X_train, y_train)
    real = float(np.mean(classifier.predict_proba(X_test).max(axis=1) > CONFIDENCE))
    print(f"recognisable samples: a logistic regression trained on the real training images "
          f"assigns {fraction:.0%} of 100 samples to a class with probability above "
          f"{CONFIDENCE} ({real:.0%} of the real test images)")

    try:
        draw(vae, X_test, y_test, class_names, image_shape, output, args.seed)
        print(f"wrote {output}: the ELBO curve, samples, reconstructions and the latent space")
    except ImportError:
        write_plain_png(vae, X_test, image_shape, output, args.seed)
        print(f"wrote {output}: two rows of samples, then 16 test images and their "
              f"reconstructions (pip install matplotlib for the full picture)")
    return {"model": vae, "seconds": seconds, "test_elbo": test_elbo, "active_units": active,
            "recognisable": fraction, "recognisable_real": real, "output": output}


if __name__ == "__main__":
    main()
