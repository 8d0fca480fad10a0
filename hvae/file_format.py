"""hvae's model file: save a fitted HierarchicalVAE and load it back without pickle.

Format "hvae", version 1
------------------------
One NumPy ``.npz`` archive (a zip file of ``.npy`` members, as written by
``numpy.savez``, uncompressed), readable with ``numpy.load(path,
allow_pickle=False)``. Members:

``metadata``
    uint8, shape (n,): UTF-8 JSON text, described below.
``parameters``
    float32, shape (n_params,): ``Model.parameters``, little-endian.
``optimizer.m``, ``optimizer.v``, ...
    Every other array of the model's state (``Model.__getstate__``): the
    optimizer's moments (absent before the first fit; no ``v`` for SGD).
``attributes.<name>``
    A fitted attribute that is a numeric array, if any.

The JSON object has the keys:

``format``, ``format_version``
    ``"hvae"`` and ``1``.
``hvae_version``
    The version of hvae that wrote the file.
``estimator``
    ``"HierarchicalVAE"``.
``params``
    ``get_params(deep=False)``. A value that JSON cannot hold (a callable in
    ``callbacks``, a ``RandomState`` in ``random_state``) is written as null
    and its name listed in ``unsaved_params``; loading gives it None.
``model``
    The keyword arguments of :class:`hvae.Model` that rebuild the network
    (``n_features``, ``latent_dims``, ``hidden_dims``, ``likelihood``, ...,
    ``seed``).
``layout``
    ``[[name, shape], ...]``: ``Model.named_parameters()``, the tensors that
    tile ``parameters`` in order.
``state``
    The rest of ``Model.__getstate__()``: optimizer settings and step count,
    the generator's state, with arrays replaced by references to members.
``attributes``
    The fitted attributes: ``n_features_in_``, ``n_iter_``, ``history_``,
    ``best_epoch_``, ``feature_names_in_`` when set, ``active_units_``
    (absent from files written before it existed), ...
``arrays``
    For every array member: ``{"dtype", "shape", "sha256"}``, the SHA-256
    of its data bytes.
``metadata_sha256``
    The SHA-256 of the rest of the metadata, spelled as canonical JSON
    (``json.dumps(..., sort_keys=True, ensure_ascii=False,
    separators=(",", ":"))`` of the object without this key). Files written
    before it existed (the same format version) lack it and still load.

Inside ``params``, ``model``, ``state`` and ``attributes`` a few values are
tagged: ``{"__tuple__": [...]}`` is a tuple, ``{"__array__": name}`` the array
member ``name``, ``{"__strings__": [...]}`` a 1-D object array of str. Floats
are written by Python's json module, which spells non-finite values NaN,
Infinity and -Infinity (history entries may be NaN).

Loading refuses, with a ValueError that names the file: anything that is not
a readable zip archive of ``.npy`` members (truncated, corrupt, a bad CRC), a
missing member or key, another format or format version, arrays whose dtype,
shape or SHA-256 differ from the metadata, metadata that differs from its
SHA-256, an architecture whose layout differs from the file's, non-finite
parameters, and parameters this version of hvae does not know. Sizes are
checked before anything is allocated: every array's declared size against
the archive's, and the architecture's widths against the number of
parameters, so that a hostile file cannot make hvae allocate much more memory
than its own size (about a thousand times, at most, for a file crafted to do
so).

Checksums detect corruption, not authors: anyone can edit a file and
recompute them. So every field is validated as well, and a file that loads
is the model its metadata describes, and one that trains:

* the fitted attributes are exactly the known ones; ``n_iter_`` is the length
  of every ``history_`` list (the estimator's keys, the validation keys all or
  none), whose entries have their types and per-layer lengths;
  ``best_epoch_`` indexes history; ``classes_`` are the model's conditions;
* the hyperparameters pass the estimator's own validation and the C core's
  limits, and describe the model's architecture;
* the optimizer state: the settings HierarchicalVAE trains with, a step count
  between 0 and the minibatches in ``history_``, finite moments, second
  moments >= 0, and first moments within the bound Adam's averages obey,
  ``|m| <= (1 - b1) / sqrt((1 - b2) (1 - b1**2 / b2)) sqrt(v)`` (7.27 for
  b1 = 0.9, b2 = 0.999; plus eps), so that no Adam step can overflow; an SGD
  state has no second moments and, without momentum, zero first ones;
* the discriminator's optimizer state, when the model has one
  (``state.discriminator_optimizer``, moments ``discriminator_optimizer.m``
  and ``.v``; absent from older files): its learning rate, betas in
  [0, 1), eps, a step count, finite moments over the discriminator's parameters, second ones >= 0 and
  first ones within the same bound for its betas and steps;
* the generator's state is four 64-bit words, not all zero;
* the parameters give a finite loss and gradient on the model's own samples
  and on data of the kind its likelihood expects, the own-sample loss at most
  1e6 nats per dimension (a coherent model's is a few).

The loadable classes are registered by their modules
(:func:`register_estimator`), so this module imports none of them.
"""
import functools
import hashlib
import inspect
import json
import math
import numbers
import os
import secrets
import warnings
import zipfile
import zlib
from typing import Callable, NamedTuple

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._native import MAX_THREADS
from ._params import FLOAT32_MAX, MAX_COUNT

FORMAT_NAME = "hvae"
FORMAT_VERSION = 1

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load", "register_estimator", "save"]

_METADATA = "metadata"
_DTYPES = {"<f4", "<f8", "<i4", "<i8", "<u8", "|u1", "|b1"}
_REQUIRED_KEYS = ("format", "format_version", "hvae_version", "estimator", "params", "model",
                  "layout", "state", "attributes", "arrays")
