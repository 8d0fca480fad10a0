"""The categorical layer's kernels at the edges of their speed-ups
(csrc/latent_categorical.c):

* a group wider than the stack tile of exps (K > 256) is taken a tile at a
  time, its exps computed again per pass: the relaxed objective and its
  gradient, the closed-form KL with a decoder-given p, and the sampled
  log-ratio still match finite differences of the float64 reference;
* the rows are split over the pool's threads, every group computed alone:
  evaluation is bitwise the same on one thread and on two, and a gradient
  the same within float rounding (the GEMMs' block widths differ).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
import test_categorical as tc  # noqa: E402
from test_categorical import _cat, _model  # noqa: E402

import hvae  # noqa: E402

WIDE_CASES = [
    _cat(4, (1,), ("categorical",), (300,), hidden=(3,)),
    _cat(4, (1, 1), ("categorical", "categorical"), (300, 3), hidden=(3,),
         markov_kl="analytic"),
    _cat(4, (1, 1), ("categorical", "categorical"), (300, 3), hidden=(3,)),
]


@pytest.mark.parametrize("cfg", WIDE_CASES, ids=["top", "analytic-kl", "sampled-ratio"])
def test_groups_wider_than_the_tile_match_float64_reference(cfg):
    tc.test_relaxed_objective_and_gradient_match_float64_reference(cfg)


def test_encode_of_groups_wider_than_the_tile():
    cfg = _cat(4, (2,), ("categorical",), (700,), hidden=(3,))
    rng = np.random.default_rng(6)
    model = _model(cfg, rng)
    x = ref.random_data(cfg, 5, rng)
    (probs, log_probs), = model.encode(x)
    expected = ref.encode(ref.unflatten(model.parameters.astype(np.float64), cfg), cfg,
                          x.astype(np.float64))[0]
    np.testing.assert_allclose(probs, expected[0], atol=1e-6)
    np.testing.assert_allclose(log_probs, expected[1], atol=1e-5)
    np.testing.assert_allclose(probs.reshape(5, 2, 700).sum(axis=2), 1.0, atol=1e-5)


def test_rows_split_over_threads_change_nothing():
    rng = np.random.default_rng(4)
    X = (rng.random((300, 784)) < 0.3).astype(np.float32)
    out = {}
    for threads in (1, 2):
        model = hvae.Model(784, (30,), (64,), likelihood="bernoulli",
                           latent_family="categorical", n_categories=10, seed=3)
        model.n_threads = threads
        terms = model.elbo_terms(X, seed=2)
        encoded = model.encode(X)
        loss, grad = model.loss_and_grad(X, seed=5, temperature=0.7)
        out[threads] = (terms, encoded, loss, np.array(grad))
    (t1, e1, l1, g1), (t2, e2, l2, g2) = out[1], out[2]
    for key in t1:
        np.testing.assert_array_equal(t1[key], t2[key], err_msg=key)
    for a, b in zip(e1, e2):
        for u, v in zip(a, b):
            if u is not None:
                np.testing.assert_array_equal(u, v)
    assert abs(l1 - l2) <= 1e-5 * abs(l1)
    np.testing.assert_allclose(g2, g1, rtol=1e-3, atol=1e-5 * np.abs(g1).max())
