"""Property-based fuzzing of every public entry point of hvae.Model and
HierarchicalVAE (Hypothesis; profiles in conftest.py).

Inputs vary in shape (0 and 1 rows, 1 feature, wide), dtype (ints, bool,
float16/32/64, long double, object, complex), layout (Fortran order, strided
and negative-stride views, read-only arrays, non-native byte order, nested
lists), values (NaN, inf, subnormals, out of [0, 1]) and hyperparameters.

Every case must end in a correct result or a clear Python exception, never
a crash, a hang or a silent NaN. "Correct" is checked against the same call
on the canonical input (float32, C-contiguous): dtype, layout and byte order
may not change a single bit of a result, and results are finite. A failed
call leaves the model exactly as it was.

Known bugs have their own small tests at the end, marked xfail(strict=True)
so that they flip to failures (and get their mark removed) when fixed.
"""
import math
import pickle
import warnings

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import hvae  # noqa: E402
from hvae import HierarchicalVAE  # noqa: E402

CLEAR_ERRORS = (ValueError, TypeError, OverflowError, MemoryError)
ACTIVATIONS = ["relu", "tanh", "leaky_relu", "elu", "softplus"]
DTYPES = ["float32", "float64", "float16", "longdouble", ">f4", ">f8", "int8", "int32", ">i8",
          "uint8", "uint64", "bool", "object", "complex64", "complex128"]
LAYOUTS = ["C", "F", "rows_strided", "cols_strided", "negative_strides", "readonly", "list"]


def assert_clear(exc, types=CLEAR_ERRORS):
    """A clear error: an expected type, with a message."""
    assert isinstance(exc, types), f"unexpected {type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


def all_finite(value):
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return bool(np.all(np.isfinite(value)))


def assert_same(a, b):
    """Bit-identical results (arrays, floats, or nested lists/dicts of them)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


# ---- strategies ---------------------------------------------------------------


@st.composite
def architectures(draw):
    """Valid, small model arguments (a wide model now and then)."""
    arch = dict(
        n_features=draw(st.sampled_from([1, 1, 2, 3, 5, 8, 1500])),
        latent_dims=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))),
        hidden_dims=tuple(draw(st.lists(st.integers(1, 6), max_size=2))),
        likelihood=draw(st.sampled_from(["gaussian", "bernoulli"])),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        decoder_variance=draw(st.sampled_from(["learned", "unit"])),
        inference=draw(st.sampled_from(["markov", "ladder"])),
        seed=draw(st.integers(0, 2**64 - 1)),
    )
    arch.update(draw(model_families(len(arch["latent_dims"]))))
    return arch


@st.composite
def model_families(draw, n_layers):
    """The prior and latent-family options (mostly the defaults): a mixture,
    VampPrior or density-ratio prior on a Gaussian top layer, or categorical
    layers (Markov inference) under the uniform prior."""
    kind = draw(st.sampled_from(["default"] * 4 + ["gmm", "vamp", "density_ratio",
                                                   "categorical", "factor"]))
    if kind == "gmm":
        return dict(prior="gmm", n_components=draw(st.integers(1, 3)))
    if kind == "vamp":
        return dict(prior="vamp", n_pseudo_inputs=draw(st.integers(1, 3)))
    if kind == "density_ratio":
        return dict(prior="density_ratio", discriminator_hidden=(draw(st.integers(1, 3)),))
    if kind == "factor":
        return dict(discriminator_hidden=tuple(draw(st.lists(st.integers(1, 3), max_size=2))))
    if kind == "categorical":
        families = draw(st.lists(st.sampled_from(["categorical", "gaussian"]),
                                 min_size=n_layers, max_size=n_layers))
        # (ladder inference merges Gaussian posteriors: Markov only)
        return dict(latent_family=tuple(families), n_categories=draw(st.integers(2, 3)),
                    inference="markov")
    return {}


def make_model(arch):
    model = hvae.Model(**arch)
    model.n_threads = 1
    return model


def to_dtype(base, dtype):
    """base (float64) as dtype, NaN/inf mapped to out-of-range ints for int dtypes."""
    dtype = np.dtype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype.kind in "iu":
            ints = np.nan_to_num(np.rint(base), nan=0.0, posinf=100.0, neginf=-100.0)
            if dtype.kind == "u":
                ints = np.abs(ints)
            return ints.astype(dtype)
        if dtype.kind == "b":
            return base != 0
        return base.astype(dtype)


def lay_out(a, layout):
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "rows_strided":
        return np.repeat(a, 2, axis=0)[::2]
    if layout == "cols_strided":
        return np.repeat(a, 2, axis=1)[:, ::2]
    if layout == "negative_strides":
        return a[::-1, ::-1].copy()[::-1, ::-1]
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if layout == "list":
        return a.tolist()
    raise AssertionError(layout)


@st.composite
def arrays_for(draw, n_cols, unit_range=False, specials=True, max_rows=5):
    """A (rows, cols) input of any dtype and layout; usually n_cols wide."""
    rows = draw(st.sampled_from([0, 1, 1, 2, 3, max_rows]))
    cols = n_cols
    if draw(st.integers(0, 9)) == 0:
        cols = draw(st.sampled_from([n_cols + 1, n_cols - 1]))
    if unit_range:
        elements = st.one_of(st.floats(0.0, 1.0),
                             st.sampled_from([0.0, 1.0, 0.5, 1e-40, 1e-45, 1.1754942e-38]))
    else:
        elements = st.one_of(st.floats(-1e3, 1e3),
                             st.sampled_from([0.0, -0.0, 1.0, 1e-40, -1e-45, 1.1754942e-38]))
    base = draw(hnp.arrays(np.float64, (rows, cols), elements=elements))
    if specials and base.size and draw(st.integers(0, 3)) == 0:
        where = draw(st.integers(0, base.size - 1))
        base.flat[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 2.0, -0.5, 1e39]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    note(f"input: {rows}x{cols} {dtype} {layout}")
    return lay_out(to_dtype(base, dtype), layout)


def canonical(X):
    """The float32 C-contiguous array hvae documents it converts X to, or
    None for data that are not real numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = np.asarray(X)
        if a.dtype.kind in "cUSVMmO" and a.dtype != object:
            return None
        if a.dtype == object:
            if any(isinstance(v, complex) for v in a.flat):
                return None
        if a.dtype.kind == "c":
            return None
        return np.ascontiguousarray(a, dtype=np.float32)


