"""The names the estimator accepts for each choice parameter.

The C core declares each list once (an enum with a ``*_COUNT`` sentinel and
a name function, csrc/hvae.h) and ``hvae._core`` exports them as tuples;
nothing in Python spells them again.
"""
from ._native import (ACTIVATIONS, DECODER_VARIANCES, INFERENCES, LIKELIHOODS, MARKOV_KLS,
                      OBJECTIVES, OPTIMIZERS)

__all__ = ["ACTIVATIONS", "DECODER_VARIANCES", "INFERENCES", "LIKELIHOODS", "MARKOV_KLS",
           "OBJECTIVES", "OPTIMIZERS"]
