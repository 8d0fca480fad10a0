"""Posterior collapse: measured at the end of a fit, explained in a warning.

A latent layer has collapsed when the encoder's posterior means no longer
vary with the data: q(z_i | x) is the same for every row, the layer's KL
term is (near) zero and the decoder ignores it. The estimator counts the
*active units* of each layer (Burda et al. 2016: dimensions whose posterior
mean varies over the data by more than ``ACTIVE_UNIT_THRESHOLD``) at the end
of every ``fit``, on a fixed sample of at most ``MAX_SAMPLE_ROWS`` training
rows (one encoder pass over them: a few milliseconds, once per fit), stores
them in ``active_units_`` and warns with :class:`PosteriorCollapseWarning`
when a layer has none, once the model has trained ``FIT_MIN_BATCHES``
minibatches (fewer updates leave a model untrained, not collapsed).

Why at the end and not every epoch: on the 1797 digits, the encoder pass
over 1000 rows costs 4-8% of a training epoch when the latent widths are
multiples of 16, but 0.7 to 1.1 epochs for other widths (the README's
headline, latent_dims=(8, 4)): evaluation computes every row on its own (a
row's score never depends on its neighbours), with a kernel that computes
the output columns past the last multiple of 16 one scalar multiply-add at
a time. Too much to pay every epoch on small data.

``partial_fit`` is called once per block of a stream, often on a few hundred
rows: measuring after every call would cost about as much as the call. It
uses the KL terms its pass recorded anyway (free): once the model has
trained ``PARTIAL_FIT_MIN_BATCHES`` minibatches (before that, upper layers
are often still inactive on their way to being used), a layer whose KL in
the pass is below ``KL_FLAG`` nats has its active units counted on the
call's rows, and the warning fires if it has none.
"""
import warnings

import numpy as np

from ._chunks import ChunkedRows, InMemoryRows

#: A unit is active when the variance over rows of its posterior mean
#: exceeds this (Burda et al. 2016; HierarchicalVAE.active_units' default).
ACTIVE_UNIT_THRESHOLD = 0.01
#: Rows on which the active units of a fit are counted, at most.
MAX_SAMPLE_ROWS = 1000
#: Contiguous runs the sample of rows read in chunks is made of.
_CHUNKED_RUNS = 8
#: fit warns only once the model has trained this many minibatches: a model
#: of fewer updates is untrained rather than collapsed (scikit-learn's
#: estimator checks fit a few rows of noise for a few dozen).
FIT_MIN_BATCHES = 100
#: partial_fit looks for collapse only once the model has trained this many
#: minibatches.
PARTIAL_FIT_MIN_BATCHES = 1000
#: partial_fit counts a layer's active units when its KL term in the pass is
#: below this many nats (a layer in use carries several).
KL_FLAG = 0.5


class PosteriorCollapseWarning(UserWarning):
    """A fitted model has latent layers with no active units.

    Raised (as a warning) at the end of :meth:`HierarchicalVAE.fit` or
    :meth:`HierarchicalVAE.partial_fit`. The message names each collapsed
    layer with its active units and KL term, and the settings that help.
    Silence it with ``warnings.filterwarnings("ignore",
    category=hvae.PosteriorCollapseWarning)``.
    """


