"""The scikit-learn estimator :class:`HierarchicalVAE`.

Its ``fit`` and ``partial_fit`` are thin shells over ``_fit``; the training
loop is in :mod:`hvae._training`, the parameter checks in :mod:`hvae._params`,
the conversion of ``y`` to conditions in :mod:`hvae._conditions` and the
agreements of data-parallel calls in :mod:`hvae.distributed`.
"""
import copy
import inspect
import math
import numbers
import os

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from . import distributed as _distributed
from ._checks import check_finite
from ._chunks import (ChunkedRows, InMemoryRows, check_array_like, default_chunk_size,
                      is_out_of_core)
from ._collapse import check_posterior_collapse
from ._conditions import ConditionCode, is_labels
from ._lock import estimator_lock
from ._native import MAX_THREADS, DivergenceError, Model
from ._params import latent_layers, validate_parameters
from ._training import (HISTORY_KEYS, VALIDATION_KEYS, Trainer, fitted_state, new_history,
                        restore_fitted_state, workspace_rows)
from ._vamp import init_pseudo_inputs, vamp_model_options
from .file_format import register_estimator

#: The parameters that make the low-level Model, as its attributes name them:
#: fit with warm_start, and partial_fit, continue a model only while they
#: are unchanged.
_MODEL_OPTIONS = ("latent_dims", "hidden_dims", "likelihood", "activation",
                  "decoder_variance", "inference", "markov_kl", "prior", "n_components",
                  "n_pseudo_inputs", "discriminator_hidden", "prior_covariance_type")
#: The Model options latent_types and n_categories make, as Model reports them.
_LATENT_OPTIONS = ("latent_family", "n_categories")


