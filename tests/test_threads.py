"""hvae's thread pool: results on one and several threads, resizes, fork, and
two models sharing the pool from two Python threads.

Evaluation splits rows between threads and computes every row alone, so it
is bitwise the same on any number of threads. Training splits products in
column blocks, each computed by OpenBLAS on one thread; OpenBLAS's kernels
can round the last bit differently for different block widths, so training
agrees to within float rounding.
"""
import multiprocessing
import threading

import numpy as np
import pytest

import hvae

D = 784


def make_model(seed=0, **kwargs):
    # W2/W3-sized layers: large enough that every product and elementwise
    # pass is split between threads.
    options = dict(latent_dims=(32, 16), hidden_dims=(512, 256), likelihood="bernoulli")
    options.update(kwargs)
    return hvae.Model(D, seed=seed, **options)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    return (rng.random((700, D)) < 0.3).astype(np.float32)


def evaluate(model, X):
    encoded = model.encode(X)
    terms = model.elbo_terms(X)
    return {
        "mu": np.concatenate([mu.ravel() for mu, _ in encoded]),
        "logvar": np.concatenate([lv.ravel() for _, lv in encoded]),
        "elbo": terms["elbo"],
        "kl": terms["kl"],
        "decode": model.decode(encoded[0][0]),
        "sample": model.sample(50, seed=3),
    }


@pytest.mark.parametrize("kwargs", [{}, {"inference": "ladder"},
                                    {"likelihood": "gaussian", "activation": "tanh"}])
def test_evaluation_is_bitwise_the_same_on_one_and_two_threads(data, kwargs):
    model = make_model(**kwargs)
    results = {}
    for threads in (1, 2, 3):
        model.n_threads = threads
        results[threads] = evaluate(model, data)
    for threads in (2, 3):
        for name, value in results[1].items():
            assert np.array_equal(value, results[threads][name]), (name, threads)


def test_gradient_agrees_on_one_and_two_threads(data):
    model = make_model()
    X = data[:256]
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal((256, d)).astype(np.float32) for d in (32, 16)]
    out = {}
    for threads in (1, 2):
        model.n_threads = threads
        loss, grad = model.loss_and_grad(X, noise=noise)
        out[threads] = (loss, np.array(grad, dtype=np.float64))
    (loss1, g1), (loss2, g2) = out[1], out[2]
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    scale = np.abs(g1).max()
    assert np.abs(g1 - g2).max() <= 1e-5 * scale


def test_training_agrees_on_one_and_two_threads(data):
    params = {}
    for threads in (1, 2):
        model = make_model(seed=1)
        model.n_threads = threads
        records = model.fit(data[:512], n_epochs=1, batch_size=128, learning_rate=1e-3)
        assert np.isfinite(records[-1]["elbo"])
        params[threads] = np.array(model.parameters, dtype=np.float64)
    # Four Adam steps of 1e-3: rounding differences stay far below a step.
    assert np.abs(params[1] - params[2]).max() < 1e-4


def test_many_resizes_between_calls(data):
    model = make_model()
    X = data[:130]
    model.n_threads = 1
    reference = model.encode(X)[0][0]
    for k in range(200):
        model.n_threads = 1 + k % 3
        if k % 10 == 0:
            assert np.array_equal(model.encode(X)[0][0], reference)
    hvae.set_num_threads(1)


def _child_encode(X, queue):
    model = make_model()
    model.n_threads = 2
    queue.put(model.encode(X)[0][0])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="no fork() on this platform")
def test_pool_works_in_a_forked_child(data):
    X = data[:200]
    model = make_model()
    model.n_threads = 2
    parent = model.encode(X)[0][0]  # the pool is running when we fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_encode, args=(X, queue))
    child.start()
    try:
        result = queue.get(timeout=120)
    finally:
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert np.array_equal(result, parent)


def test_two_models_share_the_pool_from_two_threads(data):
    # One of them runs its regions on the pool, the other (finding it busy)
    # on its own thread; results are the same either way.
    models = [make_model(seed=s) for s in (0, 1)]
    for m in models:
        m.n_threads = 1
    expected = [m.elbo(data) for m in models]
    errors, results = [], [None, None]

    def work(i):
        try:
            models[i].n_threads = 2
            for _ in range(5):
                out = models[i].elbo(data)
                if not np.array_equal(out, expected[i]):
                    results[i] = out
                    return
            results[i] = "same"
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert results == ["same", "same"]


def test_density_ratio_evaluation_is_repeatable_on_two_threads():
    """The density ratio's term runs the model's one discriminator (one set of
    MLP buffers): evaluation must not split its rows between threads, or the
    threads overwrite each other's activations and the ELBO changes from call
    to call."""
    rng = np.random.default_rng(0)
    X = (rng.random((600, 64)) < 0.3).astype(np.float32)
    model = hvae.Model(64, latent_dims=(2,), hidden_dims=(128,), likelihood="bernoulli",
                       prior="density_ratio", discriminator_hidden=(64, 64), seed=0)
    model.n_threads = 2
    first = model.elbo(X)
    for _ in range(40):
        assert np.array_equal(model.elbo(X), first)
