"""Time to quality: training wall time for hvae and its PyTorch peer to reach
a fixed test ELBO on Fashion-MNIST.

Usage::

    python bench/time_to_quality.py [--workloads W2 W3] [--targets -260 -255 -250]
                                    [--max-epochs 12] [--threads 2] [--seeds 0]
                                    [--json bench/results/time_to_quality.json]

For each workload (W2..W4 of bench/data.py: all 60,000 training images, the
10,000 test images) and seed, three learners start from the same parameters
(hvae's initialisation, copied by name into the peers; PyTorch's nn.Linear
family) with the same settings: Adam lr 1e-3 (PyTorch's other defaults),
the workload's batch size, float32, the same thread count:

  hvae              ``hvae.Model.fit(X, n_epochs=1)`` per epoch
  peer eager        ``peer_torch.Trainer`` (fused heads, fused Adam, buffers)
  peer compiled     the same with the loss through ``torch.compile``

Their epochs are interleaved (hvae, eager, compiled, hvae, ...). After every
epoch each learner's test ELBO is evaluated: the mean over the 10,000 test
images of a one-draw ELBO estimate (hvae ``Model.elbo``, the peer
``score_samples``; standard error about 0.8 nats). Evaluation time is
excluded from the training time and reported separately; torch.compile's
time is reported separately too, and the compiled peer's time to a target is
given with and without it. The time to a target is the training wall time of
the epochs up to and including the first whose test ELBO reaches it (so it
moves in whole epochs). "The peer" in the ratios is the faster of eager and
compiled to that target (compile time excluded, as in bench/run.py).

The share of the machine's CPU time used by other processes during the run
is recorded (``foreign_cpu``), as in bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
for _path in (str(BENCH_DIR.parent), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import data  # noqa: E402
import run as suite  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "time_to_quality.json"
DEFAULT_TARGETS = (-260.0, -255.0, -250.0)


def time_to_quality(workload, targets, max_epochs, n_threads, seed=0, noise=None,
                    verbose=True):
    """Train hvae and both peer variants epoch by epoch until every learner
    reaches every target (or max_epochs); see the module docs."""
    import torch

    import peer_torch as peer

    X = np.ascontiguousarray(workload["X_train"], dtype=np.float32)
    X_test = np.ascontiguousarray(workload["X_test"], dtype=np.float32)
    B = workload["batch_size"]
    model, eager_twin = suite.make_pair(workload, X.shape[1], seed=seed)
    model.n_threads = n_threads
    compiled_twin = peer.TorchHVAE(X.shape[1], workload["latent_dims"], workload["hidden_dims"],
                                   likelihood=workload["likelihood"], activation="relu")
    compiled_twin.load_named_parameters(model.named_parameters())
    X_tensor = torch.from_numpy(X)
    learners = {"hvae": None, "peer eager": None, "peer compiled": None}
    histories = {name: {"train_seconds": [], "eval_seconds": [], "test_elbo": [],
                        "foreign_cpu": []} for name in learners}
    result = {"workload": workload["name"], "seed": seed, "n_train": X.shape[0],
              "n_test": X_test.shape[0], "batch_size": B, "n_threads": n_threads,
              "targets": list(targets), "max_epochs": max_epochs}
    with peer.torch_threads(n_threads):
        trainers = {"peer eager": suite.make_peer_trainer(eager_twin, B, seed=seed),
                    "peer compiled": suite.make_peer_trainer(compiled_twin, B, compiled=True,
                                                             seed=seed)}
        meter = suite.LoadMeter()
        result["compile_seconds"] = trainers["peer compiled"].warm_up(X_tensor)
        result["compile_foreign_cpu"] = meter.foreign_share()

        def train(name):
            if name == "hvae":
                return suite.hvae_epoch(model, X, B)[0]
            return suite.peer_epoch(trainers[name], X_tensor)[0]

        def evaluate(name):
            if name == "hvae":
                return float(model.elbo(X_test).mean())
            twin = trainers[name].model
            return float(peer.score_samples(twin, X_test,
                                            generator=torch.Generator().manual_seed(seed)).mean())

        def done(name):
            elbos = histories[name]["test_elbo"]
            return bool(elbos) and max(elbos) >= max(targets)

        for epoch in range(1, max_epochs + 1):
            active = [name for name in learners if not done(name)]
            if not active:
                break
            for name in active:
                if noise is not None:
                    suite.wait_for_quiet(noise, window=0.5)
                meter = suite.LoadMeter()
                seconds = train(name)
                share = meter.foreign_share()
                start = time.perf_counter()
                elbo = evaluate(name)
                history = histories[name]
                history["train_seconds"].append(seconds)
                history["eval_seconds"].append(time.perf_counter() - start)
                history["test_elbo"].append(elbo)
                history["foreign_cpu"].append(share)
                if verbose:
                    print(f"  {workload['name']} seed {seed} epoch {epoch:2d} {name:<14} "
                          f"{seconds:6.2f} s  test ELBO {elbo:8.2f}  other CPU "
                          f"{100 * (share or 0):.0f}%", file=sys.stderr, flush=True)
    per_target = {}
    for target in targets:
        row = {}
        for name, history in histories.items():
            reached = [i for i, e in enumerate(history["test_elbo"]) if e >= target]
            if not reached:
                row[name] = None
                continue
            k = reached[0] + 1
            row[name] = {"epochs": k, "train_seconds": float(sum(history["train_seconds"][:k])),
                         "eval_seconds": float(sum(history["eval_seconds"][:k]))}
            if name == "peer compiled":
                row[name]["train_seconds_with_compile"] = (
                    row[name]["train_seconds"] + result["compile_seconds"])
        peers = [name for name in ("peer eager", "peer compiled") if row.get(name)]
        if peers:
            best = min(peers, key=lambda name: row[name]["train_seconds"])
            row["peer"] = best
            if row.get("hvae"):
                row["ratio"] = row[best]["train_seconds"] / row["hvae"]["train_seconds"]
        per_target[str(target)] = row
    result["histories"] = histories
    result["per_target"] = per_target
    shares = [s for h in histories.values() for s in h["foreign_cpu"] if s is not None]
    result["foreign_cpu_max"] = max(shares) if shares else None
    result["foreign_cpu_mean"] = float(np.mean(shares)) if shares else None
    return result


def format_report(results):
    lines = [f"machine: {suite.machine_line(results['machine'])}",
             f"time to a test ELBO ({results['n_threads']} threads; training seconds, "
             "evaluation excluded; ratio = peer time / hvae time):"]
    for r in results["runs"]:
        lines.append(f"  {r['workload']} seed {r['seed']} (torch.compile: "
                     f"{r['compile_seconds']:.1f} s; other CPU mean "
                     f"{100 * (r['foreign_cpu_mean'] or 0):.0f}%, max "
                     f"{100 * (r['foreign_cpu_max'] or 0):.0f}%)")
        for target, row in r["per_target"].items():
            cells = []
            for name in ("hvae", "peer eager", "peer compiled"):
                cell = row.get(name)
                cells.append(f"{name} " + ("not reached" if cell is None else
                                           f"{cell['train_seconds']:.1f} s ({cell['epochs']} ep)"))
            ratio = f"; ratio {row['ratio']:.2f}x vs {row['peer']}" if "ratio" in row else ""
            lines.append(f"    {float(target):7.1f} nats: " + ", ".join(cells) + ratio)
        for name, h in r["histories"].items():
            lines.append(f"    {name:<14} test ELBO per epoch: "
                         + " ".join(f"{e:.1f}" for e in h["test_elbo"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W2"], choices=["W2", "W3", "W4"])
    parser.add_argument("--targets", nargs="+", type=float, default=list(DEFAULT_TARGETS))
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-rows", type=int, help="use the first N training rows (tests)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each epoch, wait up to this long for a quiet machine")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    # Compile times as a first run sees them (see bench/run.py).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          tempfile.mkdtemp(prefix="hvae-bench-inductor-"))
    results = {"machine": suite.machine_info(), "code": suite.code_state(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_threads": args.threads,
               "learning_rate": suite.LEARNING_RATE,
               "compile_mode": suite.PEER_COMPILE_MODE,
               "compile_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"], "runs": []}
    started = time.perf_counter()
    for workload in data.workloads(args.workloads):
        if args.train_rows:
            workload = dict(workload, X_train=workload["X_train"][:args.train_rows])
        for seed in args.seeds:
            results["runs"].append(time_to_quality(
                workload, args.targets, args.max_epochs, args.threads, seed=seed,
                noise=args.wait_quiet or None))
    results["total_seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(format_report(results))
    print(f"\nwrote {args.json} ({results['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