_REQUIRED_ATTRIBUTES = ("n_features_in_", "n_iter_", "history_", "best_epoch_", "classes_")
_DIGEST = "metadata_sha256"


class _EstimatorSpec(NamedTuple):
    cls: type
    validate: Callable
    history_keys: tuple
    validation_keys: tuple
    attribute_checks: dict = {}
    params_before: dict = {}


# Loadable estimator classes by name. The estimator module registers its
# class when it is imported, so this module never imports it (no cycle).
_ESTIMATORS = {}


def register_estimator(cls, *, validate, history_keys, validation_keys=(),
                       attribute_checks=None, params_before=None):
    """Make ``cls`` savable and loadable.

    Parameters
    ----------
    cls : type
        A scikit-learn estimator class whose fitted state is ``model_`` (an
        hvae.Model) and the attributes ``n_features_in_``, ``n_iter_``,
        ``history_``, ``best_epoch_``, ``classes_``, ``feature_names_in_``.
    validate : callable
        ``validate(estimator)`` checks the estimator's parameters with the
        estimator's own validation (raising ValueError or TypeError) and
        returns the model options they describe, a dict whose keys are
        attributes of the saved ``hvae.Model`` (``latent_dims``,
        ``likelihood``, ...), each of which must equal the model's.
    history_keys, validation_keys : tuple of str
        The keys every ``history_`` has, and those it has all or none of.
    attribute_checks : dict or None
        Fitted attributes of the class beyond those above (``labels_`` of a
        clusterer), each with ``check(value, model)`` that returns None when
        the value is valid for the model and otherwise a message.
    params_before : dict or None
        Parameters added after files of the class were first written, each
        with the value that such a file's model has (rather than the
        parameter's default, which may describe another model).
    """
    _ESTIMATORS[cls.__name__] = _EstimatorSpec(cls, validate, tuple(history_keys),
                                               tuple(validation_keys),
                                               dict(attribute_checks or {}),
                                               dict(params_before or {}))


class _Unencodable(TypeError):
    pass


# ---- encoding -------------------------------------------------------------------


def _little_endian(array):
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder != "|" else array.dtype
    return np.ascontiguousarray(array, dtype=dtype)


def _encode(value, arrays, name):
    """A JSON value for ``value``; numeric arrays go to ``arrays[name]``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{name}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{name}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or key.startswith("__"):
                raise _Unencodable(f"{name} has key {key!r}")
        return {key: _encode(v, arrays, f"{name}.{key}" if name else key)
                for key, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            if value.ndim == 1 and all(isinstance(v, str) for v in value):
                return {"__strings__": [str(v) for v in value]}
            raise _Unencodable(f"{name} is an object array")
        array = _little_endian(value)
        if array.dtype.str not in _DTYPES:
            raise _Unencodable(f"{name} has dtype {value.dtype}")
        if name in arrays or name == _METADATA:
            raise _Unencodable(f"two arrays would be named {name!r}")
        arrays[name] = array
        return {"__array__": name}
    raise _Unencodable(f"{name} is a {type(value).__name__}")


def _model_arguments(model):
    """The keyword arguments of hvae.Model that rebuild ``model``."""
    constructor, args = model.__reduce__()[:2]
    names = list(inspect.signature(constructor).parameters)
    if len(args) > len(names):  # pragma: no cover - a Model/__reduce__ mismatch
        raise RuntimeError("cannot name the arguments of hvae.Model.__reduce__")
    return dict(zip(names, args))


def save(estimator, path):
    """Write a fitted estimator to ``path`` in the hvae file format (see module doc).

    The file is written to a temporary name beside ``path`` and renamed, so
    an existing file is replaced whole or not at all.

    Parameters
    ----------
    estimator : HierarchicalVAE
        A fitted estimator.
    path : str or os.PathLike
        The file to write, exactly as named (no suffix is added; ``.npz`` is
        a good one).
    """
    from . import __version__

    if type(estimator).__name__ not in _ESTIMATORS or \
            _ESTIMATORS[type(estimator).__name__].cls is not type(estimator):
        raise TypeError(f"can save a {' or '.join(_ESTIMATORS) or 'registered estimator'}; "
                        f"got {type(estimator).__name__}")
    check_is_fitted(estimator)
    model = estimator.model_
    arrays = {}

    params, unsaved = {}, []
    for key, value in estimator.get_params(deep=False).items():
        try:
            scratch = {}
            params[key] = _encode(value, scratch, key)
            if scratch:
                raise _Unencodable(f"{key} holds an array")
        except _Unencodable:
            params[key], unsaved = None, unsaved + [key]
    if unsaved:
        warnings.warn(f"{', '.join(unsaved)} cannot be saved (not JSON values) and will be None "
                      "in the loaded model", UserWarning, stacklevel=3)

    state = model.__getstate__()
    attributes = {key: value for key, value in vars(estimator).items()
                  if key.endswith("_") and not key.startswith("_") and key != "model_"}
    try:
        encoded_state = _encode(state, arrays, "")
        encoded_attributes = {key: _encode(value, arrays, f"attributes.{key}")
                              for key, value in attributes.items()}
        model_arguments = _encode(_model_arguments(model), arrays, "model")
    except _Unencodable as error:
        raise TypeError(f"cannot save this estimator: {error}") from None

    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hvae_version": __version__,
        "estimator": type(estimator).__name__,
        "params": params,
        "unsaved_params": unsaved,
        "model": model_arguments,
        "layout": [[name, list(view.shape)] for name, view in model.named_parameters()],
        "state": encoded_state,
        "attributes": encoded_attributes,
        "arrays": {name: {"dtype": array.dtype.str, "shape": list(array.shape),
                          "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
                   for name, array in arrays.items()},
    }
    metadata[_DIGEST] = _metadata_digest(metadata)
    text = json.dumps(metadata, ensure_ascii=False)
    members = dict(arrays)
    members[_METADATA] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(directory)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **members)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _create_temporary(directory):
    """(fd, path) of a new file in ``directory`` for writing, created with
    mode 0o666 less the umask, as ``open(path, "w")`` would (mkstemp's 0600
    would leave a shared model unreadable to others)."""
    for _ in range(100):
        path = os.path.join(directory, f".hvae-{secrets.token_hex(8)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                           | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
    raise FileExistsError(f"cannot create a temporary file in {directory}")  # pragma: no cover


def _metadata_digest(metadata):
    """SHA-256 of the metadata without its own digest, in a canonical JSON
    spelling (sorted keys), so that the text's layout does not matter."""
    body = {key: value for key, value in metadata.items() if key != _DIGEST}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- decoding -------------------------------------------------------------------


