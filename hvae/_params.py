"""The estimator's parameter checks, as one declarative table.

:data:`PARAMETER_CONSTRAINTS` maps every ``__init__`` parameter of
:class:`hvae.HierarchicalVAE` to the constraint its value must meet, in the
order they are checked, in the spirit of scikit-learn's
``_parameter_constraints``. scikit-learn's own validator
(``sklearn.utils._param_validation``) is private, changes between releases
and words its messages its own way; this small one keeps hvae's messages and
normalises values (``latent_dims=8`` becomes ``(8,)``). ``fit`` and
``partial_fit`` call :func:`validate_parameters` before any work, and
:mod:`hvae.file_format` checks saved parameters with it: every limit is
stated here once, the C core's own (float32 range, ``MAX_BATCH_SIZE``,
``MAX_SAMPLES``, ``MAX_THREADS``, exported by the extension) included, so
that no valid setting fails inside the core after training has begun.
"""
import numbers

import numpy as np

# The names of every choice come from the C core (csrc/hvae.h, "Names"),
# never spelled again here.
from ._native import (ACTIVATIONS, COVARIANCE_TYPES, DECODER_VARIANCES, GRADIENT_ESTIMATORS,
                      INFERENCES, LATENT_FAMILIES, LIKELIHOODS, MARKOV_KLS, MAX_BATCH_SIZE,
                      MAX_COMPONENTS, MAX_FULL_COVARIANCE_DIM, MAX_HIDDEN, MAX_LAYERS,
                      MAX_SAMPLES, MAX_THREADS, OBJECTIVES, OPTIMIZERS, PRIORS, SCORE_BASELINES)

