"""The scikit-learn estimator :class:`HierarchicalVAE`."""
import math
import numbers
import os
import sys
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ._chunks import (ChunkedRows, ChunkError, InMemoryRows, check_array_like, chunk_order,
                      default_chunk_size, is_out_of_core)
from . import distributed as _distributed
from ._native import MAX_HIDDEN, MAX_LAYERS, Model
from .file_format import register_estimator

_LIKELIHOODS = ("gaussian", "bernoulli")
_ACTIVATIONS = ("relu", "tanh", "leaky_relu", "elu", "softplus")
_VARIANCES = ("learned", "unit")
_OPTIMIZERS = ("adam", "sgd")
_INFERENCES = ("markov", "ladder")
_OBJECTIVES = ("elbo", "iwae")
_HISTORY_KEYS = ("loss", "objective", "elbo", "reconstruction", "kl", "beta", "seconds",
                 "n_batches")
_VALIDATION_KEYS = ("val_elbo", "val_reconstruction", "val_kl")
_MEAN_KEYS = ("loss", "objective", "elbo", "reconstruction")


def _one_hot(labels, classes):
    """(n, len(classes)) float32 one-hot rows of labels; unknown labels raise."""
    codes = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
    unknown = classes[codes] != labels
    if np.any(unknown):
        raise ValueError(f"y holds labels not seen in fit: {np.unique(labels[unknown])[:5]}")
    C = np.zeros((len(labels), len(classes)), dtype=np.float32)
    C[np.arange(len(labels)), codes] = 1.0
    return C


def _is_labels(y):
    """Whether y (an ndarray) holds class labels rather than condition rows."""
    return y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1
                           and not np.issubdtype(y.dtype, np.floating))


