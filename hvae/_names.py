"""The names the estimator accepts for each choice parameter.

They come from the C core (``hvae._core`` declares each list once, with a
``*_COUNT`` sentinel); nothing in Python spells them again.
"""
try:
    from ._native import (ACTIVATIONS, DECODER_VARIANCES, INFERENCES, LIKELIHOODS,
                          MARKOV_KLS, OBJECTIVES, OPTIMIZERS)
except ImportError:  # pragma: no cover - a core built before it exported the names
    LIKELIHOODS = ("gaussian", "bernoulli")
    ACTIVATIONS = ("relu", "tanh", "leaky_relu", "elu", "softplus")
    DECODER_VARIANCES = ("learned", "unit")
    OPTIMIZERS = ("adam", "sgd")
    INFERENCES = ("markov", "ladder")
    OBJECTIVES = ("elbo", "iwae")
    MARKOV_KLS = ("sampled",)

__all__ = ["ACTIVATIONS", "DECODER_VARIANCES", "INFERENCES", "LIKELIHOODS", "MARKOV_KLS",
           "OBJECTIVES", "OPTIMIZERS"]