class _Damaged(ValueError):
    pass


def _decode(value, arrays):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_decode(v, arrays) for v in value["__tuple__"])
        if set(value) == {"__array__"}:
            if value["__array__"] not in arrays:
                raise _Damaged(f"metadata refers to a missing array {value['__array__']!r}")
            return arrays[value["__array__"]]
        if set(value) == {"__strings__"} and isinstance(value["__strings__"], list):
            strings = value["__strings__"]
            if not all(isinstance(s, str) for s in strings):
                raise _Damaged("a string array holds a non-string")
            return np.array(strings, dtype=object)
        if any(key.startswith("__") for key in value):
            raise _Damaged(f"unknown tag in {sorted(value)}")
        return {key: _decode(v, arrays) for key, v in value.items()}
    return value


def _read_member(archive, info, archive_size, dtype=None, shape=None):
    """The array in one .npy member, its size checked before it is read."""
    # save() stores members uncompressed; refusing anything else bounds every
    # allocation by the file's own size (no decompression bombs).
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Damaged(f"member {info.filename} is compressed; hvae model files store "
                       "their members uncompressed")
    if info.compress_size > archive_size or info.file_size > info.compress_size:
        raise _Damaged(f"member {info.filename} declares {info.file_size} bytes, "
                       f"more than the archive ({archive_size} bytes) can hold")
    with archive.open(info) as fp:
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(fp)
            else:
                raise _Damaged(f"member {info.filename} has .npy version {version}")
        except _Damaged:
            raise
        except ValueError as error:
            raise _Damaged(f"member {info.filename} is not a .npy array ({error})") from None
        header_shape, fortran_order, header_dtype = header
        if header_dtype.str not in _DTYPES or header_dtype.hasobject:
            raise _Damaged(f"member {info.filename} has dtype {header_dtype}")
        if (dtype is not None and header_dtype.str != dtype) or \
                (shape is not None and list(header_shape) != list(shape)):
            raise _Damaged(f"member {info.filename} holds {header_dtype.str} {header_shape}; "
                           f"the metadata says {dtype} {tuple(shape)}")
        if fortran_order and len(header_shape) > 1:
            raise _Damaged(f"member {info.filename} is in Fortran order")
        n_bytes = math.prod(header_shape) * header_dtype.itemsize
        if n_bytes > info.file_size:
            raise _Damaged(f"member {info.filename} declares {n_bytes} bytes of data in "
                           f"{info.file_size}")
        data = fp.read(n_bytes)
        # Reading to the end makes zipfile check the member's CRC-32.
        if len(data) != n_bytes or fp.read(1):
            raise _Damaged(f"member {info.filename} is truncated or has trailing bytes")
    return np.frombuffer(data, dtype=header_dtype).reshape(header_shape).copy()


def _check_architecture_size(model_arguments, n_params):
    """Refuse widths that would allocate far more than the file holds."""
    widths = []
    for key, value in model_arguments.items():
        if key == "seed":
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        widths += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    # A categorical layer's sample is M * K wide.
    K, dims = model_arguments.get("n_categories"), model_arguments.get("latent_dims")
    if isinstance(K, tuple) and isinstance(dims, tuple) and len(K) == len(dims):
        widths += [d * k for d, k in zip(dims, K) if _is_int(d) and _is_int(k) and k > 1]
    if any(w < 0 or w > max(n_params, 1) for w in widths):
        raise _Damaged(f"the architecture has widths {widths}, impossible for {n_params} "
                       "parameters")
    # Every weight matrix of these networks joins widths (or sums of them).
    bound = 8 * max(len(widths), 1) * sum(widths) ** 2
    if bound > 1000 * n_params + 10**7:
        raise _Damaged(f"the architecture (widths {widths}) is implausibly large for "
                       f"{n_params} parameters")


# ---- validation of every field ----------------------------------------------------

# The Adam settings HierarchicalVAE trains with (Model.fit's defaults, as float32):
# a saved optimizer state holds exactly these.
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = (float(np.float32(x)) for x in (0.9, 0.999, 1e-8))
# |m| <= K sqrt(v) for Adam's moments started at zero (Cauchy-Schwarz over the
# two exponential averages of one gradient sequence), so a step moves a
# parameter by at most lr / (1 - beta1) * K: a state beyond it (first moments
# of 3e38 over small second moments) would overflow the first step.
_MOMENT_RATIO = (1 - _ADAM_BETA1) / math.sqrt((1 - _ADAM_BETA2)
                                              * (1 - _ADAM_BETA1 ** 2 / _ADAM_BETA2))
# The limits are the parameter table's (hvae/_params.py), stated there once:
# far more steps and epochs than any training makes, float32's range, the
# threads a Model accepts.
_MAX_COUNT = MAX_COUNT
_FLOAT32_MAX = FLOAT32_MAX
_MAX_THREADS = MAX_THREADS


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(condition, message):
    if not condition:
        raise _Damaged(message)