def _pass_record(block_records, beta, seconds=None):
    """The history_ record of a pass from its blocks' Model.fit records:
    per-row averages (the blocks' averages weighted by their rows), summed
    minibatches and rows."""
    if len(block_records) == 1:
        record = dict(block_records[0])
    else:
        n_rows = sum(r["n_rows"] for r in block_records)
        weights = [r["n_rows"] / n_rows for r in block_records]
        record = {key: math.fsum(w * r[key] for w, r in zip(weights, block_records))
                  for key in _MEAN_KEYS}
        record["kl"] = [math.fsum(w * r["kl"][i] for w, r in zip(weights, block_records))
                        for i in range(len(block_records[0]["kl"]))]
        record["n_batches"] = sum(r["n_batches"] for r in block_records)
        record["n_rows"] = n_rows
        record["seconds"] = math.fsum(r["seconds"] for r in block_records)
        record["complete"] = all(r["complete"] for r in block_records)
    if seconds is not None:
        record["seconds"] = seconds
    record["beta"] = beta
    return record


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _as_dims(value, name, allow_empty):
    """A tuple of positive ints from an int or a sequence of ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    try:
        dims = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints; got {value!r}") from None
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1:
            raise ValueError(f"{name} must hold positive ints; got {value!r}")
    if not dims and not allow_empty:
        raise ValueError(f"{name} must have at least one entry; got {value!r}")
    return tuple(int(d) for d in dims)


class HierarchicalVAE(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Hierarchical variational autoencoder with a native CPU core.

    A Markov hierarchy of T diagonal-Gaussian latent layers z_1..z_T over
    the data x. Inference runs bottom-up, q(z_i | z_{i-1}); generation runs
    top-down from p(z_T) = N(0, I) through p(z_{i-1} | z_i) to p(x | z_1).
    Training maximises the evidence lower bound (ELBO) in nats, with one
    reparameterised sample per data point, by minibatch Adam (or SGD).
    ``latent_dims=(d,)`` is the ordinary VAE.

    ``fit`` trains on an array in memory, or reads data that do not fit in
    memory (``np.memmap``, ``h5py.Dataset``, ``zarr.Array``) chunk by chunk;
    ``partial_fit`` trains one pass over the rows it is given, for training
    loops that stream the data themselves. Both take ``comm=`` (an mpi4py
    communicator) to train data-parallel over MPI processes, each holding a
    shard of the rows (:mod:`hvae.distributed`).

    Parameters
    ----------
    latent_dims : int or tuple of int, default=(16,)
        Sizes (d_1, ..., d_T) of the latent layers, bottom to top.
    hidden_dims : tuple of int, default=(256,)
        Hidden widths of every encoder block's MLP; decoder blocks use them
        reversed. May be empty (linear blocks).
    likelihood : {'gaussian', 'bernoulli'}, default='gaussian'
        p(x | z_1). Gaussian suits scaled real-valued features; Bernoulli
        suits data in [0, 1] such as images.
    activation : {'relu', 'tanh', 'leaky_relu', 'elu', 'softplus'}, default='relu'
        Activation after every hidden layer.
    decoder_variance : {'learned', 'unit'}, default='learned'
        'learned' gives every Gaussian decoder a log-variance head; 'unit'
        fixes those variances to 1.
    n_epochs : int, default=30
        Passes over the data per call to ``fit`` (``partial_fit`` makes one).
    batch_size : int, default=128
        Rows per minibatch (capped at the number of rows).
    learning_rate : float, default=1e-3
        Optimizer step size.
    optimizer : {'adam', 'sgd'}, default='adam'
        Adam (Kingma & Ba) or plain SGD.
    beta : float, default=1.0
        Weight of the KL terms in the training loss (beta-VAE); the reported
        ELBO always uses 1.
    weight_decay : float, default=0.0
        L2 penalty added to the gradient (PyTorch's convention).
    shuffle : bool, default=True
        Draw a new row order every epoch. For data read in chunks, the chunks
        are read in a new order every epoch too, and rows are shuffled within
        each chunk (see ``chunk_size``).
    warm_start : bool, default=False
        When True and the architecture is unchanged, ``fit`` continues
        training the fitted model (parameters, optimizer state, history).
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation, the minibatch order and the noise.
    n_threads : int or None, default=None
        Threads for this model's work (None: all available cores): hvae's
        own thread pool, which splits matrix products (each part on
        OpenBLAS with one thread) and the elementwise work. NumPy's and other
        libraries' threads are left alone.
    verbose : int, default=0
        0 is silent; 1 shows a progress bar (tqdm: a widget in Jupyter, text
        in a terminal) with the last epoch's training and validation ELBO;
        2 also prints one line per epoch.
    validation_fraction : float in (0, 1) or None, default=None
        Hold out this fraction of the rows of X (ceil(fraction * n_samples)
        rows, drawn with ``random_state``) and report their ELBO after every
        epoch in ``history_['val_elbo']``. This makes one copy of the training
        rows (``X[train_rows]``); passing ``validation_data`` to ``fit``
        instead makes none. With an int ``random_state`` every call to
        ``fit`` holds out the same rows, so warm-started fits never train on
        them. For X read in chunks (see ``chunk_size``) the held-out rows are
        the last ceil(fraction * n_samples) rows instead, read in chunks too
        and never copied: shuffle the file beforehand if its order is not
        random. ``partial_fit`` ignores it.
    early_stopping : bool, default=False
        Stop when the validation ELBO has not improved by more than ``tol``
        for ``n_iter_no_change`` epochs, and when ``fit`` ends (however it
        ends) restore the parameters of the epoch with the best validation
        ELBO in that call. Only the parameters are restored: the optimizer's
        moments and the random generator stay where the last epoch left them,
        ``history_`` keeps every epoch run and ``n_iter_`` counts them. Needs
        validation rows: ``validation_data``, else ``validation_fraction``,
        else 0.1 of X as with ``validation_fraction=0.1``. ``partial_fit``
        ignores it.
    n_iter_no_change : int, default=10
        Epochs without improvement before early stopping stops.
    tol : float, default=1e-4
        Improvement in validation ELBO (nats per sample) that counts as one.
    callbacks : callable, list of callables or None, default=None
        Each is called as ``callback(epoch, history)`` after every complete
        epoch, where ``epoch`` is the epoch's 0-based index in ``history_``
        (counting earlier warm-started fits) and ``history`` is ``history_``,
        already holding that epoch (and its validation ELBO). All callbacks
        run every epoch; if any returns ``False``, ``fit`` stops after that
        epoch and returns normally. An exception raised by a callback stops
        the fit and propagates, with ``history_`` kept. ``partial_fit`` calls
        them after its pass too (there is nothing for False to stop).
    chunk_size : int or None, default=None
        Rows read at a time from data that ``fit`` and ``partial_fit`` read
        in chunks: an ``np.memmap``, or an array-like that is not an ndarray
        but has ``shape``, ``dtype`` and ``__getitem__`` (``h5py.Dataset``,
        ``zarr.Array``). Ignored for data in memory. None takes the rows of
        about 64 MB of float32, rounded down to a multiple of ``batch_size``
        (so that only the last chunk makes a short minibatch). Every epoch
        reads each chunk once into one float32 buffer, checks it (NaN,
        infinity, Bernoulli range) and trains one pass over its rows, in an
        order drawn by the model's generator. With ``shuffle``, epoch e reads
        the chunks in the order
        ``np.random.default_rng([model_.seed, e]).permutation(n_chunks)``,
        e being the epoch's index in ``history_``. Memory stays at about one
        chunk (two for h5py and zarr, whose slices are arrays of their own),
        whatever the size of the data: the pages of an ``np.memmap`` are
        released as each chunk is copied.

    Attributes
    ----------
    model_ : hvae.Model
        The fitted low-level model (parameters in C buffers).
    history_ : dict of lists
        Per epoch: 'elbo', 'reconstruction' (mean log p(x|z_1)), 'kl' (one
        list of T per-layer mean KL terms per epoch), 'loss' (the training
        loss, with beta), 'beta', 'seconds', 'n_batches'. All in nats per
        sample, averaged over the epoch's rows. A call to ``partial_fit``
        adds one entry. For data read in chunks, 'seconds' includes reading
        them. With validation rows also
        'val_elbo', 'val_reconstruction' and 'val_kl': the same terms on the
        validation rows at the end of the epoch (deterministic, as in
        ``score``), NaN for epochs trained without validation rows.
    best_epoch_ : int or None
        With ``early_stopping``, the index in ``history_`` of the epoch whose
        parameters the model holds (the best validation ELBO of the last
        fit); None otherwise.
    n_iter_ : int
        Epochs trained so far (all fit calls of a warm-started model, and
        one per ``partial_fit`` call). ``kl_warmup_epochs`` counts these.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of str
        Feature names seen during fit, when X had string column names.
    classes_ : ndarray or None
        For a conditional model trained on class labels, the classes (sorted)
        whose one-hot rows are the conditions; None otherwise.

    Examples
    --------
    >>> from hvae import HierarchicalVAE
    >>> from hvae.datasets import load_digits
    >>> X, y = load_digits()
    >>> vae = HierarchicalVAE(latent_dims=(8,), hidden_dims=(64,),
    ...                       likelihood="bernoulli", n_epochs=5,
    ...                       random_state=0).fit(X)
    >>> vae.transform(X).shape
    (1797, 8)
    """

    def __init__(self, latent_dims=(16,), hidden_dims=(256,), likelihood="gaussian",
                 activation="relu", decoder_variance="learned", n_epochs=30,
                 batch_size=128, learning_rate=1e-3, optimizer="adam", beta=1.0,
                 weight_decay=0.0, shuffle=True, warm_start=False, random_state=None,
                 n_threads=None, verbose=0, validation_fraction=None, early_stopping=False,
                 n_iter_no_change=10, tol=1e-4, callbacks=None, inference="markov",
                 objective="elbo", n_mc_samples=1, n_importance_samples=5,
                 kl_warmup_epochs=0, free_bits=0.0, conditional=False, chunk_size=None):
        self.latent_dims = latent_dims
        self.hidden_dims = hidden_dims
        self.likelihood = likelihood
        self.activation = activation
        self.decoder_variance = decoder_variance
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.beta = beta
        self.weight_decay = weight_decay
        self.shuffle = shuffle
        self.warm_start = warm_start
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.callbacks = callbacks
        self.inference = inference
        self.objective = objective
        self.n_mc_samples = n_mc_samples
        self.n_importance_samples = n_importance_samples
        self.kl_warmup_epochs = kl_warmup_epochs
        self.free_bits = free_bits
        self.conditional = conditional
        self.chunk_size = chunk_size

    # ---- validation ---------------------------------------------------------

    def _architecture(self):
        """Validated (latent_dims, hidden_dims, likelihood, activation, variance,
        inference)."""
        latent = _as_dims(self.latent_dims, "latent_dims", allow_empty=False)
        hidden = _as_dims(self.hidden_dims, "hidden_dims", allow_empty=True)
        if len(latent) > MAX_LAYERS:
            raise ValueError(f"latent_dims may have at most {MAX_LAYERS} layers; got {len(latent)}")
        if len(hidden) > MAX_HIDDEN:
            raise ValueError(f"hidden_dims may have at most {MAX_HIDDEN} entries; got {len(hidden)}")
        for name, value, options in (("likelihood", self.likelihood, _LIKELIHOODS),
                                     ("activation", self.activation, _ACTIVATIONS),
                                     ("decoder_variance", self.decoder_variance, _VARIANCES),
                                     ("inference", self.inference, _INFERENCES)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}; got {value!r}")
        return (latent, hidden, self.likelihood, self.activation, self.decoder_variance,
                self.inference)

    def _check_training_params(self):
        def check_int(name, value, low):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")

        def check_float(name, value, positive):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
            if not ok or value < 0 or (positive and value == 0):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")

        check_int("n_epochs", self.n_epochs, 0)
        check_int("batch_size", self.batch_size, 1)
        check_float("learning_rate", self.learning_rate, positive=True)
        check_float("beta", self.beta, positive=False)
        check_float("weight_decay", self.weight_decay, positive=False)
        check_int("verbose", self.verbose, 0)
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}; got {self.optimizer!r}")
        if self.n_threads is not None:
            check_int("n_threads", self.n_threads, 1)
        fraction = self.validation_fraction
        if fraction is not None and not (
                isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
                and 0.0 < fraction < 1.0):
            raise ValueError(f"validation_fraction must be None or a number in (0, 1); "
                             f"got {fraction!r}")
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise ValueError(f"early_stopping must be True or False; got {self.early_stopping!r}")
        check_int("n_iter_no_change", self.n_iter_no_change, 1)
        check_float("tol", self.tol, positive=False)
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}; got {self.objective!r}")
        check_int("n_mc_samples", self.n_mc_samples, 1)
        check_int("n_importance_samples", self.n_importance_samples, 1)
        check_int("kl_warmup_epochs", self.kl_warmup_epochs, 0)
        check_float("free_bits", self.free_bits, positive=False)
        if self.objective == "iwae" and (self.beta != 1.0 or self.free_bits != 0.0
                                         or self.kl_warmup_epochs != 0):
            raise ValueError("objective='iwae' trains the importance-weighted bound itself: "
                             "beta must be 1, free_bits 0 and kl_warmup_epochs 0")
        if not isinstance(self.conditional, (bool, np.bool_)):
            raise ValueError(f"conditional must be True or False; got {self.conditional!r}")
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, 1)

    def _callbacks(self):
        """The callbacks as a list, validated."""
        callbacks = self.callbacks
        if callbacks is None:
            return []
        if callable(callbacks):
            return [callbacks]
        try:
            callbacks = list(callbacks)
        except TypeError:
            raise ValueError("callbacks must be a callable, a sequence of callables or None; "
                             f"got {self.callbacks!r}") from None
        for callback in callbacks:
            if not callable(callback):
                raise ValueError(f"callbacks must hold callables; got {callback!r}")
        return callbacks

    def _validate_X(self, X, reset, likelihood=None, name="X"):
        # float32 C order: one conversion at most, none for such an array.
        X = validate_data(self, X, reset=reset, dtype=np.float32, order="C")
        if likelihood is None:
            likelihood = self.model_.likelihood if not reset else self.likelihood
        if likelihood == "bernoulli" and X.size and (X.min() < 0.0 or X.max() > 1.0):
            raise ValueError(
                "%s has values outside [0, 1] (min %g, max %g), but likelihood='bernoulli' "
                "needs data in [0, 1]; rescale it or use likelihood='gaussian'"
                % (name, X.min(), X.max()))
        return X

    def _fit_conditions(self, y, n, classes=None):
        """(conditions, classes) of a conditional fit: (n, n_conditions) float32
        from class labels (one-hot over the sorted classes: ``classes`` when
        given, else those of y) or a 2-D array; (None, None) otherwise."""
        if not self.conditional:
            return None, None
        if y is None:
            raise ValueError("conditional=True needs y: class labels of shape (n_samples,) "
                             "or conditions of shape (n_samples, n_conditions)")
        y_arr = np.asarray(y)
        if y_arr.ndim == 1 or (y_arr.ndim == 2 and y_arr.shape[1] == 1
                               and not np.issubdtype(y_arr.dtype, np.floating)):
            y_arr = y_arr.ravel()
            if y_arr.shape[0] != n:
                raise ValueError(f"y has {y_arr.shape[0]} labels but X has {n} rows")
            if classes is None:
                classes = np.unique(y_arr)
            return _one_hot(y_arr, classes), classes
        if y_arr.ndim != 2:
            raise ValueError(f"y must be class labels (n_samples,) or conditions "
                             f"(n_samples, n_conditions); got shape {y_arr.shape}")
        C = check_array(y_arr, dtype=np.float32, order="C", input_name="y")
        if C.shape[0] != n:
            raise ValueError(f"y has {C.shape[0]} rows but X has {n}")
        return C, None

    def _conditions(self, y, n):
        """Conditions for n rows of the fitted model, None if not conditional.
        Class labels may be one label for all rows."""
        if self.model_.n_conditions == 0:
            return None
        if y is None:
            raise ValueError("this model was fitted with conditions: pass y (class labels "
                             "or conditions) for these rows too")
        if self.classes_ is not None:
            labels = np.asarray(y)
            if labels.ndim == 0:
                labels = np.full(n, labels.item(), dtype=self.classes_.dtype)
            labels = labels.ravel()
            if labels.shape[0] != n:
                raise ValueError(f"y has {labels.shape[0]} labels for {n} rows")
            return _one_hot(labels, self.classes_)
        C = check_array(y, dtype=np.float32, order="C", input_name="y")
        if C.shape != (n, self.model_.n_conditions):
            raise ValueError(f"y must have shape ({n}, {self.model_.n_conditions}); "
                             f"got {C.shape}")
        return C

    def _split_validation(self, X, C, classes, validation_data, likelihood):
        """(X_train, C_train, validation rows or None) of X in memory:
        validation_data as given ((X_val, y_val) for a conditional model), or
        held-out rows."""
        fraction = self.validation_fraction
        if validation_data is not None:
            if fraction is not None:
                raise ValueError("pass either validation_data to fit or validation_fraction, "
                                 "not both")
            return X, C, self._validation_data_rows(validation_data, C is not None, classes,
                                                    likelihood)
        if fraction is None and self.early_stopping:
            fraction = 0.1
        if fraction is None:
            return X, C, None
        n = X.shape[0]
        n_val = self._n_validation_rows(fraction, n)
        # A fresh generator from random_state: with an int, every fit holds
        # out the same rows. Fancy indexing copies; sorted rows keep X's order.
        rows = check_random_state(self.random_state).permutation(n)
        train, val = np.sort(rows[n_val:]), np.sort(rows[:n_val])
        if C is None:
            return X[train], None, InMemoryRows(X[val], None)
        return X[train], C[train], InMemoryRows(X[val], C[val])

    @staticmethod
    def _n_validation_rows(fraction, n):
        n_val = math.ceil(fraction * n)
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"validation_fraction={fraction} of {n} rows leaves "
                             f"{n - n_val} training and {n_val} validation rows; need "
                             "at least one of each")
        return n_val

    def _validation_data_rows(self, validation_data, conditional, classes, likelihood):
        """validation_data (X_val, or (X_val, y_val) for a conditional model)
        as rows: in memory, validated whole and used in place; or read in
        chunks like X."""
        y_val = None
        if conditional:
            if not (isinstance(validation_data, tuple) and len(validation_data) == 2):
                raise ValueError("validation_data of a conditional model must be a tuple "
                                 "(X_val, y_val)")
            validation_data, y_val = validation_data
        chunked = is_out_of_core(validation_data)
        if chunked:
            try:
                n_val, n_features = check_array_like(validation_data, "validation_data")
            except ValueError as error:
                raise ValueError(f"validation_data: {error}") from None
            if n_features != self.n_features_in_:
                raise ValueError(f"validation_data: X has {n_features} features, but "
                                 f"{type(self).__name__} is expecting {self.n_features_in_} "
                                 "features as input.")
        else:
            try:
                validation_data = self._validate_X(validation_data, reset=False,
                                                   likelihood=likelihood,
                                                   name="validation_data")
            except ValueError as error:
                raise ValueError(f"validation_data: {error}") from None
            n_val = validation_data.shape[0]
        C_val = None
        if conditional:
            C_val = (_one_hot(np.asarray(y_val).ravel(), classes) if classes is not None
                     else check_array(y_val, dtype=np.float32, order="C", input_name="y_val"))
            if C_val.shape[0] != n_val:
                raise ValueError("validation_data: y_val and X_val differ in length")
        if not chunked:
            return InMemoryRows(validation_data, C_val)
        return ChunkedRows(validation_data, 0, n_val, self._chunk_size(self.n_features_in_),
                           conditions=None if C_val is None else (lambda a, b: C_val[a:b]),
                           bernoulli=likelihood == "bernoulli", name="validation_data")

    def _chunk_size(self, n_features):
        if self.chunk_size is not None:
            return int(self.chunk_size)
        return default_chunk_size(n_features, self.batch_size)

    def _check_n_features(self, n_features, reset):
        """validate_data's n_features_in_ bookkeeping, for data read in chunks
        (which have no feature names)."""
        if reset:
            self.n_features_in_ = n_features
            self.__dict__.pop("feature_names_in_", None)
        elif n_features != self.n_features_in_:
            raise ValueError(f"X has {n_features} features, but {type(self).__name__} is "
                             f"expecting {self.n_features_in_} features as input.")

    def _condition_source(self, y, n, new_model, classes=None, infer_classes=True):
        """(conditions(first, end) or None, classes, n_conditions) for n rows.

        y is class labels (one-hot over the classes: ``classes``, else for a
        new model np.unique(y) when ``infer_classes``, else ``classes_``) or
        an (n, n_conditions) array. y is held in memory; one-hot rows are made
        per chunk, as they are needed.
        """
        conditional = bool(self.conditional) if new_model else self.model_.n_conditions > 0
        if not conditional:
            return None, None, 0
        if y is None:
            raise ValueError("this model is conditional: pass y, class labels of shape "
                             "(n_samples,) or conditions of shape (n_samples, n_conditions)")
        y_arr = np.asarray(y)
        if _is_labels(y_arr):
            labels = y_arr.ravel()
            if labels.shape[0] != n:
                raise ValueError(f"y has {labels.shape[0]} labels but X has {n} rows")
            if not new_model:
                if self.classes_ is None:
                    raise ValueError("this model was fitted with conditions of shape "
                                     "(n_samples, n_conditions), not class labels; pass y "
                                     "as such an array")
                classes = self.classes_
            elif classes is None:
                if not infer_classes:
                    raise ValueError("classes must be passed on the first call to "
                                     "partial_fit when y holds class labels: all the "
                                     "classes, so that later calls use the same one-hot "
                                     "code")
                classes = np.unique(labels)
            unknown = ~np.isin(labels, classes)
            if np.any(unknown):
                raise ValueError(f"y holds labels not in classes: "
                                 f"{np.unique(labels[unknown])[:5]}")
            return (lambda first, end: _one_hot(labels[first:end], classes)), classes, \
                len(classes)
        if y_arr.ndim != 2:
            raise ValueError(f"y must be class labels (n_samples,) or conditions "
                             f"(n_samples, n_conditions); got shape {y_arr.shape}")
        if new_model and classes is not None:
            raise ValueError("classes applies to class labels; y holds conditions of shape "
                             "(n_samples, n_conditions)")
        C = check_array(y_arr, dtype=np.float32, order="C", input_name="y")
        if C.shape[0] != n:
            raise ValueError(f"y has {C.shape[0]} rows but X has {n}")
        if not new_model and C.shape[1] != self.model_.n_conditions:
            raise ValueError(f"y must have shape ({n}, {self.model_.n_conditions}); "
                             f"got {C.shape}")
        return (lambda first, end: C[first:end]), None, C.shape[1]

    def _fit_rows(self, X, y, validation_data, continuing, likelihood, classes=None):
        """(training rows, validation rows or None, classes, n_conditions) of fit."""
        if not is_out_of_core(X):
            X = self._validate_X(X, reset=not continuing)
            if continuing:
                C, classes = self._conditions(y, X.shape[0]), self.classes_
            else:
                C, classes = self._fit_conditions(y, X.shape[0], classes)
            X, C, val = self._split_validation(X, C, classes, validation_data, likelihood)
            return InMemoryRows(X, C), val, classes, 0 if C is None else C.shape[1]
        n, n_features = check_array_like(X)
        self._check_n_features(n_features, reset=not continuing)
        conditions, classes, n_conditions = self._condition_source(y, n, not continuing)
        chunk_size = self._chunk_size(n_features)
        bernoulli = likelihood == "bernoulli"
        n_train, val = n, None
        fraction = self.validation_fraction
        if validation_data is not None:
            if fraction is not None:
                raise ValueError("pass either validation_data to fit or validation_fraction, "
                                 "not both")
            val = self._validation_data_rows(validation_data, n_conditions > 0, classes,
                                             likelihood)
        else:
            if fraction is None and self.early_stopping:
                fraction = 0.1
            if fraction is not None:
                # Random rows would mean random reads: the tail is held out.
                n_train = n - self._n_validation_rows(fraction, n)
                val = ChunkedRows(X, n_train, n, chunk_size, conditions, bernoulli)
        train = ChunkedRows(X, 0, n_train, chunk_size, conditions, bernoulli)
        return train, val, classes, n_conditions

    # ---- data-parallel training (hvae.distributed) --------------------------------

    _UNSHARED_PARAMS = ("callbacks", "verbose", "n_threads", "random_state")

    def _shared_settings(self):
        """The parameters every rank of a data-parallel fit must share (less
        those that may differ per process; the seed is rank 0's)."""
        params = {key: repr(value) for key, value in sorted(self.get_params().items())
                  if key not in self._UNSHARED_PARAMS}
        return params

    def _model_digest(self):
        import hashlib

        m = self.model_
        digest = hashlib.sha256(np.ascontiguousarray(m.parameters).tobytes())
        digest.update(repr((m.rng_state, m.optimizer_steps, self.n_iter_)).encode())
        return digest.hexdigest()

    def _agree_on_settings(self, session, continuing, has_validation, labels_of=None,
                           same=None):
        """The first agreement of a data-parallel call: the same parameters,
        the same model to continue (or none), validation rows on all ranks
        or none, and the same values of ``same`` (a dict). Returns (rank 0's
        seed for a new model, the union of the ranks' class labels or None)."""
        def facts():
            labels = labels_of() if labels_of is not None else None
            return None, {"settings": self._shared_settings(), "continuing": continuing,
                          "model": self._model_digest() if continuing else None,
                          "validation": has_validation, "labels": labels,
                          "seed": self._new_seed(), "same": same}

        _, gathered = session.agree("checking the settings", facts)
        for key, what in (("settings", "the estimator's parameters"),
                          ("continuing", "whether the call continues a fitted model"),
                          ("model", "the models being continued (parameters, optimizer "
                                    "or generator)"),
                          ("validation", "whether validation_data is given"),
                          ("same", "the call's arguments")):
            session.require_same([g[key] for g in gathered], what)
        labels = [g["labels"] for g in gathered if g["labels"] is not None]
        classes = np.unique(np.concatenate(labels)) if labels else None
        return gathered[0]["seed"], classes

    def _agree_on_rows(self, session, compute):
        """The second agreement: compute() makes this rank's (train rows,
        validation rows, classes, n_conditions); every rank must have
        succeeded, with the same width. Marks the rows as this rank's shard."""
        def rows():
            train, val, classes, n_conditions = compute()
            return (train, val, classes, n_conditions), (self.n_features_in_, n_conditions,
                                                         train.n_rows)

        (train, val, classes, n_conditions), gathered = session.agree("checking the data",
                                                                      rows)
        session.require_same([g[0] for g in gathered], "the numbers of features")
        session.require_same([g[1] for g in gathered], "the numbers of condition columns")
        n_global, shard_start = session.shard([g[2] for g in gathered], session.rank)
        train.parallel = (session, n_global, shard_start)
        if val is not None:
            val.parallel = (session, None, None)
        return train, val, classes, n_conditions

    def _fit_rows_parallel(self, session, X, y, validation_data, continuing, likelihood):
        """_fit_rows on one rank of a data-parallel fit, agreed with the
        others; also returns rank 0's seed."""
        def labels_of():
            if continuing or not self.conditional or y is None:
                return None
            y_arr = np.asarray(y)
            return np.unique(y_arr.ravel()) if _is_labels(y_arr) else None

        seed, classes = self._agree_on_settings(session, continuing,
                                                validation_data is not None, labels_of)

        def compute():
            X_local = _distributed.local_rows(X)
            val_local = validation_data
            if isinstance(validation_data, tuple) and len(validation_data) == 2:
                val_local = (_distributed.local_rows(validation_data[0], "validation_data"),
                             validation_data[1])
            elif validation_data is not None:
                val_local = _distributed.local_rows(validation_data, "validation_data")
            return self._fit_rows(X_local, y, val_local, continuing, likelihood, classes)

        train, val, classes, n_conditions = self._agree_on_rows(session, compute)
        return train, val, classes, n_conditions, seed

    def _new_seed(self):
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _new_model(self, architecture, n_features, n_conditions, seed=None):
        latent, hidden, likelihood, activation, variance, inference = architecture
        seed = self._new_seed() if seed is None else seed
        return Model(n_features, latent, hidden, likelihood=likelihood, activation=activation,
                     decoder_variance=variance, seed=seed, inference=inference,
                     n_conditions=n_conditions)

    def _fitted_state(self):
        """The fitted attributes, for _restore_fitted_state."""
        return {key: value for key, value in self.__dict__.items()
                if key.endswith("_") and not key.startswith("_")}

    def _restore_fitted_state(self, state):
        for key in [key for key in self.__dict__
                    if key.endswith("_") and not key.startswith("_")]:
            del self.__dict__[key]
        self.__dict__.update(state)

    # ---- fitting -------------------------------------------------------------

    def fit(self, X, y=None, *, validation_data=None, comm=None, comm_timeout=300.0):
        """Train on X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data. A float32 C-contiguous array is used in place
            (unless ``validation_fraction`` is set: see there). An
            ``np.memmap``, ``h5py.Dataset``, ``zarr.Array`` or other
            array-like that is not an ndarray but has ``shape``, ``dtype``
            and ``__getitem__`` is read ``chunk_size`` rows at a time (see
            there), so it need not fit in memory.
        y : None or array-like, default=None
            Ignored, unless ``conditional=True``: then the condition of each
            row, class labels of shape (n_samples,) (one-hot encoded inside
            over ``classes_``) or an array of shape (n_samples, n_conditions).
            Held in memory also when X is read in chunks.
        validation_data : array-like of shape (n_val, n_features) or None
            Rows whose ELBO is recorded after every epoch in
            ``history_['val_elbo']`` (and used by ``early_stopping``). A
            float32 C-contiguous array is used in place; data of the kinds
            that X may be read in chunks are read in chunks too. Cannot be
            combined with ``validation_fraction``.
        comm : mpi4py.MPI.Comm or None, default=None
            Data-parallel training over MPI (see :mod:`hvae.distributed`):
            every process of ``comm`` calls ``fit`` alike with its shard of
            the rows as X (in memory or an ``np.memmap``, used in place) and,
            if any, its shard of ``validation_data``; minibatches of
            ``batch_size`` rows are drawn from all the shards together, and
            every process ends with the same model, equal up to float
            rounding to one process fitting all the rows in rank order.
            Needs mpi4py.
        comm_timeout : float, default=300.0
            With ``comm``: seconds a process waits for the others in any
            collective step before it aborts the MPI job with a message (a
            dead or hung process never leaves the others waiting forever).

        Returns
        -------
        self : HierarchicalVAE
            The fitted estimator.

        Raises
        ------
        ValueError
            For invalid parameters or data, before any work is done. For X
            read in chunks, the shape and dtype are checked before any work
            and each chunk's values (NaN, infinity, the Bernoulli range) just
            before training on it: an invalid chunk raises a ValueError that
            names its rows, the model keeping the training done so far (a
            new model that trained on nothing leaves the estimator as it
            was).
        hvae.DivergenceError
            When the loss becomes NaN or infinite; the model keeps its last
            finite parameters (with ``early_stopping``, its best ones) and
            ``history_`` holds the epochs so far.

        Notes
        -----
        However the fit ends (all epochs done, a callback returned False,
        early stopping, Ctrl-C, an error), ``history_`` and ``n_iter_`` hold
        every epoch that ran; an epoch cut short by Ctrl-C or an error is
        recorded with the averages of its minibatches so far and NaN
        validation terms. On data read in chunks, a divergence returns the
        model to its state at the start of the chunk.
        """
        architecture = self._architecture()
        self._check_training_params()
        callbacks = self._callbacks()
        session = None if comm is None else _distributed.Session(comm, comm_timeout)
        continuing = (self.warm_start and hasattr(self, "model_")
                      and self._model_architecture() == architecture
                      and (self.model_.n_conditions > 0) == bool(self.conditional))
        # validate_data records n_features_in_ (and feature names) as it
        # checks X: until the new model exists, a failure restores them.
        before = self._fitted_state()
        try:
            if session is None:
                train, val, classes, n_conditions = self._fit_rows(
                    X, y, validation_data, continuing, architecture[2])
                seed = None
            else:
                train, val, classes, n_conditions, seed = self._fit_rows_parallel(
                    session, X, y, validation_data, continuing, architecture[2])
            if not continuing:
                model = self._new_model(architecture, self.n_features_in_, n_conditions,
                                        seed)
        except BaseException:
            self._restore_fitted_state(before)
            raise
        self.classes_ = classes
        if not continuing:
            self.model_ = model
            self.history_ = {key: [] for key in _HISTORY_KEYS}
            self.n_iter_ = 0
        self.best_epoch_ = None
        self.model_.n_threads = self.n_threads or _available_cores()
        if val is not None:
            self._ensure_validation_history()
        try:
            self._train_epochs(train, val, callbacks)
        except ChunkError:
            if not continuing and not self.history_["elbo"]:
                self._restore_fitted_state(before)
            raise
        return self

    def partial_fit(self, X, y=None, classes=None, *, comm=None, comm_timeout=300.0):
        """Train one pass of minibatch updates over the rows of X.

        The first call (on an estimator without ``model_``) creates the
        model as ``fit`` would; every call continues it, keeping the
        optimizer's state, the random generator, ``history_`` (one entry per
        call) and ``n_iter_`` (one per call, which ``kl_warmup_epochs``
        counts as epochs). So n calls on the same X train exactly as
        ``fit(X)`` with ``n_epochs=n``, and calls over consecutive chunks of
        a data set train exactly as a ``fit`` that read the data in those
        chunks in that order (the same ``random_state``, ``beta`` and
        rows). After ``fit``, it continues the fitted model.

        ``validation_fraction``, ``early_stopping`` and ``verbose`` apply to
        ``fit`` only; ``callbacks`` are called after the pass (a False return
        has nothing to stop). X read in chunks (see ``chunk_size``) is read,
        checked and trained on one chunk at a time, as in ``fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The rows of this pass; the same kinds as for ``fit``.
        y : None or array-like, default=None
            Ignored, unless ``conditional=True``: class labels of shape
            (n_samples,) or conditions of shape (n_samples, n_conditions).
        classes : array-like of shape (n_classes,) or None, default=None
            Every class label that y may hold, required on the first call of
            a conditional model trained on class labels (a single batch may
            not show them all); later calls may omit it or must repeat it.
        comm : mpi4py.MPI.Comm or None, default=None
            Data-parallel streaming over MPI: every process of ``comm`` calls
            ``partial_fit`` alike, each with its own rows (in memory); the
            pass runs over all of them together, as ``fit(X, comm=comm)``
            does (see there and :mod:`hvae.distributed`).
        comm_timeout : float, default=300.0
            As for ``fit``.

        Returns
        -------
        self : HierarchicalVAE

        Raises
        ------
        ValueError
            For invalid parameters or data (a feature count that differs
            from the model's, no ``classes`` on the first conditional call,
            parameters of another architecture than the model's), before any
            work; for an invalid chunk of X read in chunks, naming its rows,
            with the training on earlier chunks kept in the model and in
            ``history_``.
        hvae.DivergenceError
            As for ``fit``.
        """
        architecture = self._architecture()
        self._check_training_params()
        callbacks = self._callbacks()
        first = not hasattr(self, "model_")
        if not first and (self._model_architecture() != architecture
                          or (self.model_.n_conditions > 0) != bool(self.conditional)):
            raise ValueError("partial_fit continues the fitted model, whose architecture "
                             "differs from the parameters' now (latent_dims, hidden_dims, "
                             "likelihood, activation, decoder_variance, inference or "
                             "conditional); call fit to train a new model")
        session = None if comm is None else _distributed.Session(comm, comm_timeout)
        before = self._fitted_state()
        try:
            if classes is not None:
                classes = np.unique(np.asarray(classes))
                if classes.ndim != 1 or classes.size == 0:
                    raise ValueError(f"classes must be a non-empty 1-D array of labels; "
                                     f"got {classes!r}")
                if not first and (self.classes_ is None
                                  or not np.array_equal(classes, self.classes_)):
                    raise ValueError(f"classes={classes!r} differs from classes_="
                                     f"{self.classes_!r} of the earlier calls")
            seed = None
            if session is None:
                rows, classes, n_conditions = self._pass_rows(X, y, first, classes,
                                                              architecture[2])
            else:
                seed, _ = self._agree_on_settings(
                    session, not first, False,
                    same={"classes": None if classes is None else classes.tolist()})

                def compute():
                    rows, pass_classes, n_conditions = self._pass_rows(
                        _distributed.local_rows(X), y, first, classes, architecture[2])
                    return rows, None, pass_classes, n_conditions

                rows, _, classes, n_conditions = self._agree_on_rows(session, compute)
            if first:
                model = self._new_model(architecture, self.n_features_in_, n_conditions,
                                        seed)
        except BaseException:
            self._restore_fitted_state(before)
            raise
        if first:
            self.model_ = model
            self.history_ = {key: [] for key in _HISTORY_KEYS}
            self.n_iter_ = 0
            self.classes_ = classes
        self.best_epoch_ = None
        self.model_.n_threads = self.n_threads or _available_cores()
        try:
            record = self._train_pass(rows)
        except ChunkError:
            if first and not self.history_["elbo"]:
                self._restore_fitted_state(before)
            raise
        self._append_epoch(record, None)
        for callback in callbacks:
            callback(self.n_iter_ - 1, self.history_)
        return self

    def _pass_rows(self, X, y, reset, classes, likelihood):
        """(rows, classes, n_conditions) of a partial_fit call."""
        if is_out_of_core(X):
            n, n_features = check_array_like(X)
            self._check_n_features(n_features, reset)
            conditions, classes, n_conditions = self._condition_source(
                y, n, reset, classes, infer_classes=False)
            return (ChunkedRows(X, 0, n, self._chunk_size(n_features), conditions,
                                bernoulli=likelihood == "bernoulli"),
                    classes, n_conditions)
        X = self._validate_X(X, reset=reset, likelihood=likelihood)
        conditions, classes, n_conditions = self._condition_source(
            y, X.shape[0], reset, classes, infer_classes=False)
        C = conditions(0, X.shape[0]) if conditions is not None else None
        return InMemoryRows(X, C), classes, n_conditions

    def _train_epochs(self, train, val, callbacks):
        """fit's epochs: a pass over train, the validation terms of val,
        early stopping, progress and callbacks, n_epochs times."""
        best_elbo, best_parameters, n_stale = -np.inf, None, 0
        parallel = getattr(train, "parallel", None)
        session = parallel[0] if parallel is not None else None
        show = self.verbose >= 1 and (session is None or session.rank == 0)
        bar = self._progress_bar(train.n_rows if session is None else parallel[1]) if show \
            else None
        record = None  # a pass's record not yet in history_
        try:
            # One pass per epoch, so that validation and callbacks run between
            # passes and may use the model (it serves one call at a time); the
            # optimizer and generator carry over, so on data in memory this
            # trains exactly as one Model.fit call with n_epochs would.
            for epoch_in_call in range(self.n_epochs):
                record = self._train_pass(train, bar.update if bar is not None else None)
                validation = self._validation_terms(val) if val is not None else None
                self._append_epoch(record, validation)
                record, appended = None, record
                epoch = self.n_iter_ - 1
                stop = False
                if validation is not None and self.early_stopping:
                    if validation["elbo"] > best_elbo + self.tol:
                        best_elbo, n_stale = validation["elbo"], 0
                        best_parameters = np.copy(self.model_.parameters)
                        self.best_epoch_ = epoch
                    else:
                        n_stale += 1
                    stop = n_stale >= self.n_iter_no_change
                if bar is not None:
                    self._report_progress(bar, epoch_in_call, appended, validation)
                # Every callback sees every epoch, even after one asked to stop.
                for callback in callbacks:
                    if callback(epoch, self.history_) is False:
                        stop = True
                if session is not None:  # all ranks stop together
                    stop = session.any(stop)
                if stop:
                    break
        finally:
            # Whatever stopped training, keep the epochs that happened (a pass
            # cut short is recorded by _train_pass).
            if bar is not None:
                bar.close()
            if record is not None:
                self._append_epoch(record, None)
            if best_parameters is not None:
                self.model_.parameters[:] = best_parameters

    def _train_pass(self, rows, progress=None):
        """One pass of minibatch updates over rows, block by block (one
        ``_train_block`` per chunk, chunks in ``chunk_order``); the unit of
        both fit (one per epoch) and partial_fit (one per call).

        Returns the pass's record for history_. If the pass stops with an
        exception after some minibatches, their record is appended to
        history_ (NaN validation terms) before the exception propagates.
        """
        beta = self._epoch_beta(self.n_iter_)
        order = chunk_order(rows.n_chunks, self.model_.seed, self.n_iter_, self.shuffle)
        chunked = isinstance(rows, ChunkedRows)
        block_records = []  # Model.fit appends each block's record as it is made
        started = time.perf_counter()
        try:
            for _, _, X_block, C_block in rows.blocks(order):
                self._train_block(X_block, C_block, beta, block_records, progress,
                                  getattr(rows, "parallel", None))
        except BaseException:
            if block_records:
                seconds = time.perf_counter() - started if chunked else None
                self._append_epoch(_pass_record(block_records, beta, seconds), None)
            raise
        seconds = time.perf_counter() - started if chunked else None
        return _pass_record(block_records, beta, seconds)

    def _train_block(self, X, C, beta, records, progress, parallel=None):
        """One Model.fit pass over rows in memory (float32 C-contiguous X,
        conditions C or None); its record is appended to records. With
        parallel = (session, n_global, shard_start), X is this rank's shard
        of a data-parallel pass."""
        iwae = self.objective == "iwae"
        extra = {}
        if parallel is not None:
            session, n_global, shard_start = parallel
            extra = dict(reduce=session.reduce, n_global=n_global, shard_start=shard_start)
        self.model_.fit(X, n_epochs=1, batch_size=self.batch_size,
                        learning_rate=self.learning_rate, optimizer=self.optimizer,
                        beta=beta, weight_decay=self.weight_decay, shuffle=self.shuffle,
                        history=records, progress=progress, objective=self.objective,
                        n_samples=self.n_importance_samples if iwae else self.n_mc_samples,
                        free_bits=self.free_bits, cond=C, **extra)

    def _ensure_validation_history(self):
        """Add the validation keys to history_, NaN for epochs without them."""
        n_layers = len(self.model_.latent_dims)
        for key in _VALIDATION_KEYS:
            if key not in self.history_:
                missing = [math.nan] * n_layers if key == "val_kl" else math.nan
                self.history_[key] = [missing for _ in range(len(self.history_["elbo"]))]

    def _epoch_beta(self, epoch):
        """The KL weight of an epoch (counted over every fit of the model):
        beta * min(1, epoch / kl_warmup_epochs), so 0 in the first epoch and
        beta from epoch kl_warmup_epochs on; beta without warm-up."""
        if self.kl_warmup_epochs == 0:
            return float(self.beta)
        return float(self.beta) * min(1.0, epoch / self.kl_warmup_epochs)

    def _validation_terms(self, rows):
        """Mean ELBO, reconstruction and per-layer KL of the validation rows,
        block by block."""
        elbo = reconstruction = 0.0
        kl = np.zeros(len(self.model_.latent_dims))
        for _, _, X_val, C_val in rows.blocks():
            terms = self.model_.elbo_terms(X_val, cond=C_val)
            elbo += np.sum(terms["elbo"])
            reconstruction += np.sum(terms["reconstruction"])
            kl += np.sum(terms["kl"], axis=0)
        # The same per-row values as score_samples; for rows in memory (one
        # block) sum / n is np.mean's computation, so score(X_val) after early
        # stopping equals the best epoch's val_elbo exactly.
        n = rows.n_rows
        parallel = getattr(rows, "parallel", None)
        if parallel is not None:  # every rank's validation shard
            sums = parallel[0].sum([elbo, reconstruction, n, *kl])
            elbo, reconstruction, n, kl = sums[0], sums[1], sums[2], sums[3:]
        return {"elbo": float(elbo / n), "reconstruction": float(reconstruction / n),
                "kl": [float(k) for k in kl / n]}

    def _append_epoch(self, record, validation):
        for key in _HISTORY_KEYS:
            self.history_[key].append(record[key])
        if "val_elbo" in self.history_:
            if validation is None:
                n_layers = len(self.model_.latent_dims)
                validation = {"elbo": math.nan, "reconstruction": math.nan,
                              "kl": [math.nan] * n_layers}
            self.history_["val_elbo"].append(validation["elbo"])
            self.history_["val_reconstruction"].append(validation["reconstruction"])
            self.history_["val_kl"].append(validation["kl"])
        self.n_iter_ += 1

    def _progress_bar(self, n_rows):
        from tqdm.auto import tqdm

        return tqdm(total=self.n_epochs * n_rows, unit="row", unit_scale=True,
                    desc=f"epoch 1/{self.n_epochs}", leave=True)

    def _report_progress(self, bar, epoch_in_call, record, validation):
        upcoming = min(epoch_in_call + 2, self.n_epochs)
        bar.set_description(f"epoch {upcoming}/{self.n_epochs}", refresh=False)
        postfix = {"elbo": f"{record['elbo']:.3f}"}
        if validation is not None:
            postfix["val_elbo"] = f"{validation['elbo']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if self.verbose >= 2:
            kl = " ".join(f"{k:.2f}" for k in record["kl"])
            line = (f"epoch {epoch_in_call + 1}/{self.n_epochs}  elbo {record['elbo']:.3f}  "
                    f"reconstruction {record['reconstruction']:.3f}  kl [{kl}]")
            if validation is not None:
                line += f"  val_elbo {validation['elbo']:.3f}"
            bar.write(line + f"  ({record['seconds']:.2f} s)", file=sys.stdout)

    def _model_architecture(self):
        m = self.model_
        return (m.latent_dims, m.hidden_dims, m.likelihood, m.activation, m.decoder_variance,
                m.inference)

    # ---- inference -------------------------------------------------------------

    def _fitted_X(self, X, y=None):
        """(X as float32 C-contiguous, its conditions or None), validated."""
        check_is_fitted(self)
        self.model_.n_threads = self.n_threads or _available_cores()
        X = self._validate_X(X, reset=False)
        return X, self._conditions(y, X.shape[0])

    def fit_transform(self, X, y=None, **fit_params):
        """fit(X, y) then transform(X, y): posterior means of z_1.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            Conditions, when ``conditional=True``; else ignored.
        **fit_params
            Passed to ``fit`` (for example ``validation_data``).

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dims[0]), float32
        """
        return self.fit(X, y, **fit_params).transform(X, y)

    def transform(self, X, y=None):
        """Posterior means of z_1.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dims[0]), float32
        """
        X, C = self._fitted_X(X, y)
        return self.model_.encode(X, cond=C)[0][0]

    def encode(self, X, y=None):
        """Posterior mean and log-variance of every latent layer.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        layers : list of T (mu, logvar) pairs, each of shape (n_samples, d_i)
            Markov inference: layers above the first are evaluated at the
            posterior mean of the layer below. Ladder: top-down, each layer's
            prior evaluated at the posterior mean of the layer above.
        """
        X, C = self._fitted_X(X, y)
        return self.model_.encode(X, cond=C)

    def active_units(self, X, y=None, threshold=0.01):
        """Active latent units per layer (Burda et al. 2016).

        A dimension is active when the variance over X of its posterior mean
        exceeds ``threshold``: the model uses it to tell rows apart.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.
        threshold : float, default=0.01

        Returns
        -------
        counts : list of int
            The number of active dimensions of each layer, bottom to top.
        """
        return [int(np.sum(np.var(mu.astype(np.float64), axis=0) > threshold))
                for mu, _ in self.encode(X, y)]

    def log_likelihood(self, X, y=None, n_samples=1000):
        """Importance-sampled estimate of log p(x) per sample, in nats.

        The posterior is the proposal: log (1/S) sum_s p(x, z_s) / q(z_s | x)
        over S = ``n_samples`` draws, streamed in chunks so memory does not
        grow with S. It is the importance-weighted bound with S draws: at
        least the ELBO on average, approaching log p(x) as S grows. The
        number papers report as the test log-likelihood (with S = 5000 or so).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.
        n_samples : int, default=1000

        Returns
        -------
        log_px : ndarray of shape (n_rows,), float64
        """
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1; got {n_samples!r}")
        X, C = self._fitted_X(X, y)
        return self.model_.log_likelihood(X, n_samples=int(n_samples), cond=C)

    def inverse_transform(self, Z, y=None):
        """The mean of p(x | z_1) (probabilities for a Bernoulli likelihood).

        Parameters
        ----------
        Z : array-like of shape (n_samples, latent_dims[0])
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float32
        """
        check_is_fitted(self)
        # float32 first (once): values beyond its range become inf and are
        # refused with the rest.
        with np.errstate(over="ignore"):
            Z = check_array(Z, dtype=np.float32, order="C", ensure_all_finite=False,
                            input_name="Z")
        if Z.shape[1] != self.model_.latent_dims[0]:
            raise ValueError(f"Z must have shape (n_samples, {self.model_.latent_dims[0]}); "
                             f"got {Z.shape}")
        if not np.all(np.isfinite(Z)):
            raise ValueError("Z contains NaN or infinity (or values beyond float32's range)")
        return self.model_.decode(Z, cond=self._conditions(y, Z.shape[0]))

    def reconstruct(self, X, y=None):
        """inverse_transform(transform(X)): the decoded posterior mean.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features), float32
        """
        X, C = self._fitted_X(X, y)
        return self.model_.decode(self.model_.encode(X, cond=C)[0][0], cond=C)

    def sample(self, n_samples=1, random_state=None, observation_noise=False, *, y=None):
        """Draw by ancestral sampling from p(z_T) down to p(x | z_1).

        Parameters
        ----------
        n_samples : int, default=1
        random_state : int, RandomState instance or None, default=None
            Seeds the draw (None: NumPy's global generator picks a seed).
        observation_noise : bool, default=False
            False returns the mean of p(x | z_1) for each drawn z_1 (what one
            plots for images); True draws x from p(x | z_1) as well.
        y : label, array-like or None, default=None
            For a conditional model: the condition of every draw, one class
            label for all, n_samples labels, or an (n_samples, n_conditions)
            array.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float32
        """
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 0:
            raise ValueError(f"n_samples must be an int >= 0; got {n_samples!r}")
        C = self._conditions(y, int(n_samples))
        seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
        return self.model_.sample(int(n_samples), seed=seed,
                                  observation_noise=bool(observation_noise), cond=C)

    def score_samples(self, X, y=None):
        """Per-sample ELBO in nats (a lower bound on log p(x)).

        One reparameterised sample per row, drawn from a generator seeded by
        the row's values: the same row always scores the same.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        elbo : ndarray of shape (n_samples,), float64
        """
        X, C = self._fitted_X(X, y)
        return self.model_.elbo(X, cond=C)

    def score(self, X, y=None):
        """Mean ELBO in nats per sample (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X, y)))

    # ---- saving ---------------------------------------------------------------------

    def save(self, path):
        """Write the fitted estimator to ``path``; :func:`hvae.load` reads it back.

        The file is a NumPy ``.npz`` archive (no pickle): the parameters, the
        optimizer's moments and the generator's state as arrays, and JSON
        metadata with the format version, hvae's version, the
        hyperparameters, the layer layout, ``history_`` and a SHA-256 of
        every array. See :mod:`hvae.file_format`. The loaded estimator gives
        identical outputs and continues training (``warm_start``)
        identically. Callables (``callbacks``) and ``RandomState`` instances
        cannot be saved: a warning says so and they load as None.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write, exactly as named (``.npz`` is a good suffix).
            An existing file is replaced whole or not at all.
        """
        from .file_format import save

        save(self, path)

    @property
    def _n_features_out(self):
        return self.model_.latent_dims[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # The core computes in float32; it is what transform returns.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


register_estimator(HierarchicalVAE, history_keys=_HISTORY_KEYS, validation_keys=_VALIDATION_KEYS,
                   validate=lambda e: (e._check_training_params(), e._callbacks(),
                                       e._architecture())[-1])
