"""Deep clustering: :class:`VaDE`, the variational autoencoder with a
mixture-of-Gaussians prior of Jiang et al. (2017), "Variational Deep
Embedding: an unsupervised and generative approach to clustering", as a
scikit-learn clusterer.

The model is :class:`hvae.HierarchicalVAE` with ``prior='gmm'`` (the prior,
its ELBO term and the cluster responsibilities are computed in the C core,
csrc/prior_gmm.c); this module adds VaDE's initialisation (a pretrained
network and a GaussianMixture fitted to its codes), restarts, and the
clusterer's interface.
"""
import inspect
import numbers

import numpy as np
from scipy.linalg import solve_triangular
from sklearn.base import ClusterMixin
from sklearn.manifold import TSNE
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._native import COVARIANCE_TYPES, DivergenceError
from ._params import MAX_COUNT, FiniteNumber, Integer, OneOf, validate_parameters
from ._training import HISTORY_KEYS, VALIDATION_KEYS, fitted_state, restore_fitted_state
from .estimator import HierarchicalVAE, _model_options
from .file_format import register_estimator

#: VaDE's own parameters and their constraints (the others are
#: HierarchicalVAE's, checked by its table).
_VADE_CONSTRAINTS = {"pretrain_epochs": Integer(0, MAX_COUNT), "n_init": Integer(1, MAX_COUNT),
                     "pretrain_beta": FiniteNumber(),
                     "init_covariance_type": OneOf(("full", "diag")),
                     "init_params": OneOf(("tsne", "codes"))}

#: At most this many rows (a random subset of them beyond) go into the t-SNE
#: map of ``init_params='tsne'``: Barnes-Hut t-SNE takes about a minute for
#: 10,000 rows on one core and grows faster than linearly.
TSNE_MAX_ROWS = 10_000


