"""Data sets whose observations are rendered from known, discrete factors.

A :class:`FactorDataset` is what the disentanglement metrics in
:mod:`hvae.metrics` need from a data set: draw factor classes, render the
observations of given factor classes, and so draw batches in which one factor
is held fixed (the FactorVAE metric) or independent samples (MIG, DCI, SAP).
It plays the part of disentanglement_lib's ``GroundTruthData``.

Factors are always passed around as *classes*: an int64 array of shape
``(n, n_factors)`` whose column ``j`` holds integers in
``0 .. factor_sizes[j] - 1``. :meth:`FactorDataset.factor_values` maps classes
to the physical values (a scale, an angle in radians...) where a data set has
them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FactorDataset"]


def _as_generator(random_state):
    """A NumPy Generator from None, an int, a Generator or a RandomState."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        # Seed a Generator from the legacy state so that callers passing
        # scikit-learn style RandomState objects still get reproducible draws.
        return np.random.default_rng(random_state.randint(0, 2**31 - 1, size=4))
    return np.random.default_rng(random_state)


class FactorDataset:
    """Observations rendered from independent, uniformly distributed discrete factors.

    Parameters
    ----------
    factor_sizes : sequence of int, length n_factors
        Number of classes of each factor.
    render : callable
        ``render(factors)`` maps an int array of shape ``(n, n_factors)`` of
        factor classes to the observations, an array whose first axis has
        length ``n`` (for example ``(n, n_features)`` float32 images). It must
        be deterministic in the factors: the metrics assume that everything
        an observation shows comes from its factors.
    factor_names : sequence of str, length n_factors, optional
        Names of the factors; ``"factor_0"``, ``"factor_1"``, ... by default.
    factor_values : sequence of array-like, length n_factors, optional
        ``factor_values[j][c]`` is the value of class ``c`` of factor ``j``;
        by default the class index itself.

    Attributes
    ----------
    factor_sizes : tuple of int, length n_factors
    factor_names : tuple of str, length n_factors
    n_factors : int
    n_combinations : int
        Product of ``factor_sizes``: the size of the full grid of factors.

    Notes
    -----
    Factors are drawn independently and uniformly, as disentanglement_lib
    samples its ground-truth data sets. A data set given as a finite array
    that covers every combination of factors once (the real dSprites, say)
    fits with :meth:`from_grid`.

    Examples
    --------
    The identity data set, whose observations are the factor classes
    themselves (handy to test a metric on a known code):

    >>> ds = FactorDataset([3, 4], render=lambda f: f.astype(float))
    >>> X, factors = ds.sample(5, random_state=0)
    >>> X.shape, factors.shape
    ((5, 2), (5, 2))
    """

    def __init__(self, factor_sizes, render, factor_names=None, factor_values=None):
        sizes = tuple(int(s) for s in factor_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"factor_sizes must be a non-empty list of positive ints, got {factor_sizes!r}")
        if not callable(render):
            raise TypeError("render must be callable: render(factors) -> observations")
        self.factor_sizes = sizes
        self._render = render
        if factor_names is None:
            factor_names = [f"factor_{j}" for j in range(len(sizes))]
        self.factor_names = tuple(str(name) for name in factor_names)
        if len(self.factor_names) != len(sizes):
            raise ValueError(f"{len(self.factor_names)} factor_names for {len(sizes)} factors")
        if factor_values is None:
            factor_values = [np.arange(s, dtype=np.float64) for s in sizes]
        self._factor_values = tuple(np.asarray(v, dtype=np.float64) for v in factor_values)
        if [len(v) for v in self._factor_values] != list(sizes):
            raise ValueError("factor_values[j] must have factor_sizes[j] entries")

    @property
    def n_factors(self):
        """Number of factors (int)."""
        return len(self.factor_sizes)

    @property
    def n_combinations(self):
        """Number of distinct factor combinations (int): the product of the sizes."""
        return int(np.prod(self.factor_sizes, dtype=np.int64))

    def check_factors(self, factors):
        """Validate factor classes.

        Parameters
        ----------
        factors : array-like of int, shape (n, n_factors)

        Returns
        -------
        factors : ndarray of int64, shape (n, n_factors)

        Raises
        ------
        ValueError
            On a wrong shape or a class outside ``0 .. factor_sizes[j] - 1``.
        """
        factors = np.asarray(factors)
        if factors.ndim != 2 or factors.shape[1] != self.n_factors:
            raise ValueError(f"factors must have shape (n, {self.n_factors}), got {factors.shape}")
        if factors.size and not np.issubdtype(factors.dtype, np.integer):
            if not np.array_equal(factors, np.round(factors)):
                raise ValueError("factors must hold integer classes")
        factors = factors.astype(np.int64, copy=False)
        if factors.size and (np.any(factors < 0) or np.any(factors >= np.asarray(self.factor_sizes))):
            raise ValueError(f"factor classes out of range for sizes {self.factor_sizes}")
        return factors

    def factor_values(self, factors):
        """Physical values of factor classes.

        Parameters
        ----------
        factors : array-like of int, shape (n, n_factors)

        Returns
        -------
        values : ndarray of float64, shape (n, n_factors)
        """
        factors = self.check_factors(factors)
        values = np.empty(factors.shape, dtype=np.float64)
        for j, table in enumerate(self._factor_values):
            values[:, j] = table[factors[:, j]]
        return values

    def sample_factors(self, n_samples, random_state=None):
        """Draw factor classes independently and uniformly.

        Parameters
        ----------
        n_samples : int
        random_state : None, int, numpy.random.Generator or RandomState

        Returns
        -------
        factors : ndarray of int64, shape (n_samples, n_factors)
        """
        rng = _as_generator(random_state)
        return rng.integers(0, np.asarray(self.factor_sizes), size=(int(n_samples), self.n_factors),
                            dtype=np.int64)

    def render(self, factors):
        """Observations of given factor classes.

        Parameters
        ----------
        factors : array-like of int, shape (n, n_factors)

        Returns
        -------
        X : ndarray, shape (n, ...)
            Whatever ``render`` returns, one observation per row of ``factors``.
        """
        factors = self.check_factors(factors)
        X = self._render(factors)
        if len(X) != len(factors):
            raise ValueError(f"render returned {len(X)} observations for {len(factors)} factor rows")
        return X

    def sample(self, n_samples, random_state=None):
        """Draw factors and render their observations.

        Parameters
        ----------
        n_samples : int
        random_state : None, int, numpy.random.Generator or RandomState

        Returns
        -------
        X : ndarray, shape (n_samples, ...)
        factors : ndarray of int64, shape (n_samples, n_factors)
        """
        factors = self.sample_factors(n_samples, random_state)
        return self.render(factors), factors

    def sample_fixed_factor(self, factor_index, n_batches, batch_size, random_state=None):
        """Batches in each of which one factor is held at one random class.

        Every other factor varies independently and uniformly; the fixed
        class is drawn uniformly per batch. This is the batch the FactorVAE
        metric (Kim and Mnih 2018) feeds the representation.

        Parameters
        ----------
        factor_index : int or array-like of int, shape (n_batches,)
            The factor held fixed, one for all batches or one per batch.
        n_batches : int
        batch_size : int
        random_state : None, int, numpy.random.Generator or RandomState

        Returns
        -------
        factors : ndarray of int64, shape (n_batches, batch_size, n_factors)
            Render them with ``render(factors.reshape(-1, n_factors))``.
        """
        rng = _as_generator(random_state)
        factor_index = np.broadcast_to(np.asarray(factor_index, dtype=np.int64), (int(n_batches),))
        if np.any(factor_index < 0) or np.any(factor_index >= self.n_factors):
            raise ValueError(f"factor_index must be in 0..{self.n_factors - 1}")
        factors = self.sample_factors(int(n_batches) * int(batch_size), rng)
        factors = factors.reshape(int(n_batches), int(batch_size), self.n_factors)
        rows = np.arange(int(n_batches))
        # As disentanglement_lib does: the first row's class is copied to the batch.
        factors[rows, :, factor_index] = factors[rows, 0, factor_index][:, None]
        return factors

    @classmethod
    def from_grid(cls, X, factors, factor_sizes=None, factor_names=None, factor_values=None):
        """A factor data set from stored observations covering the full grid.

        Parameters
        ----------
        X : array-like, shape (n_combinations, ...)
            One observation per combination of factors, in any order.
        factors : array-like of int, shape (n_combinations, n_factors)
            The factor classes of each row of ``X``.
        factor_sizes : sequence of int, optional
            By default ``factors.max(axis=0) + 1``.
        factor_names, factor_values : optional
            As in :class:`FactorDataset`.

        Returns
        -------
        dataset : FactorDataset
            Rendering looks the rows up in ``X`` (no copy of ``X`` is made).
        """
        factors = np.asarray(factors, dtype=np.int64)
        if factor_sizes is None:
            factor_sizes = factors.max(axis=0) + 1
        sizes = tuple(int(s) for s in factor_sizes)
        flat = np.ravel_multi_index(tuple(factors.T), sizes)
        lookup = np.full(int(np.prod(sizes, dtype=np.int64)), -1, dtype=np.int64)
        lookup[flat] = np.arange(len(flat))
        if np.any(lookup < 0) or len(flat) != len(lookup):
            raise ValueError("factors must hold every combination of factor classes exactly once")

        def render(f):
            return X[lookup[np.ravel_multi_index(tuple(f.T), sizes)]]

        return cls(sizes, render, factor_names=factor_names, factor_values=factor_values)
