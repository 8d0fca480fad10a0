"""How ``y`` becomes the condition rows of a conditional model.

A conditional model takes, with every row of X, a row of conditions: either
the one-hot code of a class label over the sorted ``classes``, or the
columns of an (n_samples, n_conditions) array as given. One
:class:`ConditionCode` says which, and turns y into rows for every method
that takes y (fit, partial_fit, validation_data, transform, sample...).
"""
import numpy as np
from sklearn.utils.validation import check_array

from ._checks import check_finite


def one_hot(labels, classes):
    """(n, len(classes)) float32 one-hot rows of ``labels``, which must all
    be in the sorted array ``classes``."""
    codes = np.searchsorted(classes, labels)
    C = np.zeros((len(labels), len(classes)), dtype=np.float32)
    C[np.arange(len(labels)), codes] = 1.0
    return C


def is_labels(y):
    """Whether y (an ndarray) holds class labels rather than condition rows."""
    return y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1
                           and not np.issubdtype(y.dtype, np.floating))


class ConditionCode:
    """The conditions of a model: one-hot over ``classes``, or given columns.

    Parameters
    ----------
    classes : ndarray of shape (n_classes,) or None
        The sorted class labels whose one-hot rows are the conditions; None
        when y holds the condition rows themselves.
    n_conditions : int
        Columns of a condition row (0: the model is not conditional).
    """

    def __init__(self, classes, n_conditions):
        self.classes = classes
        self.n_conditions = int(n_conditions)

    @classmethod
    def unconditional(cls):
        """The code of a model without conditions."""
        return cls(None, 0)

    @classmethod
    def learn(cls, y, n, classes=None, infer_classes=True):
        """The code of a new conditional model trained on y for n rows.

        y holds class labels of shape (n,) (one-hot over ``classes``, else,
        when ``infer_classes``, over np.unique(y)) or conditions of shape
        (n, n_conditions).
        """
        if y is None:
            raise ValueError("conditional=True needs y: class labels of shape (n_samples,) "
                             "or conditions of shape (n_samples, n_conditions)")
        y_arr = np.asarray(y)
        if not is_labels(y_arr):
            if y_arr.ndim != 2:
                raise ValueError(f"y must be class labels (n_samples,) or conditions "
                                 f"(n_samples, n_conditions); got shape {y_arr.shape}")
            if classes is not None:
                raise ValueError("classes applies to class labels; y holds conditions of "
                                 "shape (n_samples, n_conditions)")
            return cls(None, y_arr.shape[1])
        if classes is None:
            if not infer_classes:
                raise ValueError("classes must be passed on the first call to partial_fit "
                                 "when y holds class labels: all the classes, so that later "
                                 "calls use the same one-hot code")
            labels = y_arr.ravel()
            if labels.shape[0] != n:
                raise ValueError(f"y has {labels.shape[0]} labels for {n} rows")
            if labels.dtype.kind == "f":
                check_finite(labels.reshape(-1, 1), "y")
            classes = np.unique(labels)
        return cls(classes, len(classes))

    def rows(self, y, n, name="y"):
        """The conditions of n rows from y, as a function (first, end) ->
        float32 C-contiguous rows first:end (one-hot rows are made when they
        are asked for, so that data read in chunks never hold them all);
        None for an unconditional model.

        With ``classes``, y may be one label for all n rows.
        """
        if self.n_conditions == 0:
            return None
        if y is None:
            raise ValueError("this model was fitted with conditions: pass y (class labels "
                             "or conditions) for these rows too")
        y_arr = np.asarray(y)
        if self.classes is not None and (y_arr.ndim <= 1 or y_arr.shape[1:] == (1,)):
            return self._label_rows(y_arr, n, name)
        if is_labels(y_arr):
            raise ValueError("this model was fitted with conditions of shape (n_samples, "
                             f"n_conditions), not class labels; pass {name} as such an array")
        if y_arr.ndim != 2:
            raise ValueError(f"{name} must be class labels (n_samples,) or conditions "
                             f"(n_samples, n_conditions); got shape {y_arr.shape}")
        with np.errstate(over="ignore"):
            C = check_array(y_arr, dtype=np.float32, order="C", input_name=name,
                            ensure_all_finite=False)
        check_finite(C, name)
        if C.shape != (n, self.n_conditions):
            raise ValueError(f"{name} must have shape ({n}, {self.n_conditions}); "
                             f"got {C.shape}")
        return lambda first, end: C[first:end]

    def _label_rows(self, y_arr, n, name):
        if y_arr.ndim == 0:
            labels = np.full(n, y_arr.item(), dtype=self.classes.dtype)
        else:
            labels = y_arr.ravel()
        if labels.shape[0] != n:
            raise ValueError(f"{name} has {labels.shape[0]} labels for {n} rows")
        unknown = ~np.isin(labels, self.classes)
        if np.any(unknown):
            raise ValueError(f"{name} holds labels not in classes (labels not seen in fit, "
                             f"nor passed to partial_fit): {np.unique(labels[unknown])[:5]}")
        classes = self.classes
        return lambda first, end: one_hot(labels[first:end], classes)

    def all_rows(self, y, n, name="y"):
        """The conditions of n rows from y as one (n, n_conditions) float32
        array, or None for an unconditional model."""
        rows = self.rows(y, n, name)
        return None if rows is None else rows(0, n)
