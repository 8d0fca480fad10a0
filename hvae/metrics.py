"""Disentanglement metrics: FactorVAE score, MIG, DCI and SAP; and the
clustering accuracy (:func:`clustering_accuracy`) that deep-clustering papers
report beside scikit-learn's NMI and ARI.

Each metric compares a representation (a code per observation, for example
``HierarchicalVAE.transform``, the posterior means of z_1) with the known
factors that generated the observations. They follow the definitions and
defaults of Google's disentanglement_lib (Locatello et al. 2019,
``disentanglement_lib/evaluation/metrics/``, with the defaults of its
``config/unsupervised_study_v1/metric_configs``); each function's Notes say
what it takes from there and where it differs.

=====================  ============================  =========================================
metric                 function                      needs
=====================  ============================  =========================================
FactorVAE score        :func:`factor_vae_score`      ``encode`` and a :class:`FactorDataset`
MIG                    :func:`mutual_info_gap`       codes and factors
DCI                    :func:`dci`                   codes and factors (train and test)
SAP                    :func:`sap_score`             codes and factors (train and test)
=====================  ============================  =========================================

The FactorVAE score draws its own batches with one factor held fixed, so it
needs a data set that can render observations from factors: a
:class:`hvae.datasets.FactorDataset`, such as :class:`hvae.datasets.Sprites`.
The others take arrays; :func:`sample_codes` draws them from a data set as
disentanglement_lib does (independent uniform factors).

Conventions: ``codes`` has shape ``(n_samples, n_codes)`` and ``factors``
``(n_samples, n_factors)`` with discrete factor classes in the columns, one
row per observation (disentanglement_lib stores the transposes).

Examples
--------
>>> from hvae.datasets import Sprites
>>> from hvae import metrics
>>> sprites = Sprites(image_size=32)
>>> vae = HierarchicalVAE(...).fit(sprites.sample(20000, random_state=0)[0])  # doctest: +SKIP
>>> metrics.factor_vae_score(vae.transform, sprites, random_state=0)  # doctest: +SKIP
>>> codes, factors = metrics.sample_codes(vae.transform, sprites, 10000, random_state=1)  # doctest: +SKIP
>>> metrics.mutual_info_gap(codes, factors)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import numpy as np

from ._factor_dataset import FactorDataset, _as_generator

__all__ = ["FactorDataset", "clustering_accuracy", "dci", "factor_vae_score",
           "mutual_info_gap", "sample_codes", "sap_score"]

# Rows passed to `encode` (and rendered) at once: bounds the memory of the
# images in flight (4096 64x64 float32 images are 64 MB).
_DEFAULT_CHUNK_ROWS = 4096


def _encode_chunks(encode, dataset, factors, chunk_rows):
    """Render and encode factor rows (n, n_factors) a chunk at a time -> (n, n_codes) float64."""
    codes = []
    for start in range(0, len(factors), chunk_rows):
        z = np.asarray(encode(dataset.render(factors[start:start + chunk_rows])), dtype=np.float64)
        if z.ndim != 2 or len(z) != len(factors[start:start + chunk_rows]):
            raise ValueError(f"encode must return an array of shape (n, n_codes); got shape {z.shape}")
        codes.append(z)
    return np.concatenate(codes, axis=0)


def _check_codes_factors(codes, factors, min_codes=1):
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2:
        raise ValueError(f"codes and factors must be 2-D, got shapes {codes.shape} and {factors.shape}")
    if len(codes) != len(factors):
        raise ValueError(f"codes has {len(codes)} rows but factors has {len(factors)}")
    if codes.shape[1] < min_codes:
        raise ValueError(f"this metric needs at least {min_codes} code dimensions, got {codes.shape[1]}")
    if len(codes) < 2:
        raise ValueError("need at least two samples")
    if not np.all(np.isfinite(codes)):
        raise ValueError("codes contain NaN or infinity")
    return codes, factors


def _split(codes, factors, codes_test, factors_test, train_fraction):
    """The train and test sets: the given test set, or disentanglement_lib's fixed-data split."""
    if (codes_test is None) != (factors_test is None):
        raise ValueError("pass both codes_test and factors_test, or neither")
    if codes_test is not None:
        codes_test, factors_test = _check_codes_factors(codes_test, factors_test)
        if codes_test.shape[1] != codes.shape[1] or factors_test.shape[1] != factors.shape[1]:
            raise ValueError("test codes/factors have a different number of columns than the training ones")
        return codes, factors, codes_test, factors_test
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    # The first ceil(n * train_fraction) rows train, as utils.split_train_test.
    n_train = int(np.ceil(len(codes) * train_fraction))
    if n_train >= len(codes):
        raise ValueError("train_fraction leaves no test rows")
    return codes[:n_train], factors[:n_train], codes[n_train:], factors[n_train:]


