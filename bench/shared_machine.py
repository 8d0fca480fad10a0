"""One epoch of W2 on 10,000 Fashion-MNIST rows at one and two threads, with
and without a competing busy process, for two trees (say main and a branch)
in alternation: how hvae's threads fare on a machine shared with another
busy process.

W2: latent (32,), hidden (512, 256), Bernoulli, batch 128, Adam. The
competitor is ``python3 -c "while True: pass"`` at normal priority, started
just before the fit and killed right after it. Each round runs every
configuration of one tree in a fresh process (a tree is imported by path),
the trees alternating round by round; the figures are medians over rounds.

    python bench/shared_machine.py --tree before=/path/to/main \\
        --tree after=. --rounds 3 --out bench/results/shared_machine.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = [(1, False), (2, False), (1, True), (2, True)]


def run_round(tree):
    """In a fresh process with `tree` first on sys.path: every configuration
    once; prints one JSON line {config: [seconds, parameter hash]}."""
    sys.path.insert(0, tree)
    import hashlib

    import numpy as np

    import hvae
    from hvae.datasets import load_fashion_mnist

    assert os.path.realpath(hvae.__file__).startswith(os.path.realpath(tree)), hvae.__file__
    X = load_fashion_mnist("train", path="/work/shared/data/fashion-mnist", return_y=False)
    X = np.ascontiguousarray(X[:10000])

    def model(threads):
        return hvae.HierarchicalVAE(latent_dims=(32,), hidden_dims=(512, 256),
                                    likelihood="bernoulli", batch_size=128, n_epochs=1,
                                    n_threads=threads, random_state=0)

    model(2).fit(X[:2048])  # warm-up: pages, the pool
    out = {}
    for threads, competing in CONFIGS:
        competitor = None
        if competing:
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.2)
        try:
            vae = model(threads)
            t0 = time.perf_counter()
            vae.fit(X)
            seconds = time.perf_counter() - t0
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        params = np.asarray(vae.model_.parameters, dtype=np.float32)
        out[f"{threads}{'+' if competing else ''}"] = [
            seconds, hashlib.sha256(params.tobytes()).hexdigest()[:16]]
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="name=path")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--round-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.round_of:
        run_round(args.round_of)
        return
    trees = [t.split("=", 1) for t in args.tree]
    runs = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, path in trees:
            line = subprocess.run([sys.executable, __file__, "--tree", "x=x", "--round-of",
                                   os.path.abspath(path)], check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
            runs[name].append(json.loads(line))
            print(f"round {r} {name}: " + ", ".join(
                f"{k} {v[0]:.2f} s" for k, v in runs[name][-1].items()), flush=True)
    summary = {}
    for name, rounds in runs.items():
        summary[name] = {}
        for key in rounds[0]:
            times = [r[key][0] for r in rounds]
            summary[name][key] = {"median_seconds": statistics.median(times),
                                  "seconds": times,
                                  "parameter_hashes": sorted({r[key][1] for r in rounds})}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"what": "one W2 epoch on 10,000 Fashion-MNIST rows, wall seconds; "
                               "'+': with one competing busy process",
                       "rounds": args.rounds, "results": summary}, f, indent=1)


if __name__ == "__main__":
    main()
