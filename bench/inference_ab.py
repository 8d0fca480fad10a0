"""Two hvae trees side by side on inference, one thread, in CPU seconds.

Usage::

    python bench/inference_ab.py OLD_ROOT NEW_ROOT [--rounds K] [--workloads W2 ...]
                                 [--json PATH]

Runs bench/inference_cpu.py (hvae's ``encode``/``elbo`` against the PyTorch
peer's ``transform``/``score_samples``, eager and compiled, one thread, rows
per CPU-second) alternately on the two trees, K rounds, and the machine's
one-thread single-precision peak in the same run: a square product
(n = 2048, the faster of OpenBLAS's ``scipy_cblas_sgemm`` and ``torch.mm``;
CPU time, best of 3) before the first and after the last round. Reports the
median over rounds of every rate, each also in GFLOP/s (the matrix-product
FLOPs of a row, as bench/run.py counts them) and as a share of the peak.
Each tree must be built in place (``python setup.py build_ext --inplace``).
On a shared machine this is the measurement that means something: CPU
seconds of one thread do not count the time a neighbour held the core.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from inference_cpu import WORKLOADS  # noqa: E402


def row_flops(n_features, latent_dims, hidden_dims):
    """Matrix-product FLOPs of a row (2 * sum of n_in * n_out), as bench/run.py
    counts them: the encoders for transform, every dense layer for score (a
    Bernoulli model: one head on the bottom decoder)."""
    enc = dec = 0
    inp = n_features
    for d in latent_dims:
        widths = [inp, *hidden_dims]
        enc += sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * 2 * d
        inp = d
    for i, d in enumerate(latent_dims):
        widths = [d, *reversed(hidden_dims)]
        out = n_features if i == 0 else 2 * latent_dims[i - 1]
        dec += sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * out
    return {"transform": 2 * enc, "score": 2 * (enc + dec)}


def peak_gflops(n=2048, repeats=3):
    """One-thread square sgemm GFLOP/s in CPU time: OpenBLAS (numpy's
    scipy-openblas under hvae) and torch.mm; the faster is the peak."""
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    A = torch.from_numpy(rng.standard_normal((n, n)).astype(np.float32))
    B = torch.from_numpy(rng.standard_normal((n, n)).astype(np.float32))
    C = torch.empty((n, n))
    a, b = A.numpy(), B.numpy()
    times = {"openblas": [], "torch": []}
    for _ in range(repeats + 1):
        start = time.process_time()
        np.matmul(a, b)
        times["openblas"].append(time.process_time() - start)
        start = time.process_time()
        torch.mm(A, B, out=C)
        times["torch"].append(time.process_time() - start)
    return {k: 2.0 * n ** 3 / min(v[1:]) / 1e9 for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["W2"], choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = os.getloadavg()[0]
    peaks = [peak_gflops()]
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for tree in ("old", "new"):
            out = subprocess.run(
                [sys.executable, str(HERE / "inference_cpu.py"), "--workloads", *args.workloads,
                 "--repeats", str(args.repeats), "--hvae-root", getattr(args, tree)],
                capture_output=True, text=True, env=env, check=True).stdout
            runs[tree].append(json.loads(out.strip().splitlines()[-1]))
    peaks.append(peak_gflops())
    peak = max(max(p.values()) for p in peaks)
    summary = {}
    for name in args.workloads:
        flops = row_flops(*WORKLOADS[name])
        summary[name] = {"flops_per_row": flops}
        for what in ("transform", "score"):
            rates = {f"{tree}_hvae": [r["workloads"][name][what]["hvae_rows_per_cpu_s"]
                                      for r in runs[tree]] for tree in runs}
            for variant in ("eager", "compiled"):
                rates[variant] = [r["workloads"][name][what][f"{variant}_rows_per_cpu_s"]
                                  for tree in runs for r in runs[tree]]
            med = {k: statistics.median(v) for k, v in rates.items()}
            peer = max(med["eager"], med["compiled"])
            row = {k: {"rows_per_cpu_s": round(m), "raw": v,
                       "gflops": round(m * flops[what] / 1e9, 1),
                       "percent_of_peak": round(100 * m * flops[what] / 1e9 / peak, 1)}
                   for (k, v), m in zip(rates.items(), med.values())}
            row["peer_variant"] = "eager" if med["eager"] >= med["compiled"] else "compiled"
            row["old_ratio_to_peer"] = round(med["old_hvae"] / peer, 3)
            row["new_ratio_to_peer"] = round(med["new_hvae"] / peer, 3)
            row["new_over_old"] = round(med["new_hvae"] / med["old_hvae"], 3)
            summary[name][what] = row
    report = {"what": "inference, one thread, rows per CPU-second (bench/inference_cpu.py), "
                      "old and new hvae alternately, medians over rounds",
              "started": started, "ended": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "old": args.old, "new": args.new, "rounds": args.rounds,
              "repeats_per_round": args.repeats, "rows": 10000,
              "peak_gflops_1_thread": {"before": peaks[0], "after": peaks[1], "used": peak},
              "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
              "workloads": summary}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