def data_problem(ref, n_cols, bernoulli=False):
    """Why hvae must refuse ref (None when it must accept it)."""
    if ref is None:
        return "not real numbers"
    if ref.ndim != 2:
        return "not 2-D"
    if ref.shape[0] == 0:
        return "no rows"
    if ref.shape[1] == 0:
        return "no columns"
    if ref.shape[1] != n_cols:
        return "wrong width"
    if not np.all(np.isfinite(ref)):
        return "NaN or infinity"
    if bernoulli and np.any((ref < 0) | (ref > 1)):
        return "outside [0, 1]"
    return None


def outcome(call, *args, **kwargs):
    """(result, None) or (None, exception)."""
    try:
        return call(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - the property is about which
        return None, exc


# ---- hvae.Model ----------------------------------------------------------------


@given(arch=architectures(), data=st.data())
def test_model_data_entry_points(arch, data):
    """elbo, elbo_terms, encode, loss_and_grad, log_likelihood and fit on
    fuzzed X: the canonical input's result bit for bit, finite; or a
    ValueError that leaves the model untouched."""
    bernoulli = arch["likelihood"] == "bernoulli"
    D, T = arch["n_features"], len(arch["latent_dims"])
    X = data.draw(arrays_for(D, unit_range=bernoulli))
    ref = canonical(X)
    problem = data_problem(ref, D, bernoulli)
    note(f"problem: {problem}")
    model = make_model(arch)
    before = model.parameters.copy()
    calls = {
        "elbo": lambda x: model.elbo(x, seed=3),
        "elbo_terms": lambda x: model.elbo_terms(x),
        "encode": lambda x: model.encode(x),
        "loss_and_grad": lambda x: model.loss_and_grad(x, seed=1),
        "log_likelihood": lambda x: model.log_likelihood(x, n_samples=3),
    }
    for name, call in calls.items():
        result, error = outcome(call, X)
        if problem:
            assert error is not None, f"{name} accepted data with {problem}"
            assert_clear(error, ValueError)
            continue
        assert error is None, f"{name} raised {error!r}"
        assert all_finite(result), f"{name} returned NaN or infinity"
        assert_same(result, call(ref))
        n = ref.shape[0]
        if name == "elbo":
            assert result.shape == (n,) and result.dtype == np.float64
        elif name == "elbo_terms":
            assert result["kl"].shape == (n, T)
        elif name == "encode":
            assert [mu.shape for mu, _ in result] == [(n, w) for w in model.latent_widths]
        elif name == "loss_and_grad":
            assert result[1].shape == (model.n_params,)
    assert np.array_equal(model.parameters, before)

    # fit: the same training from X and from its canonical form.
    fitted, error = outcome(model.fit, X, n_epochs=1, batch_size=2)
    if problem:
        assert_clear(error, ValueError)
        assert np.array_equal(model.parameters, before) and model.optimizer_steps == 0
        return
    assert error is None, repr(error)
    twin = make_model(arch)
    twin.fit(ref, n_epochs=1, batch_size=2)
    assert_same(model.parameters, twin.parameters)
    assert len(fitted) == 1 and fitted[0]["complete"]
    assert all(math.isfinite(fitted[0][k]) for k in ("loss", "elbo", "reconstruction"))
    assert all_finite(model.parameters)
    assert all_finite(model.elbo(ref))


@given(arch=architectures(), data=st.data())
def test_model_decode(arch, data):
    """decode on fuzzed finite Z: the canonical result, finite, shaped (n, D)."""
    model = make_model(arch)
    d1 = model.latent_widths[0]
    Z = data.draw(arrays_for(d1, specials=False))
    return_logvar = data.draw(st.booleans())
    ref = canonical(Z)
    problem = data_problem(ref, d1)
    result, error = outcome(model.decode, Z, return_logvar=return_logvar)
    if problem:
        assert_clear(error, ValueError)
        return
    assert error is None, repr(error)
    assert all_finite(result)
    assert_same(result, model.decode(ref, return_logvar=return_logvar))
    mean = result[0] if return_logvar else result
    assert mean.shape == (ref.shape[0], arch["n_features"]) and mean.dtype == np.float32
    if arch["likelihood"] == "bernoulli":
        assert np.all((mean >= 0) & (mean <= 1))


@given(arch=architectures(),
       n=st.one_of(st.integers(-3, 6), st.sampled_from([2**62, 2**63, 2**64, -2**63 - 1]),
                   st.sampled_from([1.5, "3", None, True])),
       seed=st.one_of(st.none(), st.integers(-2**70, 2**70), st.sampled_from([1.5, "x"])),
       observation_noise=st.booleans())
def test_model_sample(arch, n, seed, observation_noise):
    """sample: n draws, finite, reproducible from a seed; or a clear error."""
    model = make_model(arch)
    state = model.rng_state
    result, error = outcome(model.sample, n, seed=seed, observation_noise=observation_noise)
    valid_n = isinstance(n, int) and 0 <= n <= 6
    valid_seed = seed is None or (isinstance(seed, int) and 0 <= seed < 2**64)
    if not (valid_n and valid_seed):
        assert error is not None, "sample accepted an invalid argument"
        assert_clear(error)
        assert model.rng_state == state
        return
    assert error is None, repr(error)
    assert result.shape == (n, arch["n_features"]) and result.dtype == np.float32
    assert all_finite(result)
    if seed is not None:
        assert model.rng_state == state
        assert_same(result, model.sample(n, seed=seed, observation_noise=observation_noise))
    if arch["likelihood"] == "bernoulli":
        assert np.all((result >= 0) & (result <= 1))


float_settings = st.one_of(
    st.floats(1e-6, 1.0), st.sampled_from([0.0, -1.0, np.nan, np.inf, -np.inf, 1e39, 5e-324]))


@given(arch=architectures(), data=st.data(),
       n_epochs=st.one_of(st.integers(0, 2), st.sampled_from([-1, 2**63, "2", 1.0])),
       batch_size=st.one_of(st.integers(1, 7), st.sampled_from([0, -5, 2**40, 2**64, None])),
       learning_rate=float_settings,
       optimizer=st.sampled_from(["adam", "sgd", "rmsprop", "", None]),
       beta=st.one_of(st.floats(0, 4), st.sampled_from([-1.0, np.nan, np.inf, 1e39])),
       weight_decay=st.one_of(st.floats(0, 0.1), st.sampled_from([-1.0, np.nan, 1e39])),
       momentum=st.one_of(st.floats(0, 0.99), st.sampled_from([1.0, -0.1, np.nan])),
       adam_betas=st.one_of(st.tuples(st.floats(0, 0.99), st.floats(0, 0.999)),
                            st.sampled_from([(1.0, 0.9), (0.9,), (0.9, np.nan), "ab"])),
       adam_eps=st.one_of(st.floats(1e-10, 1e-3), st.sampled_from([-1.0, np.nan, np.inf])),
       objective=st.sampled_from(["elbo", "iwae", "vimco"]),
       n_samples=st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 2**40])),
       free_bits=st.one_of(st.floats(0, 1), st.sampled_from([-1.0, np.nan, np.inf])),
       shuffle=st.booleans())