#: The largest count (epochs, patience, warm-up) a parameter may hold.
MAX_COUNT = 2**48
#: The largest chunk_size: 2**40 rows.
MAX_CHUNK_SIZE = 2**40
#: The largest finite float32: settings the core computes with in float32
#: (learning_rate, beta, weight_decay, free_bits) must stay below it.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Integer:
    """An int in [``low``, ``high``]."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    def __call__(self, name, value):
        if not _is_int(value) or not self.low <= value <= self.high:
            raise ValueError(f"{name} must be an int between {self.low} and {self.high}; "
                             f"got {value!r:.100}")
        return value


class FiniteNumber:
    """A real number >= 0 (> 0 when ``positive``) that is finite in float32,
    where the core computes with it (below 3.4e38)."""

    def __init__(self, positive=False):
        self.positive = positive

    def __call__(self, name, value):
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and np.isfinite(value) and abs(float(value)) <= FLOAT32_MAX)
        if not ok or value < 0 or (self.positive and value == 0):
            bound = "> 0" if self.positive else ">= 0"
            raise ValueError(f"{name} must be a number {bound} that is finite in float32 "
                             f"(at most {FLOAT32_MAX:.4g}); got {value!r:.100}")
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


class PerLayer:
    """One value for every layer, or a sequence of one per layer, each
    meeting ``constraint``; normalised to a tuple (the layer count is
    checked against latent_dims in validate_parameters)."""

    def __init__(self, constraint, scalar):
        self.constraint, self.scalar = constraint, scalar

    def __call__(self, name, value):
        if isinstance(value, self.scalar) and not isinstance(value, bool):
            return (self.constraint(name, value),)
        try:
            values = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be one value or a sequence of one per layer; "
                             f"got {value!r}") from None
        if not values:
            raise ValueError(f"{name} must not be empty; got {value!r}")
        return tuple(self.constraint(name, v) for v in values)


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
    "latent_types": PerLayer(OneOf(LATENT_FAMILIES), str),
    "n_categories": PerLayer(Integer(2, 2**31 - 1), numbers.Integral),
    "n_epochs": Integer(0, MAX_COUNT),
    "batch_size": Integer(1, MAX_BATCH_SIZE),
    "learning_rate": FiniteNumber(positive=True),
    "beta": FiniteNumber(),
    "weight_decay": FiniteNumber(),
    "verbose": Integer(0, 100),
    "optimizer": OneOf(OPTIMIZERS),
    "n_threads": Optional(Integer(1, MAX_THREADS)),
    "validation_fraction": Optional(OpenFraction()),
    "early_stopping": Flag(),
    "n_iter_no_change": Integer(1, MAX_COUNT),
    "tol": FiniteNumber(),
    "objective": OneOf(OBJECTIVES),
    "n_mc_samples": Integer(1, MAX_SAMPLES),
    "n_importance_samples": Integer(1, MAX_SAMPLES),
    "kl_warmup_epochs": Integer(0, MAX_COUNT),
    "free_bits": FiniteNumber(),
    "temperature": FiniteNumber(positive=True),
    "temperature_min": FiniteNumber(positive=True),
    "temperature_decay": FiniteNumber(),
    "straight_through": Flag(),
    "gradient_estimator": OneOf(GRADIENT_ESTIMATORS),
    "score_baseline": OneOf(SCORE_BASELINES),
    "conditional": Flag(),
    "chunk_size": Optional(Integer(1, MAX_CHUNK_SIZE)),
    "callbacks": Callbacks(),
    "tc_weight": FiniteNumber(),
    "tcvae_weights": Optional(Weights(3)),
    "discriminator_hidden": Dims(allow_empty=True, max_entries=MAX_HIDDEN, unit="entries"),
    "discriminator_learning_rate": FiniteNumber(positive=True),
    "discriminator_betas": Weights(2, below_one=True),
    "shuffle": Unchecked(),
    "warm_start": Unchecked(),
    "random_state": Unchecked(),
    "prior": OneOf(PRIORS),
    "n_components": Integer(1, MAX_COMPONENTS),
    "prior_covariance_type": OneOf(COVARIANCE_TYPES),
    "prior_learning_rate": Optional(FiniteNumber(positive=True)),
    "n_pseudo_inputs": Integer(1, 2**31 - 1),
}


def _check_iwae_settings(params):
    if params["objective"] == "iwae" and (params["beta"] != 1.0 or params["free_bits"] != 0.0
                                          or params["kl_warmup_epochs"] != 0):
        raise ValueError("objective='iwae' trains the importance-weighted bound itself: "
                         "beta must be 1, free_bits 0 and kl_warmup_epochs 0")


def latent_layers(params):
    """(families, n_categories) per layer of validated parameters: the
    latent types (one for all layers, or one per layer) and each layer's
    classes (0 for a Gaussian layer), as hvae.Model reports them."""
    T = len(params["latent_dims"])
    types, K = params["latent_types"], params["n_categories"]
    for name, value in (("latent_types", types), ("n_categories", K)):
        if len(value) not in (1, T):
            raise ValueError(f"{name} must give one value or one per latent layer "
                             f"({T}); got {len(value)}")
    types = types * T if len(types) == 1 else types
    K = K * T if len(K) == 1 else K
    return types, tuple(k if t == "categorical" else 0 for t, k in zip(types, K))


def _check_latent_settings(params):
    types, _ = latent_layers(params)
    categorical = "categorical" in types
    estimator = params["gradient_estimator"]
    if categorical and params["inference"] != "markov":
        raise ValueError("categorical latent layers need inference='markov' (the ladder "
                         "merges Gaussian posteriors)")
    if estimator == "reparameterization" and categorical:
        raise ValueError("gradient_estimator='reparameterization' cannot pass through a "
                         "categorical layer: use 'gumbel_softmax' (or 'auto') or "
                         "'score_function'")
    if estimator == "gumbel_softmax" and not categorical:
        raise ValueError("gradient_estimator='gumbel_softmax' needs a categorical latent "
                         "layer (latent_types)")
    if estimator == "score_function" and (params["objective"] != "elbo"
                                          or params["inference"] != "markov"):
        raise ValueError("gradient_estimator='score_function' trains the ELBO "
                         "(objective='elbo') of a Markov hierarchy (inference='markov')")
    if (estimator == "score_function" and params["score_baseline"] == "leave_one_out"
            and params["n_mc_samples"] < 2):
        raise ValueError("score_baseline='leave_one_out' needs n_mc_samples >= 2 (the "
                         "other draws of a row make its baseline)")


def _check_prior_settings(params):
    if params["prior"] == "vamp" and params["conditional"]:
        raise ValueError("prior='vamp' cannot be conditional: its pseudo-inputs have no "
                         "condition; use conditional=False or another prior")
    covariance = params["prior_covariance_type"]
    if covariance != "diag" and params["prior"] != "gmm":
        raise ValueError(f"prior_covariance_type={covariance!r} is the mixture prior's: it "
                         f"needs prior='gmm'; got prior={params['prior']!r}")
    if covariance == "full" and params["latent_dims"][-1] > MAX_FULL_COVARIANCE_DIM:
        raise ValueError(f"prior_covariance_type='full' takes a top latent layer of at most "
                         f"{MAX_FULL_COVARIANCE_DIM} units; got {params['latent_dims'][-1]}")


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
    _check_latent_settings(params)
    _check_prior_settings(params)
    _check_discriminator_settings(params)
    return params