class VaDE(ClusterMixin, HierarchicalVAE):
    """Variational Deep Embedding (VaDE): a VAE whose prior is a mixture of
    Gaussians, so that one model embeds, generates and clusters.

    p(c) = softmax(pi_logits), p(z | c) = N(mu_c, Sigma_c) (Sigma_c full or
    diagonal: ``covariance_type``), p(x | z) the decoder (z the top latent
    layer): the ELBO has VaDE's term
    sum_c gamma_c [KL(q(z|x) || N(mu_c, Sigma_c)) + log gamma_c - log p(c)],
    gamma_c = p(c | z) at the sampled z, with gradients through gamma as in
    the authors' code (see csrc/prior_gmm.c, csrc/prior_gmm_full.c). A
    row's cluster is argmax_c q(c | x), computed in C at the posterior mean of z (so
    ``predict`` is deterministic; VaDE's own script reads gamma at a
    sampled z).

    ``fit`` runs VaDE's initialisation ``n_init`` times (each from its own
    seed drawn from ``random_state``) and keeps the run of the best ELBO on
    X, as GaussianMixture keeps the best of its ``n_init``:

    1. ``pretrain_epochs`` epochs of the same network as a plain VAE
       (standard normal prior) whose KL terms weigh ``pretrain_beta``: the
       authors pretrain a stacked autoencoder, and a VAE with a small KL
       weight is nearly one, with every latent unit in use (with weight 1
       many units stay inactive, and their codes carry no clusters);
    2. a ``sklearn.mixture.GaussianMixture`` of ``n_components`` (of
       ``init_covariance_type``) clusters the posterior means of the top
       layer, or (``init_params='tsne'``, the default) a two-dimensional
       t-SNE map of them, and each cluster's codes initialise the weight,
       mean and covariance (``covariance_type``) of one component of the
       prior (moment matching, see ``_mixture_init``);
    3. ``n_epochs`` epochs of the whole model, the prior's tensors at
       ``prior_learning_rate`` (None: ``learning_rate``).

    ``partial_fit`` continues the fitted model by one pass (a first call on
    an unfitted estimator starts from the prior's random initialisation,
    without pretraining). ``HierarchicalVAE(prior='gmm', n_components=K)``
    is the same model as a transformer.

    Parameters
    ----------
    n_components : int, default=10
        Number of clusters K (mixture components); at most the number of
        rows of X.
    latent_dims : int or tuple of int, default=(10,)
        Sizes of the latent layers, bottom to top; the mixture is on the
        top one.
    hidden_dims : tuple of int, default=(256, 256)
        Hidden widths of every encoder block (decoders reversed). VaDE's
        paper uses (500, 500, 2000).
    likelihood : {'gaussian', 'bernoulli'}, default='gaussian'
        p(x | z_1): 'bernoulli' for data in [0, 1] such as images.
    activation : {'relu', 'tanh', 'leaky_relu', 'elu', 'softplus'}, default='relu'
        Hidden activation.
    decoder_variance : {'learned', 'unit'}, default='learned'
        As in HierarchicalVAE.
    n_epochs : int, default=50
        Epochs of the whole model after the initialisation (per restart).
    pretrain_epochs : int, default=20
        Epochs of the plain-VAE pretraining (per restart); 0 initialises
        the mixture from the codes of the untrained network.
    pretrain_beta : float, default=0.01
        Weight of the KL term in pretraining (see above).
    covariance_type : {'full', 'diag'}, default='full'
        Covariance of the prior's components (GaussianMixture's name):
        'full', N(mu_c, Sigma_c) with a learned precision Cholesky factor
        (HierarchicalVAE's ``prior_covariance_type='full'``); 'diag', the
        authors' N(mu_c, diag(var_c)). A cluster of correlated codes keeps
        its shape with 'full', and the start's clusters survive the moment
        matching (see ``_full_moments`` and the README's clustering
        section for the measurements). Top layer of at most 512 units.
    init_covariance_type : {'full', 'diag'}, default='full'
        Covariance of the GaussianMixture that finds the initial clusters
        (the prior's own is ``covariance_type``). The authors fit 'diag';
        'full' follows the codes' correlated units, and the clusters VaDE
        starts from decide most of its result (its training moves few rows
        between clusters). Measured in the README's clustering section.
    init_params : {'tsne', 'codes'}, default='tsne'
        Where the GaussianMixture of step 2 finds the initial clusters.
        'codes': on the posterior means themselves, as the authors do.
        'tsne': on a two-dimensional t-SNE map of them
        (``sklearn.manifold.TSNE``, perplexity 30; a random subset of
        ``TSNE_MAX_ROWS`` = 10,000 rows when X has more; X of no more rows
        than ``n_components`` is clustered on the codes), the idea of N2D
        (McConville et al. 2020, who use UMAP): the map separates the
        clusters that the codes' manifold holds but a Gaussian mixture of
        the codes merges or splits. The prior's components are still
        matched to the codes of each cluster. Costs the t-SNE (about a
        minute per 10,000 rows on one core) and gains most on MNIST-like
        data; measured in the README's clustering section.
    n_init : int, default=1
        Restarts of the whole procedure; the one of the best ELBO on X is
        kept.
    batch_size : int, default=100
        Rows per minibatch (VaDE's 100).
    learning_rate : float, default=2e-3
        Adam's step size for the networks (VaDE's 0.002), in pretraining and
        after.
    prior_learning_rate : float or None, default=2e-4
        Step size of the mixture's tensors after the initialisation; None
        is ``learning_rate``. The authors use ``learning_rate`` on MNIST and
        a hundredth of it on HHAR; a tenth keeps the initial components
        from merging here (on the digits, and on scikit-learn's blobs).
    optimizer : {'adam', 'sgd'}, default='adam'
        As in HierarchicalVAE.
    beta : float, default=1.0
        Weight of the KL terms in training (the reported ELBO uses 1).
    weight_decay : float, default=0.0
        L2 penalty added to the gradient.
    shuffle : bool, default=True
        New row order every epoch.
    warm_start : bool, default=False
        When True and the model's options are unchanged, ``fit`` continues
        training the fitted model for ``n_epochs`` epochs (no pretraining
        or restarts).
    random_state : int, RandomState instance or None, default=None
        Seeds the restarts (each: initialisation, GaussianMixture,
        minibatch order, noise).
    n_threads : int or None, default=None
        Threads for the model's work (None: all available cores).
    verbose : int, default=0
        As in HierarchicalVAE, for every training stage.
    validation_fraction : float in (0, 1) or None, default=None
        Held-out rows whose ELBO is recorded after every epoch of the final
        stage (see HierarchicalVAE).
    early_stopping : bool, default=False
        Early stopping of the final stage on the validation ELBO (see
        HierarchicalVAE).
    n_iter_no_change : int, default=10
        Epochs without improvement before early stopping stops.
    tol : float, default=1e-4
        Improvement in validation ELBO that counts as one.
    callbacks : callable, list of callables or None, default=None
        Called after every epoch of the final stage, as in HierarchicalVAE.
    inference : {'markov', 'ladder'}, default='markov'
        As in HierarchicalVAE; the mixture prior works with both.
    objective : {'elbo', 'iwae'}, default='elbo'
        The bound trained (pretraining and after).
    n_mc_samples : int, default=1
        Draws per row with ``objective='elbo'``.
    n_importance_samples : int, default=5
        Draws per row with ``objective='iwae'``.
    kl_warmup_epochs : int, default=0
        KL warm-up over the epochs of each stage.
    free_bits : float, default=0.0
        Free bits per layer in the training loss.
    markov_kl : {'sampled', 'analytic'}, default='sampled'
        The lower Markov layers' ELBO term (see HierarchicalVAE).

    Attributes
    ----------
    labels_ : ndarray of shape (n_samples,), int64
        The cluster of every training row (``predict`` of the fitted model).
    weights_ : ndarray of shape (n_components,)
        Mixture weights p(c) (float64).
    means_ : ndarray of shape (n_components, d_T)
        Component means.
    covariances_ : ndarray of shape (n_components, d_T, d_T) or (n_components, d_T)
        Component covariances ('full'), or variances ('diag'), as
        GaussianMixture's for its ``covariance_type``.
    precisions_cholesky_ : ndarray of shape (n_components, d_T, d_T) or (n_components, d_T)
        'full': the prior's factors P_c, lower triangular with a positive
        diagonal, precision P_c P_c^T (GaussianMixture's factor is the upper
        triangular one with the same product A A^T); 'diag': 1 / standard
        deviations, as GaussianMixture's.
    model_, history_, n_iter_, best_epoch_, n_features_in_, feature_names_in_
        As in HierarchicalVAE; ``history_`` holds the final stage's epochs
        of the kept restart.

    Examples
    --------
    >>> from hvae import VaDE
    >>> from hvae.datasets import load_digits
    >>> X, y = load_digits()
    >>> vade = VaDE(n_components=10, likelihood="bernoulli", n_epochs=2,
    ...             pretrain_epochs=2, random_state=0).fit(X)
    >>> vade.predict(X[:5]).shape
    (5,)
    """

    # HierarchicalVAE's parameters that VaDE fixes (not in its __init__, so not in get_params):
    # the mixture prior, in memory, on Gaussian latent layers.
    prior = "gmm"
    conditional = False
    chunk_size = None
    latent_types = "gaussian"
    n_categories = 10
    temperature = 1.0
    temperature_min = 0.5
    temperature_decay = 3e-5
    straight_through = False
    gradient_estimator = "auto"
    score_baseline = "auto"
    n_pseudo_inputs = 500
    tc_weight = 0.0
    tcvae_weights = None
    discriminator_hidden = (256, 256)
    discriminator_learning_rate = 1e-4
    discriminator_betas = (0.5, 0.9)

    def __init__(self, n_components=10, *, latent_dims=(10,), hidden_dims=(256, 256),
                 likelihood="gaussian", activation="relu", decoder_variance="learned",
                 n_epochs=50, pretrain_epochs=20, pretrain_beta=0.01,
                 covariance_type="full", init_covariance_type="full", init_params="tsne",
                 n_init=1,
                 batch_size=100, learning_rate=2e-3, prior_learning_rate=2e-4, optimizer="adam", beta=1.0,
                 weight_decay=0.0, shuffle=True, warm_start=False, random_state=None,
                 n_threads=None, verbose=0, validation_fraction=None, early_stopping=False,
                 n_iter_no_change=10, tol=1e-4, callbacks=None, inference="markov",
                 objective="elbo", n_mc_samples=1, n_importance_samples=5,
                 kl_warmup_epochs=0, free_bits=0.0, markov_kl="sampled"):
        self.n_components = n_components
        self.latent_dims = latent_dims
        self.hidden_dims = hidden_dims
        self.likelihood = likelihood
        self.activation = activation
        self.decoder_variance = decoder_variance
        self.n_epochs = n_epochs
        self.pretrain_epochs = pretrain_epochs
        self.pretrain_beta = pretrain_beta
        self.covariance_type = covariance_type
        self.init_covariance_type = init_covariance_type
        self.init_params = init_params
        self.n_init = n_init
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.prior_learning_rate = prior_learning_rate
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
        self.markov_kl = markov_kl

    @property
    def prior_covariance_type(self):
        """HierarchicalVAE's name of ``covariance_type`` (read by its
        parameter table and by the stages)."""
        return self.covariance_type

    # ---- fitting -------------------------------------------------------------

    def _validate_vade(self):
        # Checked first, under its own name (the table checks it again as
        # HierarchicalVAE's prior_covariance_type).
        OneOf(COVARIANCE_TYPES)("covariance_type", self.covariance_type)
        params = validate_parameters(self)
        for name, constraint in _VADE_CONSTRAINTS.items():
            params[name] = constraint(name, getattr(self, name))
        return params

    def fit(self, X, y=None):
        """Cluster the rows of X: VaDE's initialisation and training,
        ``n_init`` times, keeping the run of the best ELBO on X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, in memory.
        y : None
            Ignored.

        Returns
        -------
        self : VaDE

        Raises
        ------
        ValueError
            For invalid parameters or data (``n_components`` above the
            number of rows), before any work.
        hvae.DivergenceError
            When training diverges; the estimator then holds that run's
            model at its last finite parameters and its history.
        """
        params = self._validate_vade()
        continuing = (self.warm_start and hasattr(self, "model_")
                      and self._model_options() == _model_options(params))
        before = fitted_state(self)
        try:
            X = self._validate_X(X, reset=not continuing, likelihood=params["likelihood"])
            if X.shape[0] < params["n_components"]:
                raise ValueError(f"n_components={params['n_components']} must be at most "
                                 f"the number of rows, {X.shape[0]}")
        except BaseException:
            restore_fitted_state(self, before)
            raise
        if continuing:
            super().fit(X)
        else:
            rng = check_random_state(self.random_state)
            best, best_score = None, -np.inf
            for _ in range(params["n_init"]):
                run = self._one_run(X, int(rng.randint(np.iinfo(np.int32).max)))
                score = run.score(X)
                if best is None or score > best_score:
                    best, best_score = run, score
            self._install(best)
        self.labels_ = self.predict(X)
        return self

    def _stage(self, **overrides):
        """A HierarchicalVAE with this estimator's settings (and the fixed
        ones), changed by overrides."""
        names = [p for p in inspect.signature(HierarchicalVAE.__init__).parameters
                 if p != "self"]
        settings = {name: getattr(self, name) for name in names}
        settings.update(overrides)
        return HierarchicalVAE(**settings)

    def _one_run(self, X, seed):
        """Pretraining, the GaussianMixture initialisation and the final
        stage, from one seed."""
        quiet = dict(random_state=seed, warm_start=False, validation_fraction=None,
                     early_stopping=False, callbacks=None)
        pre = self._stage(prior="standard", prior_covariance_type="diag",
                          n_epochs=self.pretrain_epochs,
                          beta=self.pretrain_beta, kl_warmup_epochs=0, **quiet).fit(X)
        run = self._stage(n_epochs=0, **quiet).fit(X)
        offset = run.model_.prior_offset
        run.model_.parameters[:offset] = pre.model_.parameters
        mu, logvar = (a.astype(np.float64) for a in pre.model_.encode(X)[-1])
        rows, resp = _initial_clusters(mu, self.n_components, self.init_params,
                                       self.init_covariance_type, seed, self.n_threads)
        init = _mixture_init(mu[rows], logvar[rows], resp, self.covariance_type)
        tensors = dict(run.model_.named_parameters())
        for name, value in init.items():
            tensors[name][...] = value
        run.set_params(n_epochs=self.n_epochs, warm_start=True,
                       validation_fraction=self.validation_fraction,
                       early_stopping=self.early_stopping, callbacks=self.callbacks)
        try:
            run.fit(X)
        except DivergenceError:
            self._install(run)
            raise
        return run

    def _install(self, run):
        """Takes the fitted state of a run (a HierarchicalVAE)."""
        for key in ("model_", "history_", "n_iter_", "best_epoch_", "classes_"):
            setattr(self, key, getattr(run, key))

    def partial_fit(self, X, y=None, classes=None, *, comm=None, comm_timeout=300.0):
        """One pass of training over the rows of X, continuing the fitted
        model (an unfitted estimator starts from the prior's random
        initialisation, without pretraining); ``labels_`` stays that of the
        last ``fit``. See HierarchicalVAE.partial_fit for the arguments.

        Returns
        -------
        self : VaDE
        """
        self._validate_vade()
        if X is not None and not hasattr(self, "model_") and \
                np.shape(X)[0] < self.n_components:
            raise ValueError(f"n_components={self.n_components} must be at most the "
                             f"number of rows, {np.shape(X)[0]}")
        return super().partial_fit(X, y, classes, comm=comm, comm_timeout=comm_timeout)

    # ---- clustering -----------------------------------------------------------

    def predict_proba(self, X):
        """q(c | x) of every component: p(c | z) at the posterior mean of z
        (computed in C, hvae_responsibilities).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        resp : ndarray of shape (n_samples, n_components), float64
            Rows sum to 1.
        """
        X, C = self._fitted_X(X)
        return self.model_.responsibilities(X, cond=C)

    def predict(self, X):
        """The most probable component argmax_c q(c | x) of every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,), int64
        """
        return np.argmax(self.predict_proba(X), axis=1).astype(np.int64)

    def sample(self, n_samples=1, random_state=None, observation_noise=False, *,
               component=None, y=None):
        """Draw from the model: z from the mixture (or from one component),
        then down the hierarchy to p(x | z_1).

        Parameters
        ----------
        n_samples : int, default=1
        random_state : int, RandomState instance or None, default=None
            Seeds the draw.
        observation_noise : bool, default=False
            False returns the mean of p(x | z_1); True draws x from it.
        component : int or None, default=None
            Draw z from N(mu_c, var_c) of this component only; None draws
            the component from the weights too.
        y : None
            Ignored (VaDE is not conditional).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float32
        """
        if component is None:
            return super().sample(n_samples, random_state, observation_noise)
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 0:
            raise ValueError(f"n_samples must be an int >= 0; got {n_samples!r}")
        K = self.model_.n_components
        if not isinstance(component, numbers.Integral) or not 0 <= component < K:
            raise ValueError(f"component must be an int in [0, {K}); got {component!r}")
        rng = check_random_state(random_state)
        mean = self.means_[component]
        eps = rng.standard_normal((int(n_samples), mean.size))
        if self.model_.prior_covariance_type == "diag":
            z = mean + np.sqrt(self.covariances_[component]) * eps
        else:  # z = mu + x, P^T x = eps: Cov(x) = (P P^T)^-1
            P = self.precisions_cholesky_[component]
            z = mean + solve_triangular(P.T, eps.T, lower=False).T
        return self.model_.sample_top(z.astype(np.float32),
                                      seed=int(rng.randint(np.iinfo(np.int32).max)),
                                      observation_noise=bool(observation_noise))

    def _prior_tensor(self, name):
        check_is_fitted(self)
        return np.array(dict(self.model_.named_parameters())[name], dtype=np.float64)

    @property
    def weights_(self):
        logits = self._prior_tensor("prior.pi_logits")
        w = np.exp(logits - logits.max())
        return w / w.sum()

    @property
    def means_(self):
        return self._prior_tensor("prior.mu")

    @property
    def covariances_(self):
        check_is_fitted(self)
        if self.model_.prior_covariance_type == "diag":
            return np.exp(self._prior_tensor("prior.logvar"))
        eye = np.eye(self.means_.shape[1])
        inverse = np.stack([solve_triangular(P, eye, lower=True)
                            for P in self.precisions_cholesky_])
        return np.einsum("kji,kjl->kil", inverse, inverse)  # P^-T P^-1

    @property
    def precisions_cholesky_(self):
        check_is_fitted(self)
        if self.model_.prior_covariance_type == "diag":
            return np.exp(-0.5 * self._prior_tensor("prior.logvar"))
        tensors = dict(self.model_.named_parameters())
        return precision_factor(tensors["prior.prec_log_diag"],
                                tensors.get("prior.prec_lower"))


