"""Hashes of the parameters and history after short fits, for a set of
configurations: a restructuring that must not change results compares the
output before and after (`python tools/param_hashes.py > before.json`, then
`python tools/param_hashes.py --compare before.json`).

The hashes depend on the BLAS and the CPU's instruction set, so they are only
comparable on one machine and build; they are not a test.
"""
import argparse
import hashlib
import json
import sys

import numpy as np

import hvae
from hvae.datasets import load_digits


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


MODEL_CONFIGS = {
    "T1-gauss": dict(latent_dims=(4,), hidden_dims=(32,)),
    "T2-bern": dict(latent_dims=(6, 3), hidden_dims=(32, 16), likelihood="bernoulli"),
    "T3-ladder": dict(latent_dims=(6, 4, 2), hidden_dims=(32,), likelihood="bernoulli",
                      inference="ladder"),
    "T2-unit-tanh": dict(latent_dims=(6, 3), hidden_dims=(24,), activation="tanh",
                         decoder_variance="unit"),
    "T1-nohidden": dict(latent_dims=(5,), hidden_dims=()),
}
FIT_OPTIONS = {
    "elbo": {},
    "iwae5": dict(objective="iwae", n_samples=5),
    "mc3": dict(n_samples=3),
    "beta-freebits": dict(beta=2.0, free_bits=0.3),
    "sgd": dict(optimizer="sgd", momentum=0.5, learning_rate=1e-3, weight_decay=1e-4),
}
ESTIMATOR_CONFIGS = {
    "est-T2": dict(latent_dims=(6, 3), hidden_dims=(32,), likelihood="bernoulli",
                   n_epochs=3, batch_size=64, random_state=0),
    "est-ladder-warmup": dict(latent_dims=(6, 3), hidden_dims=(32,), likelihood="bernoulli",
                              inference="ladder", kl_warmup_epochs=2, n_epochs=3,
                              random_state=1),
    "est-cond": dict(latent_dims=(4,), hidden_dims=(32,), likelihood="bernoulli",
                     conditional=True, n_epochs=2, random_state=2),
    "est-early": dict(latent_dims=(4,), hidden_dims=(32,), likelihood="bernoulli",
                      early_stopping=True, n_iter_no_change=2, n_epochs=6,
                      random_state=3),
    "est-iwae": dict(latent_dims=(4,), hidden_dims=(16,), likelihood="bernoulli",
                     objective="iwae", n_importance_samples=3, n_epochs=2, random_state=4),
}


def run():
    X, y = load_digits()
    X = np.ascontiguousarray(X[:600], dtype=np.float32)
    y = y[:600]
    out = {}
    for cname, cfg in MODEL_CONFIGS.items():
        for oname, opts in FIT_OPTIONS.items():
            m = hvae.Model(64, seed=7, **cfg)
            hist = m.fit(X, n_epochs=2, batch_size=50, **opts)
            vals = [v for rec in hist for k, v in sorted(rec.items()) if k != "seconds"
                    for v in np.ravel(v)]
            st = m.__getstate__()
            opt = [np.ravel(v) for k, v in sorted(st["optimizer"].items())
                   if isinstance(v, (np.ndarray, int, float))]
            opt.append(np.array(st["rng_state"], dtype=np.float64))
            out[f"{cname}/{oname}"] = {
                "params": digest(m.parameters),
                "history": digest(vals),
                "elbo": digest(m.elbo(X[:100])),
                "state": digest(*opt),
            }
    for name, params in ESTIMATOR_CONFIGS.items():
        est = hvae.HierarchicalVAE(**params)
        if params.get("conditional"):
            est.fit(X, y)
            Z = est.transform(X[:50], y[:50])
        else:
            est.fit(X)
            Z = est.transform(X[:50])
        hist = [np.ravel(v) for k, v in sorted(est.history_.items()) if k != "seconds"]
        out[name] = {"params": digest(est.model_.parameters),
                     "history": digest(*hist), "transform": digest(Z),
                     "n_iter": est.n_iter_}
        # partial_fit continues from there.
        if not params.get("conditional"):
            est.partial_fit(X[:200])
            out[name]["partial_fit"] = digest(est.model_.parameters)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", help="a JSON file written by an earlier run")
    args = ap.parse_args()
    hvae.set_num_threads(1)
    now = run()
    if not args.compare:
        json.dump(now, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    bad = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    for k in bad:
        print(f"DIFFERS {k}: {before.get(k)} -> {now.get(k)}")
    print(f"{len(now) - len(bad)} of {len(now)} configurations identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