def test_model_fit_hyperparameters(arch, data, n_epochs, batch_size, learning_rate, optimizer,
                                   beta, weight_decay, momentum, adam_betas, adam_eps,
                                   objective, n_samples, free_bits, shuffle):
    """fit with fuzzed settings: finite parameters and records, or a clear
    error before any work (parameters and optimizer untouched)."""
    bernoulli = arch["likelihood"] == "bernoulli"
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    X = rng.random((data.draw(st.integers(1, 6)), arch["n_features"]), dtype=np.float32)
    if not bernoulli:
        X = (X - 0.5) * 4
    model = make_model(arch)
    before = model.parameters.copy()
    kwargs = dict(n_epochs=n_epochs, batch_size=batch_size, learning_rate=learning_rate,
                  optimizer=optimizer, beta=beta, weight_decay=weight_decay, momentum=momentum,
                  adam_betas=adam_betas, adam_eps=adam_eps, objective=objective,
                  n_samples=n_samples, free_bits=free_bits, shuffle=shuffle)
    records, error = outcome(model.fit, X, **kwargs)
    if error is not None:
        if isinstance(error, hvae.DivergenceError):
            assert all_finite(model.parameters)
            return
        assert_clear(error)
        assert np.array_equal(model.parameters, before), "a refused fit changed the model"
        assert model.optimizer_steps == 0
        return
    # Accepted: the settings must have been valid.
    assert isinstance(n_epochs, int) and 0 <= n_epochs <= 2
    assert isinstance(batch_size, int) and batch_size >= 1
    assert 0 < learning_rate <= 1.0 and optimizer in ("adam", "sgd")
    assert objective in ("elbo", "iwae") and isinstance(n_samples, int) and n_samples >= 1
    for value in (beta, weight_decay, free_bits, adam_eps):
        assert math.isfinite(value) and value >= 0
    assert 0 <= momentum < 1 and all(0 <= b < 1 for b in adam_betas)
    assert len(records) == n_epochs
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("loss", "elbo", "reconstruction"))
        assert all_finite(record["kl"])
    assert all_finite(model.parameters)
    assert all_finite(model.elbo(X))


