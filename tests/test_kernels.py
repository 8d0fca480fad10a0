"""Every per-layer kernel, optimizer update and random-number function of
csrc/hvae.h against float64 NumPy, called through ctypes on the extension's
shared library (which exports the HVAE_API symbols).

Tolerances are float32 ones. Where an output is a sum or a product, the
bound scales with the magnitudes of the pieces (|x| @ |W| for a matrix
product), since float32 rounding error grows with them, not with the result:
1e-4 of that scale for matrix products (n_in * 2^-24 is about 1e-5 for the
widest layer here) and 1e-5 for elementwise formulas (a few float32 roundings,
each 6e-8). Backward kernels ACCUMULATE: every gradient buffer is pre-filled
with random values that the expected result includes.
"""

import ctypes
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402

import hvae  # noqa: E402  (a missing build must fail, not skip)
import hvae._core  # noqa: E402

F32P = ctypes.POINTER(ctypes.c_float)
F64P = ctypes.POINTER(ctypes.c_double)
I64P = ctypes.POINTER(ctypes.c_int64)
I64 = ctypes.c_int64
F32 = ctypes.c_float
ENUM = ctypes.c_int


class Rng(ctypes.Structure):
    """hvae_rng: the four words of xoshiro256** state."""
    _fields_ = [("s", ctypes.c_uint64 * 4)]


RNGP = ctypes.POINTER(Rng)

SIGNATURES = {
    "hvae_dense_forward": (None, [F32P, F32P, F32P, F32P, ENUM, I64, I64, I64]),
    "hvae_dense_backward": (None, [F32P, F32P, F32P, F32P, F32P, F32P, F32P,
                                   ENUM, I64, I64, I64]),
    "hvae_activation_forward": (None, [F32P, F32P, ENUM, I64]),
    "hvae_activation_backward": (None, [F32P, F32P, F32P, ENUM, I64]),
    "hvae_reparam_forward": (None, [F32P, F32P, F32P, F32P, I64]),
    "hvae_reparam_backward": (None, [F32P, F32P, F32P, F32P, F32P, I64]),
    "hvae_gaussian_kl_forward": (None, [F64P, F32P, F32P, F32P, F32P, I64, I64]),
    "hvae_gaussian_kl_backward": (None, [F32P, F32P, F32P, F32P, F32, F32P,
                                         F32P, F32P, F32P, I64, I64]),
    "hvae_gaussian_loglik_forward": (None, [F64P, F32P, F32P, F32P, I64, I64]),
    "hvae_gaussian_loglik_backward": (None, [F32P, F32P, F32, F32P, F32P, F32P,
                                             I64, I64]),
    "hvae_bernoulli_loglik_forward": (None, [F64P, F32P, F32P, I64, I64]),
    "hvae_bernoulli_loglik_backward": (None, [F32P, F32, F32P, F32P, I64, I64]),
    "hvae_adam_update": (None, [F32P, F32P, F32P, F32P, I64, F32, F32, F32,
                                F32, F32, I64]),
    "hvae_sgd_update": (None, [F32P, F32P, F32P, I64, F32, F32, F32]),
    "hvae_rng_seed": (None, [RNGP, ctypes.c_uint64]),
    "hvae_rng_next": (ctypes.c_uint64, [RNGP]),
    "hvae_rng_normal": (None, [RNGP, F32P, I64]),
    "hvae_rng_permutation": (None, [RNGP, I64P, I64]),
}

ACTIVATIONS = list(ref.ACTIVATION_CODES)  # every enum value, identity and the log-variance clip included


