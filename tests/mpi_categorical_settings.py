"""The fits tests/test_mpi_categorical.py runs under mpirun and in one
process (shared by the test and tests/mpi_worker_categorical.py)."""
from hvae.datasets import load_digits

_BASE = dict(latent_dims=(4, 2), latent_types=("gaussian", "categorical"), n_categories=4,
             hidden_dims=(32,), likelihood="bernoulli", n_epochs=3, batch_size=100,
             random_state=0, n_threads=1)
# A temperature that falls within the fit (0.05 per step, 18 steps), so
# that every rank must anneal by the same step count.
_ANNEAL = dict(temperature=1.0, temperature_min=0.3, temperature_decay=0.05)

SCENARIOS = {
    "gumbel_softmax": dict(_BASE, **_ANNEAL),
    "straight_through": dict(_BASE, **_ANNEAL, straight_through=True),
    "categorical_top_of_two": dict(_BASE, latent_types=("categorical", "categorical"),
                                   n_categories=(3, 4), **_ANNEAL),
    "score_running_mean": dict(_BASE, gradient_estimator="score_function",
                               score_baseline="running_mean"),
    "score_leave_one_out": dict(_BASE, gradient_estimator="score_function",
                                score_baseline="leave_one_out", n_mc_samples=2),
}


def data():
    """(training rows, validation rows) of the digits."""
    X = load_digits()[0]
    return X[:600], X[600:800]
