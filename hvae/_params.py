"""The estimator's parameter checks, as one declarative table.

:data:`PARAMETER_CONSTRAINTS` maps every ``__init__`` parameter of
:class:`hvae.HierarchicalVAE` to the constraint its value must meet, in the
order they are checked, in the spirit of scikit-learn's
``_parameter_constraints``. scikit-learn's own validator
(``sklearn.utils._param_validation``) is private, changes between releases
and words its messages its own way; this small one keeps hvae's messages and
normalises values (``latent_dims=8`` becomes ``(8,)``). ``fit`` and
``partial_fit`` call :func:`validate_parameters` before any work.
"""
import numbers

import numpy as np

# The names of every choice come from the C core (csrc/hvae.h, "Names"),
# never spelled again here.
from ._native import (ACTIVATIONS, DECODER_VARIANCES, INFERENCES, LIKELIHOODS, MARKOV_KLS,
                      MAX_HIDDEN, MAX_LAYERS, OBJECTIVES, OPTIMIZERS, PRIORS)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Integer:
    """An int >= ``low``."""

    def __init__(self, low):
        self.low = low

    def __call__(self, name, value):
        if not _is_int(value) or value < self.low:
            raise ValueError(f"{name} must be an int >= {self.low}; got {value!r}")
        return value


class FiniteNumber:
    """A finite real number >= 0 (> 0 when ``positive``)."""

    def __init__(self, positive=False):
        self.positive = positive

    def __call__(self, name, value):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
        if not ok or value < 0 or (self.positive and value == 0):
            bound = "> 0" if self.positive else ">= 0"
            raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
        return value


class OpenFraction:
    """A number in (0, 1)."""

    def __call__(self, name, value):
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and 0.0 < value < 1.0):
            raise ValueError(f"{name} must be None or a number in (0, 1); got {value!r}")
        return value


class OneOf:
    """One of the names in ``names`` (a tuple the C core reports)."""

    def __init__(self, names):
        self.names = names

    def __call__(self, name, value):
        if value not in self.names:
            raise ValueError(f"{name} must be one of {self.names}; got {value!r}")
        return value


class Flag:
    """True or False (a NumPy bool too)."""

    def __call__(self, name, value):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {value!r}")
        return value


class Dims:
    """A tuple of positive ints from an int or a sequence of ints, with at
    most ``max_entries`` entries (``unit`` names them in the message)."""

    def __init__(self, allow_empty, max_entries, unit):
        self.allow_empty, self.max_entries, self.unit = allow_empty, max_entries, unit

    def __call__(self, name, value):
        items = (value,) if _is_int(value) else value
        try:
            dims = tuple(items)
        except TypeError:
            raise ValueError(f"{name} must be an int or a sequence of ints; "
                             f"got {value!r}") from None
        if not all(_is_int(d) and d >= 1 for d in dims):
            raise ValueError(f"{name} must hold positive ints; got {value!r}")
        if not dims and not self.allow_empty:
            raise ValueError(f"{name} must have at least one entry; got {value!r}")
        if len(dims) > self.max_entries:
            raise ValueError(f"{name} may have at most {self.max_entries} {self.unit}; "
                             f"got {len(dims)}")
        return tuple(int(d) for d in dims)


class Weights:
    """A tuple of ``n`` finite numbers, each >= 0 (< 1 with ``below_one``)."""

    def __init__(self, n, below_one=False):
        self.n, self.below_one = n, below_one

    def __call__(self, name, value):
        try:
            items = tuple(value)
        except TypeError:
            items = ()
        ok = len(items) == self.n and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)
            and v >= 0 and (not self.below_one or v < 1) for v in items)
        if not ok:
            bound = "in [0, 1)" if self.below_one else ">= 0"
            raise ValueError(f"{name} must be a tuple of {self.n} finite numbers {bound}; "
                             f"got {value!r}")
        return tuple(float(v) for v in items)


class Callbacks:
    """None, a callable or a sequence of callables; normalised to a list."""

    def __call__(self, name, value):
        if value is None:
            return []
        if callable(value):
            return [value]
        try:
            callbacks = list(value)
        except TypeError:
            raise ValueError(f"{name} must be a callable, a sequence of callables or None; "
                             f"got {value!r}") from None
        for callback in callbacks:
            if not callable(callback):
                raise ValueError(f"{name} must hold callables; got {callback!r}")
        return callbacks