@given(n_features=st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**63, 2**64, 2.5, None, "3"])),
       latent_dims=st.one_of(
           st.lists(st.integers(-1, 4), max_size=4),
           st.sampled_from([[2**31], [2**40], [1] * 17, [2.0], ["2"], None, 3, [True]])),
       hidden_dims=st.one_of(
           st.lists(st.integers(-1, 6), max_size=3),
           st.sampled_from([[2**31], [1] * 17, [None], 7, "ab"])),
       likelihood=st.sampled_from(["gaussian", "bernoulli", "poisson", "", None, 1]),
       activation=st.sampled_from(ACTIVATIONS + ["gelu", None, b"relu"]),
       decoder_variance=st.sampled_from(["learned", "unit", "fixed", None]),
       inference=st.sampled_from(["markov", "ladder", "top-down", None]),
       n_conditions=st.one_of(st.integers(0, 3), st.sampled_from([-1, 2**31, 2**64, 1.5])),
       seed=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**64, 1.5, None])))
def test_model_constructor(n_features, latent_dims, hidden_dims, likelihood, activation,
                           decoder_variance, inference, n_conditions, seed):
    """Model(...) with fuzzed arguments: a working model or a clear error."""
    kwargs = dict(likelihood=likelihood, activation=activation, decoder_variance=decoder_variance,
                  inference=inference, n_conditions=n_conditions, seed=seed)
    model, error = outcome(hvae.Model, n_features, latent_dims, hidden_dims, **kwargs)
    if error is not None:
        assert_clear(error)
        return
    model.n_threads = 1
    assert model.n_params == sum(v.size for _, v in model.named_parameters())
    assert isinstance(repr(model), str)
    X = np.random.default_rng(0).random((2, model.n_features), dtype=np.float32)
    cond = np.ones((2, n_conditions), np.float32) if n_conditions else None
    assert all_finite(model.elbo(X, cond=cond))
    assert all_finite(model.sample(2, seed=0, cond=cond))