def _model_options(params):
    """The Model options of validated parameters (see _MODEL_OPTIONS). The
    model has a discriminator for FactorVAE (tc_weight > 0) and for the
    density-ratio prior only (discriminator_hidden None otherwise)."""
    options = {key: params[key] for key in _MODEL_OPTIONS}
    families, n_categories = latent_layers(params)
    options["latent_family"] = families[0] if len(set(families)) == 1 else families
    options["n_categories"] = n_categories
    if params["tc_weight"] == 0 and params["prior"] != "density_ratio":
        options["discriminator_hidden"] = None
    return vamp_model_options(options)


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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
        0 creates the model only: ``fit`` checks X, initialises a new model
        (or keeps the fitted one with ``warm_start``) and trains nothing,
        ``history_`` gaining no epoch (an untrained baseline, say).
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
        When True and the model's options are unchanged (the architecture,
        ``inference``, ``markov_kl``, ``conditional``), ``fit`` continues
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
        2 also prints one line per epoch. When stderr is a file or a pipe
        (a log), the bar is written as plain lines, one every 5 s at most
        and the last, instead of carriage-return redraws. With
        ``early_stopping``, a line after the bar says whether it fired and
        which epoch's parameters the model holds.
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
    inference : {'markov', 'ladder'}, default='markov'
        How the posterior is computed. 'markov': bottom-up,
        q(z_i | z_{i-1}), each layer from a sample of the one below.
        'ladder' (Sønderby et al. 2016): a deterministic bottom-up pass, then
        top-down posteriors that combine it with the prior
        p(z_i | z_{i+1}) by precision weighting; the generative model and
        the parameters' layout are those of 'markov'.
    objective : {'elbo', 'iwae'}, default='elbo'
        The bound training maximises. 'elbo': the ELBO, averaged over
        ``n_mc_samples`` draws per row. 'iwae' (Burda et al. 2016): the
        importance-weighted bound log (1/k) sum_j p(x, z_j) / q(z_j | x)
        with k = ``n_importance_samples`` draws per row; it needs ``beta=1``,
        ``free_bits=0`` and ``kl_warmup_epochs=0``.
    n_mc_samples : int, default=1
        Reparameterised draws per row with ``objective='elbo'``; the
        training loss averages their ELBOs.
    n_importance_samples : int, default=5
        Draws per row (k) with ``objective='iwae'``; ignored otherwise.
    kl_warmup_epochs : int, default=0
        KL warm-up: epoch e (counted by ``n_iter_`` over every fit of the
        model) weights the KL terms by beta * min(1, e / kl_warmup_epochs),
        so 0 in the first epoch and ``beta`` from epoch ``kl_warmup_epochs``
        on. 0 uses ``beta`` throughout.
    free_bits : float, default=0.0
        Free bits (Kingma et al. 2016): in the training loss, each layer's
        minibatch-mean KL term counts as at least ``free_bits`` nats, so the
        optimizer gains nothing by pushing a layer below that. The reported
        ELBO is unaffected. 0 turns it off.
    conditional : bool, default=False
        Train a conditional VAE: ``y`` passed to ``fit`` gives every row a
        condition, either class labels of shape (n_samples,) (one-hot
        encoded over ``classes_``) or an array of shape (n_samples,
        n_conditions), which enters every encoder and decoder block. Every
        method that takes X (and ``sample``) then needs ``y`` for its rows.
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
    markov_kl : {'sampled', 'analytic'}, default='sampled'
        The ELBO's term of each lower layer z_i (i < T) of a Markov
        hierarchy (``inference='markov'``), in training and in evaluation
        (``score``, ``validation_data``). 'sampled': the sampled log-density
        ratio log q(z_i | z_{i-1}) - log p(z_i | z_{i+1}), whose expectation
        is exactly the term. 'analytic': the closed-form
        KL(q(z_i | z_{i-1}) || p(z_i | z_{i+1})) at the sampled z_{i+1}, as
        the lecture notes derive it; z_{i+1} was drawn given z_i, so this is
        a different, not an unbiased, estimate of the ELBO (see the README).
        The top layer's KL is in closed form either way; ladder inference,
        ``objective='iwae'`` and ``log_likelihood`` are unaffected. Part of
        the model: with another value, ``fit`` trains a new model even with
        ``warm_start``.
    latent_types : str or tuple of str, default='gaussian'
        Each latent layer's distribution, one name for every layer or one
        per layer (bottom to top): 'gaussian' (diagonal Gaussian) or
        'categorical': latent_dims[i] = M independent categorical variables
        of K = ``n_categories`` classes, z_i a one-hot of M*K columns
        (column m*K + k). A categorical top layer has the uniform prior 1/K;
        a lower one p(z_i | z_{i+1}) = softmax of logits from the decoder
        block above. Mixed hierarchies work (Markov inference only).
        Evaluation (``score``, ``log_likelihood``, ``sample``) draws exact
        categories by the Gumbel-max trick; ``transform``/``encode`` give
        the class probabilities (and their logs). Its term of the ELBO is
        the closed-form KL sum_m sum_k q_mk (log q_mk - log p_mk) of the
        unrelaxed q where a Gaussian's would be closed-form (the top layer;
        ``markov_kl='analytic'``), else sum_mk z_mk (log q_mk - log p_mk) at
        the sample. Part of the model, like ``markov_kl``.
    n_categories : int or tuple of int, default=10
        Classes K per variable of the categorical layers (>= 2; one for all
        layers or one per layer; ignored for Gaussian layers). Part of the
        model.
    temperature : float, default=1.0
        Gumbel-softmax (Jang et al. 2017): training replaces a categorical
        sample by softmax((logits + g) / tau), g ~ Gumbel(0, 1), annealed
        per optimizer step t as tau_t = max(temperature_min, temperature *
        exp(-temperature_decay * t)). Lower tau: less bias, more variance.
    temperature_min : float, default=0.5
        The annealing's floor.
    temperature_decay : float, default=3e-5
        The annealing's rate per optimizer step (0: constant
        max(temperature_min, temperature)).
    straight_through : bool, default=False
        Straight-through Gumbel-softmax: the exact one-hot in the forward
        pass, the relaxed sample's gradient in the backward.
    gradient_estimator : {'auto', 'reparameterization', 'gumbel_softmax', \
'score_function'}, default='auto'
        How the gradient passes through the sampled latents. 'auto': each
        layer its pathwise estimator (reparameterisation for Gaussian
        layers, Gumbel-softmax for categorical ones); 'reparameterization'
        and 'gumbel_softmax' are the same, naming the models they fit.
        'score_function' (REINFORCE): exact samples (Gumbel-max), no
        gradient through them, and grad log q(z | x) times the centred
        learning signal (the row's ELBO estimate) instead; unbiased, high
        variance. Needs ``objective='elbo'``. See ``score_baseline`` and
        :func:`hvae.gradient_variance`.
    score_baseline : {'auto', 'none', 'running_mean', 'leave_one_out'}, \
default='auto'
        The score function's baseline: 'running_mean', a moving average
        (weight 0.1) of earlier minibatches' mean signal; 'leave_one_out'
        (``n_mc_samples >= 2``, as in VIMCO), the mean signal of the row's
        other draws; 'auto', leave-one-out with several draws, else the
        running mean; 'none'.
    prior : {'standard', 'gmm', 'vamp', 'density_ratio'}, default='standard'
        p(z_T), the top layer's prior. 'standard': N(0, I). 'gmm': a mixture
        of ``n_components`` diagonal Gaussians, p(c) = softmax(pi_logits),
        p(z_T | c) = N(mu_c, diag(exp(logvar_c))) (full covariances with
        ``prior_covariance_type='full'``), all learned, with VaDE's
        ELBO term (Jiang et al. 2017; see csrc/prior_gmm.c): the model
        embeds, generates and clusters, its tensors ``prior.pi_logits``,
        ``prior.mu``, ``prior.logvar`` in ``model_.named_parameters()``.
        Initialised at random here (equal weights, N(0, I) means, unit
        variances); :class:`hvae.VaDE` pretrains and initialises them from
        a GaussianMixture as VaDE does. Part of the model. 'vamp': the
        VampPrior (Tomczak and Welling 2018), the mixture (1/K) sum_k
        q(z_T | u_k) of the posteriors of ``n_pseudo_inputs``
        learned pseudo-inputs u_k (tensor ``prior.pseudo_inputs`` of shape
        (K, n_features) in ``model_.named_parameters()``; for a Bernoulli
        likelihood clipped to [0, 1]); for T > 1 the pseudo-inputs' posterior
        runs through the encoder chain at the means. Its ELBO term is the
        sampled log q(z_T | .) - log p(z_T), in training and in ``score``.
        ``fit`` starts the pseudo-inputs at ``n_pseudo_inputs`` random
        training rows (drawn with replacement when there are fewer rows;
        data-parallel fits keep the model's seeded initialisation). Not with
        ``conditional=True``. Part of the model (see csrc/prior_vamp.c).
        'density_ratio' (the "prior ELBO"): the aggregate posterior q(z_T), written as
        N(z_T; 0, I) exp(T(z_T)) with T a discriminator trained beside the
        model to tell the encoder's samples from N(0, I) draws (at its
        optimum T = log q(z_T) / N(z_T; 0, I)). The top layer's term becomes
        KL(q(z_T|.) || N(0, I)) - T(z_T) = KL(q(z_T|.) || q(z_T)) for an
        exact T. ``score``, ``score_samples`` and ``log_likelihood`` then
        estimate the ELBO and log p(x) under the prior N(0, I) exp(T), which
        is normalised only as far as T is exact (its normaliser
        E_N(0,I)[exp T] is 1 at the optimum); ``sample`` draws from it by
        sampling-importance-resampling (256 N(0, I) draws per sample, one
        kept with probability proportional to exp(T)). Part of the model.
    n_components : int, default=1
        Components K of the 'gmm' prior; ignored by 'standard'. Part of the
        model.
    prior_covariance_type : {'diag', 'full'}, default='diag'
        Covariance of the 'gmm' prior's components (GaussianMixture's
        ``covariance_type``): 'diag', N(mu_c, diag(exp(logvar_c))); 'full',
        N(mu_c, Sigma_c) with Sigma_c^-1 = P_c P_c^T, P_c lower triangular
        with a positive diagonal (the precision's Cholesky factor, as
        GaussianMixture's ``precisions_cholesky_``), learned as the tensors
        ``prior.prec_log_diag`` (n_components, d_T), log P_jj, and
        ``prior.prec_lower`` (n_components, d_T (d_T - 1) / 2), the
        strictly-lower entries packed row by row (absent when d_T = 1);
        initialised to identity precisions. Same ELBO term and estimator as
        'diag' (see csrc/prior_gmm_full.c); O(K d_T^2) work per row, d_T at
        most 512. 'full' needs ``prior='gmm'``. Part of the model.
    prior_learning_rate : float or None, default=None
        Step size of the prior's own tensors (the 'gmm' mixture), None for
        ``learning_rate``: VaDE trains its mixture at its own rate.
    n_pseudo_inputs : int, default=500
        K, the VampPrior's pseudo-inputs (the paper's 500); ignored by other
        priors. Part of the model.
    tc_weight : float, default=0.0
        FactorVAE's gamma (Kim and Mnih 2018): the training loss is
        -ELBO + tc_weight * mean T(z_T), T a discriminator between the
        minibatch's samples z_T and the same rows with each dimension
        permuted independently (samples of prod_j q(z_j)), whose mean over
        q's samples estimates the total correlation KL(q(z) || prod_j q(z_j)).
        > 0 gives the model a discriminator (``discriminator_hidden``), whose
        training steps alternate with the model's inside the C loop: each
        step the model's gradient is taken at the current discriminator,
        then the discriminator takes one Adam step on the same minibatch's
        samples (disentanglement_lib's arrangement) with probabilities
        clipped to [1e-6, 1 - 1e-6]. ``history_`` then also records
        'discriminator_log_ratio' (the epoch's mean T on q's samples: the
        total-correlation estimate) and 'discriminator_accuracy'. Needs
        ``objective='elbo'`` and ``prior='standard'``. In MPI training
        (``fit(comm=...)``) every rank gathers the minibatch's samples, takes
        the discriminator's loss on its own rows, and the discriminator's
        gradient is summed over the ranks like the model's, so every rank
        holds the same discriminator (the one a single process would train).
    tcvae_weights : tuple of 3 floats or None, default=None
        beta-TCVAE (Chen et al. 2018): (alpha, beta, gamma) weights of the
        top layer's KL split into index-code mutual information, total
        correlation and dimension-wise KL, estimated per minibatch by
        minibatch-weighted sampling over the training set's rows; they
        replace ``beta`` for the top layer (which still weights the layers
        below). Their paper's setting is (1, beta, 1). Needs
        ``objective='elbo'``, ``prior='standard'``, ``free_bits=0`` and
        ``tc_weight=0``. ``history_`` then also records the epoch's
        'mutual_information' (index-code), 'total_correlation' and
        'dimension_wise_kl' (means per row as trained; they sum to the
        sampled estimate of the top layer's KL, whose closed form is
        ``history_['kl']``; NaN for epochs trained without beta-TCVAE). The data
        set's size N is the rows of the pass (``fit``: the training rows;
        ``partial_fit``: the call's rows; MPI: the total over the ranks); in
        MPI training every rank gathers the minibatch's (mu, logvar) so that
        each row's terms are estimated against the whole minibatch, as one
        process would. None turns it off.
    discriminator_hidden : tuple of int, default=(256, 256)
        Hidden widths of the discriminator (leaky-ReLU layers, one linear
        output; the FactorVAE paper uses six layers of 1000) of a model with
        ``tc_weight > 0`` or ``prior='density_ratio'``; ignored otherwise.
        Its weights are the tensors ``discriminator.*`` at the end of the
        model's parameters (saved, loaded and pickled with them).
    discriminator_learning_rate : float, default=1e-4
        The discriminator's Adam step size (FactorVAE's reference: 1e-4).
    discriminator_betas : tuple of 2 floats, default=(0.5, 0.9)
        The discriminator's Adam betas (FactorVAE's reference). Its Adam
        moments live with the fitted model in memory and restart from zero
        after ``hvae.load`` or unpickling (its weights do not).

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
    active_units_ : list of int or None
        Active units per latent layer, bottom to top, counted at the end of
        ``fit`` as ``active_units`` does (dimensions whose posterior mean
        varies by more than 0.01 over the rows) on at most 1000 of the
        training rows, evenly spaced (for data read in chunks, 8 evenly
        spaced runs of rows): one encoder pass, a few milliseconds. A layer
        with none has collapsed onto the prior, and ``fit`` warns with
        :class:`hvae.PosteriorCollapseWarning`, naming the settings that
        help (once the model has trained 100 minibatches: before, it is
        untrained rather than collapsed). ``partial_fit`` counts them only
        once the model has trained 1000 minibatches and a layer's KL term in
        the pass is below 0.5 nats (else sets None), on the rows of the
        call, and warns likewise. None after ``fit`` with ``n_epochs=0``.
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
                 kl_warmup_epochs=0, free_bits=0.0, conditional=False, chunk_size=None,
                 markov_kl="sampled", latent_types="gaussian", n_categories=10,
                 temperature=1.0, temperature_min=0.5, temperature_decay=3e-5,
                 straight_through=False, gradient_estimator="auto", score_baseline="auto",
                 prior="standard", n_components=1, prior_covariance_type="diag",
                 prior_learning_rate=None, n_pseudo_inputs=500, tc_weight=0.0, tcvae_weights=None,
                 discriminator_hidden=(256, 256), discriminator_learning_rate=1e-4,
                 discriminator_betas=(0.5, 0.9)):
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
        self.markov_kl = markov_kl
        self.latent_types = latent_types
        self.n_categories = n_categories
        self.temperature = temperature
        self.temperature_min = temperature_min
        self.temperature_decay = temperature_decay
        self.straight_through = straight_through
        self.gradient_estimator = gradient_estimator
        self.score_baseline = score_baseline
        self.prior = prior
        self.n_components = n_components
        self.prior_covariance_type = prior_covariance_type
        self.prior_learning_rate = prior_learning_rate
        self.n_pseudo_inputs = n_pseudo_inputs
        self.tc_weight = tc_weight
        self.tcvae_weights = tcvae_weights
        self.discriminator_hidden = discriminator_hidden
        self.discriminator_learning_rate = discriminator_learning_rate
        self.discriminator_betas = discriminator_betas

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
        model to its state at the start of the chunk. A call that fails on a
        setting, the data or an allocation (MemoryError), before any epoch,
        leaves the estimator exactly as it was.

        ``fit``, ``partial_fit``, ``save``, pickling and ``set_params`` of one
        estimator run one at a time: a call from another thread waits for a
        running fit; ``fit`` or ``partial_fit`` called from this fit's own
        callback raises RuntimeError. In a process forked while another
        thread was fitting the estimator, the estimator refuses these calls
        (RuntimeError): its model may be mid-update.
        """
        return self._fit(X, y, incremental=False, validation_data=validation_data, comm=comm,
                         comm_timeout=comm_timeout)

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
        return self._fit(X, y, incremental=True, classes=classes, comm=comm,
                         comm_timeout=comm_timeout)

    def _fit(self, X, y, *, incremental, validation_data=None, classes=None, comm=None,
             comm_timeout=300.0):
        """fit (``incremental=False``: n_epochs epochs of a new model, or of
        the fitted one with ``warm_start``) and partial_fit
        (``incremental=True``: one pass that continues the fitted model).

        One at a time per estimator (hvae._lock): a call from another thread
        waits, one from inside this fit (a callback) is refused. Every
        parameter is validated and everything is allocated (the model, its
        workspace and optimizer) before the fitted state is touched; a call
        that fails before it recorded an epoch leaves the estimator exactly
        as it was, one that fails later keeps the epochs recorded."""
        with estimator_lock(self).hold("partial_fit" if incremental else "fit"):
            return self._fit_locked(X, y, incremental=incremental,
                                    validation_data=validation_data, classes=classes,
                                    comm=comm, comm_timeout=comm_timeout)

    def _fit_locked(self, X, y, *, incremental, validation_data, classes, comm, comm_timeout):
        params = validate_parameters(self)
        model_options = _model_options(params)
        continuing = self._continues(model_options, incremental)
        session = None if comm is None else _distributed.Session(comm, comm_timeout)
        # validate_data records n_features_in_ (and feature names) as it
        # checks X: until the new model exists, a failure restores them.
        before = fitted_state(self)
        try:
            if incremental:
                classes = self._partial_fit_classes(classes, continuing)
            rows_args = (X, y, validation_data, classes, continuing, incremental,
                         model_options["likelihood"])
            if session is None:
                (train, val, code), seed = self._training_rows(*rows_args), None
            else:
                train, val, code, seed = self._training_rows_parallel(session, *rows_args)
            model = None if continuing else self._new_model(model_options, code.n_conditions,
                                                            seed)
            if model is not None:
                init_pseudo_inputs(model, train)
            # What training allocates, allocated now: a MemoryError leaves
            # the estimator as it was.
            parallel = getattr(train, "parallel", None)
            n_rows = parallel[1] if parallel is not None else train.n_rows
            (self.model_ if model is None else model).reserve(
                workspace_rows(params, max(n_rows, 1)), optimizer=params["optimizer"])
        except BaseException:
            restore_fitted_state(self, before)
            raise
        self._start_training(model, code, params)
        n_iter = self.n_iter_
        trainer = Trainer(self, params)
        try:
            if incremental:
                trainer.run_pass(train)
            else:
                if val is not None:
                    trainer.add_validation_history()
                trainer.run_epochs(train, val)
        except BaseException as error:
            # Nothing recorded (an invalid first chunk, Ctrl-C before the
            # first step, a divergence rolled back in a model being
            # continued): as it was. A new model that diverged in its first
            # epoch is kept, initialised and untrained, as DivergenceError
            # documents.
            if self.n_iter_ == n_iter and (continuing
                                           or not isinstance(error, DivergenceError)):
                restore_fitted_state(self, before)
            raise
        check_posterior_collapse(self, train, incremental, trained=self.n_iter_ > n_iter)
        return self

    def _continues(self, model_options, incremental):
        """Whether the call continues the fitted model: partial_fit always
        (refusing other model options), fit with warm_start and the same
        model options."""
        if not hasattr(self, "model_"):
            return False
        same = (self._model_options() == model_options
                and (self.model_.n_conditions > 0) == bool(self.conditional))
        if incremental and not same:
            raise ValueError("partial_fit continues the fitted model, whose architecture "
                             "differs from the parameters' now (latent_dims, hidden_dims, "
                             "likelihood, activation, decoder_variance, inference, "
                             "markov_kl, latent_types, n_categories, prior, n_components, "
                             "prior_covariance_type, "
                             "n_pseudo_inputs, the discriminator (tc_weight > 0 or not, "
                             "discriminator_hidden) or conditional); call fit to train a "
                             "new model")
        return same and (incremental or bool(self.warm_start))

    def _model_options(self):
        """The fitted model's options, as _model_options(params) gives them."""
        return {key: getattr(self.model_, key) for key in _MODEL_OPTIONS + _LATENT_OPTIONS}

    def _partial_fit_classes(self, classes, continuing):
        """partial_fit's classes, sorted, checked against classes_ of a model
        being continued."""
        if classes is None:
            return None
        classes = np.unique(np.asarray(classes))
        if classes.ndim != 1 or classes.size == 0:
            raise ValueError(f"classes must be a non-empty 1-D array of labels; "
                             f"got {classes!r}")
        if continuing and (self.classes_ is None
                           or not np.array_equal(classes, self.classes_)):
            raise ValueError(f"classes={classes!r} differs from classes_="
                             f"{self.classes_!r} of the earlier calls")
        return classes

    def _start_training(self, model, code, params):
        """Installs a new model (None: continue the fitted one) and the
        condition code before the first pass."""
        self.classes_ = code.classes
        if model is not None:
            self.model_ = model
            self.history_ = new_history(model)
            self.n_iter_ = 0
        self.best_epoch_ = None
        self.model_.n_threads = params["n_threads"] or min(_available_cores(), MAX_THREADS)

    def _new_seed(self):
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _new_model(self, model_options, n_conditions, seed=None):
        """A new Model for n_features_in_ columns (seeded from random_state
        unless ``seed`` is given)."""
        seed = self._new_seed() if seed is None else seed
        return Model(self.n_features_in_, seed=seed, n_conditions=n_conditions,
                     **model_options)

    # ---- the rows of a fit ---------------------------------------------------------

    def _training_rows(self, X, y, validation_data, classes, continuing, incremental,
                       likelihood):
        """(training rows, validation rows or None, condition code) of a fit
        (``incremental=False``) or partial_fit call. X in memory is
        validated whole; X read in chunks by its shape and dtype here, by
        chunk as it is read."""
        chunked = is_out_of_core(X)
        if chunked:
            n, n_features = check_array_like(X)
            self._check_n_features(n_features, reset=not continuing)
        else:
            X = self._validate_X(X, reset=not continuing, likelihood=likelihood)
            n, n_features = X.shape
        if continuing:
            code = self._condition_code()
        elif self.conditional:
            code = ConditionCode.learn(y, n, classes, infer_classes=not incremental)
        else:
            code = ConditionCode.unconditional()
        conditions = code.rows(y, n)
        fraction = None if incremental else self._validation_fraction(validation_data)
        val = None
        if not incremental and validation_data is not None:
            val = self._validation_data_rows(validation_data, code, likelihood)
        if not chunked:
            C = None if conditions is None else conditions(0, n)
            if fraction is None:
                return InMemoryRows(X, C), val, code
            return (*self._hold_out_rows(X, C, fraction), code)
        chunk_size = self._chunk_size(n_features)
        bernoulli = likelihood == "bernoulli"
        n_train = n
        if fraction is not None:
            # Random rows would mean random reads: the tail is held out.
            n_train = n - self._n_validation_rows(fraction, n)
            val = ChunkedRows(X, n_train, n, chunk_size, conditions, bernoulli)
        return ChunkedRows(X, 0, n_train, chunk_size, conditions, bernoulli), val, code

    def _validation_fraction(self, validation_data):
        """The fraction of X that fit holds out: None when validation_data is
        given, else validation_fraction, or 0.1 for early stopping."""
        fraction = self.validation_fraction
        if validation_data is not None:
            if fraction is not None:
                raise ValueError("pass either validation_data to fit or validation_fraction, "
                                 "not both")
            return None
        if fraction is None and self.early_stopping:
            return 0.1
        return fraction

    def _hold_out_rows(self, X, C, fraction):
        """(training rows, validation rows) of X in memory (conditions C or
        None), ceil(fraction * n) rows held out at random."""
        n = X.shape[0]
        n_val = self._n_validation_rows(fraction, n)
        # A fresh generator from random_state: with an int, every fit holds
        # out the same rows. Fancy indexing copies; sorted rows keep X's order.
        rows = check_random_state(self.random_state).permutation(n)
        train, val = np.sort(rows[n_val:]), np.sort(rows[:n_val])
        if C is None:
            return InMemoryRows(X[train], None), InMemoryRows(X[val], None)
        return InMemoryRows(X[train], C[train]), InMemoryRows(X[val], C[val])

    @staticmethod
    def _n_validation_rows(fraction, n):
        n_val = math.ceil(fraction * n)
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"validation_fraction={fraction} of {n} rows leaves "
                             f"{n - n_val} training and {n_val} validation rows; need "
                             "at least one of each")
        return n_val

    def _validation_data_rows(self, validation_data, code, likelihood):
        """validation_data (X_val, or (X_val, y_val) for a conditional model)
        as rows: in memory, validated whole and used in place; or read in
        chunks like X."""
        y_val = None
        conditional = code.n_conditions > 0
        if conditional:
            if not (isinstance(validation_data, tuple) and len(validation_data) == 2):
                raise ValueError("validation_data of a conditional model must be a tuple "
                                 "(X_val, y_val)")
            validation_data, y_val = validation_data
        chunked = is_out_of_core(validation_data)
        try:
            if chunked:
                n_val, n_features = check_array_like(validation_data, "validation_data")
                self._check_n_features(n_features, reset=False)
            else:
                validation_data = self._validate_X(validation_data, reset=False,
                                                   likelihood=likelihood,
                                                   name="validation_data")
                n_val = validation_data.shape[0]
            C_val = code.all_rows(y_val, n_val, name="y_val")
        except ValueError as error:
            raise ValueError(f"validation_data: {error}") from None
        if not chunked:
            return InMemoryRows(validation_data, C_val)
        return ChunkedRows(validation_data, 0, n_val, self._chunk_size(self.n_features_in_),
                           conditions=None if C_val is None else (lambda a, b: C_val[a:b]),
                           bernoulli=likelihood == "bernoulli", name="validation_data")

    def _training_rows_parallel(self, session, X, y, validation_data, classes, continuing,
                                incremental, likelihood):
        """_training_rows on one rank of a data-parallel call, agreed with
        the others (hvae.distributed); also returns rank 0's seed."""
        def labels_of():
            if incremental or continuing or not self.conditional or y is None:
                return None
            y_arr = np.asarray(y)
            return np.unique(y_arr.ravel()) if is_labels(y_arr) else None

        same = None
        if incremental:
            same = {"classes": None if classes is None else classes.tolist()}
        seed, label_union = _distributed.agree_on_settings(
            session, self, continuing, validation_data is not None, self._new_seed,
            labels_of, same)
        if not incremental:
            classes = label_union

        def compute():
            return self._training_rows(_distributed.local_rows(X), y,
                                       _distributed.local_validation_data(validation_data),
                                       classes, continuing, incremental, likelihood)

        train, val, code = _distributed.agree_on_rows(session, self, compute)
        return train, val, code, seed

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

    def _validate_X(self, X, reset, likelihood=None, name="X"):
        # float32 C order: one conversion at most, none for such an array.
        # Values beyond float32's range become inf, refused by check_finite
        # with NaN in hvae's own words.
        with np.errstate(over="ignore"):
            X = validate_data(self, X, reset=reset, dtype=np.float32, order="C",
                              ensure_all_finite=False)
        check_finite(X, name)
        if likelihood is None:
            likelihood = self.model_.likelihood if not reset else self.likelihood
        if likelihood == "bernoulli" and X.size and (X.min() < 0.0 or X.max() > 1.0):
            raise ValueError(
                "%s has values outside [0, 1] (min %g, max %g), but likelihood='bernoulli' "
                "needs data in [0, 1]; rescale it or use likelihood='gaussian'"
                % (name, X.min(), X.max()))
        return X

    def _condition_code(self):
        """The fitted model's ConditionCode."""
        return ConditionCode(self.classes_, self.model_.n_conditions)

    # ---- inference -------------------------------------------------------------

    def _fitted_X(self, X, y=None):
        """(X as float32 C-contiguous, its conditions or None), validated."""
        check_is_fitted(self)
        self.model_.n_threads = self.n_threads or _available_cores()
        X = self._validate_X(X, reset=False)
        return X, self._condition_code().all_rows(y, X.shape[0])

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
        Z : ndarray of shape (n_samples, width of z_1), float32
        """
        return self.fit(X, y, **fit_params).transform(X, y)

    def transform(self, X, y=None):
        """Posterior means of z_1 (a categorical z_1: its class
        probabilities, column m*K + k for class k of variable m).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        Z : ndarray of shape (n_samples, width of z_1), float32
            The width is latent_dims[0], or latent_dims[0] * K for a
            categorical layer.
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
            prior evaluated at the posterior mean of the layer above. A
            categorical layer gives (class probabilities, their logs), of
            shape (n_samples, M_i * K_i).
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

    def prior_log_density(self, Z):
        """log p(z_T) of the fitted top-layer prior at given codes, in nats.

        The prior the model was trained with: N(0, I) (``prior='standard'``),
        the mixture of Gaussians (``'gmm'``, VaDE's), the VampPrior's mixture
        of the pseudo-inputs' posteriors (``'vamp'``), or for
        ``'density_ratio'`` log N(z; 0, I) + T(z), T the discriminator's
        logit: an UNNORMALISED density (normalised only where the
        discriminator is optimal), as the ELBO and ``log_likelihood`` use
        it. Compare it with the aggregate posterior, e.g. ``encode(X)[-1][0]``
        (the top layer's posterior means). Each row is computed alone, so a
        row's value does not depend on the other rows.

        Parameters
        ----------
        Z : array-like of shape (n_samples, latent_dims[-1])
            Points of the top latent layer z_T.

        Returns
        -------
        log_p : ndarray of shape (n_samples,), float64

        Raises
        ------
        ValueError
            For a categorical top layer (its prior is uniform over classes,
            not a density over z_T), or a Z of the wrong shape, or with NaN
            or infinity.
        """
        check_is_fitted(self)
        family = self.model_.latent_family
        top = family if isinstance(family, str) else family[-1]
        if top != "gaussian":
            raise ValueError(f"prior_log_density needs a Gaussian top layer: this model's is "
                             f"{top!r}, whose uniform prior is over classes, not a density "
                             f"over z_T")
        self.model_.n_threads = self.n_threads or _available_cores()
        # float32 first (once): values beyond its range become inf and are
        # refused with the rest.
        with np.errstate(over="ignore"):
            Z = check_array(Z, dtype=np.float32, order="C", ensure_all_finite=False,
                            input_name="Z")
        width = self.model_.latent_widths[-1]
        if Z.shape[1] != width:
            raise ValueError(f"Z must have shape (n_samples, {width}) (the top layer's "
                             f"width, latent_dims[-1]); got {Z.shape}")
        if not np.all(np.isfinite(Z)):
            raise ValueError("Z contains NaN or infinity (or values beyond float32's range)")
        return self.model_.prior_log_density(Z)

    def inverse_transform(self, Z, y=None):
        """The mean of p(x | z_1) (probabilities for a Bernoulli likelihood).

        Parameters
        ----------
        Z : array-like of shape (n_samples, width of z_1), or list of pairs
            Values of z_1, such as ``transform``'s output: latent_dims[0]
            columns, or M*K for a categorical z_1 (one-hots or
            probabilities); or ``encode``'s output, the list of T (mu, logvar)
            pairs, of which the first layer's means are decoded
            (``inverse_transform(encode(X))`` equals ``reconstruct(X)``).
        y : array-like or None, default=None
            The rows' conditions, for a model fitted with ``conditional=True``
            (class labels or an (n_samples, n_conditions) array); else ignored.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), float32
        """
        check_is_fitted(self)
        if isinstance(Z, list) and Z and isinstance(Z[0], tuple):
            T = len(self.model_.latent_dims)
            if not (len(Z) == T and all(isinstance(pair, tuple) and len(pair) == 2
                                        for pair in Z)):
                raise ValueError(f"Z must be values of z_1 of shape (n_samples, "
                                 f"{self.model_.latent_dims[0]}) or encode's output, a list "
                                 f"of {T} (mu, logvar) pairs; got a list of {len(Z)} tuples")
            Z = Z[0][0]
        # float32 first (once): values beyond its range become inf and are
        # refused with the rest.
        with np.errstate(over="ignore"):
            Z = check_array(Z, dtype=np.float32, order="C", ensure_all_finite=False,
                            input_name="Z")
        width = self.model_.latent_widths[0]
        if Z.shape[1] != width:
            raise ValueError(f"Z must have shape (n_samples, {width}); got {Z.shape}")
        if not np.all(np.isfinite(Z)):
            raise ValueError("Z contains NaN or infinity (or values beyond float32's range)")
        return self.model_.decode(Z, cond=self._condition_code().all_rows(y, Z.shape[0]))

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
        C = self._condition_code().all_rows(y, int(n_samples))
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

        with estimator_lock(self).hold("save", reentrant=True):
            save(self, path)

    def set_params(self, **params):
        """Set the parameters (scikit-learn's ``set_params``).

        Waits for a fit of another thread to finish; from a callback of this
        estimator's own fit it applies to the next call (the running fit
        trains with the parameters it validated when it started).

        Parameters
        ----------
        **params : dict
            Estimator parameters.

        Returns
        -------
        self : HierarchicalVAE
        """
        with estimator_lock(self).hold("set_params", reentrant=True):
            return super().set_params(**params)

    def __getstate__(self):
        # Under the lock, so a fit in another thread cannot run ahead of what
        # is captured: the model and history_ are copied before it returns
        # (pickle serialises after). The lock itself is not part of the state.
        with estimator_lock(self).hold("pickling", reentrant=True):
            state = dict(super().__getstate__())  # object's may be __dict__ itself
            state.pop("_estimator_lock", None)
            if isinstance(state.get("history_"), dict):
                state["history_"] = copy.deepcopy(state["history_"])
            if isinstance(state.get("model_"), Model):
                state["model_"] = copy.copy(state["model_"])
        return state

    def __setstate__(self, state):
        # An estimator pickled before a parameter existed (markov_kl) loads
        # with that parameter's default, which is how it trained.
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if name != "self":
                state.setdefault(name, parameter.default)
        super().__setstate__(state)

    @property
    def _n_features_out(self):
        return self.model_.latent_widths[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # The core computes in float32; it is what transform returns.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


register_estimator(HierarchicalVAE, history_keys=HISTORY_KEYS, validation_keys=VALIDATION_KEYS,
                   validate=lambda e: _model_options(validate_parameters(e)))
