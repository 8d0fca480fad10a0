"""Discrete latents on Fashion-MNIST: a categorical VAE against a Gaussian VAE
and against its PyTorch peer, and the gradient estimators' variance.

    python bench/discrete.py [--epochs 5] [--ll-rows 500] [--ll-samples 500]

Models (hidden (512, 256), Bernoulli likelihood, Adam 1e-3, batch 128, the
same epochs):

  categorical   30 variables x 10 classes, Gumbel-softmax with
                tau = max(0.5, exp(-3e-5 step)) (Jang et al.)
  gaussian      32 Gaussian units, reparameterisation
  torch         bench/peer_torch_discrete.py: the categorical model in
                PyTorch (same relaxation, annealing, optimizer; fused Adam),
                eager and with its loss through torch.compile (compiled
                before the first epoch; the compile time is reported apart)

Training interleaves the epochs (hvae categorical, torch eager, torch
compiled, hvae Gaussian, then the next epoch), so the load of the shared
machine falls on all of them alike; throughput is training rows per median
epoch second, and "the peer" is the faster of its eager and compiled forms
(as bench/run.py takes it, issue 17). Each epoch records the share of the
machine's CPU time other processes used meanwhile (bench/run.py's
LoadMeter), so that a noisy run says so. Every model is
scored on the 10k test images: the mean ELBO with one exact draw per image
(Gumbel-max for categorical layers, averaged over 3 seeds) and, on the first
--ll-rows images, the importance-sampled log-likelihood with --ll-samples
draws. Then the gradient estimators on one minibatch of 128 test images at
the trained models (hvae.gradient_variance): total variance (trace of the
covariance of one estimate), |mean|, and for the categorical model the bias
|mean - reference|, the reference being the mean of many score-function
estimates with the leave-one-out baseline (unbiased), whose own standard
error is reported. Writes bench/results/discrete.json.

torch runs with OMP_WAIT_POLICY=PASSIVE (set here before torch loads unless
the environment says otherwise): on a loaded machine OpenMP's spinning
threads made it 5-10x slower, and the peer should be at its best.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import hvae  # noqa: E402
from data import fashion_mnist_split, quality_arguments  # noqa: E402
from run import LoadMeter  # noqa: E402

ANNEAL = dict(temperature=1.0, temperature_min=0.5, temperature_decay=3e-5)


def hvae_models(seed):
    cat = hvae.Model(784, (30,), (512, 256), likelihood="bernoulli",
                     latent_family="categorical", n_categories=10, seed=seed)
    gauss = hvae.Model(784, (32,), (512, 256), likelihood="bernoulli", seed=seed)
    return cat, gauss


def hvae_epoch(model, X, **options):
    start = time.perf_counter()
    record = model.fit(X, n_epochs=1, batch_size=128, learning_rate=1e-3, **options)[-1]
    return record["elbo"], time.perf_counter() - start


def variance_table(cat, gauss, X, n_draws, reference_draws):
    """Rows of the estimator table on the minibatch X."""
    rows = []

    def add(model_name, model, label, **options):
        start = time.perf_counter()
        s = hvae.gradient_variance(model, X, n_draws=n_draws, seed=1000, **options)
        rows.append(dict(model=model_name, estimator=label, options=options,
                         total_variance=s["total_variance"], mean_norm=s["mean_norm"],
                         mean=s["mean"], seconds=time.perf_counter() - start))
        print(f"  {model_name:<12} {label:<34} total variance {s['total_variance']:12.4g}  "
              f"|mean| {s['mean_norm']:9.4g}", flush=True)

    print(f"gradient estimators on one minibatch of {len(X)} test images, "
          f"{n_draws} draws each:")
    for tau in (2.0, 1.0, 0.5, 0.25, 0.1):
        add("categorical", cat, f"gumbel_softmax tau={tau}", temperature=tau)
    add("categorical", cat, "gumbel_softmax straight-through tau=0.5", temperature=0.5,
        straight_through=True)
    add("categorical", cat, "score_function, no baseline",
        gradient_estimator="score_function", score_baseline="none")
    add("categorical", cat, "score_function, running mean",
        gradient_estimator="score_function", score_baseline="running_mean")
    add("categorical", cat, "score_function, leave-one-out (S=4)",
        gradient_estimator="score_function", score_baseline="leave_one_out", n_samples=4)
    add("gaussian", gauss, "reparameterization")
    add("gaussian", gauss, "score_function, no baseline",
        gradient_estimator="score_function", score_baseline="none")
    add("gaussian", gauss, "score_function, running mean",
        gradient_estimator="score_function", score_baseline="running_mean")
    add("gaussian", gauss, "score_function, leave-one-out (S=4)",
        gradient_estimator="score_function", score_baseline="leave_one_out", n_samples=4)

    # Unbiased references for the bias column: many leave-one-out score-
    # function draws of 8 samples (categorical), reparameterisation (Gaussian).
    refs = {}
    for name, model, options in (
            ("categorical", cat, dict(gradient_estimator="score_function",
                                      score_baseline="leave_one_out", n_samples=8)),
            ("gaussian", gauss, dict(n_samples=8))):
        s = hvae.gradient_variance(model, X, n_draws=reference_draws, seed=50000, **options)
        refs[name] = (s["mean"], float(np.sqrt(np.sum(s["variance"]) / reference_draws)))
    for row in rows:
        mean = row.pop("mean")
        ref, ref_se = refs[row["model"]]
        row["bias"] = float(np.linalg.norm(mean - ref))
        # |mean - ref| of an unbiased estimator is about sqrt(its variance /
        # n_draws + the reference's squared standard error).
        row["bias_noise_floor"] = float(math.sqrt(row["total_variance"] / n_draws
                                                  + ref_se ** 2))
        row["reference_standard_error"] = ref_se
    return rows


def main(argv=None):
    parser = quality_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                               "discrete.json", epochs=5, ll_rows=500, ll_samples=500)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--reference-draws", type=int, default=300)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--throughput-only", action="store_true",
                        help="time the interleaved epochs only (no scores, no variance table)")
    args = parser.parse_args(argv)

    X_train, X_test = fashion_mnist_split(args.train_rows)
    cat, gauss = hvae_models(0)
    cat.n_threads = gauss.n_threads = args.threads
    keys = ["hvae categorical", "torch categorical", "torch categorical compiled",
            "hvae gaussian"]
    if args.no_torch:
        keys = [k for k in keys if not k.startswith("torch")]
    seconds = {key: [] for key in keys}
    train_elbo = {key: [] for key in keys}
    foreign = {key: [] for key in keys}  # other processes' CPU share per epoch
    cpu = {key: [] for key in keys}  # this process's CPU seconds per epoch
    trainers, compile_seconds, compile_foreign = {}, None, None
    if not args.no_torch:
        import copy

        import torch

        from peer_torch_discrete import Trainer, TorchCategoricalVAE
        from peer_torch_discrete import log_likelihood as torch_ll
        from peer_torch_discrete import score_samples as torch_score

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        peer = TorchCategoricalVAE(784)
        Xt_train = torch.from_numpy(X_train)
        for key, compiled in (("torch categorical", False),
                              ("torch categorical compiled", True)):
            trainers[key] = Trainer(peer if not compiled else copy.deepcopy(peer), Xt_train,
                                    batch_size=128, lr=1e-3, tau0=1.0, tau_min=0.5,
                                    rate=3e-5, compile=compiled)
        meter = LoadMeter()
        compile_seconds = trainers["torch categorical compiled"].warm_up()
        compile_foreign = meter.foreign_share()
        print(f"torch.compile of the peer's loss: {compile_seconds:.1f} s "
              f"(other processes' CPU share {compile_foreign})", flush=True)
    print(f"Fashion-MNIST: {len(X_train)} train, {len(X_test)} test; {args.epochs} "
          f"interleaved epochs; {args.threads} threads; load average {os.getloadavg()}")
    load_before = os.getloadavg()
    for epoch in range(args.epochs):
        for key in keys:
            meter, times = LoadMeter(), os.times()
            if key in trainers:
                elbo, s = trainers[key].epoch()
            else:
                model = cat if key == "hvae categorical" else gauss
                elbo, s = hvae_epoch(model, X_train, **(ANNEAL if model is cat else {}))
            seconds[key].append(s)
            train_elbo[key].append(elbo)
            foreign[key].append(meter.foreign_share())
            after = os.times()
            cpu[key].append(after.user + after.system - times.user - times.system)
            print(f"  epoch {epoch + 1} {key:<27} {s:7.1f} s  train ELBO {elbo:8.2f}  "
                  f"others' CPU {foreign[key][-1]}", flush=True)
    load_after = os.getloadavg()

    # The peer: the faster of its two forms (median epochs); only it is scored.
    peer_key = None
    if trainers:
        peer_key = min(trainers, key=lambda k: float(np.median(seconds[k])))
    results = []
    for key in keys:
        start = time.perf_counter()
        if args.throughput_only or (key in trainers and key != peer_key):
            elbo = ll = None
        elif key in trainers:
            Xt, model = torch.from_numpy(X_test), trainers[key].model
            elbo = float(np.mean([torch_score(model, Xt, seed=s).mean().item()
                                  for s in range(3)]))
            ll = float(torch_ll(model, Xt[:args.ll_rows], n_samples=args.ll_samples).mean())
        else:
            model = cat if key == "hvae categorical" else gauss
            elbo = float(np.mean([model.elbo(X_test, seed=s).mean() for s in range(3)]))
            ll = float(model.log_likelihood(X_test[:args.ll_rows],
                                            n_samples=args.ll_samples).mean())
        median = float(np.median(seconds[key]))
        results.append(dict(model=key, epoch_seconds=seconds[key], median_epoch_seconds=median,
                            best_epoch_seconds=float(np.min(seconds[key])),
                            rows_per_second=len(X_train) / median, train_elbo=train_elbo[key],
                            test_elbo=elbo, test_log_likelihood=ll,
                            foreign_cpu_share=foreign[key], cpu_seconds=cpu[key],
                            rows_per_cpu_second=len(X_train) / float(np.median(cpu[key])),
                            eval_seconds=time.perf_counter() - start))
        print(f"{key:<27} median epoch {median:7.1f} s ({len(X_train) / median:8.0f} rows/s)"
              + ("" if elbo is None else f"  test ELBO {elbo:8.2f}  log p(x) {ll:8.2f}"),
              flush=True)
    by = {r["model"]: r for r in results}
    ratio = best_ratio = None
    ratios = {}
    if peer_key:
        for key in trainers:
            ratios[key] = by["hvae categorical"]["rows_per_second"] / by[key]["rows_per_second"]
        ratio = ratios[peer_key]
        per_epoch = [t / h for h, t in zip(seconds["hvae categorical"], seconds[peer_key])]
        best_ratio = by[peer_key]["best_epoch_seconds"] / by["hvae categorical"][
            "best_epoch_seconds"]
        print(f"throughput hvae / the peer ({peer_key}): {ratio:.2f} (medians), "
              f"{best_ratio:.2f} (fastest epochs); per epoch "
              f"{[round(r, 2) for r in per_epoch]}; against each form "
              f"{ {k: round(v, 2) for k, v in ratios.items()} }")
    if peer_key:
        # A second view, less sensitive to the other processes' load: rows
        # per CPU second of this process (the peer's threads wait passively).
        cpu_ratio = (by["hvae categorical"]["rows_per_cpu_second"]
                     / by[peer_key]["rows_per_cpu_second"])
        print(f"rows per CPU second, hvae / the peer: {cpu_ratio:.2f}")
    shares = [v for key in keys for v in foreign[key] if v is not None]
    print(f"load average before {load_before}, after {load_after}; other processes' CPU "
          f"share per epoch: median {np.median(shares) if shares else None}, "
          f"max {max(shares) if shares else None}")

    table = None if args.throughput_only else variance_table(cat, gauss, X_test[:128],
                                                             args.draws, args.reference_draws)
    out = dict(epochs=args.epochs, train_rows=len(X_train), threads=args.threads,
               ll_rows=args.ll_rows, ll_samples=args.ll_samples, blas=hvae.blas_info(),
               load_average_at_end=os.getloadavg(), annealing=ANNEAL,
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               load_average_before=load_before, load_average_after_training=load_after,
               foreign_cpu_share_median=float(np.median(shares)) if shares else None,
               foreign_cpu_share_max=max(shares) if shares else None,
               peer=peer_key, peer_compile_seconds=compile_seconds,
               peer_compile_foreign_cpu=compile_foreign,
               throughput_ratio_categorical=ratio,
               throughput_ratio_categorical_per_peer_form=ratios,
               cpu_throughput_ratio_categorical=cpu_ratio if peer_key else None,
               throughput_ratio_categorical_fastest_epochs=best_ratio, results=results,
               gradient_variance=dict(rows=128, draws=args.draws,
                                      reference_draws=args.reference_draws, table=table))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