@given(arch=architectures(), data=st.data())
def test_model_state_setters(arch, data):
    """rng_state, n_threads, init_parameters, __setstate__ with fuzzed
    values: accepted and effective, or refused with the model unchanged.
    (Non-tuple and out-of-range rng_state values and seeds: see the xfail
    tests at the end.)"""
    model = make_model(arch)
    params, state = model.parameters.copy(), model.rng_state

    rng_state = data.draw(st.one_of(
        st.tuples(*[st.integers(0, 2**64 - 1)] * 4),
        st.sampled_from([(0, 0, 0, 0), (1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 3, 1.5), ()])))
    try:
        model.rng_state = rng_state
    except CLEAR_ERRORS as exc:
        assert_clear(exc)
        assert model.rng_state == state
    else:
        assert model.rng_state == tuple(rng_state) and any(rng_state)

    n_threads = data.draw(st.sampled_from([1, 2, None, 0, -1, 1025, 2**64, 1.5, "2"]))
    try:
        model.n_threads = n_threads
    except CLEAR_ERRORS as exc:
        assert_clear(exc)
    else:
        assert model.n_threads == n_threads
    model.n_threads = 1

    seed = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([1.5, "1", None])))
    try:
        model.init_parameters(seed)
    except CLEAR_ERRORS as exc:
        assert_clear(exc)
        assert np.array_equal(model.parameters, params)
    else:
        assert_same(model.parameters, make_model(dict(arch, seed=seed)).parameters)

    # __setstate__ with one entry damaged; the model must not change.
    good = model.__getstate__()
    current = model.parameters.copy()
    key = data.draw(st.sampled_from(sorted(good)))
    # (Non-tuple rng_state and non-dict optimizer values: xfail tests below.)
    junk = data.draw(st.sampled_from(
        [(1, 2), (0, 0, 0, 0), (1, 2, 3, 1.5)] if key == "rng_state" else
        [None, {}, {"kind": "adam"}, dict(good["optimizer"] or {}, m=np.zeros(2))]
        if key == "optimizer" else
        [None, 3, "x", np.zeros(2, np.float32), [1, 2], {}]))
    bad = dict(good)
    bad[key] = junk
    try:
        model.__setstate__(bad)
    except CLEAR_ERRORS as exc:
        assert_clear(exc)
        assert np.array_equal(model.parameters, current)
    assert all_finite(model.elbo(np.zeros((1, model.n_features), np.float32)))
    restored = pickle.loads(pickle.dumps(model))
    assert_same(restored.parameters, model.parameters)


@given(arch=architectures(), data=st.data())
def test_model_noise_argument(arch, data):
    """Caller-provided noise: fuzzed count, shapes, dtypes and layouts."""
    model = make_model(arch)
    D, dims = arch["n_features"], model.latent_widths
    n = data.draw(st.integers(1, 3))
    X = np.full((n, D), 0.5, np.float32)
    count = len(dims) if data.draw(st.integers(0, 4)) else data.draw(st.integers(0, 4))
    noise = [data.draw(arrays_for(dims[i] if i < len(dims) else 2, specials=False, max_rows=n))
             for i in range(count)]
    refs = [canonical(eps) for eps in noise]
    ok = count == len(dims) and all(
        r is not None and data_problem(r, dims[i]) is None and r.shape[0] == n
        for i, r in enumerate(refs))
    result, error = outcome(model.elbo, X, noise=noise)
    if not ok:
        assert_clear(error, ValueError)
        return
    assert error is None, repr(error)
    assert all_finite(result)
    assert_same(result, model.elbo(X, noise=refs))


# ---- HierarchicalVAE ---------------------------------------------------------


@st.composite
def estimator_params(draw):
    params = dict(
        latent_dims=draw(st.one_of(st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
                                   st.integers(1, 3))),
        hidden_dims=tuple(draw(st.lists(st.integers(1, 5), max_size=2))),
        likelihood=draw(st.sampled_from(["gaussian", "bernoulli"])),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        decoder_variance=draw(st.sampled_from(["learned", "unit"])),
        inference=draw(st.sampled_from(["markov", "ladder"])),
        objective=draw(st.sampled_from(["elbo", "iwae"])),
        n_mc_samples=draw(st.integers(1, 2)),
        n_importance_samples=draw(st.integers(1, 3)),
        n_epochs=draw(st.integers(0, 2)),
        batch_size=draw(st.integers(1, 8)),
        learning_rate=draw(st.floats(1e-4, 1e-1)),
        optimizer=draw(st.sampled_from(["adam", "sgd"])),
        beta=draw(st.floats(0, 2)),
        free_bits=draw(st.sampled_from([0.0, 0.1])),
        kl_warmup_epochs=draw(st.integers(0, 2)),
        random_state=draw(st.integers(0, 2**32 - 1)),
        n_threads=1,
    )
    n_layers = 1 if isinstance(params["latent_dims"], int) else len(params["latent_dims"])
    params.update(draw(estimator_families(n_layers)))
    if params["objective"] == "iwae":  # it trains the bound itself
        params.update(beta=1.0, free_bits=0.0, kl_warmup_epochs=0)
    return params


