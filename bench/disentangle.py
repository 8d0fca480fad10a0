"""Disentanglement on the sprites, and the density-ratio prior on Fashion-MNIST.

    python bench/disentangle.py [--part sprites|prior|all] [--epochs 10]

Part "sprites": four models at an equal budget on ``make_sprites(n_train,
image_size=32)`` (a dSprites imitation with known factors): the same
architecture (latent (10,), hidden (256,) or --hidden, Bernoulli likelihood), the same
epochs, batch 64, Adam 1e-3, random_state --seed (default 0):

  VAE            beta = 1
  beta-VAE       beta = 4
  FactorVAE      tc_weight = gamma (--gamma, default 35, the FactorVAE paper's
                 dSprites value), discriminator (256, 256), Adam 1e-4, betas (0.5, 0.9)
  beta-TCVAE     tcvae_weights = (1, --tcvae-beta (default 6), 1)

With --checkpoints E1,E2 the same fits are also measured after E1, E2
epochs (the trend over steps; the JSON's "trend"). Reports per model: the FactorVAE metric (hvae.metrics.factor_vae_score on
posterior means; 2000 train / 1000 eval votes of batch 64, variances from
5000 images: smaller than disentanglement_lib's 10000 / 5000 / 10000 for the
time), MIG (10000 images, 20 bins), the held-out reconstruction log p(x|z)
and ELBO (2000 fresh sprites), the active units, the TC estimate of the
FactorVAE discriminator, and the training time. Writes
bench/results/disentangle.json.

Part "prior": on Fashion-MNIST (60000 train, 10000 test), latent (16,),
hidden (256,), Bernoulli, batch 128, the same epochs (--prior-epochs, default
5) for the standard N(0, I) prior and prior='density_ratio' (discriminator
(256, 256), Adam 1e-4, betas (0.5, 0.9)); reports the test ELBO, the importance-
sampled log-likelihood (--ll-rows test images, --ll-samples draws), for the
density-ratio prior also the log-normaliser log E_N(0,I)[exp T] of its
unnormalised prior N exp(T) (200000 draws) and the log-likelihood corrected
by it, and the sample quality as the fraction of 2000 samples that a logistic
regression fitted to real images assigns to a class with probability above
0.8 (``python -m hvae``'s recognisable fraction; real test images score
about 0.8). Writes bench/results/density_ratio_prior.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# This checkout's hvae before any installed one (as bench/mpi.py does).
for _path in (str(HERE.parent), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import hvae  # noqa: E402
from hvae.datasets import Sprites, load_fashion_mnist, make_sprites  # noqa: E402
from hvae.metrics import factor_vae_score, mutual_info_gap, sample_codes  # noqa: E402


def sprite_models(gamma, tcvae_beta, discriminator_lr):
    lr = "" if discriminator_lr == 1e-4 else f", D lr {discriminator_lr:g}"
    return [
        ("VAE", dict()),
        ("beta-VAE (beta=4)", dict(beta=4.0)),
        (f"FactorVAE (gamma={gamma:g}{lr})",
         dict(tc_weight=gamma, discriminator_learning_rate=discriminator_lr)),
        (f"beta-TCVAE (1, {tcvae_beta:g}, 1)", dict(tcvae_weights=(1.0, tcvae_beta, 1.0))),
    ]


def evaluate_sprites(vae, X_test, dataset):
    """The metrics of one fitted model (see the module docstring)."""
    terms = vae.model_.elbo_terms(X_test)
    fvae = factor_vae_score(vae.transform, dataset, n_train=2000, n_eval=1000,
                            n_variance_estimate=5000, random_state=0)
    codes, factors = sample_codes(vae.transform, dataset, 10000, random_state=0)
    mig, details = mutual_info_gap(codes, factors, return_details=True)
    tc = vae.history_.get("discriminator_log_ratio", [float("nan")])[-1]
    return dict(epochs=len(vae.history_["elbo"]),
                steps=int(sum(vae.history_["n_batches"])),
                factor_vae_score=float(fvae), mig=float(mig),
                mig_gap_per_factor=[round(float(g), 4) for g in details["gap_per_factor"]],
                mig_best_code=[int(c) for c in details["best_code"]],
                test_reconstruction=float(np.mean(terms["reconstruction"])),
                test_elbo=float(np.mean(terms["elbo"])),
                active_units=vae.active_units(X_test)[0], tc_estimate_last_epoch=tc,
                train_elbo_last_epoch=vae.history_["elbo"][-1])


def run_sprites(args):
    X, _ = make_sprites(args.n_train, image_size=32, random_state=0)
    X_test, _ = make_sprites(2000, image_size=32, random_state=1)
    dataset = Sprites(image_size=32)
    checkpoints = sorted({int(e) for e in args.checkpoints.split(",") if e} | {args.epochs})
    hidden = tuple(int(h) for h in args.hidden.split(","))
    rows = []
    path = Path(args.json) if args.json else HERE / "results" / "disentangle.json"
    print(f"sprites 32x32: {len(X)} train images, {args.epochs} epochs per model "
          f"(metrics after epochs {checkpoints})")
    print(f"{'model':<26} {'epochs':>6} {'train s':>8} {'FVAE':>6} {'MIG':>6} {'rec':>8} "
          f"{'ELBO':>8} {'active':>6} {'TC est':>7}")
    models = sprite_models(args.gamma, args.tcvae_beta, args.discriminator_lr)
    if args.models:
        models = [models[int(k)] for k in args.models.split(",")]
    for name, params in models:
        vae = hvae.HierarchicalVAE(latent_dims=(10,), hidden_dims=hidden,
                                   likelihood="bernoulli", batch_size=64, learning_rate=1e-3,
                                   random_state=args.seed, n_threads=args.threads,
                                   warm_start=True, **params)
        seconds, done, trend = 0.0, 0, []
        for epochs in checkpoints:
            start = time.perf_counter()
            vae.set_params(n_epochs=epochs - done).fit(X)
            seconds += time.perf_counter() - start
            done = epochs
            point = dict(evaluate_sprites(vae, X_test, dataset), train_seconds=seconds)
            trend.append(point)
            print(f"{name:<26} {epochs:6d} {seconds:8.1f} {point['factor_vae_score']:6.3f} "
                  f"{point['mig']:6.3f} {point['test_reconstruction']:8.2f} "
                  f"{point['test_elbo']:8.2f} {point['active_units']:6d} "
                  f"{point['tc_estimate_last_epoch']:7.3f}", flush=True)
        row = dict(model=name, params={k: list(v) if isinstance(v, tuple) else v
                                       for k, v in params.items()}, **trend[-1], trend=trend)
        rows.append(row)
        out = dict(data="make_sprites(image_size=32)", n_train=len(X), n_test=len(X_test),
                   epochs=args.epochs, batch_size=64, latent_dims=[10], hidden_dims=list(hidden),
                   learning_rate=1e-3, threads=args.threads, seed=args.seed,
                   metrics=dict(factor_vae_score=dict(n_train=2000, n_eval=1000,
                                                      n_variance_estimate=5000, batch_size=64),
                                mig=dict(n_samples=10000, n_bins=20)),
                   results=rows)
        path.write_text(json.dumps(out, indent=2))  # after every model: partial results
    print(f"wrote {path}")


def recognisable(samples, X, y):
    from hvae.__main__ import recognisable_fraction
    return recognisable_fraction(samples, X, y)[0]


def log_normaliser(model, n_draws=200000, seed=0):
    """log E_N(0,I)[exp T(z)] by Monte Carlo: the density-ratio prior
    N(0, I) exp(T) integrates to this (0 when T is the exact log-ratio)."""
    rng = np.random.default_rng(seed)
    d = model.latent_dims[-1]
    t = model.discriminator_log_ratio(rng.standard_normal((n_draws, d)).astype(np.float32))
    t = t.astype(np.float64)
    mx = t.max()
    return float(mx + np.log(np.mean(np.exp(t - mx))))


def run_prior(args):
    from data import find_fashion_mnist
    path = find_fashion_mnist()
    X, y = load_fashion_mnist("train", path=path)
    X_test, y_test = load_fashion_mnist("test", path=path)
    rows = []
    print(f"Fashion-MNIST: {len(X)} train, {args.prior_epochs} epochs per model")
    for prior in ("standard", "density_ratio"):
        vae = hvae.HierarchicalVAE(latent_dims=(16,), hidden_dims=(256,),
                                   likelihood="bernoulli", n_epochs=args.prior_epochs,
                                   batch_size=128,
                                   learning_rate=1e-3, random_state=0, n_threads=args.threads,
                                   prior=prior)
        start = time.perf_counter()
        vae.fit(X)
        seconds = time.perf_counter() - start
        elbo = float(vae.score(X_test))
        ll = float(vae.log_likelihood(X_test[:args.ll_rows], n_samples=args.ll_samples).mean())
        samples = vae.sample(2000, random_state=0)
        row = dict(prior=prior, train_seconds=seconds, test_elbo=elbo,
                   test_log_likelihood=ll, recognisable_fraction=recognisable(samples, X, y),
                   active_units=vae.active_units(X_test)[0])
        if prior == "density_ratio":
            log_z = log_normaliser(vae.model_)
            row.update(log_normaliser=log_z, test_log_likelihood_normalised=ll - log_z,
                       discriminator_accuracy_last_epoch=vae.history_[
                           "discriminator_accuracy"][-1],
                       kl_aggregate_estimate_last_epoch=vae.history_[
                           "discriminator_log_ratio"][-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    real = recognisable(X_test[:2000], X, y)
    out = dict(data="Fashion-MNIST", epochs=args.prior_epochs, latent_dims=[16],
               hidden_dims=[256], batch_size=128, ll_rows=args.ll_rows, ll_samples=args.ll_samples,
               real_images_recognisable_fraction=real, threads=args.threads, results=rows)
    path = HERE / "results" / "density_ratio_prior.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"real test images recognisable: {real:.3f}; wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("sprites", "prior", "all"), default="all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--prior-epochs", type=int, default=5)
    parser.add_argument("--hidden", default="256",
                        help="the encoder's and decoder's hidden widths, e.g. 512,512")
    parser.add_argument("--checkpoints", default="",
                        help="epochs after which to measure too, e.g. 3,10 (a trend)")
    parser.add_argument("--gamma", type=float, default=35.0)
    parser.add_argument("--tcvae-beta", type=float, default=6.0)
    parser.add_argument("--discriminator-lr", type=float, default=1e-4)
    parser.add_argument("--models", default="",
                        help="indices into the four sprite models, e.g. 2 (default: all)")
    parser.add_argument("--json", default="", help="the sprites part's output file")
    parser.add_argument("--seed", type=int, default=0, help="the sprites models' random_state")
    parser.add_argument("--ll-rows", type=int, default=1000)
    parser.add_argument("--ll-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    (HERE / "results").mkdir(exist_ok=True)
    if args.part in ("sprites", "all"):
        run_sprites(args)
    if args.part in ("prior", "all"):
        run_prior(args)


if __name__ == "__main__":
    main()