def _check_int(value, name, low, high=_MAX_COUNT):
    _require(_is_int(value) and low <= value <= high,
             f"{name} must be an int in [{low}, {high}]; got {value!r:.100}")


def _check_real(value, name, low=-math.inf, high=math.inf, nan=False):
    ok = _is_real(value) and (low <= value <= high or (nan and value != value))
    _require(ok and (math.isfinite(value) or (nan and value != value)),
             f"{name} must be a finite number in [{low:g}, {high:g}]"
             f"{' (or NaN)' if nan else ''}; got {value!r:.100}")


def _check_model_arguments(arguments, n_params):
    """Types and ranges of hvae.Model's arguments, before it is built."""
    for key in ("n_features", "n_conditions"):
        if key in arguments:
            _check_int(arguments[key], f"model {key}", 1 if key == "n_features" else 0,
                       max(n_params, 1))
    for key in ("latent_dims", "hidden_dims"):
        value = arguments.get(key)
        _require(isinstance(value, tuple) and all(_is_int(d) and d >= 1 for d in value),
                 f"model {key} must be a tuple of positive ints; got {value!r:.100}")
    value = arguments.get("discriminator_hidden")
    _require(value is None or (isinstance(value, tuple)
                               and all(_is_int(d) and d >= 1 for d in value)),
             f"model discriminator_hidden must be None or a tuple of positive ints; "
             f"got {value!r:.100}")
    for key in ("likelihood", "activation", "decoder_variance", "inference", "markov_kl",
                "prior", "prior_covariance_type"):
        if key in arguments:
            _require(isinstance(arguments[key], str),
                     f"model {key} must be a string; got {arguments[key]!r:.100}")
    # Latent families: one name, or one per layer; classes per layer, 0 for
    # a Gaussian layer and 2.. for a categorical one (Model checks which).
    n_layers = len(arguments.get("latent_dims") or ())
    family = arguments.get("latent_family", "gaussian")
    _require(isinstance(family, str) or (isinstance(family, tuple) and len(family) == n_layers
                                         and all(isinstance(f, str) for f in family)),
             f"model latent_family must be a string or a tuple of {n_layers}; "
             f"got {family!r:.100}")
    if "n_categories" in arguments:
        K = arguments["n_categories"]
        _require(isinstance(K, tuple) and len(K) == n_layers
                 and all(_is_int(k) and 0 <= k <= max(n_params, 2) for k in K),
                 f"model n_categories must be a tuple of {n_layers} ints in [0, n_params]; "
                 f"got {K!r:.100}")
    if "n_components" in arguments:
        # A mixture prior holds at least 1 + 2 d_T floats per component.
        _check_int(arguments["n_components"], "model n_components", 1, max(n_params, 1))
    if "n_pseudo_inputs" in arguments:
        # The VampPrior's (K, n_features) pseudo-inputs are among the parameters.
        _check_int(arguments["n_pseudo_inputs"], "model n_pseudo_inputs", 0, max(n_params, 1))
    if "seed" in arguments:
        _check_int(arguments["seed"], "model seed", 0, 2**64 - 1)


