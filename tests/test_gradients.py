"""hvae.Model.loss_and_grad against finite differences, with fixed noise.

Two independent checks per model:

1. Every coordinate of the float32 analytic gradient against central
   differences of the float64 reference loss (tests/reference.py, itself
   checked against the model's forward pass in test_elbo_reference.py and
   again here). In float64 a step of 1e-6 leaves a finite-difference error
   near 1e-9 (roundoff 1e-16 * |L| / h, truncation h^2), so what remains is
   the float32 rounding of the model's backward pass, about 1e-7 of
   max |gradient| (seen: at most 2.5e-7). The bound, 1e-3 relative plus 1e-5
   of max |gradient|, leaves a margin of 40 for other BLAS builds and still
   catches a term off by a tenth of a percent.

2. The model alone: central differences of its own float32 loss, on 200
   random coordinates and along random directions of the whole vector,
   perturbing through the writable Model.parameters. The loss carries float32
   rounding of about 1e-7 |L| (~1e-6 here); divided by a step of 1e-2 (3e-3
   with relu) that is ~1e-4 of noise, next to a truncation error of
   h^2/6 * L''' of the same order for this scale of model (seen: at most
   1.6e-4 of max |gradient|). The step is measured as the float32 values
   actually set (p+ - p-), not the nominal h. Hence 1e-3 of max |gradient|
   absolute plus 1e-2 relative for coordinates. A directional derivative
   averages that noise over the whole vector (seen: 1e-5 of |gradient|); it
   must agree with g.v to 2e-4 of |gradient|.

With relu and leaky relu the loss has kinks; a difference quotient across one
means nothing, so a coordinate (or direction) whose perturbation flips the
sign of any hidden pre-activation (found with the reference) is skipped, and
the test demands that few are.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from reference import Config  # noqa: E402

import hvae  # noqa: E402  (a missing build must fail, not skip)

N_ROWS = 9
LATENT = {1: (4,), 2: (4, 3), 3: (4, 3, 2)}


def _cfg(T, likelihood, variance, act, hidden, markov_kl="sampled"):
    D = 6 if likelihood == "gaussian" else 8
    return Config(D, LATENT[T], hidden, likelihood, act, variance, markov_kl=markov_kl)


CASES = [
    _cfg(1, "gaussian", "learned", "tanh", (6,)),
    _cfg(1, "gaussian", "unit", "relu", (5, 4)),
    _cfg(1, "bernoulli", "learned", "relu", (6,)),
    _cfg(1, "bernoulli", "unit", "softplus", ()),
    _cfg(2, "gaussian", "learned", "relu", (6,)),
    _cfg(2, "gaussian", "unit", "elu", (6,)),
    _cfg(2, "bernoulli", "learned", "softplus", (5, 4)),
    _cfg(2, "bernoulli", "unit", "leaky_relu", (6,)),
    _cfg(3, "gaussian", "learned", "softplus", (5, 4)),
    _cfg(3, "gaussian", "learned", "relu", (5, 4)),
    _cfg(3, "gaussian", "unit", "relu", (6,)),
    _cfg(3, "bernoulli", "learned", "elu", ()),
    _cfg(3, "bernoulli", "unit", "tanh", (6,)),
    # markov_kl="analytic": the lower layers' closed-form KL at the sampled
    # z_{i+1}, whose gradient reaches the prior's decoder through mu_p, lv_p.
    _cfg(2, "gaussian", "learned", "tanh", (6,), "analytic"),
    _cfg(3, "gaussian", "learned", "softplus", (5, 4), "analytic"),
    _cfg(3, "bernoulli", "unit", "elu", (6,), "analytic"),
]


def case_id(cfg):
    hidden = "x".join(map(str, cfg.hidden_dims)) or "linear"
    analytic = "-analytic" if cfg.markov_kl == "analytic" else ""
    return (f"T{cfg.n_layers}-{cfg.likelihood}-{cfg.decoder_variance}-"
            f"{cfg.activation}-h{hidden}{analytic}")


class Problem:
    """A small model with our own random parameters, data and fixed noise."""

    def __init__(self, cfg, seed=0):
        self.cfg = cfg
        rng = np.random.default_rng(list(f"{seed}:{case_id(cfg)}".encode()))
        self.model = hvae.Model(cfg.n_features, cfg.latent_dims, cfg.hidden_dims,
                                likelihood=cfg.likelihood,
                                activation=cfg.activation,
                                decoder_variance=cfg.decoder_variance,
                                markov_kl=cfg.markov_kl, seed=seed)
        self.p0 = ref.random_parameters(cfg, rng, scale=1.5)
        self.model.parameters[:] = self.p0
        self.x = ref.random_data(cfg, N_ROWS, rng)
        self.noise = ref.random_noise(cfg, N_ROWS, rng)
        loss, grad = self.model.loss_and_grad(self.x, noise=self.noise)
        self.loss0 = float(loss)
        self.grad0 = np.array(grad, dtype=np.float64)  # a copy: the buffer is reused
        self.kinked = (cfg.activation in ref.KINKED_ACTIVATIONS
                       and len(cfg.hidden_dims) > 0)

    def c_loss(self, p32):
        """The model's loss at float32 parameters p32."""
        self.model.parameters[:] = p32
        try:
            return float(self.model.loss_and_grad(self.x, noise=self.noise)[0])
        finally:
            self.model.parameters[:] = self.p0

    def ref_eval(self, flat64):
        """(reference loss, sign pattern of the hidden pre-activations or None)."""
        out = ref.forward(ref.unflatten(flat64, self.cfg), self.cfg, self.x, self.noise)
        signs = None
        if self.kinked:
            signs = np.concatenate([(p > 0).ravel() for p in out["preactivations"]])
        return -np.mean(out["elbo"]), signs

    def smooth_between(self, lo, hi, signs0):
        """True if no hidden pre-activation changes sign between the points."""
        if not self.kinked:
            return True
        return all(np.array_equal(self.ref_eval(np.asarray(p, np.float64))[1], signs0)
                   for p in (lo, hi))


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def problem(request):
    return Problem(request.param)