@pytest.fixture(scope="module")
def lib():
    library = ctypes.CDLL(hvae._core.__file__)
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(library, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return library


_CTYPES = {np.dtype(np.float32): ctypes.c_float,
           np.dtype(np.float64): ctypes.c_double,
           np.dtype(np.int64): ctypes.c_int64}


def ptr(a):
    """A typed pointer to a C-contiguous array's data; None gives NULL."""
    if a is None:
        return None
    assert a.flags.c_contiguous, "kernels take C-contiguous buffers"
    return a.ctypes.data_as(ctypes.POINTER(_CTYPES[a.dtype]))


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def seeded(*key):
    """A generator seeded from a test's parameters, the same in every run
    (built from bytes: Python's str hash is salted per process)."""
    return np.random.default_rng(list(repr(key).encode()))


# --------------------------------------------------------------------------
# Dense layers

DENSE_SIZES = [(1, 1, 1), (1, 5, 3), (7, 1, 4), (7, 13, 5), (33, 64, 17),
               (128, 100, 50)]


def _dense_inputs(rng, B, n_in, n_out):
    x = f32(rng.standard_normal((B, n_in)))
    w = f32(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in))
    b = f32(0.5 * rng.standard_normal(n_out))
    return x, w, b


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("B,n_in,n_out", DENSE_SIZES)
def test_dense_forward(lib, act, B, n_in, n_out):
    rng = seeded("dense_forward", act, B, n_in, n_out)
    x, w, b = _dense_inputs(rng, B, n_in, n_out)
    out = np.full((B, n_out), np.nan, np.float32)
    lib.hvae_dense_forward(ptr(out), ptr(x), ptr(w), ptr(b),
                           ref.ACTIVATION_CODES[act], B, n_in, n_out)
    expected = ref.activation(act, f64(x) @ f64(w) + f64(b))
    # Every activation here is 1-Lipschitz, so the GEMM bound carries over.
    scale = np.abs(f64(x)) @ np.abs(f64(w)) + np.abs(f64(b))
    ref.assert_close(out, expected, rtol=1e-5, atol=1e-4 * scale + 1e-6,
                     what=f"dense_forward {act} B={B} n_in={n_in} n_out={n_out}")


