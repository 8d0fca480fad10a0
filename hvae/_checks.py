"""hvae's own message for NaN and infinity in the data.

scikit-learn's generic message ("Input X contains NaN. HierarchicalVAE does
not accept missing values encoded as NaN natively...") recommends estimators
that handle missing values, which a VAE is not. :func:`check_finite` says
what it found (NaN, infinity, how many), where (the first rows and columns)
and what to do (impute in a Pipeline, or drop the rows).
"""
import numpy as np

#: Rows and columns a message names, at most.
_SHOWN = 5


def _some(indices, what):
    shown = ", ".join(str(int(i)) for i in indices[:_SHOWN])
    more = f", ... ({len(indices)} {what})" if len(indices) > _SHOWN else ""
    return shown + more


def check_finite(A, name="X"):
    """Raises ValueError when the float32 array A (n, d) holds NaN or
    infinity, naming the counts, the first rows and columns, and the
    remedies.

    Parameters
    ----------
    A : ndarray of shape (n, d), float32
        Values beyond float32's range are infinite already.
    name : str
        How the message names A (``X``, ``validation_data``, ``y``).
    """
    # A float64 sum of float32 values is finite exactly when they all are:
    # no mask for the usual, clean case.
    if A.size == 0 or np.isfinite(np.sum(A, dtype=np.float64)):
        return
    details = describe_nonfinite(A, name)
    if details is not None:  # None: a float64 A whose sum overflowed
        raise ValueError(f"{name} contains {details}")


def describe_nonfinite(A, name, first_row=0):
    """What NaN and infinity A (n, d) holds, where, and what to do, as the
    end of a sentence ("NaN (3 values) in 2 of 100 rows (rows 5, 9; column
    1). hvae needs finite values: ..."); None when A is finite. Rows are
    numbered from ``first_row`` (for a chunk of a larger array)."""
    bad = ~np.isfinite(A)
    if not bad.any():
        return None
    n_nan = int(np.count_nonzero(np.isnan(A)))
    n_inf = int(np.count_nonzero(bad)) - n_nan
    found = []
    if n_nan:
        found.append(f"NaN ({n_nan} {'value' if n_nan == 1 else 'values'})")
    if n_inf:
        found.append(f"infinity ({n_inf} {'value' if n_inf == 1 else 'values'}; values "
                     "beyond float32's range, about 3.4e38, count as infinite)")
    bad2 = bad.reshape(A.shape[0], -1)
    rows = np.flatnonzero(bad2.any(axis=1)) + first_row
    columns = np.flatnonzero(bad2.any(axis=0))
    where = f"{'row' if len(rows) == 1 else 'rows'} {_some(rows, 'rows')}"
    if A.ndim == 2 and A.shape[1] > 1:
        where += f"; {'column' if len(columns) == 1 else 'columns'} {_some(columns, 'columns')}"
    if name.startswith("y"):
        remedy = ("drop those rows from X and y alike "
                  f"(keep = np.isfinite({name}).all(axis=-1))")
    else:
        remedy = ("impute them, e.g. "
                  + (f"{name}[np.isinf({name})] = np.nan first, then " if n_inf else "")
                  + "make_pipeline(SimpleImputer(), HierarchicalVAE(...)) with "
                  "sklearn.impute.SimpleImputer and sklearn.pipeline.make_pipeline, or drop "
                  f"those rows ({name}[np.isfinite({name}).all(axis=1)])")
    return (f"{' and '.join(found)} in {len(rows)} of {A.shape[0]} rows ({where}). "
            f"hvae needs finite values: {remedy}.")