def test_gradient_matches_float64_reference(problem):
    p64 = problem.p0.astype(np.float64)
    loss_ref, signs0 = problem.ref_eval(p64)
    # The forward passes agree first, or the comparison below means nothing.
    assert abs(problem.loss0 - loss_ref) <= 1e-4 * (1 + abs(loss_ref)), (
        problem.loss0, loss_ref)

    h = 1e-6
    g_ref = np.empty_like(p64)
    skipped = []
    flat = p64.copy()
    for k in range(flat.size):
        flat[k] = p64[k] + h
        plus, s_plus = problem.ref_eval(flat)
        flat[k] = p64[k] - h
        minus, s_minus = problem.ref_eval(flat)
        flat[k] = p64[k]
        g_ref[k] = (plus - minus) / (2 * h)
        if signs0 is not None and not (np.array_equal(s_plus, signs0)
                                       and np.array_equal(s_minus, signs0)):
            skipped.append(k)
    assert len(skipped) <= 0.01 * flat.size, f"{len(skipped)} coordinates at kinks"
    keep = np.setdiff1d(np.arange(flat.size), skipped)

    g = problem.grad0
    scale = np.abs(g_ref).max()
    assert scale > 1e-2, "gradient vanishes: nothing is being tested"
    worst_abs = np.abs(g - g_ref)[keep].max() / scale
    worst_rel = ref.max_relative(g[keep], g_ref[keep], floor=1e-3 * scale)
    print(f"{case_id(problem.cfg)}: {keep.size} coordinates vs float64 FD, "
          f"max |diff|/max|g| {worst_abs:.2e}, max rel {worst_rel:.2e}")
    names = [n for n, shape in ref.parameter_shapes(problem.cfg)
             for _ in range(int(np.prod(shape)))]
    bad = [k for k in keep
           if abs(g[k] - g_ref[k]) > 1e-3 * abs(g_ref[k]) + 1e-5 * scale]
    assert not bad, (
        f"{len(bad)}/{keep.size} gradient entries off (max |diff|/max|g| "
        f"{worst_abs:.2e}); first: " + "; ".join(
            f"{names[k]}[{k}] model {g[k]:.6g} reference {g_ref[k]:.6g}"
            for k in bad[:6]))