@pytest.mark.parametrize("with_dinp", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("B,n_in,n_out", DENSE_SIZES)
def test_dense_backward(lib, act, B, n_in, n_out, with_dinp):
    rng = seeded("dense_backward", act, B, n_in, n_out, with_dinp)
    x, w, b = _dense_inputs(rng, B, n_in, n_out)
    code = ref.ACTIVATION_CODES[act]
    out = np.empty((B, n_out), np.float32)
    lib.hvae_dense_forward(ptr(out), ptr(x), ptr(w), ptr(b), code, B, n_in, n_out)

    dout = f32(rng.standard_normal((B, n_out)))
    dout_given = dout.copy()
    dinp0 = f32(rng.standard_normal((B, n_in)))
    dw0 = f32(rng.standard_normal((n_in, n_out)))
    db0 = f32(rng.standard_normal(n_out))
    dinp, dw, db = dinp0.copy(), dw0.copy(), db0.copy()
    lib.hvae_dense_backward(ptr(dinp) if with_dinp else None, ptr(dw), ptr(db),
                            ptr(dout), ptr(out), ptr(x), ptr(w), code,
                            B, n_in, n_out)

    pre = f64(x) @ f64(w) + f64(b)
    derivative = ref.activation_derivative(act, pre)
    if act in ref.KINKED_ACTIVATIONS:
        # Which side of the kink comes from the float32 forward output, as
        # the header specifies; float64 could disagree within 1e-6 of zero.
        below = 0.0 if act == "relu" else ref.LEAKY_SLOPE
        derivative = np.where(out > 0, 1.0, below)
    dpre = f64(dout_given) * derivative
    what = f"dense_backward {act} B={B} n_in={n_in} n_out={n_out}"
    # dout is consumed: it now holds dL/d(pre-activation).
    ref.assert_close(dout, dpre, rtol=1e-5, atol=1e-6,
                     what=what + " dout -> dpre")
    ref.assert_close(dw, f64(dw0) + f64(x).T @ dpre, rtol=1e-5,
                     atol=1e-4 * (np.abs(f64(x)).T @ np.abs(dpre)) + 1e-6,
                     what=what + " dweight")
    ref.assert_close(db, f64(db0) + dpre.sum(axis=0), rtol=1e-5,
                     atol=1e-4 * np.abs(dpre).sum(axis=0) + 1e-6,
                     what=what + " dbias")
    if with_dinp:
        ref.assert_close(dinp, f64(dinp0) + dpre @ f64(w).T, rtol=1e-5,
                         atol=1e-4 * (np.abs(dpre) @ np.abs(f64(w)).T) + 1e-6,
                         what=what + " dinp")
    else:
        np.testing.assert_array_equal(dinp, dinp0)


# --------------------------------------------------------------------------
# Activations

EXTREMES = np.array([-100.0, -50.0, -20.0, -1e-3, 1e-3, 20.0, 50.0, 100.0])


def _preactivations(rng, n):
    """n values: mostly 3 * N(0, 1), with the extremes in when they fit.
    Zero is left out: relu'(0) is a convention, not a spec."""
    pre = 3.0 * rng.standard_normal(n)
    k = min(n, EXTREMES.size)
    pre[:k] = EXTREMES[:k] if n >= EXTREMES.size else rng.choice(EXTREMES, k)
    pre[pre == 0] = 0.5
    return f32(pre)


@pytest.mark.parametrize("alias", [False, True])
@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_forward(lib, act, n, alias):
    rng = seeded("activation_forward", act, n, alias)
    pre = _preactivations(rng, n)
    expected = ref.activation(act, f64(pre))
    if alias:
        out = pre.copy()
        lib.hvae_activation_forward(ptr(out), ptr(out), ref.ACTIVATION_CODES[act], n)
    else:
        out = np.full(n, np.nan, np.float32)
        lib.hvae_activation_forward(ptr(out), ptr(pre), ref.ACTIVATION_CODES[act], n)
    ref.assert_close(out, expected, rtol=1e-5, atol=1e-6,
                     what=f"activation_forward {act} n={n} alias={alias}")


@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_backward(lib, act, n):
    rng = seeded("activation_backward", act, n)
    pre = _preactivations(rng, n)
    out = f32(ref.activation(act, f64(pre)))  # the forward output, as in a model
    dout = f32(rng.standard_normal(n))
    dinp0 = f32(rng.standard_normal(n))
    dinp = dinp0.copy()
    lib.hvae_activation_backward(ptr(dinp), ptr(dout), ptr(out),
                                 ref.ACTIVATION_CODES[act], n)
    expected = f64(dinp0) + f64(dout) * ref.activation_derivative(act, f64(pre))
    ref.assert_close(dinp, expected, rtol=1e-5,
                     atol=1e-6 * (1 + np.abs(f64(dinp0)) + np.abs(f64(dout))),
                     what=f"activation_backward {act} n={n}")


# --------------------------------------------------------------------------
# Reparameterisation


def _gaussian_inputs(rng, shape):
    mu = f32(rng.standard_normal(shape))
    logvar = f32(rng.uniform(-6.0, 4.0, shape))
    return mu, logvar


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_reparam_forward(lib, n):
    rng = seeded("reparam_forward", n)
    mu, logvar = _gaussian_inputs(rng, n)
    eps = f32(rng.standard_normal(n))
    z = np.full(n, np.nan, np.float32)
    lib.hvae_reparam_forward(ptr(z), ptr(mu), ptr(logvar), ptr(eps), n)
    noise = np.exp(f64(logvar) / 2) * f64(eps)
    ref.assert_close(z, f64(mu) + noise, rtol=0.0,
                     atol=1e-5 * (np.abs(f64(mu)) + np.abs(noise)) + 1e-7,
                     what=f"reparam_forward n={n}")


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_reparam_backward(lib, n):
    rng = seeded("reparam_backward", n)
    _, logvar = _gaussian_inputs(rng, n)
    eps = f32(rng.standard_normal(n))
    dz = f32(rng.standard_normal(n))
    dmu0, dlv0 = f32(rng.standard_normal(n)), f32(rng.standard_normal(n))
    dmu, dlv = dmu0.copy(), dlv0.copy()
    lib.hvae_reparam_backward(ptr(dmu), ptr(dlv), ptr(dz), ptr(logvar), ptr(eps), n)
    term = f64(dz) * f64(eps) * np.exp(f64(logvar) / 2) / 2
    ref.assert_close(dmu, f64(dmu0) + f64(dz), rtol=0.0,
                     atol=1e-6 * (np.abs(f64(dmu0)) + np.abs(f64(dz))) + 1e-7,
                     what=f"reparam_backward dmu n={n}")
    ref.assert_close(dlv, f64(dlv0) + term, rtol=0.0,
                     atol=1e-5 * (np.abs(f64(dlv0)) + np.abs(term)) + 1e-7,
                     what=f"reparam_backward dlogvar n={n}")


# --------------------------------------------------------------------------
# Gaussian KL

KL_SIZES = [(1, 1), (1, 6), (7, 1), (7, 5), (50, 33)]
NULL_CASES = list(itertools.product([True, False], repeat=2))  # mu_p, lv_p given


def _kl_inputs(rng, B, d):
    mu_q, lv_q = _gaussian_inputs(rng, (B, d))
    mu_p, lv_p = _gaussian_inputs(rng, (B, d))
    return mu_q, lv_q, mu_p, lv_p


@pytest.mark.parametrize("mu_p_given,lv_p_given", NULL_CASES)
@pytest.mark.parametrize("B,d", KL_SIZES)
def test_gaussian_kl_forward(lib, B, d, mu_p_given, lv_p_given):
    rng = seeded("kl_forward", B, d, mu_p_given, lv_p_given)
    mu_q, lv_q, mu_p, lv_p = _kl_inputs(rng, B, d)
    mu_p = mu_p if mu_p_given else None
    lv_p = lv_p if lv_p_given else None
    kl = np.full(B, np.nan)  # NaN: the kernel must write, not accumulate
    lib.hvae_gaussian_kl_forward(ptr(kl), ptr(mu_q), ptr(lv_q), ptr(mu_p),
                                 ptr(lv_p), B, d)
    m_p = 0.0 if mu_p is None else f64(mu_p)
    l_p = 0.0 if lv_p is None else f64(lv_p)
    expected = ref.gaussian_kl(f64(mu_q), f64(lv_q), m_p, l_p)
    scale = 0.5 * np.sum(np.abs(l_p - f64(lv_q)) + np.exp(f64(lv_q) - l_p)
                         + (f64(mu_q) - m_p) ** 2 * np.exp(-l_p) + 1, axis=1)
    ref.assert_close(kl, expected, rtol=0.0, atol=1e-5 * scale,
                     what=f"gaussian_kl_forward B={B} d={d} "
                          f"mu_p={mu_p_given} lv_p={lv_p_given}")


@pytest.mark.parametrize("dmu_p_given,dlv_p_given", NULL_CASES)
@pytest.mark.parametrize("mu_p_given,lv_p_given", NULL_CASES)
@pytest.mark.parametrize("B,d", KL_SIZES)
def test_gaussian_kl_backward(lib, B, d, mu_p_given, lv_p_given, dmu_p_given,
                              dlv_p_given):
    rng = seeded("kl_backward", B, d, mu_p_given, lv_p_given, dmu_p_given,
                 dlv_p_given)
    mu_q, lv_q, mu_p, lv_p = _kl_inputs(rng, B, d)
    mu_p = mu_p if mu_p_given else None
    lv_p = lv_p if lv_p_given else None
    grads0 = [f32(rng.standard_normal((B, d))) for _ in range(4)]
    dmu_q, dlv_q, dmu_p, dlv_p = [g.copy() for g in grads0]
    # A gradient whose input is NULL is passed as NULL too (the spec skips it).
    pass_dmu_p = dmu_p if (mu_p_given and dmu_p_given) else None
    pass_dlv_p = dlv_p if (lv_p_given and dlv_p_given) else None
    scale = np.float32(0.37)
    lib.hvae_gaussian_kl_backward(ptr(dmu_q), ptr(dlv_q), ptr(pass_dmu_p),
                                  ptr(pass_dlv_p), scale, ptr(mu_q), ptr(lv_q),
                                  ptr(mu_p), ptr(lv_p), B, d)

    s = float(scale)
    m_q, l_q = f64(mu_q), f64(lv_q)
    m_p = 0.0 if mu_p is None else f64(mu_p)
    l_p = 0.0 if lv_p is None else f64(lv_p)
    inv_var_p = np.exp(-l_p)
    diff = m_q - m_p
    expected = {
        "dmu_q": s * diff * inv_var_p,
        "dlv_q": s * 0.5 * (np.exp(l_q - l_p) - 1.0),
        "dmu_p": -s * diff * inv_var_p,
        "dlv_p": s * 0.5 * (1.0 - (np.exp(l_q) + diff ** 2) * inv_var_p),
    }
    magnitude = {  # sums of |pieces|, the scale of float32 rounding
        "dmu_q": s * (np.abs(m_q) + np.abs(m_p)) * inv_var_p,
        "dlv_q": s * 0.5 * (np.exp(l_q - l_p) + 1.0),
        "dmu_p": s * (np.abs(m_q) + np.abs(m_p)) * inv_var_p,
        "dlv_p": s * 0.5 * (1.0 + (np.exp(l_q) + diff ** 2) * inv_var_p),
    }
    what = (f"gaussian_kl_backward B={B} d={d} mu_p={mu_p_given} "
            f"lv_p={lv_p_given} dmu_p={dmu_p_given} dlv_p={dlv_p_given}")
    outputs = {"dmu_q": (dmu_q, True), "dlv_q": (dlv_q, True),
               "dmu_p": (dmu_p, pass_dmu_p is not None),
               "dlv_p": (dlv_p, pass_dlv_p is not None)}
    for (name, (got, written)), g0 in zip(outputs.items(), grads0):
        if written:
            ref.assert_close(got, f64(g0) + expected[name], rtol=0.0,
                             atol=1e-5 * (np.abs(f64(g0)) + magnitude[name]) + 1e-7,
                             what=f"{what} {name}")
        else:
            np.testing.assert_array_equal(got, g0, err_msg=f"{what} {name}")


@pytest.mark.parametrize("mu_p_given,lv_p_given", [(False, False), (True, False),
                                                   (False, True)])
def test_gaussian_kl_backward_skips_gradients_of_null_inputs(lib, mu_p_given,
                                                             lv_p_given):
    """'Gradients for a NULL input are skipped': a buffer given for the
    gradient of a NULL input stays untouched."""
    B, d = 7, 5
    rng = seeded("kl_backward_null", mu_p_given, lv_p_given)
    mu_q, lv_q, mu_p, lv_p = _kl_inputs(rng, B, d)
    mu_p = mu_p if mu_p_given else None
    lv_p = lv_p if lv_p_given else None
    dmu_q, dlv_q = np.zeros((B, d), np.float32), np.zeros((B, d), np.float32)
    sentinel_mu = f32(rng.standard_normal((B, d)))
    sentinel_lv = f32(rng.standard_normal((B, d)))
    dmu_p, dlv_p = sentinel_mu.copy(), sentinel_lv.copy()
    lib.hvae_gaussian_kl_backward(ptr(dmu_q), ptr(dlv_q), ptr(dmu_p), ptr(dlv_p),
                                  1.0, ptr(mu_q), ptr(lv_q), ptr(mu_p), ptr(lv_p),
                                  B, d)
    if mu_p is None:
        np.testing.assert_array_equal(dmu_p, sentinel_mu,
                                      err_msg="dmu_p written although mu_p is NULL")
    if lv_p is None:
        np.testing.assert_array_equal(dlv_p, sentinel_lv,
                                      err_msg="dlv_p written although lv_p is NULL")


# --------------------------------------------------------------------------
# Log-likelihoods

LL_SIZES = [(1, 1), (1, 9), (7, 1), (7, 12), (50, 33)]


@pytest.mark.parametrize("lv_given", [True, False])
@pytest.mark.parametrize("B,D", LL_SIZES)
def test_gaussian_loglik_forward(lib, B, D, lv_given):
    rng = seeded("gll_forward", B, D, lv_given)
    x = f32(rng.standard_normal((B, D)))
    mu, lv = _gaussian_inputs(rng, (B, D))
    lv = lv if lv_given else None
    ll = np.full(B, np.nan)
    lib.hvae_gaussian_loglik_forward(ptr(ll), ptr(x), ptr(mu), ptr(lv), B, D)
    l = 0.0 if lv is None else f64(lv)
    expected = ref.gaussian_loglik(f64(x), f64(mu), l)
    # Written out independently of ref.gaussian_loglik, for one row:
    row = -0.5 * sum(np.log(2 * np.pi) + (0.0 if lv is None else float(lv[0, j]))
                     + (float(x[0, j]) - float(mu[0, j])) ** 2
                     / np.exp(0.0 if lv is None else float(lv[0, j]))
                     for j in range(D))
    assert abs(row - expected[0]) <= 1e-9 * (1 + abs(row))
    scale = 0.5 * np.sum(np.log(2 * np.pi) + np.abs(l + 0 * f64(x))
                         + (f64(x) - f64(mu)) ** 2 * np.exp(-l), axis=1)
    ref.assert_close(ll, expected, rtol=0.0, atol=1e-5 * scale,
                     what=f"gaussian_loglik_forward B={B} D={D} lv={lv_given}")


@pytest.mark.parametrize("lv_given,dlv_given", [(True, True), (True, False),
                                                (False, False)])
@pytest.mark.parametrize("B,D", LL_SIZES)
def test_gaussian_loglik_backward(lib, B, D, lv_given, dlv_given):
    rng = seeded("gll_backward", B, D, lv_given, dlv_given)
    x = f32(rng.standard_normal((B, D)))
    mu, lv = _gaussian_inputs(rng, (B, D))
    lv = lv if lv_given else None
    dmu0, dlv0 = f32(rng.standard_normal((B, D))), f32(rng.standard_normal((B, D)))
    dmu, dlv = dmu0.copy(), dlv0.copy()
    scale = np.float32(-0.625)
    lib.hvae_gaussian_loglik_backward(ptr(dmu), ptr(dlv) if dlv_given else None,
                                      scale, ptr(x), ptr(mu), ptr(lv), B, D)
    s = float(scale)
    l = 0.0 if lv is None else f64(lv)
    inv_var = np.exp(-l)
    r = f64(x) - f64(mu)
    what = f"gaussian_loglik_backward B={B} D={D} lv={lv_given} dlv={dlv_given}"
    ref.assert_close(dmu, f64(dmu0) + s * r * inv_var, rtol=0.0,
                     atol=1e-5 * (np.abs(f64(dmu0)) + abs(s) * (np.abs(f64(x))
                                  + np.abs(f64(mu))) * inv_var) + 1e-7,
                     what=what + " dmu")
    if dlv_given:
        ref.assert_close(dlv, f64(dlv0) + s * 0.5 * (r ** 2 * inv_var - 1.0),
                         rtol=0.0,
                         atol=1e-5 * (np.abs(f64(dlv0))
                                      + abs(s) * 0.5 * (r ** 2 * inv_var + 1)) + 1e-7,
                         what=what + " dlv")
    else:
        np.testing.assert_array_equal(dlv, dlv0)


def _bernoulli_inputs(rng, B, D):
    x = rng.uniform(0.0, 1.0, (B, D))
    binary = rng.uniform(size=(B, D)) < 0.5
    x[binary] = np.round(x[binary])
    logits = 4.0 * rng.standard_normal((B, D))
    k = min(B * D, EXTREMES.size)
    logits.ravel()[:k] = EXTREMES[:k]  # overflow-prone values for softplus
    return f32(x), f32(logits)


@pytest.mark.parametrize("B,D", LL_SIZES)
def test_bernoulli_loglik_forward(lib, B, D):
    rng = seeded("bll_forward", B, D)
    x, logits = _bernoulli_inputs(rng, B, D)
    ll = np.full(B, np.nan)
    lib.hvae_bernoulli_loglik_forward(ptr(ll), ptr(x), ptr(logits), B, D)
    expected = ref.bernoulli_loglik(f64(x), f64(logits))
    scale = np.sum(np.abs(f64(x) * f64(logits)) + ref.softplus(f64(logits)), axis=1)
    ref.assert_close(ll, expected, rtol=0.0, atol=1e-5 * scale + 1e-7,
                     what=f"bernoulli_loglik_forward B={B} D={D}")


@pytest.mark.parametrize("B,D", LL_SIZES)
def test_bernoulli_loglik_backward(lib, B, D):
    rng = seeded("bll_backward", B, D)
    x, logits = _bernoulli_inputs(rng, B, D)
    dl0 = f32(rng.standard_normal((B, D)))
    dl = dl0.copy()
    scale = np.float32(1.75)
    lib.hvae_bernoulli_loglik_backward(ptr(dl), scale, ptr(x), ptr(logits), B, D)
    expected = f64(dl0) + float(scale) * (f64(x) - ref.sigmoid(f64(logits)))
    ref.assert_close(dl, expected, rtol=0.0,
                     atol=1e-5 * (np.abs(f64(dl0)) + float(scale)) + 1e-7,
                     what=f"bernoulli_loglik_backward B={B} D={D}")


# --------------------------------------------------------------------------
# Optimizers (float64 references that follow the header's formulas, with the
# hyperparameters rounded to float32 as the kernel receives them)


def _h(value):
    return float(np.float32(value))


def adam_reference(p, g, m, v, lr, b1, b2, eps, wd, t):
    lr, b1, b2, eps, wd = map(_h, (lr, b1, b2, eps, wd))
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_adam_update(lib, n, weight_decay):
    rng = seeded("adam", n, weight_decay)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    p = f32(rng.standard_normal(n))
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p0 = f64(p).copy()
    p_ref, m_ref, v_ref = f64(p).copy(), np.zeros(n), np.zeros(n)
    # Gradient scales per entry from 1e-9 (where eps matters) to 10.
    g_scale = 10.0 ** rng.uniform(-9, 1, n)
    g_max = np.zeros(n)
    for t in range(1, 7):
        g = f32(g_scale * rng.standard_normal(n))
        g_max = np.maximum(g_max, np.abs(f64(g)) + weight_decay * np.abs(p_ref))
        lib.hvae_adam_update(ptr(p), ptr(g), ptr(m), ptr(v), n, lr, b1, b2, eps,
                             weight_decay, t)
        p_ref, m_ref, v_ref = adam_reference(p_ref, f64(g), m_ref, v_ref, lr, b1,
                                             b2, eps, weight_decay, t)
        what = f"adam n={n} wd={weight_decay} step {t}"
        ref.assert_close(m, m_ref, rtol=1e-5, atol=1e-6 * g_max, what=what + " m")
        ref.assert_close(v, v_ref, rtol=1e-5, atol=1e-6 * g_max ** 2,
                         what=what + " v")
        # Each step rounds p to float32 (6e-8 |p|); beyond that the updates
        # themselves must be right to 1e-4 of their size.
        ref.assert_close(p, p_ref, rtol=0.0,
                         atol=1e-6 * np.abs(p0) + 1e-4 * np.abs(p_ref - p0) + 1e-9,
                         what=what + " params")


def test_adam_update_late_step(lib):
    """Bias corrections at t = 1000 and arbitrary moments."""
    rng = seeded("adam_late")
    n = 257
    p = f32(rng.standard_normal(n))
    g = f32(rng.standard_normal(n))
    m = f32(0.1 * rng.standard_normal(n))
    v = f32(rng.uniform(1e-4, 1e-1, n))
    args = (1e-3, 0.8, 0.99, 1e-6, 0.01)
    p_ref, m_ref, v_ref = adam_reference(f64(p), f64(g), f64(m), f64(v), *args, 1000)
    p0 = f64(p).copy()
    lib.hvae_adam_update(ptr(p), ptr(g), ptr(m), ptr(v), n, *args, 1000)
    ref.assert_close(m, m_ref, rtol=1e-5, atol=1e-7, what="adam t=1000 m")
    ref.assert_close(v, v_ref, rtol=1e-5, atol=1e-9, what="adam t=1000 v")
    ref.assert_close(p, p_ref, rtol=0.0,
                     atol=1e-6 * np.abs(p0) + 1e-4 * np.abs(p_ref - p0),
                     what="adam t=1000 params")


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 0.05),
                                                   (0.9, 0.0), (0.9, 0.05)])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_sgd_update(lib, n, momentum, weight_decay):
    rng = seeded("sgd", n, momentum, weight_decay)
    lr = 0.05
    p = f32(rng.standard_normal(n))
    p0 = f64(p).copy()
    # A non-zero starting buffer checks buf = momentum * buf + g exactly.
    buf = f32(rng.standard_normal(n)) if momentum else None
    p_ref = f64(p).copy()
    buf_ref = None if buf is None else f64(buf).copy()
    for step in range(5):
        g = f32(rng.standard_normal(n))
        lib.hvae_sgd_update(ptr(p), ptr(g), ptr(buf), n, lr, momentum,
                            weight_decay)
        d = f64(g) + _h(weight_decay) * p_ref
        if momentum:
            buf_ref = _h(momentum) * buf_ref + d
            d = buf_ref
        p_ref = p_ref - _h(lr) * d
        what = f"sgd n={n} momentum={momentum} wd={weight_decay} step {step}"
        if momentum:
            ref.assert_close(buf, buf_ref, rtol=1e-5, atol=1e-6, what=what + " buf")
        ref.assert_close(p, p_ref, rtol=0.0,
                         atol=1e-6 * np.abs(p0) + 1e-4 * np.abs(p_ref - p0) + 1e-9,
                         what=what + " params")