@st.composite
def estimator_families(draw, n_layers):
    """The model-family parameters (mostly the defaults), each with the
    settings it needs: the objective 'elbo' for the discriminator models,
    beta-TCVAE and the score function, Markov inference for categorical
    layers."""
    kind = draw(st.sampled_from(["default"] * 4 + ["gmm", "vamp", "density_ratio", "factor",
                                                   "tcvae", "categorical"]))
    elbo = dict(objective="elbo")
    if kind == "gmm":
        return dict(prior="gmm", n_components=draw(st.integers(1, 3)),
                    prior_learning_rate=draw(st.sampled_from([None, 1e-2])))
    if kind == "vamp":
        return dict(prior="vamp", n_pseudo_inputs=draw(st.integers(1, 3)))
    if kind == "density_ratio":
        return dict(elbo, prior="density_ratio", discriminator_hidden=(2,))
    if kind == "factor":
        return dict(elbo, tc_weight=draw(st.floats(0.1, 10)), discriminator_hidden=(3, 2),
                    discriminator_learning_rate=draw(st.floats(1e-4, 1e-2)))
    if kind == "tcvae":
        return dict(elbo, free_bits=0.0,
                    tcvae_weights=tuple(draw(st.lists(st.floats(0, 4), min_size=3,
                                                      max_size=3))))
    if kind == "categorical":
        families = draw(st.lists(st.sampled_from(["categorical", "gaussian"]),
                                 min_size=n_layers, max_size=n_layers))
        estimator = draw(st.sampled_from(["auto", "score_function"]))
        return dict(elbo if estimator == "score_function" else {},
                    latent_types=tuple(families), n_categories=draw(st.integers(2, 3)),
                    inference="markov", gradient_estimator=estimator,
                    straight_through=draw(st.booleans()),
                    temperature=draw(st.floats(0.5, 2.0)))
    return {}


@given(params=estimator_params(), data=st.data())
def test_estimator_fit_and_inference(params, data):
    """HierarchicalVAE on fuzzed X: fit, transform, score_samples, encode,
    reconstruct, inverse_transform, sample, log_likelihood give the canonical
    input's results bit for bit, finite; or a ValueError before any work."""
    bernoulli = params["likelihood"] == "bernoulli"
    X = data.draw(arrays_for(data.draw(st.sampled_from([1, 2, 4, 600])), unit_range=bernoulli))
    ref = canonical(X)
    D = ref.shape[1] if ref is not None and ref.ndim == 2 else 1
    problem = data_problem(ref, D, bernoulli)
    vae = HierarchicalVAE(**params)
    _, error = outcome(vae.fit, X)
    if problem:
        assert error is not None, f"fit accepted data with {problem}"
        # A nested list of complex numbers fails NumPy's float conversion: TypeError.
        assert_clear(error, (ValueError, TypeError) if ref is None else ValueError)
        assert not hasattr(vae, "model_")
        return
    assert error is None, repr(error)
    twin = HierarchicalVAE(**params).fit(ref)
    assert_same(vae.model_.parameters, twin.model_.parameters)
    assert all_finite(vae.model_.parameters)
    assert vae.n_iter_ == params["n_epochs"] == len(vae.history_["elbo"])
    assert all_finite(vae.history_["elbo"])

    Xt = data.draw(arrays_for(D, unit_range=bernoulli))
    ref_t = canonical(Xt)
    problem_t = data_problem(ref_t, D, bernoulli)
    d1 = vae.model_.latent_dims[0]
    for name in ("transform", "score_samples", "encode", "reconstruct", "log_likelihood", "score"):
        call = getattr(vae, name)
        result, error = outcome(call, Xt)
        if problem_t:
            assert error is not None, f"{name} accepted data with {problem_t}"
            assert_clear(error, (ValueError, TypeError) if ref_t is None else ValueError)
            continue
        assert error is None, f"{name} raised {error!r}"
        assert all_finite(result), f"{name} returned NaN or infinity"
        assert_same(result, call(ref_t))
        if name == "transform":
            assert result.shape == (ref_t.shape[0], d1)
    Z = data.draw(arrays_for(d1, specials=False))
    ref_z = canonical(Z)
    result, error = outcome(vae.inverse_transform, Z)
    if data_problem(ref_z, d1) or np.asarray(Z).dtype == object:
        # object arrays: see test_inverse_transform_accepts_numeric_object_arrays
        if error is not None:
            assert_clear(error)
    else:
        assert error is None, repr(error)
        assert all_finite(result)
        assert_same(result, vae.inverse_transform(ref_z))
    n = data.draw(st.integers(0, 4))
    samples = vae.sample(n, random_state=0)
    assert samples.shape == (n, D) and all_finite(samples)


