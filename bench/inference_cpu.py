"""Inference rows per CPU-second, one thread: hvae against its PyTorch peer.

Usage::

    python bench/inference_cpu.py [--workloads W1 W2 W4] [--rows N] [--repeats K]
                                  [--hvae-root PATH] [--json PATH]

On a machine shared with other jobs, wall-clock rates of two threads say more
about the neighbours than about the code. This measures what a change to the
kernels does, on one thread, in CPU seconds of this process
(``time.process_time``, which does not count the time the process waited for
a core): hvae's ``Model.encode`` and ``Model.elbo`` against the peer's
``transform`` and ``score_samples`` (``peer_torch``: eager, and through
``compile_inference``, compiled before timing; the faster is "the peer"), on
random rows in [0, 1], a Bernoulli model of the workload's shape with
hvae's and PyTorch's own initialisations (the rates do not depend on the
parameter values). The calls are interleaved, K repeats after two warm-up
calls each, and the median is reported. It is not the README's benchmark
(bench/run.py measures two threads, wall clock, on Fashion-MNIST); it is the
A/B tool for kernels: run it once per tree (``--hvae-root`` imports hvae
from another checkout, built in place) and alternate the runs.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKLOADS = {  # n_features, latent_dims, hidden_dims (bench/data.py's shapes)
    "W1": (64, (8,), (64,)),
    "W2": (784, (32,), (512, 256)),
    "W3": (784, (32, 16), (512, 256)),
    "W4": (784, (64, 32, 16, 8, 4), (256, 128)),
}


def measure(name, n_rows, repeats, hvae, torch, peer):
    """Median rows per CPU-second of every call on workload `name`."""
    n_features, latent_dims, hidden_dims = WORKLOADS[name]
    X = np.random.default_rng(0).random((n_rows, n_features), dtype=np.float32)
    model = hvae.Model(n_features, latent_dims, hidden_dims, likelihood="bernoulli", seed=0)
    model.n_threads = 1
    torch.manual_seed(0)
    twin = peer.TorchHVAE(n_features, latent_dims, hidden_dims)
    compiled = peer.compile_inference(twin)
    calls = {
        ("transform", "hvae"): lambda: model.encode(X),
        ("transform", "eager"): lambda: peer.transform(twin, X),
        ("transform", "compiled"): lambda: peer.transform(twin, X, encode=compiled["encode"]),
        ("score", "hvae"): lambda: model.elbo(X),
        ("score", "eager"): lambda: peer.score_samples(twin, X),
        ("score", "compiled"): lambda: peer.score_samples(twin, X, elbo=compiled["elbo"]),
    }
    for call in calls.values():
        call()
        call()
    seconds = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            t0 = time.process_time()
            call()
            seconds[key].append(time.process_time() - t0)
    result = {}
    for what in ("transform", "score"):
        rates = {who: n_rows / float(np.median(seconds[(what, who)]))
                 for who in ("hvae", "eager", "compiled")}
        result[what] = {f"{who}_rows_per_cpu_s": round(rate) for who, rate in rates.items()}
        result[what]["ratio"] = round(rates["hvae"] / max(rates["eager"], rates["compiled"]), 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS),
                        default=["W1", "W2", "W4"])
    parser.add_argument("--rows", type=int, default=10000, help="rows per call (default 10000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (default 5)")
    parser.add_argument("--hvae-root", default=str(HERE.parent),
                        help="the checkout whose hvae to import (default this one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, os.path.abspath(args.hvae_root))
    import torch

    import hvae
    import peer_torch as peer

    if not hvae.__file__.startswith(os.path.abspath(args.hvae_root)):
        sys.exit(f"imported hvae from {hvae.__file__}, not from {args.hvae_root}")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    results = {name: measure(name, args.rows, args.repeats, hvae, torch, peer)
               for name in args.workloads}
    report = {"hvae": hvae.__file__, "torch": torch.__version__, "machine": platform.processor()
              or platform.machine(), "rows": args.rows, "repeats": args.repeats,
              "loadavg_start": load_before, "loadavg_end": os.getloadavg()[0],
              "workloads": results}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