# --------------------------------------------------------------------------
# Random numbers


def _normals(lib, seed, n):
    rng = Rng()
    lib.hvae_rng_seed(ctypes.byref(rng), seed)
    out = np.full(n, np.nan, np.float32)
    lib.hvae_rng_normal(ctypes.byref(rng), ptr(out), n)
    return out


def test_rng_next_is_seed_deterministic_and_state_is_plain_data(lib):
    a, b = Rng(), Rng()
    lib.hvae_rng_seed(ctypes.byref(a), 12345)
    lib.hvae_rng_seed(ctypes.byref(b), 12345)
    first = [lib.hvae_rng_next(ctypes.byref(a)) for _ in range(8)]
    assert first == [lib.hvae_rng_next(ctypes.byref(b)) for _ in range(8)]
    assert len(set(first)) == 8
    saved = Rng.from_buffer_copy(a)  # the state is plain data: copy it
    more = [lib.hvae_rng_next(ctypes.byref(a)) for _ in range(4)]
    assert more == [lib.hvae_rng_next(ctypes.byref(saved)) for _ in range(4)]
    c = Rng()
    lib.hvae_rng_seed(ctypes.byref(c), 12346)
    assert [lib.hvae_rng_next(ctypes.byref(c)) for _ in range(8)] != first
    # splitmix64 seeding never leaves the all-zero state (xoshiro's fixed point).
    z = Rng()
    lib.hvae_rng_seed(ctypes.byref(z), 0)
    assert any(z.s[i] for i in range(4))