@given(param=st.sampled_from([
           ("latent_dims", [(), (0,), (-1,), (2**40,), (1.5,), "ab", None, (1,) * 17]),
           ("hidden_dims", [(0,), (-2,), (None,), 3.5, (1,) * 17]),
           ("likelihood", ["poisson", None, 3]),
           ("activation", ["gelu", None]),
           ("decoder_variance", ["fixed", None]),
           ("n_epochs", [-1, 1.5, None, "3"]),
           ("batch_size", [0, -1, 2.5, None]),
           ("learning_rate", [0.0, -1.0, np.nan, np.inf, None, "1e-3"]),
           ("optimizer", ["lbfgs", None]),
           ("beta", [-1.0, np.nan, np.inf]),
           ("weight_decay", [-1.0, np.nan]),
           ("n_threads", [0, -1, 1.5, "2"]),
           ("inference", ["top-down", None]),
           ("objective", ["vimco", None]),
           ("n_mc_samples", [0, -1, 1.5]),
           ("n_importance_samples", [0, -1]),
           ("kl_warmup_epochs", [-1, 1.5]),
           ("free_bits", [-1.0, np.nan, np.inf]),
           ("verbose", [-1, 1.5]),
           ("validation_fraction", [-0.1, 0.0, 1.0, 2.0, np.nan]),
           ("n_iter_no_change", [0, -1]),
           ("tol", [np.nan, -np.inf]),
           ("prior", ["mixture", None]),
           ("n_components", [0, -1, 1.5]),
           ("n_pseudo_inputs", [0, 2.5]),
           ("prior_learning_rate", [0.0, -1.0, np.nan]),
           ("latent_types", ["bernoulli", (None,), 3]),
           ("n_categories", [1, 0, 2.5]),
           ("temperature", [0.0, -1.0, np.nan]),
           ("temperature_min", [0.0, np.inf]),
           ("gradient_estimator", ["reinforce", None]),
           ("score_baseline", ["mean", None]),
           ("tc_weight", [-1.0, np.nan]),
           ("tcvae_weights", [(1.0, 1.0), (1.0, np.nan, 1.0), "abc"]),
           ("discriminator_learning_rate", [0.0, np.inf]),
           ("discriminator_betas", [(1.0, 0.9), (0.5,)]),
       ]), data=st.data())
def test_estimator_bad_parameters(param, data):
    """Invalid constructor parameters: a ValueError (or TypeError) naming the
    parameter, raised by fit before any work."""
    name, values = param
    value = data.draw(st.sampled_from(values))
    note(f"{name}={value!r}")
    X = np.random.default_rng(0).random((6, 3))
    vae = HierarchicalVAE(**{"n_epochs": 1, "n_threads": 1, name: value})
    with pytest.raises((ValueError, TypeError)) as info:
        vae.fit(X)
    assert name in str(info.value)
    assert not hasattr(vae, "model_")


# ---- known bugs: xfail(strict=True) until fixed ----------------------------------


@given(arch=architectures(),
       magnitude=st.floats(1e16, 3e38),
       sign=st.sampled_from([1.0, -1.0]))
def test_huge_finite_data_give_finite_results_or_a_clear_error(arch, magnitude, sign):
    arch = dict(arch, likelihood="gaussian")
    model = make_model(arch)
    X = np.full((2, arch["n_features"]), sign * magnitude, np.float32)
    for call in (model.elbo, model.encode, model.log_likelihood,
                 lambda x: model.loss_and_grad(x)[1]):
        result, error = outcome(call, X)
        if error is not None:
            assert_clear(error, (ValueError, FloatingPointError))
        else:
            assert all_finite(result)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_decode_rejects_nonfinite_z(value):
    model = make_model(dict(n_features=3, latent_dims=(2,), hidden_dims=(4,), seed=0))
    Z = np.zeros((2, 2), np.float32)
    Z[1, 0] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.decode(Z)


