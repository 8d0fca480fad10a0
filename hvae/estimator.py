"""The scikit-learn estimator :class:`HierarchicalVAE`."""
import numbers
import os
import sys

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from ._native import MAX_HIDDEN, MAX_LAYERS, Model

_LIKELIHOODS = ("gaussian", "bernoulli")
_ACTIVATIONS = ("relu", "tanh", "leaky_relu", "elu", "softplus")
_VARIANCES = ("learned", "unit")
_OPTIMIZERS = ("adam", "sgd")


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
        Passes over the data per call to ``fit``.
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
        Draw a new row order every epoch.
    warm_start : bool, default=False
        When True and the architecture is unchanged, ``fit`` continues
        training the fitted model (parameters, optimizer state, history).
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation, the minibatch order and the noise.
    n_threads : int or None, default=None
        BLAS threads for this model's work (None: all available cores).
        Applies to hvae's own OpenBLAS only, not to NumPy's or others'.
    verbose : int, default=0
        0 is silent; 1 prints one line per epoch.

    Attributes
    ----------
    model_ : hvae.Model
        The fitted low-level model (parameters in C buffers).
    history_ : dict of lists
        Per epoch: 'elbo', 'reconstruction' (mean log p(x|z_1)), 'kl' (one
        list of T per-layer mean KL terms per epoch), 'loss' (the training
        loss, with beta), 'seconds', 'n_batches'. All in nats per sample,
        averaged over the epoch's minibatches.
    n_iter_ : int
        Epochs trained so far (all fit calls of a warm-started model).
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of str
        Feature names seen during fit, when X had string column names.

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
                 n_threads=None, verbose=0):
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

    # ---- validation ---------------------------------------------------------

    def _architecture(self):
        """Validated (latent_dims, hidden_dims, likelihood, activation, variance)."""
        latent = _as_dims(self.latent_dims, "latent_dims", allow_empty=False)
        hidden = _as_dims(self.hidden_dims, "hidden_dims", allow_empty=True)
        if len(latent) > MAX_LAYERS:
            raise ValueError(f"latent_dims may have at most {MAX_LAYERS} layers; got {len(latent)}")
        if len(hidden) > MAX_HIDDEN:
            raise ValueError(f"hidden_dims may have at most {MAX_HIDDEN} entries; got {len(hidden)}")
        for name, value, options in (("likelihood", self.likelihood, _LIKELIHOODS),
                                     ("activation", self.activation, _ACTIVATIONS),
                                     ("decoder_variance", self.decoder_variance, _VARIANCES)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}; got {value!r}")
        return latent, hidden, self.likelihood, self.activation, self.decoder_variance

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

    def _validate_X(self, X, reset):
        # float32 C order: one conversion at most, none for such an array.
        X = validate_data(self, X, reset=reset, dtype=np.float32, order="C")
        likelihood = self.model_.likelihood if not reset else self.likelihood
        if likelihood == "bernoulli" and X.size and (X.min() < 0.0 or X.max() > 1.0):
            raise ValueError(
                "X has values outside [0, 1] (min %g, max %g), but likelihood='bernoulli' "
                "needs data in [0, 1]; rescale it or use likelihood='gaussian'"
                % (X.min(), X.max()))
        return X

    # ---- fitting -------------------------------------------------------------

    def fit(self, X, y=None):
        """Train on X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data. A float32 C-contiguous array is used in place.
        y : None
            Ignored.

        Returns
        -------
        self : HierarchicalVAE
            The fitted estimator.

        Raises
        ------
        ValueError
            For invalid parameters or data, before any work is done.
        hvae.DivergenceError
            When the loss becomes NaN or infinite; the model keeps its last
            finite parameters and ``history_`` holds the epochs so far.
        """
        architecture = self._architecture()
        self._check_training_params()
        continuing = (self.warm_start and hasattr(self, "model_")
                      and self._model_architecture() == architecture)
        X = self._validate_X(X, reset=not continuing)

        if not continuing:
            latent, hidden, likelihood, activation, variance = architecture
            rng = check_random_state(self.random_state)
            seed = int(rng.randint(np.iinfo(np.int32).max))
            model = Model(X.shape[1], latent, hidden, likelihood=likelihood,
                          activation=activation, decoder_variance=variance, seed=seed)
            self.model_ = model
            self.history_ = {key: [] for key in
                             ("loss", "elbo", "reconstruction", "kl", "seconds", "n_batches")}
            self.n_iter_ = 0
        self.model_.n_threads = self.n_threads or _available_cores()

        records = []
        try:
            self.model_.fit(X, n_epochs=self.n_epochs, batch_size=self.batch_size,
                            learning_rate=self.learning_rate, optimizer=self.optimizer,
                            beta=self.beta, weight_decay=self.weight_decay,
                            shuffle=self.shuffle, history=records,
                            callback=self._report if self.verbose else None)
        finally:
            # Whatever stopped training, keep the epochs that happened.
            for record in records:
                for key in self.history_:
                    self.history_[key].append(record[key])
            self.n_iter_ += len(records)
        return self

    def _model_architecture(self):
        m = self.model_
        return (m.latent_dims, m.hidden_dims, m.likelihood, m.activation, m.decoder_variance)

    def _report(self, epoch, record):
        kl = " ".join(f"{k:.2f}" for k in record["kl"])
        print(f"epoch {epoch + 1}/{self.n_epochs}  elbo {record['elbo']:.3f}  "
              f"reconstruction {record['reconstruction']:.3f}  kl [{kl}]  "
              f"({record['seconds']:.2f} s)", file=sys.stdout, flush=True)

    # ---- inference -------------------------------------------------------------

    def _fitted_X(self, X):
        check_is_fitted(self)
        self.model_.n_threads = self.n_threads or _available_cores()
        return self._validate_X(X, reset=False)

    def transform(self, X):
        """Posterior means of z_1.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dims[0]), float32
        """
        return self.model_.encode(self._fitted_X(X))[0][0]

    def encode(self, X):
        """Posterior mean and log-variance of every latent layer.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        layers : list of T (mu, logvar) pairs, each of shape (n_samples, d_i)
            Layers above the first are evaluated at the posterior mean of the
            layer below.
        """
        return self.model_.encode(self._fitted_X(X))

    def inverse_transform(self, Z):
        """The mean of p(x | z_1) (probabilities for a Bernoulli likelihood).

        Parameters
        ----------
        Z : array-like of shape (n_samples, latent_dims[0])

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float32
        """
        check_is_fitted(self)
        Z = np.asarray(Z)
        if Z.ndim != 2 or Z.shape[1] != self.model_.latent_dims[0]:
            raise ValueError(f"Z must have shape (n_samples, {self.model_.latent_dims[0]}); "
                             f"got {Z.shape}")
        if not np.all(np.isfinite(Z)):
            raise ValueError("Z contains NaN or infinity")
        return self.model_.decode(Z)

    def reconstruct(self, X):
        """inverse_transform(transform(X)): the decoded posterior mean.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features), float32
        """
        return self.model_.decode(self.transform(X))

    def sample(self, n_samples=1, random_state=None, observation_noise=False):
        """Draw by ancestral sampling from p(z_T) down to p(x | z_1).

        Parameters
        ----------
        n_samples : int, default=1
        random_state : int, RandomState instance or None, default=None
            Seeds the draw (None: NumPy's global generator picks a seed).
        observation_noise : bool, default=False
            False returns the mean of p(x | z_1) for each drawn z_1 (what one
            plots for images); True draws x from p(x | z_1) as well.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float32
        """
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 0:
            raise ValueError(f"n_samples must be an int >= 0; got {n_samples!r}")
        seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
        return self.model_.sample(int(n_samples), seed=seed,
                                  observation_noise=bool(observation_noise))

    def score_samples(self, X):
        """Per-sample ELBO in nats (a lower bound on log p(x)).

        One reparameterised sample per row, drawn from a generator seeded by
        the row's values: the same row always scores the same.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        elbo : ndarray of shape (n_samples,), float64
        """
        return self.model_.elbo(self._fitted_X(X))

    def score(self, X, y=None):
        """Mean ELBO in nats per sample (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

    @property
    def _n_features_out(self):
        return self.model_.latent_dims[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # The core computes in float32; it is what transform returns.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