def sample_codes(encode, dataset, n_samples, *, random_state=None, chunk_rows=_DEFAULT_CHUNK_ROWS):
    """Draw factors from a data set, render them and encode the observations.

    What disentanglement_lib's ``utils.generate_batch_factor_code`` does to
    feed MIG, DCI and SAP: factors independent and uniform over their classes.

    Parameters
    ----------
    encode : callable
        ``encode(X)`` maps observations of shape ``(m, ...)`` (what
        ``dataset.render`` returns) to codes of shape ``(m, n_codes)``; for
        example ``HierarchicalVAE.transform`` (posterior means).
    dataset : FactorDataset
    n_samples : int
    random_state : None, int or numpy.random.Generator, default=None
    chunk_rows : int, default=4096
        Observations rendered and encoded per call of ``encode``.

    Returns
    -------
    codes : ndarray of float64, shape (n_samples, n_codes)
    factors : ndarray of int64, shape (n_samples, n_factors)
    """
    factors = dataset.sample_factors(n_samples, _as_generator(random_state))
    return _encode_chunks(encode, dataset, factors, int(chunk_rows)), factors


def factor_vae_score(encode, dataset, *, batch_size=64, n_train=10000, n_eval=5000,
                     n_variance_estimate=10000, prune_threshold=0.05, random_state=None,
                     chunk_rows=_DEFAULT_CHUNK_ROWS, return_details=False):
    """The FactorVAE disentanglement metric (Kim and Mnih 2018).

    Definition: normalise each code dimension by its standard deviation over
    the data. A *vote* draws a factor ``k`` uniformly, a batch of
    ``batch_size`` observations in which factor ``k`` is fixed at one random
    class and the others vary, and returns the pair (k, d) where ``d`` is
    the active code dimension with the smallest normalised variance over the
    batch. A majority-vote classifier maps each dimension to the factor that
    won it most often on ``n_train`` votes; the score is its accuracy on
    ``n_eval`` fresh votes. 1 means that fixing any factor freezes a
    dimension of its own; chance is about ``1 / n_factors``.

    Parameters
    ----------
    encode : callable
        ``encode(X)`` maps observations ``(m, ...)`` to codes ``(m, n_codes)``,
        for example ``HierarchicalVAE.transform``.
    dataset : FactorDataset
        Draws the factors and renders the observations, e.g.
        :class:`hvae.datasets.Sprites`.
    batch_size : int, default=64
        Observations per vote.
    n_train : int, default=10000
        Votes that train the majority-vote classifier.
    n_eval : int, default=5000
        Votes that evaluate it.
    n_variance_estimate : int, default=10000
        Observations for the global variance of each code dimension.
    prune_threshold : float, default=0.05
        Dimensions whose global standard deviation is below it (collapsed to
        the prior) are not candidates; no active dimension scores 0.
    random_state : None, int or numpy.random.Generator, default=None
    chunk_rows : int, default=4096
        Observations rendered and encoded per call of ``encode``; votes are
        drawn ``chunk_rows // batch_size`` at a time.
    return_details : bool, default=False

    Returns
    -------
    score : float
        The evaluation accuracy in [0, 1] (disentanglement_lib's ``eval_accuracy``).
    details : dict
        Only when ``return_details``: ``train_accuracy``, ``eval_accuracy``,
        ``n_active_dims``, ``global_variances`` (n_codes,), ``active_dims``
        (n_codes,) bool, and ``train_votes``/``eval_votes`` of shape
        (n_factors, n_codes), the count of votes (factor, dimension).

    Notes
    -----
    Follows ``disentanglement_lib/evaluation/metrics/factor_vae.py`` with the
    unsupervised study's defaults (batch 64, 10000 train and 5000 eval
    votes, variances from 10000 samples with ``ddof=1``, ``prune_dims``
    threshold 0.05 on the standard deviation). Differences, none of which
    changes the metric's definition:

    * Votes are drawn many at a time (one ``encode`` call per
      ``chunk_rows`` observations rather than per vote), so the random
      stream, hence the exact score for a given seed, differs.
    * Votes are counted by original dimension index; disentanglement_lib
      counts the argmin's index among the *active* dimensions. The majority
      vote's accuracy is the same either way.

    The default costs ``10000 + 15000 * 64`` rendered and encoded
    observations, about a million: with :class:`hvae.datasets.Sprites` and a
    trivial encoder, 25 s at 32 x 32 and 110 s at 64 x 64 on a loaded 2-core
    machine, before the encoder's own time. ``n_train=1000, n_eval=500``
    cost a tenth and give the score to within a few hundredths (binomial
    standard error ``sqrt(p (1 - p) / n_eval)``, 0.02 at 500 votes).
    """
    if not isinstance(dataset, FactorDataset):
        raise TypeError("dataset must be a FactorDataset (e.g. hvae.datasets.Sprites)")
    batch_size, n_train, n_eval = int(batch_size), int(n_train), int(n_eval)
    if batch_size < 2 or n_train < 1 or n_eval < 1 or int(n_variance_estimate) < 2:
        raise ValueError("need batch_size >= 2, n_train >= 1, n_eval >= 1, n_variance_estimate >= 2")
    rng = _as_generator(random_state)
    chunk_rows = int(chunk_rows)

    codes, _ = sample_codes(encode, dataset, int(n_variance_estimate), random_state=rng,
                            chunk_rows=chunk_rows)
    global_variances = np.var(codes, axis=0, ddof=1)
    active = np.sqrt(global_variances) >= prune_threshold
    n_codes = codes.shape[1]
    details = {"global_variances": global_variances, "active_dims": active,
               "n_active_dims": int(active.sum())}
    if not active.any():
        details.update(train_accuracy=0.0, eval_accuracy=0.0,
                       train_votes=np.zeros((dataset.n_factors, n_codes), np.int64),
                       eval_votes=np.zeros((dataset.n_factors, n_codes), np.int64))
        return (0.0, details) if return_details else 0.0
    active_index = np.flatnonzero(active)

    def votes(n_votes):
        counts = np.zeros((dataset.n_factors, n_codes), dtype=np.int64)
        per_chunk = max(1, chunk_rows // batch_size)
        for start in range(0, n_votes, per_chunk):
            m = min(per_chunk, n_votes - start)
            factor_index = rng.integers(0, dataset.n_factors, size=m)
            factors = dataset.sample_fixed_factor(factor_index, m, batch_size, rng)
            z = _encode_chunks(encode, dataset, factors.reshape(m * batch_size, -1), m * batch_size)
            local_variances = np.var(z.reshape(m, batch_size, n_codes), axis=1, ddof=1)
            ratio = local_variances[:, active_index] / global_variances[active_index]
            np.add.at(counts, (factor_index, active_index[np.argmin(ratio, axis=1)]), 1)
        return counts

    def accuracy(counts, classifier):
        return float(counts[classifier, np.arange(n_codes)].sum() / counts.sum())

    train_votes = votes(n_train)
    classifier = np.argmax(train_votes, axis=0)
    eval_votes = votes(n_eval)
    details.update(train_accuracy=accuracy(train_votes, classifier),
                   eval_accuracy=accuracy(eval_votes, classifier),
                   train_votes=train_votes, eval_votes=eval_votes)
    if return_details:
        return details["eval_accuracy"], details
    return details["eval_accuracy"]


def _discretize(codes, n_bins):
    """Each column into n_bins equal-width bins over its range, labels 1..n_bins (int64)."""
    out = np.empty(codes.shape, dtype=np.int64)
    for i in range(codes.shape[1]):
        # As utils._histogram_discretize: np.histogram's edges, the last one dropped.
        edges = np.histogram_bin_edges(codes[:, i], bins=n_bins)
        out[:, i] = np.digitize(codes[:, i], edges[:-1])
    return out


def _mutual_info(a, b):
    """Mutual information in nats of two discrete label vectors (n,) (plug-in estimate)."""
    from sklearn.metrics import mutual_info_score

    return mutual_info_score(a, b)


def mutual_info_gap(codes, factors, *, n_bins=20, return_details=False):
    """Mutual information gap (MIG; Chen, Li, Grosse and Duvenaud 2018).

    Definition: discretise each code dimension into ``n_bins`` equal-width
    bins over its range; estimate the mutual information ``I(z_i; v_k)``
    between every discretised dimension and every factor by the plug-in
    (empirical histogram) estimate; for each factor take the gap between the
    largest and the second largest over dimensions, divided by the factor's
    entropy ``H(v_k)``; average over factors. 1 means each factor is fully
    captured by one dimension and by no other; 0 means two dimensions share
    it equally (or none has it).

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_codes)
        Representations, at least two dimensions.
    factors : array-like of shape (n_samples, n_factors)
        Discrete factor labels (classes); none constant.
    n_bins : int, default=20
        Equal-width bins per code dimension.
    return_details : bool, default=False

    Returns
    -------
    mig : float
    details : dict
        Only when ``return_details``: ``mutual_info`` (n_codes, n_factors) in
        nats, ``entropy`` (n_factors,) in nats, ``gap_per_factor`` (n_factors,)
        normalised gaps, ``best_code`` (n_factors,) the dimension with the
        most information about each factor.

    Notes
    -----
    Follows ``disentanglement_lib/evaluation/metrics/mig.py`` (``discrete_mig``)
    with its defaults: ``histogram_discretizer`` with 20 bins (``np.histogram``
    edges, ``np.digitize`` on all but the last), scikit-learn's
    ``mutual_info_score`` in nats, entropies as ``I(v; v)``, and 10000 points
    when drawn with :func:`sample_codes`. Chen et al. estimate ``I(z; v)``
    from the encoder's full posterior instead; like disentanglement_lib this
    uses the codes only. Bias to keep in mind: with 20 bins a factor with
    more than 20 classes cannot be fully captured (a perfect code of a
    40-class factor gets ``log 20 / log 40 = 0.81`` for it), and the plug-in
    estimate is biased upwards by about ``(n_bins - 1)(n_classes - 1) / (2 n)``
    nats. A constant factor (entropy 0) raises ValueError, where
    disentanglement_lib would return NaN.
    """
    codes, factors = _check_codes_factors(codes, factors, min_codes=2)
    n_bins = int(n_bins)
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2, got {n_bins}")
    binned = _discretize(codes, n_bins)
    n_codes, n_factors = codes.shape[1], factors.shape[1]
    entropy = np.array([_mutual_info(factors[:, k], factors[:, k]) for k in range(n_factors)])
    if np.any(entropy <= 0):
        raise ValueError(f"factors {np.flatnonzero(entropy <= 0).tolist()} are constant: MIG "
                         "divides by each factor's entropy")
    mutual_info = np.array([[_mutual_info(factors[:, k], binned[:, i]) for k in range(n_factors)]
                            for i in range(n_codes)])
    top_two = -np.sort(-mutual_info, axis=0)[:2]
    gap = (top_two[0] - top_two[1]) / entropy
    mig = float(np.mean(gap))
    if return_details:
        return mig, {"mutual_info": mutual_info, "entropy": entropy, "gap_per_factor": gap,
                     "best_code": np.argmax(mutual_info, axis=0)}
    return mig


def _normalised_entropy(p, axis):
    """Entropy of the rows/columns of a non-negative matrix, in base = their length.

    As ``scipy.stats.entropy(x + 1e-11, base=len)``: each slice is made a
    distribution by dividing by its sum; 0 log 0 counts 0.
    """
    p = p + 1e-11
    p = p / p.sum(axis=axis, keepdims=True)
    return -np.sum(p * np.log(p), axis=axis) / np.log(p.shape[axis])


def dci(codes, factors, codes_test=None, factors_test=None, *, estimator=None,
        train_fraction=2 / 3, random_state=None):
    """Disentanglement, completeness and informativeness (Eastwood and Williams 2018).

    Definition: for each factor ``k`` a classifier predicts its class from
    all code dimensions; its feature importances form column ``k`` of the
    importance matrix ``R`` (n_codes, n_factors), ``R[i, k] >= 0``.

    * Disentanglement of dimension ``i``: ``D_i = 1 - H_K(P_i.)``, with
      ``P_ik = R_ik / sum_k R_ik`` and ``H_K`` the entropy in base
      ``K = n_factors``; the score is ``sum_i rho_i D_i`` with weights
      ``rho_i = sum_k R_ik / sum R``. 1 when each dimension matters to one
      factor only.
    * Completeness of factor ``k``: ``C_k = 1 - H_D(R_.k / sum_i R_ik)``
      with ``D = n_codes``, weighted by factor importance ``sum_i R_ik / sum R``.
      1 when each factor is read from a single dimension.
    * Informativeness: the classifiers' mean accuracy (train and test).
      Eastwood and Williams define it as a prediction *error*; like
      disentanglement_lib this reports accuracy (higher is better).

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_codes)
        Training codes, at least two dimensions.
    factors : array-like of shape (n_samples, n_factors)
        Discrete factor classes of the training rows, at least two factors.
    codes_test, factors_test : array-like of shape (n_test, n_codes) and (n_test, n_factors), optional
        Held-out rows for ``informativeness_test``. If omitted, the first
        ``ceil(n_samples * train_fraction)`` rows train and the rest test
        (disentanglement_lib's ``compute_dci_on_fixed_data`` split).
    estimator : scikit-learn classifier with ``feature_importances_``, optional
        Cloned once per factor. Default:
        ``sklearn.ensemble.GradientBoostingClassifier()`` (disentanglement_lib's
        choice) with ``random_state`` set.
    train_fraction : float, default=2/3
        Only without a test set; 2/3 matches the 10000 train / 5000 test
        points of disentanglement_lib's defaults.
    random_state : None or int, default=None
        Given to the estimator's ``random_state`` when it has one.

    Returns
    -------
    scores : dict
        ``disentanglement``, ``completeness``, ``informativeness_train``,
        ``informativeness_test`` (floats in [0, 1]), ``importance`` (n_codes,
        n_factors), ``disentanglement_per_code`` (n_codes,),
        ``completeness_per_factor`` (n_factors,).

    Notes
    -----
    Follows ``disentanglement_lib/evaluation/metrics/dci.py``:
    ``GradientBoostingClassifier`` with scikit-learn's defaults (100 stages
    of depth-3 trees, one tree per class per stage), importances
    ``abs(feature_importances_)``, entropies of ``R + 1e-11``, and
    10000/5000 train/test points when drawn with :func:`sample_codes`.

    Cost: the default classifier fits ``100 * n_classes`` trees per factor
    (one per stage for a binary factor). On the sprites' factors (3, 6, 40,
    32 and 32 classes) with 10000 train / 5000 test rows of 8 code
    dimensions it took 250-350 s on a loaded 2-core machine. A faster
    choice is ``estimator=GradientBoostingClassifier(n_estimators=10)``
    (about 40 s there): it gave the same 1.0/1.0 on a perfect code, but
    0.43/0.37 instead of 0.24/0.22 (disentanglement/completeness) on a
    rotated one, so its figures are not comparable with the default's.
    Avoid random forests with feature subsampling
    (``RandomForestClassifier``'s default ``max_features="sqrt"``): trees
    that cannot see the right dimension split on others, which spreads the
    importances (0.60/0.53 on the same perfect code). Say which estimator
    you used when you report a DCI.
    """
    codes, factors = _check_codes_factors(codes, factors, min_codes=2)
    if factors.shape[1] < 2:
        raise ValueError("DCI needs at least two factors (entropies are in base n_factors)")
    codes, factors, codes_test, factors_test = _split(codes, factors, codes_test, factors_test,
                                                      train_fraction)
    from sklearn.base import clone
    from sklearn.ensemble import GradientBoostingClassifier

    if estimator is None:
        estimator = GradientBoostingClassifier()
    n_codes, n_factors = codes.shape[1], factors.shape[1]
    importance = np.zeros((n_codes, n_factors))
    accuracy_train, accuracy_test = [], []
    for k in range(n_factors):
        model = clone(estimator)
        if random_state is not None and "random_state" in model.get_params():
            model.set_params(random_state=random_state)
        model.fit(codes, factors[:, k])
        importance[:, k] = np.abs(model.feature_importances_)
        accuracy_train.append(np.mean(model.predict(codes) == factors[:, k]))
        accuracy_test.append(np.mean(model.predict(codes_test) == factors_test[:, k]))

    per_code = 1.0 - _normalised_entropy(importance, axis=1)
    per_factor = 1.0 - _normalised_entropy(importance, axis=0)
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    code_weight = weights.sum(axis=1) / weights.sum()
    factor_weight = weights.sum(axis=0) / weights.sum()
    return {
        "disentanglement": float(np.sum(per_code * code_weight)),
        "completeness": float(np.sum(per_factor * factor_weight)),
        "informativeness_train": float(np.mean(accuracy_train)),
        "informativeness_test": float(np.mean(accuracy_test)),
        "importance": importance,
        "disentanglement_per_code": per_code,
        "completeness_per_factor": per_factor,
    }


def sap_score(codes, factors, codes_test=None, factors_test=None, *, continuous_factors=False,
              train_fraction=2 / 3, return_details=False):
    """Separated attribute predictability (SAP; Kumar, Sattigeri and Balakrishnan 2018).

    Definition: a score matrix ``S`` (n_codes, n_factors) rates how well each
    single code dimension predicts each factor; for each factor take the
    difference between its two best dimensions; average over factors. High
    when each factor is predicted well by exactly one dimension.

    * Discrete factors (default): ``S[i, k]`` is the test accuracy of a
      linear SVM (``LinearSVC(C=0.01, class_weight="balanced")``) trained to
      predict factor ``k`` from dimension ``i`` alone.
    * ``continuous_factors=True``: ``S[i, k]`` is the squared correlation
      ``cov(z_i, v_k)^2 / (var z_i var v_k)`` on the training rows (the R^2
      of a linear regression), 0 for a dimension of variance below 1e-12.

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_codes)
        Training codes, at least two dimensions.
    factors : array-like of shape (n_samples, n_factors)
        Factor classes (or values, with ``continuous_factors``).
    codes_test, factors_test : array-like, optional
        Held-out rows for the discrete score; split off the training rows
        as in :func:`dci` when omitted (unused when ``continuous_factors``).
    continuous_factors : bool, default=False
        disentanglement_lib's default for the unsupervised study is False.
    train_fraction : float, default=2/3
    return_details : bool, default=False

    Returns
    -------
    sap : float
    details : dict
        Only when ``return_details``: ``score_matrix`` (n_codes, n_factors).

    Notes
    -----
    Follows ``disentanglement_lib/evaluation/metrics/sap_score.py`` and its
    defaults (discrete factors, 10000/5000 train/test points when drawn with
    :func:`sample_codes`). liblinear often stops at its iteration limit on
    these one-dimensional many-class problems; its ConvergenceWarning is
    silenced here, as it goes unremarked in disentanglement_lib. The cost is
    ``n_codes * n_factors`` SVM fits (2.4 s for 8 x 5 on 10000/5000 rows).

    Scale of the discrete score: a one-vs-rest linear SVM on one dimension
    cannot single out the middle classes of a many-class factor, and a
    useless dimension still scores chance (1/2 on a binary factor), so even
    a perfect code is far from 1: 0.18 on the sprites' factors (0.09 for a
    random rotation of it), about 0.5 on binary factors. The continuous
    score reaches 1 on a perfect code (0.31 for the rotation).
    """
    codes, factors = _check_codes_factors(codes, factors, min_codes=2)
    n_codes, n_factors = codes.shape[1], factors.shape[1]
    score = np.zeros((n_codes, n_factors))
    if continuous_factors:
        values = np.asarray(factors, dtype=np.float64)
        code_centred = codes - codes.mean(axis=0)
        factor_centred = values - values.mean(axis=0)
        n = len(codes)
        cov = code_centred.T @ factor_centred / (n - 1)
        var_code = np.sum(code_centred**2, axis=0) / (n - 1)
        var_factor = np.sum(factor_centred**2, axis=0) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = cov**2 / np.outer(var_code, var_factor)
        score[var_code <= 1e-12, :] = 0.0
    else:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        codes, factors, codes_test, factors_test = _split(codes, factors, codes_test, factors_test,
                                                          train_fraction)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for i in range(n_codes):
                for k in range(n_factors):
                    svm = LinearSVC(C=0.01, class_weight="balanced")
                    svm.fit(codes[:, i:i + 1], factors[:, k])
                    score[i, k] = np.mean(svm.predict(codes_test[:, i:i + 1]) == factors_test[:, k])
    top_two = -np.sort(-score, axis=0)[:2]
    sap = float(np.mean(top_two[0] - top_two[1]))
    if return_details:
        return sap, {"score_matrix": score}
    return sap


def clustering_accuracy(labels_true, labels_pred):
    """Clustering accuracy: the share of rows whose cluster maps to their
    class under the best one-to-one matching of clusters to classes (the
    Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``), as VaDE
    (Jiang et al. 2017) and most deep-clustering papers report it. Clusters
    left unmatched (more clusters than classes) count as wrong.

    Parameters
    ----------
    labels_true : array-like of int, shape (n_samples,)
        The classes, non-negative integers.
    labels_pred : array-like of int, shape (n_samples,)
        The clusters, non-negative integers (e.g. ``VaDE.predict(X)``).

    Returns
    -------
    accuracy : float in [0, 1]
    """
    from scipy.optimize import linear_sum_assignment

    y = np.asarray(labels_true)
    c = np.asarray(labels_pred)
    for name, a in (("labels_true", y), ("labels_pred", c)):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array; got shape {a.shape}")
        if a.dtype.kind not in "iu" or a.min() < 0:
            raise ValueError(f"{name} must hold non-negative integers")
    if len(y) != len(c):
        raise ValueError(f"labels_true has {len(y)} rows, labels_pred {len(c)}")
    counts = np.zeros((int(c.max()) + 1, int(y.max()) + 1), dtype=np.int64)
    np.add.at(counts, (c, y), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(y))