def test_noise_must_be_finite():
    model = make_model(dict(n_features=3, latent_dims=(2,), hidden_dims=(4,), seed=0))
    X = np.zeros((2, 3), np.float32)
    noise = [np.array([[0.0, np.nan], [0.0, 0.0]], np.float32)]
    with pytest.raises(ValueError, match="noise"):
        model.elbo(X, noise=noise)
    with pytest.raises(ValueError, match="noise"):
        model.loss_and_grad(X, noise=noise)


@pytest.mark.parametrize("setting, value", [
    ("learning_rate", 1e39), ("beta", 1e39), ("weight_decay", 1e39), ("adam_eps", 1e39),
    ("momentum", 1 - 1e-12)])
def test_out_of_float32_settings_are_named(setting, value):
    model = make_model(dict(n_features=3, latent_dims=(2,), hidden_dims=(4,), seed=0))
    X = np.zeros((2, 3), np.float32)
    kwargs = {setting: value}
    if setting == "momentum":
        kwargs["optimizer"] = "sgd"
    with pytest.raises(ValueError, match=setting):
        model.fit(X, **kwargs)
    if setting == "beta":
        with pytest.raises(ValueError, match=setting):
            model.loss_and_grad(X, beta=value)


def test_inverse_transform_rejects_z_beyond_float32():
    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(4,), n_epochs=1, random_state=0,
                          n_threads=1).fit(np.random.default_rng(0).random((10, 3)))
    result, error = outcome(vae.inverse_transform, np.full((1, 2), 1e300))
    assert error is not None or all_finite(result)
    assert error is None or isinstance(error, ValueError)


def test_inverse_transform_accepts_numeric_object_arrays():
    vae = HierarchicalVAE(latent_dims=(2,), hidden_dims=(4,), n_epochs=1, random_state=0,
                          n_threads=1).fit(np.random.default_rng(0).random((10, 3)))
    Z = np.array([[0.5, -1.0]], dtype=object)
    np.testing.assert_array_equal(vae.inverse_transform(Z),
                                  vae.inverse_transform(Z.astype(np.float32)))


@pytest.mark.parametrize("value", [[1, 2, 3, 4], None, "abcd", "delete"])
def test_rng_state_setter_errors_are_clear(value):
    model = make_model(dict(n_features=3, latent_dims=(2,), hidden_dims=(4,), seed=0))
    state = model.rng_state
    with pytest.raises((TypeError, AttributeError)):
        if value == "delete":
            del model.rng_state
        else:
            model.rng_state = value
    assert model.rng_state == state


@pytest.mark.parametrize("case", ["seed=-1", "seed=2**64", "init_parameters(-1)", "rng_state"])
def test_out_of_range_seeds_are_refused(case):
    arch = dict(n_features=3, latent_dims=(2,), hidden_dims=(4,))
    with pytest.raises((ValueError, OverflowError)):
        if case == "seed=-1":
            hvae.Model(**arch, seed=-1)
        elif case == "seed=2**64":
            hvae.Model(**arch, seed=2**64)
        elif case == "init_parameters(-1)":
            hvae.Model(**arch).init_parameters(-1)
        else:
            hvae.Model(**arch).rng_state = (1, 2, 3, -1)


@pytest.mark.parametrize("value", [3, "adam", [1, 2]])
def test_setstate_rejects_a_non_dict_optimizer_state(value):
    model = make_model(dict(n_features=3, latent_dims=(2,), hidden_dims=(4,), seed=0))
    state = dict(model.__getstate__(), optimizer=value)
    with pytest.raises((TypeError, ValueError)):
        model.__setstate__(state)


@pytest.mark.parametrize("how", ["view NaN", "view huge", "setstate NaN"])
def test_non_finite_parameters_never_give_silent_nan(how):
    model = make_model(dict(n_features=5, latent_dims=(3,), hidden_dims=(4,), seed=0))
    if how == "view NaN":
        dict(model.named_parameters())["dec1.mu.b"][:] = np.nan
    elif how == "view huge":
        model.parameters[:] = 1e30
    else:
        state = model.__getstate__()
        state["parameters"] = np.full_like(state["parameters"], np.nan)
        try:
            model.__setstate__(state)
        except ValueError:
            return
    X = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    for call in (lambda: model.elbo(X), lambda: model.encode(X), lambda: model.sample(3, seed=0),
                 lambda: model.decode(np.zeros((2, 3), np.float32)),
                 lambda: model.log_likelihood(X, n_samples=3)):
        result, error = outcome(call)
        if error is not None:
            assert_clear(error, (ValueError, FloatingPointError))
        else:
            assert all_finite(result)