def _initial_clusters(mu, n_components, init_params, covariance_type, seed, n_threads):
    """VaDE's initial clusters of the pretrained codes mu, shape (n, d).

    A GaussianMixture (5 initialisations, ``covariance_type`` 'full' or
    'diag') fitted to the codes (``init_params='codes'``) or to a 2-D t-SNE
    map of at most ``TSNE_MAX_ROWS`` of them (``'tsne'``).

    With 'full' the mixture only finds the clusters: the codes' units are
    correlated, and a diagonal mixture fitted to them splits elongated
    clusters more often (on the digits, 8 seeds, 16-dimensional codes:
    81.0% accuracy after VaDE's training from the full mixture's clusters,
    78.3% from the diagonal one's, worst seeds 76.7% and 68.7%).

    Returns
    -------
    rows : ndarray of shape (m,), int64
        The rows clustered (all n, or the t-SNE's subset, sorted).
    resp : ndarray of shape (m, n_components)
        Their responsibilities.
    """
    rows = np.arange(len(mu))
    features = mu
    # (With no more rows than clusters there is nothing to map.)
    if init_params == "tsne" and len(mu) > n_components:
        rng = np.random.RandomState(seed)
        if len(mu) > TSNE_MAX_ROWS:
            rows = np.sort(rng.choice(len(mu), TSNE_MAX_ROWS, replace=False))
        # perplexity must stay below the number of rows (tiny data sets).
        perplexity = min(30.0, max(1.0, (len(rows) - 1) / 3.0))
        features = TSNE(2, perplexity=perplexity, init="pca", random_state=seed,
                        n_jobs=n_threads).fit_transform(mu[rows])
    # GaussianMixture's reg_covar (1e-6) is meant for unit-scale features; a
    # t-SNE map spans tens of units, so it scales with the features' variance.
    reg_covar = 1e-6 * max(1.0, float(features.var(axis=0).mean()))
    mixture = GaussianMixture(n_components, covariance_type=covariance_type, n_init=5,
                              reg_covar=reg_covar, random_state=seed).fit(features)
    return rows, mixture.predict_proba(features)