def test_rng_normal_moments(lib):
    n = 100_000
    z = f64(_normals(lib, 2024, n))
    assert np.all(np.isfinite(z))
    # Bounds of 4.5 to 6 standard errors: a correct generator passes them for
    # practically any seed, a wrong scale, shift or pairing does not.
    mean, std = z.mean(), z.std()
    assert abs(mean) < 6 / np.sqrt(n), f"mean {mean:.5f}"
    assert abs(std - 1) < 4.5 / np.sqrt(2 * n), f"std {std:.5f}"
    within1, within2 = np.mean(np.abs(z) < 1), np.mean(np.abs(z) < 2)
    assert abs(within1 - 0.682689) < 4.5 * np.sqrt(0.683 * 0.317 / n), within1
    assert abs(within2 - 0.954500) < 4.5 * np.sqrt(0.955 * 0.045 / n), within2
    skew = np.mean((z - mean) ** 3) / std ** 3
    kurt = np.mean((z - mean) ** 4) / std ** 4
    assert abs(skew) < 5 * np.sqrt(6 / n), f"skewness {skew:.4f}"
    assert abs(kurt - 3) < 5 * np.sqrt(24 / n), f"kurtosis {kurt:.4f}"
    # Box-Muller makes pairs: neighbours must still be uncorrelated.
    for lag in (1, 2):
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 6 / np.sqrt(n), f"lag-{lag} correlation {r:.4f}"
    assert 3.5 < np.abs(z).max() < 6.5


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_rng_normal_is_seed_deterministic(lib, n):
    a, b, c = _normals(lib, 7, n), _normals(lib, 7, n), _normals(lib, 8, n)
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Successive calls continue the stream rather than repeating it.
    rng = Rng()
    lib.hvae_rng_seed(ctypes.byref(rng), 7)
    first, second = np.empty(n, np.float32), np.empty(n, np.float32)
    lib.hvae_rng_normal(ctypes.byref(rng), ptr(first), n)
    lib.hvae_rng_normal(ctypes.byref(rng), ptr(second), n)
    np.testing.assert_array_equal(first, a)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_rng_permutation_is_a_permutation(lib, n):
    rng = Rng()
    lib.hvae_rng_seed(ctypes.byref(rng), 99)
    perms = []
    for _ in range(3):
        out = np.full(n, -1, np.int64)
        lib.hvae_rng_permutation(ctypes.byref(rng), ptr(out), n)
        np.testing.assert_array_equal(np.sort(out), np.arange(n))
        perms.append(out)
    if n == 1000:
        assert not np.array_equal(perms[0], np.arange(n))
        assert not np.array_equal(perms[0], perms[1])
    again = Rng()
    lib.hvae_rng_seed(ctypes.byref(again), 99)
    out = np.full(n, -1, np.int64)
    lib.hvae_rng_permutation(ctypes.byref(again), ptr(out), n)
    np.testing.assert_array_equal(out, perms[0])


def test_rng_permutation_is_unbiased(lib):
    """All 6 orders of 3 items about equally often, and each of 5 items lands
    in each of 5 positions about equally often (chi-square, p ~ 1e-5)."""
    rng = Rng()
    lib.hvae_rng_seed(ctypes.byref(rng), 31337)
    draws = 6000
    counts = {}
    out = np.empty(3, np.int64)
    for _ in range(draws):
        lib.hvae_rng_permutation(ctypes.byref(rng), ptr(out), 3)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    assert len(counts) == 6, counts
    observed = np.array(list(counts.values()), dtype=float)
    chi2 = np.sum((observed - draws / 6) ** 2 / (draws / 6))
    assert chi2 < 30.0, f"chi-square {chi2:.1f} (5 dof) for {counts}"

    positions = np.zeros((5, 5))
    out = np.empty(5, np.int64)
    for _ in range(draws):
        lib.hvae_rng_permutation(ctypes.byref(rng), ptr(out), 5)
        positions[out, np.arange(5)] += 1
    chi2 = np.sum((positions - draws / 5) ** 2 / (draws / 5))
    assert chi2 < 60.0, f"chi-square {chi2:.1f} (16 dof) for\n{positions}"
