"""Independent gradient estimates for one minibatch, to compare estimators.

The training gradient of a VAE is a Monte Carlo estimate; how it passes
through the sampled latent variables (``gradient_estimator``) decides its
variance and, for a relaxed categorical, its bias. ``gradient_draws`` returns
many independent estimates of the same gradient, each from fresh noise;
``gradient_variance`` summarises them. Neither changes the model.

Example
-------
>>> import numpy as np, hvae
>>> model = hvae.Model(8, (2,), (16,), likelihood="bernoulli",
...                    latent_family="categorical", n_categories=3)
>>> X = (np.random.default_rng(0).random((4, 8)) > 0.5).astype(np.float32)
>>> G = hvae.gradient_draws(model, X, n_draws=10, gradient_estimator="score_function")
>>> G.shape == (10, model.n_params)
True
"""
import numpy as np

__all__ = ["gradient_draws", "gradient_variance"]


def _model_of(model):
    """An hvae.Model, or a fitted HierarchicalVAE's."""
    inner = getattr(model, "model_", None)
    if inner is not None:
        return inner
    if not hasattr(model, "loss_and_grad"):
        raise TypeError("model must be an hvae.Model or a fitted HierarchicalVAE; "
                        f"got {type(model).__name__}")
    return model


def gradient_draws(model, X, n_draws=100, seed=0, **options):
    """Draw ``n_draws`` independent estimates of the loss gradient on X.

    Parameters
    ----------
    model : hvae.Model or fitted HierarchicalVAE
    X : array-like of shape (n_rows, n_features)
        The minibatch; every draw uses all of its rows.
    n_draws : int, default=100
        Number of estimates; draw j uses noise seed ``seed + j``.
    seed : int, default=0
    **options
        Keywords of ``Model.loss_and_grad``: ``gradient_estimator``
        ('auto', 'reparameterization', 'gumbel_softmax', 'score_function'),
        ``score_baseline``, ``temperature``, ``straight_through``,
        ``n_samples``, ``objective``, ``beta``, ``free_bits``, ``cond``.
        The running-mean baseline carries over from draw to draw, as it
        does between training steps.

    Returns
    -------
    ndarray of shape (n_draws, n_params), float64
        Row j is the gradient of draw j, aligned with ``model.parameters``.
    """
    m = _model_of(model)
    n_draws = int(n_draws)
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1; got {n_draws}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    out = np.empty((n_draws, m.n_params))
    for j in range(n_draws):
        # The returned gradient is a fresh array; copy it into the table.
        out[j] = m.loss_and_grad(X, seed=int(seed) + j, **options)[1]
    return out


def gradient_variance(model, X, n_draws=100, seed=0, **options):
    """Summary of ``gradient_draws``: the estimator's mean and spread.

    Parameters
    ----------
    model, X, n_draws, seed, **options
        As in :func:`gradient_draws`.

    Returns
    -------
    dict
        ``mean`` (n_params,): the mean estimate; ``variance`` (n_params,):
        the per-coordinate sample variance (ddof 1); ``total_variance``:
        its sum (the trace of the estimate's covariance); ``mean_norm``:
        ``|mean|``; ``standard_error`` (n_params,): of the mean;
        ``n_draws``.
    """
    G = gradient_draws(model, X, n_draws, seed, **options)
    var = G.var(axis=0, ddof=1) if len(G) > 1 else np.zeros(G.shape[1])
    mean = G.mean(axis=0)
    return {"mean": mean, "variance": var, "total_variance": float(var.sum()),
            "mean_norm": float(np.linalg.norm(mean)),
            "standard_error": np.sqrt(var / len(G)), "n_draws": len(G)}