def _mixture_init(mu, logvar, resp, prior_covariance_type="diag"):
    """The mixture prior's initial tensors, by name, from the pretrained
    codes mu, shape (n, d), and their initial clusters' responsibilities
    resp, shape (n, K) ('full' components by ``_full_moments``).

    A diagonal component is matched to the codes it holds, weighted by the
    responsibilities r: weight sum_n r_nc / n, mean the weighted mean of
    mu, variance the weighted variance of mu plus the weighted mean of the
    posteriors' variances exp(logvar) (moment matching: Var = Var(means) +
    E[variance], which keeps a component as wide as the codes it holds,
    about N(0, 1) on an inactive unit, rather than the near-zero spread of
    its means).

    Returns
    -------
    tensors : dict of str to ndarray
        'diag': "prior.pi_logits" (n_components,), "prior.mu" and
        "prior.logvar" (n_components, d).
    """
    if prior_covariance_type == "full":
        return _full_moments(mu, logvar, resp)
    counts = np.maximum(resp.sum(axis=0), 1e-12)
    means = resp.T @ mu / counts[:, None]
    spread = resp.T @ (mu ** 2 + np.exp(logvar)) / counts[:, None] - means ** 2
    # GaussianMixture's reg_covar keeps a variance positive in a tight component.
    return {"prior.pi_logits": np.log(counts / counts.sum()), "prior.mu": means,
            "prior.logvar": np.log(np.maximum(spread, 0.0) + 1e-6)}