class Optional:
    """None, or a value meeting ``constraint``."""

    def __init__(self, constraint):
        self.constraint = constraint

    def __call__(self, name, value):
        return None if value is None else self.constraint(name, value)


class Unchecked:
    """Any value: used as given (``random_state`` goes through
    ``check_random_state`` where it is used; ``shuffle`` and ``warm_start``
    by truth value)."""

    def __call__(self, name, value):
        return value


#: Every ``__init__`` parameter and its constraint, in the order checked.
PARAMETER_CONSTRAINTS = {
    "latent_dims": Dims(allow_empty=False, max_entries=MAX_LAYERS, unit="layers"),
    "hidden_dims": Dims(allow_empty=True, max_entries=MAX_HIDDEN, unit="entries"),
    "likelihood": OneOf(LIKELIHOODS),
    "activation": OneOf(ACTIVATIONS),
    "decoder_variance": OneOf(DECODER_VARIANCES),
    "inference": OneOf(INFERENCES),
    "markov_kl": OneOf(MARKOV_KLS),
    "n_epochs": Integer(0),
    "batch_size": Integer(1),
    "learning_rate": FiniteNumber(positive=True),
    "beta": FiniteNumber(),
    "weight_decay": FiniteNumber(),
    "verbose": Integer(0),
    "optimizer": OneOf(OPTIMIZERS),
    "n_threads": Optional(Integer(1)),
    "validation_fraction": Optional(OpenFraction()),
    "early_stopping": Flag(),
    "n_iter_no_change": Integer(1),
    "tol": FiniteNumber(),
    "objective": OneOf(OBJECTIVES),
    "n_mc_samples": Integer(1),
    "n_importance_samples": Integer(1),
    "kl_warmup_epochs": Integer(0),
    "free_bits": FiniteNumber(),
    "conditional": Flag(),
    "chunk_size": Optional(Integer(1)),
    "callbacks": Callbacks(),
    "prior": OneOf(PRIORS),
    "tc_weight": FiniteNumber(),
    "tcvae_weights": Optional(Weights(3)),
    "discriminator_hidden": Dims(allow_empty=True, max_entries=MAX_HIDDEN, unit="entries"),
    "discriminator_learning_rate": FiniteNumber(positive=True),
    "discriminator_betas": Weights(2, below_one=True),
    "shuffle": Unchecked(),
    "warm_start": Unchecked(),
    "random_state": Unchecked(),
}


def _check_iwae_settings(params):
    if params["objective"] == "iwae" and (params["beta"] != 1.0 or params["free_bits"] != 0.0
                                          or params["kl_warmup_epochs"] != 0):
        raise ValueError("objective='iwae' trains the importance-weighted bound itself: "
                         "beta must be 1, free_bits 0 and kl_warmup_epochs 0")


def _check_discriminator_settings(params):
    if params["tc_weight"] > 0 and (params["objective"] != "elbo"
                                    or params["prior"] != "standard"):
        raise ValueError("tc_weight > 0 (FactorVAE) needs objective='elbo' and "
                         "prior='standard'")
    if params["tcvae_weights"] is not None and (
            params["objective"] != "elbo" or params["prior"] != "standard"
            or params["free_bits"] != 0.0 or params["tc_weight"] != 0.0):
        raise ValueError("tcvae_weights (beta-TCVAE) needs objective='elbo', "
                         "prior='standard', free_bits=0 and tc_weight=0")
    if (params["tc_weight"] > 0 or params["prior"] == "density_ratio") and \
            params["weight_decay"] != 0.0:
        raise ValueError("weight_decay must be 0 for a model with a discriminator "
                         "(tc_weight > 0 or prior='density_ratio')")


def validate_parameters(estimator):
    """Every parameter of ``estimator`` checked against
    :data:`PARAMETER_CONSTRAINTS` and against each other; returns a dict of
    the values, normalised (dims as tuples, callbacks as a list). Raises
    ValueError naming the first parameter that fails."""
    params = {}
    for name, constraint in PARAMETER_CONSTRAINTS.items():
        params[name] = constraint(name, getattr(estimator, name))
    _check_iwae_settings(params)
    _check_discriminator_settings(params)
    return params