def sample_rows(rows, max_rows=MAX_SAMPLE_ROWS):
    """(X, C) of at most ``max_rows`` training rows, spread over them: every
    row for fewer, else evenly spaced rows in memory, or ``_CHUNKED_RUNS``
    evenly spaced contiguous runs of data read in chunks (a few reads, each
    checked like a chunk)."""
    n = rows.n_rows
    if isinstance(rows, InMemoryRows):
        if n <= max_rows:
            return rows.X, rows.C
        index = np.linspace(0, n - 1, max_rows).round().astype(np.intp)
        return rows.X[index], None if rows.C is None else rows.C[index]
    assert isinstance(rows, ChunkedRows)
    take = min(n, max_rows)
    runs = min(_CHUNKED_RUNS, take)
    lengths = [take // runs + (k < take % runs) for k in range(runs)]
    X_parts, C_parts = [], []
    for k, length in enumerate(lengths):
        first = rows.start + (n - length) * k // max(1, runs - 1)
        run = ChunkedRows(rows.X, first, first + length, length, rows.conditions,
                          rows.bernoulli, rows.name)
        for _, _, X_block, C_block in run.blocks():
            X_parts.append(X_block.copy())
            C_parts.append(C_block)
    C = None if C_parts[0] is None else np.ascontiguousarray(np.concatenate(C_parts))
    return np.ascontiguousarray(np.concatenate(X_parts)), C


def count_active_units(model, X, C, session=None, threshold=ACTIVE_UNIT_THRESHOLD):
    """(active units per layer, rows counted) of ``model`` over the rows X
    (conditions C): the dimensions whose posterior mean has a variance above
    ``threshold``. With an hvae.distributed session, over every rank's rows
    (pooled moments; every rank gets the same counts)."""
    layers = model.encode(X, cond=C)
    moments = [float(X.shape[0])]
    for mu, _ in layers:
        mu = mu.astype(np.float64)
        moments.extend(np.sum(mu, axis=0))
        moments.extend(np.sum(mu * mu, axis=0))
    moments = np.asarray(moments if session is None
                         else session.sum(moments, "counting active units"), np.float64)
    n, counts, offset = moments[0], [], 1
    for mu, _ in layers:
        d = mu.shape[1]
        mean = moments[offset:offset + d] / n
        variance = moments[offset + d:offset + 2 * d] / n - mean * mean
        counts.append(int(np.sum(variance > threshold)))
        offset += 2 * d
    return counts, int(n)


def remedies(estimator):
    """The settings of hvae that counter collapse, as advice for this
    estimator's parameters, most effective first (on the digits, the
    collapsing ``latent_dims=(32, 16), hidden_dims=(512, 256)`` for 20
    epochs keeps [30, 12] units active with free_bits=0.5, [27, 0] with
    kl_warmup_epochs=10 and [7, 2] of (8, 4); more epochs or smaller steps
    alone leave it at [0, 0])."""
    advice = []
    if estimator.beta > 1:
        advice.append(f"a smaller beta ({estimator.beta:g} now)")
    if estimator.objective == "elbo":
        if estimator.free_bits == 0:
            advice.append("free_bits=0.5 (each layer's KL counts as at least 0.5 nats in the "
                          "loss, so nothing is gained by emptying a layer)")
        if estimator.kl_warmup_epochs == 0:
            advice.append("kl_warmup_epochs=10 (the KL weight rises from 0 over the first "
                          "epochs, so the decoder learns to use the latents first)")
    advice.append(f"fewer latent dimensions (latent_dims={tuple(estimator.model_.latent_dims)} "
                  "now)")
    advice.append(f"more epochs (n_epochs={estimator.n_epochs} now) or more, smaller steps: "
                  f"a smaller batch_size ({estimator.batch_size} now) or learning_rate "
                  f"({estimator.learning_rate:g} now)")
    return advice


def collapse_message(estimator, counts, where, n_rows):
    """The warning's text: every collapsed layer, then the remedies."""
    dims = estimator.model_.latent_dims
    collapsed = [i for i, count in enumerate(counts) if count == 0]
    history, best = estimator.history_, estimator.best_epoch_
    if best is not None and "val_kl" in history:
        # Early stopping restored that epoch's parameters: its validation KL.
        kl, kind = history["val_kl"][best], f" (validation rows, epoch {best + 1})"
    else:
        kl, kind = history["kl"][-1], ""
    layers = "; ".join(f"layer {i + 1} (z_{i + 1}): 0 of {dims[i]} units active, "
                       f"KL {kl[i]:.3f} nats{kind}" for i in collapsed)
    effect = ("the decoder ignores the latent code, so every sample looks the same"
              if 0 in collapsed or len(collapsed) == len(dims) else
              "those layers carry no information about the data")
    advice = "; ".join(remedies(estimator))
    return (f"{type(estimator).__name__}: posterior collapse after {where}: {layers} "
            f"(active units per layer: {counts}, counted over {n_rows} "
            f"training rows; see active_units_). The posterior of "
            f"{'that layer' if len(collapsed) == 1 else 'those layers'} is the same for "
            f"every row: {effect}. Try: {advice}.")


def check_posterior_collapse(estimator, rows, incremental, trained):
    """Counts ``estimator.active_units_`` after a fit (``incremental=False``)
    or partial_fit that trained on ``rows`` (``trained``: at least one epoch
    in this call; else None), and warns with PosteriorCollapseWarning when a
    layer has no active units (see the module's docstring for when
    partial_fit counts)."""
    history = estimator.history_
    parallel = getattr(rows, "parallel", None)
    session = None if parallel is None else parallel[0]
    estimator.active_units_ = None
    if not trained:
        return
    kl = history["kl"][-1]
    if incremental and (sum(history["n_batches"]) < PARTIAL_FIT_MIN_BATCHES
                        or min(kl) >= KL_FLAG):
        return
    X, C = sample_rows(rows)
    counts, n_rows = count_active_units(estimator.model_, X, C, session)
    estimator.active_units_ = counts
    if (0 in counts and sum(history["n_batches"]) >= FIT_MIN_BATCHES
            and (session is None or session.rank == 0)):
        n = estimator.n_iter_
        where = f"{n} {'epoch' if n == 1 else 'epochs'}" + (" (partial_fit passes)"
                                                            if incremental else "")
        # Pointed at the user's call: this function <- _fit_locked <- _fit
        # <- fit or partial_fit <- the caller.
        warnings.warn(collapse_message(estimator, counts, where, n_rows),
                      PosteriorCollapseWarning, stacklevel=5)
