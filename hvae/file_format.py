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
    ``best_epoch_``, ``feature_names_in_`` when set, ...
``arrays``
    For every array member: ``{"dtype", "shape", "sha256"}``, the SHA-256
    of its data bytes.

Inside ``params``, ``model``, ``state`` and ``attributes`` a few values are
tagged: ``{"__tuple__": [...]}`` is a tuple, ``{"__array__": name}`` the array
member ``name``, ``{"__strings__": [...]}`` a 1-D object array of str. Floats
are written by Python's json module, which spells non-finite values NaN,
Infinity and -Infinity (history entries may be NaN).

Loading refuses, with a ValueError that names the file: anything that is not
a readable zip archive of ``.npy`` members (truncated, corrupt, a bad CRC), a
missing member or key, another format or format version, arrays whose dtype,
shape or SHA-256 differ from the metadata, an architecture whose layout
differs from the file's, non-finite parameters, and parameters this version
of hvae does not know. Sizes are checked before anything is allocated: every
array's declared size against the archive's, and the architecture's widths
against the number of parameters, so that a hostile file cannot make hvae
allocate much more memory than its own size (about a thousand times, at
most, for a file crafted to do so).
"""
import hashlib
import inspect
import json
import math
import numbers
import os
import tempfile
import warnings
import zipfile
import zlib

import numpy as np
from sklearn.utils.validation import check_is_fitted

FORMAT_NAME = "hvae"
FORMAT_VERSION = 1

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load", "save"]

_METADATA = "metadata"
_DTYPES = {"<f4", "<f8", "<i4", "<i8", "<u8", "|u1", "|b1"}
_REQUIRED_KEYS = ("format", "format_version", "hvae_version", "estimator", "params", "model",
                  "layout", "state", "attributes", "arrays")
_REQUIRED_ATTRIBUTES = ("n_features_in_", "n_iter_", "history_")


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
    from .estimator import HierarchicalVAE

    if type(estimator) is not HierarchicalVAE:
        raise TypeError(f"can save a HierarchicalVAE; got {type(estimator).__name__}")
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
    text = json.dumps(metadata, ensure_ascii=False)
    members = dict(arrays)
    members[_METADATA] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".hvae-", suffix=".tmp", dir=directory)
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
    if any(w < 0 or w > max(n_params, 1) for w in widths):
        raise _Damaged(f"the architecture has widths {widths}, impossible for {n_params} "
                       "parameters")
    # Every weight matrix of these networks joins widths (or sums of them).
    bound = 8 * max(len(widths), 1) * sum(widths) ** 2
    if bound > 1000 * n_params + 10**7:
        raise _Damaged(f"the architecture (widths {widths}) is implausibly large for "
                       f"{n_params} parameters")


def _load(file, archive_size):
    from . import __version__
    from ._native import Model
    from .estimator import HierarchicalVAE

    with zipfile.ZipFile(file) as archive:
        infos = {}
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise _Damaged(f"unexpected member {info.filename!r}")
            infos[info.filename[:-4]] = info
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
        if version != FORMAT_VERSION:
            raise ValueError(
                f"written in hvae file format version {version!r} (by hvae "
                f"{metadata.get('hvae_version')}); this hvae ({__version__}) reads version "
                f"{FORMAT_VERSION}" + (": upgrade hvae to load it" if isinstance(version, int)
                                       and version > FORMAT_VERSION else ""))
        missing = [key for key in _REQUIRED_KEYS if key not in metadata]
        if missing:
            raise _Damaged(f"the metadata lacks {missing}")
        if metadata["estimator"] != HierarchicalVAE.__name__:
            raise _Damaged(f"holds a {metadata['estimator']!r}, not a HierarchicalVAE")

        declared = metadata["arrays"]
        if not isinstance(declared, dict) or "parameters" not in declared:
            raise _Damaged("the metadata declares no 'parameters' array")
        members = set(infos) - {_METADATA}
        if members != set(declared):
            raise _Damaged(f"members {sorted(members)} differ from the metadata's arrays "
                           f"{sorted(declared)}")
        arrays = {}
        for name, spec in declared.items():
            try:
                dtype, shape, digest = spec["dtype"], spec["shape"], spec["sha256"]
                if not all(isinstance(s, int) and s >= 0 for s in shape):
                    raise TypeError
            except (TypeError, KeyError):
                raise _Damaged(f"the metadata's entry for array {name!r} is malformed") from None
            array = _read_member(archive, infos[name], archive_size, dtype, shape)
            if hashlib.sha256(array.tobytes()).hexdigest() != digest:
                raise _Damaged(f"array {name!r} does not match its SHA-256 checksum: the file "
                               "was altered")
            arrays[name] = array

    parameters = arrays["parameters"]
    if parameters.dtype != np.float32 or parameters.ndim != 1:
        raise _Damaged("'parameters' is not a 1-D float32 array")
    model_arguments = _decode(metadata["model"], arrays)
    if not isinstance(model_arguments, dict):
        raise _Damaged("the metadata's 'model' is not an object")
    known = set(inspect.signature(Model).parameters)
    if set(model_arguments) - known:
        raise ValueError(f"the model uses settings this hvae ({__version__}) does not know: "
                         f"{sorted(set(model_arguments) - known)}; it was written by hvae "
                         f"{metadata['hvae_version']}")
    _check_architecture_size(model_arguments, parameters.size)
    try:
        model = Model(**model_arguments)
    except (TypeError, ValueError, OverflowError, MemoryError) as error:
        raise _Damaged(f"invalid model architecture ({error})") from None
    layout = [[name, list(view.shape)] for name, view in model.named_parameters()]
    if layout != metadata["layout"]:
        raise _Damaged(f"layout mismatch: the file's tensors {_describe(metadata['layout'])} "
                       f"differ from those of its architecture in this hvae "
                       f"{_describe(layout)}")
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise _Damaged(f"array {name!r} holds NaN or infinite values")

    state = _decode(metadata["state"], arrays)
    if not isinstance(state, dict):
        raise _Damaged("the metadata's 'state' is not an object")
    rng_state = state.get("rng_state")
    if not (isinstance(rng_state, tuple) and len(rng_state) == 4 and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**64
            for s in rng_state)):
        raise _Damaged(f"invalid model state (rng_state {rng_state!r:.100} is not 4 "
                       "unsigned 64-bit ints)")
    try:
        model.__setstate__(state)
    except (TypeError, ValueError, OverflowError, KeyError) as error:
        raise _Damaged(f"invalid model state ({error})") from None

    params = _decode(metadata["params"], arrays)
    attributes = _decode(metadata["attributes"], arrays)
    if not isinstance(params, dict) or not isinstance(attributes, dict):
        raise _Damaged("the metadata's 'params' or 'attributes' is not an object")
    unknown = set(params) - set(HierarchicalVAE().get_params())
    if unknown:
        raise ValueError(f"the estimator uses parameters this hvae ({__version__}) does not "
                         f"know: {sorted(unknown)}; it was written by hvae "
                         f"{metadata['hvae_version']}")
    missing = [key for key in _REQUIRED_ATTRIBUTES if key not in attributes]
    if missing:
        raise _Damaged(f"the metadata lacks the fitted attributes {missing}")
    if attributes["n_features_in_"] != model.n_features:
        raise _Damaged(f"n_features_in_ ({attributes['n_features_in_']}) differs from the "
                       f"model's {model.n_features} features")
    estimator = HierarchicalVAE(**params)
    for key, value in attributes.items():
        if not (isinstance(key, str) and key.endswith("_") and not key.startswith("_")):
            raise _Damaged(f"invalid attribute name {key!r}")
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
