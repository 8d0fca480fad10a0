"""Clustering quality of hvae.VaDE against KMeans and GaussianMixture.

    python bench/clustering.py [--datasets digits,mnist,fashion] [--threads 2]
                               [--scale 1.0]

For each data set, clusters every row into 10 clusters (the classes are used
only to score) and reports clustering accuracy (the best one-to-one matching
of clusters to classes, Hungarian algorithm: scipy's linear_sum_assignment),
normalised mutual information and adjusted Rand index, with wall time:

  KMeans raw          KMeans(10, n_init=10) on the pixels
  GMM raw (diag)      GaussianMixture(10, covariance_type='diag') on the pixels
  KMeans PCA          KMeans(10, n_init=10) on PCA(n_pca) features
  GMM PCA (full)      GaussianMixture(10, covariance_type='full') on PCA(n_pca)
  GMM t-SNE PCA       GaussianMixture(10, 'full', n_init=5) on a 2-D t-SNE map of
                      PCA(n_pca): VaDE's default initialisation applied to PCA
                      features instead of the network's codes
  VaDE                hvae.VaDE (settings in CONFIGS; Bernoulli likelihood)

Data: scikit-learn's 1797 digits (8x8); the 10,000 MNIST test images
(/work/shared/data/mnist-test or HVAE_MNIST); the 10,000 Fashion-MNIST test
images. The published VaDE accuracy on all 70,000 MNIST images (Jiang et
al. 2017; 500-500-2000 networks, autoencoder pretraining, 300 epochs) is
94.46%, quoted for scale. --scale multiplies every epoch count (a quick run:
--scale 0.2). Writes bench/results/clustering.json.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.mixture import GaussianMixture

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's hvae, not an installed one

import hvae  # noqa: E402
from hvae._native import COVARIANCE_TYPES  # noqa: E402
from hvae.datasets import load_digits, load_fashion_mnist, load_mnist  # noqa: E402
from hvae.metrics import clustering_accuracy  # noqa: E402

PUBLISHED_VADE_MNIST = 0.9446  # Jiang et al. 2017, all 70k MNIST images

#: VaDE's settings per data set (epoch counts before --scale).
CONFIGS = {
    "digits": dict(latent_dims=(8,), hidden_dims=(256, 256), pretrain_epochs=100,
                   n_epochs=20, n_init=1, batch_size=32),
    "mnist": dict(latent_dims=(10,), hidden_dims=(500, 500), pretrain_epochs=20,
                  n_epochs=30, n_init=1, batch_size=100),
    "fashion": dict(latent_dims=(10,), hidden_dims=(500, 500), pretrain_epochs=100,
                    n_epochs=30, n_init=1, batch_size=100),
}
N_PCA = {"digits": 20, "mnist": 50, "fashion": 50}



def scores(y, labels, seconds):
    return {"accuracy": clustering_accuracy(y, labels),
            "nmi": float(normalized_mutual_info_score(y, labels)),
            "ari": float(adjusted_rand_score(y, labels)),
            "seconds": float(seconds),
            "clusters_used": int(len(np.unique(labels)))}


def load(name):
    if name == "digits":
        return load_digits()
    if name == "mnist":
        path = os.environ.get("HVAE_MNIST", "/work/shared/data/mnist-test")
        return load_mnist("test", path=path)
    if name == "fashion":
        path = os.environ.get("HVAE_FASHION_MNIST", "/work/shared/data/fashion-mnist")
        return load_fashion_mnist("test", path=path)
    raise ValueError(f"unknown data set {name!r}")


def timed(fit_predict):
    start = time.perf_counter()
    labels = fit_predict()
    return np.asarray(labels), time.perf_counter() - start


def run(name, threads, scale, seed=0, baselines=None, vade_seeds=(0,), covariance_type=None):
    X, y = load(name)
    X64 = X.astype(np.float64)
    results = {}
    features = PCA(N_PCA[name], random_state=seed).fit_transform(X64)
    methods = {
        "KMeans raw": lambda: KMeans(10, n_init=10, random_state=seed).fit_predict(X64),
        "GMM raw (diag)": lambda: GaussianMixture(10, covariance_type="diag",
                                                  random_state=seed).fit_predict(X64),
        f"KMeans PCA{N_PCA[name]}": lambda: KMeans(10, n_init=10,
                                                   random_state=seed).fit_predict(features),
        f"GMM PCA{N_PCA[name]} (full)": lambda: GaussianMixture(
            10, covariance_type="full", random_state=seed).fit_predict(features),
        f"GMM t-SNE PCA{N_PCA[name]}": lambda: GaussianMixture(
            10, covariance_type="full", n_init=5, random_state=seed).fit_predict(
                TSNE(2, init="pca", random_state=seed, n_jobs=1).fit_transform(features)),
    }
    for method, fit_predict in methods.items():
        if baselines is not None and method in baselines:  # --reuse-baselines
            results[method] = dict(baselines[method], reused=True)
        else:
            labels, seconds = timed(fit_predict)
            results[method] = scores(y, labels, seconds)
        print(f"  {method:<20} " + report(results[method]), flush=True)
    config = dict(CONFIGS[name])
    config["pretrain_epochs"] = max(1, round(config["pretrain_epochs"] * scale))
    config["n_epochs"] = max(1, round(config["n_epochs"] * scale))
    if covariance_type is not None:
        config["covariance_type"] = covariance_type
    runs = []
    for vade_seed in vade_seeds:
        vade = hvae.VaDE(10, likelihood="bernoulli", random_state=vade_seed,
                         n_threads=threads, **config)
        labels, seconds = timed(lambda: vade.fit(X).labels_)
        runs.append(dict(scores(y, labels, seconds), random_state=vade_seed,
                         train_elbo=float(vade.score(X))))
        print(f"  {'VaDE seed %d' % vade_seed:<20} " + report(runs[-1]), flush=True)
    # Several seeds: the means (and each run), since n_init's ELBO does not pick
    # the better clustering (see the README).
    results["VaDE"] = {key: float(np.mean([r[key] for r in runs]))
                       for key in ("accuracy", "nmi", "ari", "seconds", "train_elbo")}
    results["VaDE"].update(runs=runs, accuracy_min=min(r["accuracy"] for r in runs),
                           accuracy_max=max(r["accuracy"] for r in runs))
    results["VaDE"]["settings"] = {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in vade.get_params().items()
                                   if k not in ("callbacks", "random_state")}
    if len(runs) > 1:
        print(f"  {'VaDE mean':<20} " + report(results["VaDE"]), flush=True)
    return {"n_rows": int(len(X)), "n_features": int(X.shape[1]), "methods": results}


def report(r):
    return (f"acc {100 * r['accuracy']:5.1f}%  NMI {r['nmi']:.3f}  ARI {r['ari']:.3f}  "
            f"{r['seconds']:7.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist,fashion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", default=str(HERE / "results" / "clustering.json"))
    parser.add_argument("--seeds", default="0",
                        help="VaDE's random_state values, comma-separated: the VaDE row "
                             "is their mean")
    parser.add_argument("--covariance-type", choices=COVARIANCE_TYPES, default=None,
                        help="VaDE's covariance_type (default: VaDE's)")
    parser.add_argument("--reuse-baselines", action="store_true",
                        help="copy the baselines (deterministic, seed 0) from the existing "
                             "--json file instead of recomputing them; only VaDE runs")
    args = parser.parse_args(argv)
    previous = json.loads(Path(args.json).read_text()) if args.reuse_baselines else None
    out = {"threads": args.threads, "scale": args.scale, "blas": hvae.blas_info(),
           "published_vade_mnist_70k_accuracy": PUBLISHED_VADE_MNIST,
           # --reuse-baselines keeps the data sets not run this time.
           "datasets": dict(previous["datasets"]) if previous else {}}
    for name in args.datasets.split(","):
        print(f"{name}:", flush=True)
        reused = (previous["datasets"].get(name, {}).get("methods") if previous else None)
        out["datasets"][name] = run(name, args.threads, args.scale, baselines=reused,
                                    vade_seeds=[int(v) for v in args.seeds.split(",")],
                                    covariance_type=args.covariance_type)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"published VaDE on the 70k MNIST images: {100 * PUBLISHED_VADE_MNIST:.1f}%")


if __name__ == "__main__":
    main()