def _full_moments(mu, logvar, resp, reg_covar=1e-6):
    """The full-covariance prior's tensors matched to the codes of each
    cluster: with responsibilities resp (n, K), component c's weight is
    sum_n r_nc / n, its mean m_c the weighted mean of the posterior means mu
    (n, d), and its covariance

        Sigma_c = sum_n r_nc [(mu_n - m_c)(mu_n - m_c)^T + diag(exp(logvar_n))] / N_c
                  + reg_covar I,

    the law of total covariance over q(z | x_n) (the codes' spread plus
    their posteriors' own; reg_covar as GaussianMixture's). The precision
    Sigma_c^-1 = P_c P_c^T gives the tensors: its Cholesky factor P_c's log
    diagonal and strictly-lower entries, packed row by row.

    Returns
    -------
    tensors : dict of str to ndarray
        "prior.pi_logits" (K,), "prior.mu" (K, d), "prior.prec_log_diag"
        (K, d) and, when d > 1, "prior.prec_lower" (K, d (d - 1) / 2).
    """
    d = mu.shape[1]
    counts = np.maximum(resp.sum(axis=0), 1e-12)
    means = resp.T @ mu / counts[:, None]
    log_diag, lower = [], []
    rows, cols = np.tril_indices(d, -1)
    for c in range(resp.shape[1]):
        centred = mu - means[c]
        cov = (resp[:, c, None] * centred).T @ centred / counts[c]
        cov += np.diag(resp[:, c] @ np.exp(logvar) / counts[c] + reg_covar)
        factor = np.linalg.cholesky(np.linalg.inv(cov))
        log_diag.append(np.log(np.diag(factor)))
        lower.append(factor[rows, cols])
    tensors = {"prior.pi_logits": np.log(counts / counts.sum()), "prior.mu": means,
               "prior.prec_log_diag": np.array(log_diag)}
    if d > 1:
        tensors["prior.prec_lower"] = np.array(lower)
    return tensors