def _check_state(state, model, history):
    """The model's state (Model.__getstate__) field by field: what the C
    optimizer and generator need to train, and agreement with history_."""
    expected = {"parameters", "optimizer", "rng_state", "n_threads"}
    # The discriminator's optimizer: absent from files written before it
    # was saved (such a model's discriminator restarts its Adam moments).
    _require(isinstance(state, dict) and set(state) - {"discriminator_optimizer"} == expected,
             f"the model state must have the keys {sorted(expected)} (and "
             f"'discriminator_optimizer'); got "
             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    _check_discriminator_optimizer(state.get("discriminator_optimizer"), model)
    n_params = model.n_params
    parameters = state["parameters"]
    _require(isinstance(parameters, np.ndarray) and parameters.dtype == np.float32
             and parameters.shape == (n_params,),
             "the model state's parameters must be the float32 'parameters' array")
    rng_state = state["rng_state"]
    _require(isinstance(rng_state, tuple) and len(rng_state) == 4
             and all(_is_int(s) and 0 <= s < 2**64 for s in rng_state)
             and any(rng_state),
             f"invalid model state (rng_state {rng_state!r:.100} is not 4 unsigned 64-bit "
             "ints, not all zero)")
    threads = state["n_threads"]
    _require(threads is None or (_is_int(threads) and 1 <= threads <= _MAX_THREADS),
             f"the model state's n_threads must be None or in 1..{_MAX_THREADS}; "
             f"got {threads!r:.100}")
    optimizer = state["optimizer"]
    if optimizer is None:
        return
    keys = {"kind", "learning_rate", "beta1", "beta2", "eps", "momentum", "weight_decay",
            "step", "m", "v"}
    _require(isinstance(optimizer, dict) and set(optimizer) == keys,
             f"invalid model state (the optimizer state must have the keys {sorted(keys)})")
    kind = optimizer["kind"]
    _require(kind in ("adam", "sgd"),
             f"invalid model state (optimizer kind {kind!r:.100} is not 'adam' or 'sgd')")
    _check_real(optimizer["learning_rate"], "the optimizer's learning_rate", 0.0,
                _FLOAT32_MAX)
    _require(optimizer["learning_rate"] > 0, "the optimizer's learning_rate must be > 0")
    _check_real(optimizer["weight_decay"], "the optimizer's weight_decay", 0.0, _FLOAT32_MAX)
    for key, value in (("beta1", _ADAM_BETA1), ("beta2", _ADAM_BETA2), ("eps", _ADAM_EPS),
                       ("momentum", 0.0)):
        _require(_is_real(optimizer[key]) and optimizer[key] == value,
                 f"the optimizer's {key} is {optimizer[key]!r:.100}; HierarchicalVAE trains "
                 f"with {value!r}")
    # Each step is one minibatch of history_ (a step whose gradient was not
    # finite is undone, a diverged epoch is rolled back and not recorded);
    # switching optimizer or reset_optimizer() starts again from 0.
    n_batches = sum(history["n_batches"])
    step = optimizer["step"]
    _require(_is_int(step) and 0 <= step <= n_batches,
             f"the optimizer's step count {step!r:.100} is not in [0, {n_batches}], the "
             "minibatches in history_")
    m, v = optimizer["m"], optimizer["v"]
    for name, array in (("m", m), ("v", v)):
        if name == "v" and kind == "sgd":
            _require(array is None, "an SGD optimizer state has no second moments 'v'")
            continue
        _require(isinstance(array, np.ndarray) and array.dtype == np.float32
                 and array.shape == (n_params,) and array is not parameters,
                 f"the optimizer's {name} must be a float32 array of {n_params} values")
        _require(bool(np.all(np.isfinite(array))),
                 f"the optimizer's {name} holds NaN or infinite values")
    if kind == "sgd":
        # Without momentum (HierarchicalVAE uses none) SGD never writes it.
        _require(not np.any(m), "an SGD optimizer state without momentum has nonzero 'm'")
        return
    _require(bool(np.all(v >= 0)), "the optimizer's second moments 'v' must be >= 0")
    bound = _MOMENT_RATIO * 1.001 * np.sqrt(v.astype(np.float64)) + _ADAM_EPS
    _require(bool(np.all(np.abs(m.astype(np.float64)) <= bound)),
             "the optimizer's first moments 'm' exceed what its second moments 'v' allow "
             f"(|m| <= {_MOMENT_RATIO:.2f} sqrt(v) for Adam): an Adam step from this state "
             "would overflow")
    if step == 0:
        _require(not np.any(m) and not np.any(v),
                 "the optimizer has taken no step but holds nonzero moments")


def _adam_moment_bound(beta1, beta2, steps):
    """K with |m| <= K sqrt(v) for Adam's moments after ``steps`` steps
    from zero (Cauchy-Schwarz over the two exponential averages):
    K = (1 - b1) / sqrt(1 - b2) * sqrt(sum_{k < steps} (b1^2 / b2)^k)."""
    if steps == 0:
        return 0.0
    ratio = beta1 * beta1 / beta2 if beta2 > 0 else math.inf
    if ratio < 1:
        total = (1 - ratio ** steps) / (1 - ratio)
    elif ratio == 1:
        total = float(steps)
    else:
        total = math.inf if steps * math.log(ratio) > 700 else (ratio ** steps - 1) / (ratio - 1)
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(total)


def _check_discriminator_optimizer(optimizer, model):
    """The discriminator's Adam state (Model.__getstate__()
    ['discriminator_optimizer']): None, or its settings, a step count, and
    finite moments over the discriminator's parameters within the bound
    Adam's averages obey for its betas and steps."""
    if optimizer is None:
        return
    _require(model.discriminator_hidden is not None,
             "the model state has a discriminator optimizer but the model has no discriminator")
    keys = {"learning_rate", "beta1", "beta2", "eps", "step", "m", "v"}
    _require(isinstance(optimizer, dict) and set(optimizer) == keys,
             f"invalid model state (the discriminator optimizer state must have the keys "
             f"{sorted(keys)})")
    _check_real(optimizer["learning_rate"], "the discriminator optimizer's learning_rate", 0.0,
                _FLOAT32_MAX)
    _require(optimizer["learning_rate"] > 0,
             "the discriminator optimizer's learning_rate must be > 0")
    for key in ("beta1", "beta2"):
        value = optimizer[key]
        _require(_is_real(value) and 0 <= value < 1,
                 f"the discriminator optimizer's {key} ({value!r:.100}) must lie in [0, 1)")
    _require(_is_real(optimizer["eps"]) and optimizer["eps"] == _ADAM_EPS,
             f"the discriminator optimizer's eps is {optimizer['eps']!r:.100}; HierarchicalVAE "
             f"trains with {_ADAM_EPS!r}")
    # Not bounded by history_'s minibatches: an epoch that diverged is
    # rolled back and not recorded, but the discriminator's steps in it stay.
    step = optimizer["step"]
    _check_int(step, "the discriminator optimizer's step count", 0, _MAX_COUNT)
    n_disc = sum(view.size for name, view in model.named_parameters()
                 if name.startswith("discriminator."))
    m, v = optimizer["m"], optimizer["v"]
    for name, array in (("m", m), ("v", v)):
        _require(isinstance(array, np.ndarray) and array.dtype == np.float32
                 and array.shape == (n_disc,),
                 f"the discriminator optimizer's {name} must be a float32 array of "
                 f"{n_disc} values")
        _require(bool(np.all(np.isfinite(array))),
                 f"the discriminator optimizer's {name} holds NaN or infinite values")
    _require(bool(np.all(v >= 0)), "the discriminator optimizer's second moments 'v' must be >= 0")
    bound = (_adam_moment_bound(optimizer["beta1"], optimizer["beta2"], step) * 1.001
             * np.sqrt(v.astype(np.float64)) + _ADAM_EPS)
    _require(bool(np.all(np.abs(m.astype(np.float64)) <= bound)),
             "the discriminator optimizer's first moments 'm' exceed what its second moments "
             "'v' allow for its betas and steps: an Adam step from this state could overflow")


def _check_history(history, n_iter, n_layers, keys, validation_keys):
    _require(isinstance(history, dict), f"history_ must be a dict; got "
             f"{type(history).__name__}")
    # Optional groups, each all or none: the validation terms, beta-TCVAE's.
    from ._native import TCVAE_RECORD_KEYS
    groups = [set(validation_keys), set(TCVAE_RECORD_KEYS)]
    required, present = set(keys), set(history)
    extra = present - required
    _require(required <= present and
             extra == set().union(*[g for g in groups if g & extra]),
             f"history_ must have the keys {sorted(required)} (and all or none of each of "
             f"{[sorted(g) for g in groups]}); got {sorted(map(str, present))[:20]}")
    for key, values in history.items():
        _require(isinstance(values, list) and len(values) == n_iter,
                 f"history_[{key!r}] must be a list of n_iter_ = {n_iter} entries")
        for i, value in enumerate(values):
            name = f"history_[{key!r}][{i}]"
            if key in ("kl", "val_kl"):
                _require(isinstance(value, list) and len(value) == n_layers,
                         f"{name} must be a list of {n_layers} per-layer KL terms")
                for k in value:
                    _check_real(k, name, nan=True)
            elif key == "n_batches":
                _check_int(value, name, 0)
            elif key in ("beta", "seconds"):
                _check_real(value, name, 0.0, nan=key == "seconds")
            else:
                _check_real(value, name, nan=True)


def _check_attributes(attributes, model, spec):
    """The fitted attributes: their set, types, ranges and agreement with
    the model."""
    known = {"n_features_in_", "n_iter_", "history_", "best_epoch_", "classes_",
             "feature_names_in_", "active_units_"} | set(spec.attribute_checks)
    missing = [key for key in _REQUIRED_ATTRIBUTES if key not in attributes]
    if missing:
        raise _Damaged(f"the metadata lacks the fitted attributes {missing}")
    unknown = set(attributes) - known
    _require(not unknown, f"unknown fitted attributes {sorted(map(str, unknown))[:10]}")
    for key, check in spec.attribute_checks.items():
        if key in attributes:
            problem = check(attributes[key], model)
            _require(problem is None, f"{key}: {problem}")
    n_features = attributes["n_features_in_"]
    _require(_is_int(n_features) and n_features == model.n_features,
             f"n_features_in_ ({n_features!r:.100}) differs from the model's "
             f"{model.n_features} features")
    n_iter = attributes["n_iter_"]
    _check_int(n_iter, "n_iter_", 0)
    # A model with a discriminator also records its steps.
    from ._native import DISCRIMINATOR_RECORD_KEYS
    history_keys = spec.history_keys + (DISCRIMINATOR_RECORD_KEYS
                                        if model.discriminator_hidden is not None else ())
    _check_history(attributes["history_"], n_iter, len(model.latent_dims),
                   history_keys, spec.validation_keys)
    best = attributes.get("best_epoch_")
    _require(best is None or (_is_int(best) and 0 <= best < n_iter),
             f"best_epoch_ must be None or an epoch index in [0, {n_iter}); got {best!r:.100}")
    classes = attributes.get("classes_")
    if classes is not None:
        _require(isinstance(classes, np.ndarray) and classes.ndim == 1
                 and classes.size == model.n_conditions and classes.size > 0,
                 f"classes_ must be None or the {model.n_conditions} class labels whose "
                 "one-hot rows are the model's conditions")
        if classes.dtype.kind == "f":
            _require(bool(np.all(np.isfinite(classes))), "classes_ holds NaN or infinity")
        _require(np.array_equal(np.unique(classes), classes),
                 "classes_ must be sorted and unique")
    # Files written before it existed lack it.
    active = attributes.get("active_units_")
    dims = model.latent_dims
    _require(active is None or (isinstance(active, list) and len(active) == len(dims)
                                and all(_is_int(a) and 0 <= a <= d for a, d in zip(active, dims))),
             f"active_units_ must be None or a list of {len(dims)} counts, each between 0 and "
             f"its layer's size {tuple(dims)}; got {active!r:.100}")
    names = attributes.get("feature_names_in_")
    if "feature_names_in_" in attributes:
        _require(isinstance(names, np.ndarray) and names.dtype == object
                 and names.shape == (model.n_features,),
                 f"feature_names_in_ must be {model.n_features} strings")


def _check_params(estimator, model, spec):
    """The estimator's parameters through its own validation, then what the
    C core needs of them, then their agreement with the model."""
    try:
        claimed = spec.validate(estimator)
    except (TypeError, ValueError, OverflowError) as error:
        raise _Damaged(f"invalid estimator parameters ({error})") from None
    params = estimator.get_params(deep=False)
    # Every parameter's own limits (types, ranges, the C core's) were checked
    # by spec.validate, from the estimator's table (hvae/_params.py). A saved
    # file is held to a stricter policy: beyond these the first minibatches
    # overflow float32 (a loss of beta * KL, a step of learning_rate * 10 per
    # parameter), so no training could have used them, and a model saved
    # with them could not train on.
    for key, high in (("learning_rate", 1.0), ("beta", 1e3), ("weight_decay", 1e3),
                      ("free_bits", 1e3), ("temperature", 1e6), ("temperature_min", 1e6),
                      ("temperature_decay", 1e3), ("prior_learning_rate", 1.0),
                      ("pretrain_beta", 1e3), ("discriminator_learning_rate", 1.0),
                      ("tc_weight", 1e3)):
        if _is_real(params.get(key)):
            _check_real(params[key], key, high=high)
    for weight in params.get("tcvae_weights") or ():
        _check_real(weight, "each of tcvae_weights", high=1e3)
    random_state = params.get("random_state")
    _require(random_state is None or (_is_int(random_state) and 0 <= random_state < 2**32),
             f"random_state must be None or an int in [0, 2**32); got {random_state!r:.100}")
    _require(params.get("callbacks") is None, "callbacks cannot be saved; must be null")
    actual = {key: getattr(model, key) for key in claimed}
    _require(dict(claimed) == actual,
             f"the estimator's parameters describe the architecture {claimed}, but the "
             f"model is {actual}")
    _require(bool(params.get("conditional")) == (model.n_conditions > 0),
             f"conditional={params.get('conditional')!r} but the model has "
             f"{model.n_conditions} conditions")


def _check_trains(model):
    """A cheap check that the parameters can be trained from: the loss and
    gradient of the model's own samples, and of data of the kind its
    likelihood expects (coin flips in [0, 1]; standard-normal, that is
    scaled, features), are finite, and the loss of its own samples is that
    of a coherent model. The encoder and decoder of any trained (or freshly
    initialised) model agree on what the decoder generates, a few nats per
    dimension; finite but arbitrary weights are off by 1e10 and more, and
    their gradients overflow the first steps. The user's data can still
    differ, and make a bad model diverge (DivergenceError, the model kept)."""
    rng = np.random.default_rng(0)
    n = 8
    cond = (np.eye(model.n_conditions, dtype=np.float32)[np.arange(n) % model.n_conditions]
            if model.n_conditions else None)
    if model.likelihood == "bernoulli":
        data = (rng.random((n, model.n_features)) < 0.5).astype(np.float32)
    else:
        data = rng.standard_normal((n, model.n_features)).astype(np.float32)
    bound = 1e6 * (model.n_features + sum(model.latent_dims))
    try:
        samples = model.sample(n, seed=0, cond=cond)
        for X, limit in ((samples, bound), (data, math.inf)):
            for seed in (0, 1):
                loss, grad = model.loss_and_grad(X, seed=seed, cond=cond)
                _require(abs(loss) <= limit and bool(np.all(np.isfinite(grad))),
                         f"the model's parameters are incoherent: the loss of its own "
                         f"samples is {loss:.3g} nats per row")
    except (ValueError, FloatingPointError, ArithmeticError) as error:
        if isinstance(error, _Damaged):
            raise
        raise _Damaged(f"the model's parameters give no finite loss and gradient on its own "
                       f"samples or on data of the kind its likelihood expects ({error})") \
            from None


@functools.lru_cache(maxsize=None)
def _argument_names(constructor):
    """The keyword arguments a class's constructor takes (parsing a C
    signature costs more than the rest of loading a small model)."""
    return frozenset(inspect.signature(constructor).parameters)


def _read_metadata(archive, infos, archive_size):
    """The archive's metadata member, parsed and checked: format, version,
    keys, estimator and hvae_version. Returns ``(metadata, spec)``."""
    from . import __version__

    if _METADATA not in infos:
        raise _Damaged("no metadata member: not an hvae model file")
    text = _read_member(archive, infos[_METADATA], archive_size, "|u1")
    try:
        metadata = json.loads(text.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Damaged(f"the metadata is not JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _Damaged("the metadata does not name the format 'hvae': not an hvae "
                       "model file")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise ValueError(
            f"written in hvae file format version {version!r:.100} (by hvae "
            f"{str(metadata.get('hvae_version'))[:100]}); this hvae ({__version__}) reads "
            f"version {FORMAT_VERSION}" + (": upgrade hvae to load it" if _is_int(version)
                                           and version > FORMAT_VERSION else ""))
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise _Damaged(f"the metadata lacks {missing}")
    unknown = set(metadata) - set(_REQUIRED_KEYS) - {"unsaved_params", _DIGEST}
    _require(not unknown, f"unknown metadata keys {sorted(unknown)[:10]}")
    spec = _ESTIMATORS.get(metadata["estimator"]) if isinstance(
        metadata["estimator"], str) else None
    if spec is None:
        raise _Damaged(f"holds a {metadata['estimator']!r:.100}, not a "
                       f"{' or '.join(_ESTIMATORS)}")
    _require(isinstance(metadata["hvae_version"], str) and len(metadata["hvae_version"])
             < 100, "hvae_version must be a short string")
    return metadata, spec


def _read_arrays(archive, infos, metadata, archive_size):
    """The arrays the metadata declares, each read and checked against its
    dtype, shape and SHA-256. Returns a dict of name to array."""
    declared = metadata["arrays"]
    if not isinstance(declared, dict) or "parameters" not in declared:
        raise _Damaged("the metadata declares no 'parameters' array")
    members = set(infos) - {_METADATA}
    if members != set(declared):
        raise _Damaged(f"members {sorted(members)} differ from the metadata's arrays "
                       f"{sorted(declared)}")
    arrays = {}
    for name, spec_ in declared.items():
        try:
            dtype, shape, digest = spec_["dtype"], spec_["shape"], spec_["sha256"]
            if not all(_is_int(s) and s >= 0 for s in shape) or set(spec_) != {
                    "dtype", "shape", "sha256"}:
                raise TypeError
        except (TypeError, KeyError):
            raise _Damaged(f"the metadata's entry for array {name!r} is malformed") from None
        array = _read_member(archive, infos[name], archive_size, dtype, shape)
        if hashlib.sha256(array.tobytes()).hexdigest() != digest:
            raise _Damaged(f"array {name!r} does not match its SHA-256 checksum: the file "
                           "was altered")
        arrays[name] = array
    return arrays


def _read_archive(file, archive_size):
    """Step 1 of _load: the archive's metadata and arrays, read and checked.
    Returns ``(metadata, spec, arrays)``."""
    with zipfile.ZipFile(file) as archive:
        infos = {}
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise _Damaged(f"unexpected member {info.filename!r}")
            infos[info.filename[:-4]] = info
        metadata, spec = _read_metadata(archive, infos, archive_size)
        arrays = _read_arrays(archive, infos, metadata, archive_size)
    return metadata, spec, arrays


def _build_model(metadata, arrays):
    """Step 2 of _load: the model of the file's architecture, its layout
    checked against the file's, every float array checked finite."""
    from . import __version__
    from ._native import Model

    parameters = arrays["parameters"]
    if parameters.dtype != np.float32 or parameters.ndim != 1:
        raise _Damaged("'parameters' is not a 1-D float32 array")
    model_arguments = _decode(metadata["model"], arrays)
    if not isinstance(model_arguments, dict):
        raise _Damaged("the metadata's 'model' is not an object")
    known = _argument_names(Model)
    if set(model_arguments) - known:
        raise ValueError(f"the model uses settings this hvae ({__version__}) does not know: "
                         f"{sorted(set(model_arguments) - known)}; it was written by hvae "
                         f"{metadata['hvae_version']}")
    _check_architecture_size(model_arguments, parameters.size)
    try:
        model = Model(**model_arguments)
    except (TypeError, ValueError, OverflowError, MemoryError) as error:
        raise _Damaged(f"invalid model architecture ({error})") from None
    _check_model_arguments(model_arguments, parameters.size)
    layout = [[name, list(view.shape)] for name, view in model.named_parameters()]
    if layout != metadata["layout"]:
        raise _Damaged(f"layout mismatch: the file's tensors {_describe(metadata['layout'])} "
                       f"differ from those of its architecture in this hvae "
                       f"{_describe(layout)}")
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise _Damaged(f"array {name!r} holds NaN or infinite values")
    return model


def _read_estimator_fields(metadata, arrays, model, spec):
    """Step 3 of _load: the estimator's params and fitted attributes,
    checked. Returns ``(params, attributes)``."""
    from . import __version__

    params = _decode(metadata["params"], arrays)
    attributes = _decode(metadata["attributes"], arrays)
    if not isinstance(params, dict) or not isinstance(attributes, dict):
        raise _Damaged("the metadata's 'params' or 'attributes' is not an object")
    params = {**spec.params_before, **params}
    unknown = set(params) - _argument_names(spec.cls)
    if unknown:
        raise ValueError(f"the estimator uses parameters this hvae ({__version__}) does not "
                         f"know: {sorted(unknown)}; it was written by hvae "
                         f"{metadata['hvae_version']}")
    unsaved = metadata.get("unsaved_params", [])
    _require(isinstance(unsaved, list) and all(
        isinstance(key, str) and key in params and params[key] is None for key in unsaved),
        "unsaved_params must list parameters saved as null")
    _check_attributes(attributes, model, spec)
    return params, attributes


def _restore_state(metadata, arrays, model, history):
    """Step 4 of _load: the model's state (parameters, optimizer, generator),
    checked, then restored into ``model``."""
    state = _decode(metadata["state"], arrays)
    if isinstance(state, dict) and "rng_state" in state:
        rng_state = state.get("rng_state")
        if not (isinstance(rng_state, tuple) and len(rng_state) == 4 and all(
                _is_int(s) and 0 <= s < 2**64 for s in rng_state)):
            raise _Damaged(f"invalid model state (rng_state {rng_state!r:.100} is not 4 "
                           "unsigned 64-bit ints)")
    if isinstance(state, dict) and isinstance(state.get("optimizer"), dict) and \
            state["optimizer"].get("kind") not in ("adam", "sgd"):
        raise _Damaged(f"invalid model state (optimizer kind "
                       f"{state['optimizer'].get('kind')!r:.100})")
    _check_state(state, model, history)
    try:
        model.__setstate__(state)
    except (TypeError, ValueError, OverflowError, KeyError) as error:
        raise _Damaged(f"invalid model state ({error})") from None


def _load(file, archive_size):
    metadata, spec, arrays = _read_archive(file, archive_size)
    model = _build_model(metadata, arrays)
    params, attributes = _read_estimator_fields(metadata, arrays, model, spec)
    _restore_state(metadata, arrays, model, attributes["history_"])

    estimator = spec.cls(**params)
    _check_params(estimator, model, spec)
    _check_trains(model)
    # Last, so that an edit that breaks a field is named by that field's check.
    if _DIGEST in metadata:
        _require(isinstance(metadata[_DIGEST], str)
                 and metadata[_DIGEST] == _metadata_digest(metadata),
                 "the metadata does not match its SHA-256 checksum: the file was altered")
    for key, value in attributes.items():
        setattr(estimator, key, value)
    estimator.model_ = model
    return estimator


def _describe(layout):
    try:
        return "[" + ", ".join(f"{name} {tuple(shape)}" for name, shape in layout) + "]"
    except (TypeError, ValueError):
        return repr(layout)[:500]


def load(path):
    """Load a HierarchicalVAE saved with :meth:`HierarchicalVAE.save`.

    Parameters
    ----------
    path : str or os.PathLike
        A file in the hvae file format (see :mod:`hvae.file_format`).

    Returns
    -------
    estimator : HierarchicalVAE
        The fitted estimator, with the same parameters, optimizer state,
        generator state, hyperparameters and ``history_`` as the one saved:
        it gives identical outputs and continues training identically.

    Raises
    ------
    ValueError
        If the file is not a valid hvae model file, is truncated or damaged,
        was altered, or was written in a format version this hvae cannot
        read. The message names the file and the problem.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        try:
            return _load(file, os.fstat(file.fileno()).st_size)
        except _Damaged as error:
            raise ValueError(f"{path}: cannot load this hvae model file: {error}") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        except RecursionError:
            raise ValueError(f"{path}: cannot load this hvae model file: its metadata "
                             "is nested too deeply") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, TypeError,
                AttributeError, OverflowError) as error:
            # zipfile and the .npy reader raise these for damaged archives and
            # malformed metadata.
            raise ValueError(f"{path}: cannot load this hvae model file: it is damaged or "
                             f"not an hvae model file ({type(error).__name__}: {error})") from None
