"""bench/run.py's inference section alone, for one hvae tree.

Usage::

    python bench/inference_wall.py [--hvae-root PATH] [--threads K] [--repeats N]
                                   [--no-compile]

Runs exactly what bench/run.py measures for inference (``compare_inference``
on W2's 10000 test rows, the model and its PyTorch twin from ``make_pair``,
wall clock, K threads) and the machine peak in the same run
(``machine_peak``, n = 4096), and prints one JSON line with the rates, the
GFLOP/s and the percentages of the peak, and the load average around it.
Run it alternately on two trees (``--hvae-root``, built in place) to compare
them on the full benchmark's terms without the training sections; on a
shared machine prefer bench/inference_ab.py (one thread, CPU seconds).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hvae-root", default=str(HERE.parent))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, os.path.abspath(args.hvae_root))
    import hvae

    if not hvae.__file__.startswith(os.path.abspath(args.hvae_root)):
        sys.exit(f"imported hvae from {hvae.__file__}, not from {args.hvae_root}")
    import data
    import run

    load_start = os.getloadavg()[0]
    w2 = data.workloads(["W2"])[0]
    model, twin = run.make_pair(w2, w2["X_train"].shape[1])
    variants = ("eager",) if args.no_compile else run.PEER_VARIANTS
    result = run.compare_inference(model, twin, w2["X_test"], args.threads, args.repeats,
                                   peer_variants=variants)
    peak = run.machine_peak(args.threads, n=4096)
    peak_gflops = peak["peak_gflops"][args.threads]
    out = {"hvae": hvae.__file__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "threads": args.threads, "peak_gflops": peak_gflops,
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]}
    for name in ("transform", "score"):
        r = result[name]
        out[name] = {"hvae_rows_per_s": round(r["hvae_rows_per_s"]),
                     "peer_rows_per_s": round(r["peer_rows_per_s"]),
                     "peer_variant": r["peer_variant"], "ratio": round(r["ratio"], 3),
                     "hvae_percent_of_peak": round(100 * r["hvae_gflops"] / peak_gflops, 1),
                     "peer_percent_of_peak": round(100 * r["peer_gflops"] / peak_gflops, 1),
                     "foreign_cpu": r["noise"]["foreign_cpu_used"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