def test_gradient_matches_own_finite_differences(problem):
    p0 = problem.p0
    g = problem.grad0
    n = p0.size
    h = 3e-3 if problem.kinked else 1e-2
    signs0 = problem.ref_eval(p0.astype(np.float64))[1]
    gscale = np.abs(g).max()
    assert gscale > 1e-2, "gradient vanishes: nothing is being tested"

    rng = np.random.default_rng(list(case_id(problem.cfg).encode()))
    coords = rng.choice(n, size=min(200, n), replace=False)
    rows, skipped = [], 0
    for k in coords:
        plus, minus = p0.copy(), p0.copy()
        plus[k] = np.float32(p0[k] + h)
        minus[k] = np.float32(p0[k] - h)
        if not problem.smooth_between(minus, plus, signs0):
            skipped += 1
            continue
        step = float(plus[k]) - float(minus[k])
        fd = (problem.c_loss(plus) - problem.c_loss(minus)) / step
        rows.append((k, fd, g[k]))
    assert skipped <= 0.2 * coords.size, f"{skipped} coordinates at kinks"
    ks, fds, gs = (np.array(c) for c in zip(*rows))
    worst = np.abs(fds - gs).max() / gscale
    print(f"{case_id(problem.cfg)}: {ks.size} coordinates vs float32 FD "
          f"(h={h}), max |diff|/max|g| {worst:.2e}, max rel "
          f"{ref.max_relative(gs, fds, floor=1e-2 * gscale):.2e}")
    ref.assert_close(gs, fds, rtol=1e-2, atol=1e-3 * gscale,
                     what=f"{case_id(problem.cfg)} gradient vs float32 FD")

    # The whole vector: directional derivatives along random directions.
    gnorm = np.linalg.norm(g)
    checked = 0
    for _ in range(12):
        if checked == 3:
            break
        v = rng.standard_normal(n)
        v /= np.linalg.norm(v)
        step = h
        while True:
            plus = (p0 + step * v).astype(np.float32)
            minus = (p0 - step * v).astype(np.float32)
            if problem.smooth_between(minus, plus, signs0) or step < h / 8:
                break
            step /= 2
        if not problem.smooth_between(minus, plus, signs0):
            continue
        delta = plus.astype(np.float64) - minus.astype(np.float64)
        change = problem.c_loss(plus) - problem.c_loss(minus)
        predicted = g @ delta
        norm = np.linalg.norm(delta)
        err = abs(change - predicted) / norm
        print(f"  direction {checked}: step {step:.1e}, (L+ - L-)/|d| "
              f"{change / norm:.6g}, g.d/|d| {predicted / norm:.6g}, "
              f"|diff|/|g| {err / gnorm:.2e}")
        assert err <= 2e-4 * gnorm, (
            f"directional derivative {change / norm:.6g} vs g.v "
            f"{predicted / norm:.6g} (|g| {gnorm:.4g})")
        checked += 1
    assert checked == 3, "no kink-free direction found"


def test_gradient_is_overwritten_and_is_a_mean():
    """loss_and_grad overwrites the gradient (the kernels accumulate: the
    model must zero once per call), and the loss and gradient are means over
    rows, so stacking the batch twice changes neither."""
    problem = Problem(CASES[9])
    model, x, noise = problem.model, problem.x, problem.noise
    loss, grad = model.loss_and_grad(x, noise=noise)
    assert grad.dtype == np.float32 and grad.shape == (model.n_params,)
    first = np.array(grad, dtype=np.float64)
    loss2, grad2 = model.loss_and_grad(x, noise=noise)
    assert loss2 == loss
    scale = np.abs(first).max()
    ref.assert_close(grad2, first, 0.0, 1e-6 * scale, what="second call")
    np.testing.assert_array_equal(model.parameters, problem.p0)

    loss3, grad3 = model.loss_and_grad(np.concatenate([x, x]),
                                       noise=[np.concatenate([e, e]) for e in noise])
    assert abs(loss3 - loss) <= 1e-6 * abs(loss), (loss3, loss)
    ref.assert_close(grad3, first, 1e-5, 1e-5 * scale, what="stacked batch")
    # A batch of one row: the loss is that row's -ELBO.
    loss1, _ = model.loss_and_grad(x[:1], noise=[e[:1] for e in noise])
    elbo = model.elbo(x, noise=noise)
    assert abs(loss1 + elbo[0]) <= 1e-5 * (1 + abs(elbo[0])), (loss1, -elbo[0])