def precision_factor(log_diag, lower=None):
    """The full-covariance prior's factors P (K, d, d), lower triangular,
    from its tensors: log_diag (K, d), log P_jj; lower (K, d (d - 1) / 2),
    the strictly-lower P_ij packed row by row (None when d = 1). The
    component's precision is P P^T.

    Parameters
    ----------
    log_diag : array-like of shape (K, d)
    lower : array-like of shape (K, d (d - 1) / 2) or None

    Returns
    -------
    P : ndarray of shape (K, d, d), float64
    """
    log_diag = np.asarray(log_diag, dtype=np.float64)
    K, d = log_diag.shape
    P = np.zeros((K, d, d))
    P[:, np.arange(d), np.arange(d)] = np.exp(log_diag)
    if d > 1:
        rows, cols = np.tril_indices(d, -1)
        P[:, rows, cols] = np.asarray(lower, dtype=np.float64)
    return P


def _check_labels(labels, model):
    """labels_ in a saved file: component indices of the model."""
    if not (isinstance(labels, np.ndarray) and labels.ndim == 1
            and labels.dtype.kind in "iu"):
        return "must be a 1-D integer array"
    if labels.size and (labels.min() < 0 or labels.max() >= model.n_components):
        return f"holds indices outside [0, {model.n_components})"
    return None


def _validate_for_file(estimator):
    estimator._validate_vade()
    return _model_options(validate_parameters(estimator))


# Files written before covariance_type hold diagonal models.
register_estimator(VaDE, history_keys=HISTORY_KEYS, validation_keys=VALIDATION_KEYS,
                   validate=_validate_for_file, attribute_checks={"labels_": _check_labels},
                   params_before={"covariance_type": "diag"})
