"""The training loop of :class:`hvae.HierarchicalVAE`.

``fit`` runs :meth:`Trainer.run_epochs` (epochs, validation, early
stopping, progress, callbacks) and ``partial_fit`` :meth:`Trainer.run_pass`;
both train in passes (:meth:`Trainer.train_pass`: one
:meth:`hvae.Model.fit` epoch per block of rows) and record each in the
estimator's ``history_``, whose keys are declared here once.
:func:`fitted_state` and :func:`restore_fitted_state` put back the
estimator's fitted attributes when a fit fails before it trained anything.
"""
import math
import sys
import time

import numpy as np

from ._chunks import ChunkedRows, chunk_order
from ._native import DISCRIMINATOR_RECORD_KEYS, EPOCH_RECORD_KEYS, TCVAE_RECORD_KEYS

#: Keys of Model.fit's records that only combine the blocks of a pass.
_BLOCK_KEYS = ("n_rows", "complete")
#: The keys of ``history_``, one list each, one entry per epoch: those of
#: Model.fit's records (EPOCH_RECORD_KEYS, declared by the C core) and the
#: epoch's KL weight.
HISTORY_KEYS = tuple(key for key in EPOCH_RECORD_KEYS if key not in _BLOCK_KEYS) + ("beta",)
#: The keys added to ``history_`` once a fit has validation rows.
VALIDATION_KEYS = ("val_elbo", "val_reconstruction", "val_kl")
#: The keys of a pass record that are per-row averages of its blocks' records.
_MEAN_KEYS = ("loss", "objective", "elbo", "reconstruction")


def draws_per_row(params):
    """The draws per row of a training step: n_importance_samples for
    objective='iwae', n_mc_samples for the ELBO."""
    if params["objective"] == "iwae":
        return params["n_importance_samples"]
    return params["n_mc_samples"]


def workspace_rows(params, n_rows):
    """The workspace rows a fit over blocks of at most n_rows rows needs:
    a minibatch's rows times its draws per row."""
    return min(params["batch_size"], n_rows) * draws_per_row(params)


def new_history(model=None):
    """An empty ``history_`` (with the DISCRIMINATOR_RECORD_KEYS, declared
    by the C core, for a model with a discriminator)."""
    history = {key: [] for key in HISTORY_KEYS}
    if model is not None and model.discriminator_hidden is not None:
        history.update({key: [] for key in DISCRIMINATOR_RECORD_KEYS})
    return history


def pass_record(block_records, beta, seconds=None):
    """The history_ record of a pass from its blocks' Model.fit records:
    per-row averages (the blocks' averages weighted by their rows), summed
    minibatches and rows."""
    if len(block_records) == 1:
        record = dict(block_records[0])
    else:
        n_rows = sum(r["n_rows"] for r in block_records)
        weights = [r["n_rows"] / n_rows for r in block_records]
        mean_keys = _MEAN_KEYS + tuple(k for k in DISCRIMINATOR_RECORD_KEYS + TCVAE_RECORD_KEYS
                                       if k in block_records[0])
        record = {key: math.fsum(w * r[key] for w, r in zip(weights, block_records))
                  for key in mean_keys}
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


def _fitted_attributes(estimator):
    return [key for key in estimator.__dict__ if key.endswith("_") and not key.startswith("_")]


def fitted_state(estimator):
    """The estimator's fitted attributes (those ending in ``_``), for
    :func:`restore_fitted_state`; ``history_`` copied (a fit appends to its
    lists in place)."""
    state = {key: estimator.__dict__[key] for key in _fitted_attributes(estimator)}
    if isinstance(state.get("history_"), dict):
        state["history_"] = {key: list(value) for key, value in state["history_"].items()}
    return state


def restore_fitted_state(estimator, state):
    """Puts back the fitted attributes as :func:`fitted_state` saw them,
    dropping any added since."""
    for key in _fitted_attributes(estimator):
        del estimator.__dict__[key]
    estimator.__dict__.update(state)


class EarlyStopping:
    """Tracks the best validation ELBO of a fit and the parameters it had.

    Parameters
    ----------
    model : hvae.Model
    tol : float
        Improvement (nats per sample) that counts as one.
    n_iter_no_change : int
        Epochs without one before training stops.
    """

    def __init__(self, model, tol, n_iter_no_change):
        self.model, self.tol, self.n_iter_no_change = model, tol, n_iter_no_change
        self.best_elbo, self.best_parameters, self.best_epoch, self.n_stale = -np.inf, None, None, 0

    def update(self, epoch, validation_elbo):
        """Records an epoch's validation ELBO; returns whether to stop."""
        if validation_elbo > self.best_elbo + self.tol:
            self.best_elbo, self.n_stale = validation_elbo, 0
            self.best_parameters = np.copy(self.model.parameters)
            self.best_epoch = epoch
        else:
            self.n_stale += 1
        return self.n_stale >= self.n_iter_no_change

    def restore_best(self):
        """Puts the best epoch's parameters back into the model, if any."""
        if self.best_parameters is not None:
            self.model.parameters[:] = self.best_parameters


#: Seconds between fit's progress lines when they are plain lines.
PLAIN_LINE_SECONDS = 5.0


def _in_notebook():
    """Whether tqdm.auto shows a Jupyter widget (its notebook tqdm)."""
    from tqdm import auto, std  # noqa: F401  (tqdm.auto imports tqdm.autonotebook quietly)

    return sys.modules["tqdm.autonotebook"].tqdm is not std.tqdm


def _is_terminal(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


class _LineWriter:
    """A text stream for tqdm that turns its carriage-return redraws into
    plain lines: each redraw of the bar becomes one line, blank redraws
    (clearing) none."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        getattr(self.stream, "flush", lambda: None)()


class ProgressBar:
    """fit's progress at ``verbose >= 1``: a tqdm bar (rows trained, the
    epoch, the last ELBOs) in a terminal or Jupyter (a widget). When stderr
    is a file or a pipe, tqdm's carriage-return redraws would pile up there:
    the bar is then written as plain lines, one at most every
    PLAIN_LINE_SECONDS and one at the end. At ``verbose >= 2`` also one line
    per epoch on stdout."""

    def __init__(self, n_epochs, n_rows, verbose, stream=None):
        from tqdm.auto import tqdm

        self.n_epochs, self.verbose = n_epochs, verbose
        stream = sys.stderr if stream is None else stream
        options = dict(file=stream)
        if not _is_terminal(stream) and not _in_notebook():
            options = dict(file=_LineWriter(stream), mininterval=PLAIN_LINE_SECONDS,
                           maxinterval=math.inf)
        self.bar = tqdm(total=n_epochs * n_rows, unit="row", unit_scale=True,
                        desc=f"epoch 1/{n_epochs}", leave=True, **options)
        self.stream = stream
        self.update = self.bar.update

    def report(self, epoch_in_call, record, validation):
        """Shows a finished epoch (its 0-based index in this call)."""
        upcoming = min(epoch_in_call + 2, self.n_epochs)
        self.bar.set_description(f"epoch {upcoming}/{self.n_epochs}", refresh=False)
        postfix = {"elbo": f"{record['elbo']:.3f}"}
        if validation is not None:
            postfix["val_elbo"] = f"{validation['elbo']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        if self.verbose >= 2:
            kl = " ".join(f"{k:.2f}" for k in record["kl"])
            line = (f"epoch {epoch_in_call + 1}/{self.n_epochs}  elbo {record['elbo']:.3f}  "
                    f"reconstruction {record['reconstruction']:.3f}  kl [{kl}]")
            if validation is not None:
                line += f"  val_elbo {validation['elbo']:.3f}"
            self.bar.write(line + f"  ({record['seconds']:.2f} s)", file=sys.stdout)

    def close(self, epochs_run):
        """Ends the bar at the last epoch run in this call."""
        self.bar.set_description(f"epoch {epochs_run}/{self.n_epochs}", refresh=False)
        self.bar.close()

    def note(self, text):
        """A line after the bar (once closed): how the fit ended."""
        print(text, file=self.stream, flush=True)


def early_stopping_note(stopping, stopped, epochs_run, first_epoch, tol):
    """fit's line on early stopping at ``verbose >= 1``: whether it fired and
    which epoch's parameters the model holds (epochs counted from 1 in this
    call, as the progress shows them; ``first_epoch`` is the call's first
    index in history_)."""
    if stopping.best_epoch is None:
        return None
    best = stopping.best_epoch - first_epoch + 1
    restored = (f"the parameters of epoch {best} (val_elbo {stopping.best_elbo:.3f}; "
                f"best_epoch_={stopping.best_epoch})")
    if stopped:
        return (f"early stopping after epoch {epochs_run}: the validation ELBO did not "
                f"improve by more than tol={tol:g} for {stopping.n_iter_no_change} epochs; "
                f"restored {restored}")
    if best == epochs_run:
        return f"early stopping did not fire; the last epoch, {epochs_run}, was the best"
    return (f"early stopping did not fire in {epochs_run} epochs; restored {restored}, "
            "the best validation ELBO")


class Trainer:
    """Trains an estimator's ``model_`` in passes over rows and records each
    pass in its ``history_`` and ``n_iter_``.

    Parameters
    ----------
    estimator : HierarchicalVAE
        Its ``model_``, ``history_``, ``n_iter_`` and ``best_epoch_`` are
        updated.
    params : dict
        The estimator's parameters as validated at the start of the call
        (hvae._params.validate_parameters): the training uses these, so that
        a callback's ``set_params`` applies to the next call, not halfway
        through this one. ``params["callbacks"]`` (a list) are called as
        ``callback(epoch, history_)`` after every recorded epoch.
    """

    def __init__(self, estimator, params):
        self.estimator = estimator
        self.params = params
        self.callbacks = params["callbacks"]

    @property
    def model(self):
        return self.estimator.model_

    # ---- fit: epochs ---------------------------------------------------------------

    def run_epochs(self, train, val):
        """fit's epochs: a pass over train, the validation terms of val,
        early stopping, progress and callbacks, n_epochs times."""
        est, p = self.estimator, self.params
        parallel = getattr(train, "parallel", None)
        session = parallel[0] if parallel is not None else None
        stopping = (EarlyStopping(self.model, p["tol"], p["n_iter_no_change"])
                    if p["early_stopping"] and val is not None else None)
        bar = None
        if p["verbose"] >= 1 and (session is None or session.rank == 0):
            bar = ProgressBar(p["n_epochs"], train.n_rows if session is None else parallel[1],
                              p["verbose"])
        record = None  # a pass's record not yet in history_
        first_epoch, stopped_early = est.n_iter_, False
        try:
            # One pass per epoch, so that validation and callbacks run between
            # passes and may use the model (it serves one call at a time); the
            # optimizer and generator carry over, so on data in memory this
            # trains exactly as one Model.fit call with n_epochs would.
            for epoch_in_call in range(p["n_epochs"]):
                record = self.train_pass(train, bar.update if bar is not None else None)
                validation = self.validation_terms(val) if val is not None else None
                self.append_epoch(record, validation)
                record, appended = None, record
                epoch = est.n_iter_ - 1
                stop = False
                if stopping is not None:
                    stop = stopped_early = stopping.update(epoch, validation["elbo"])
                    est.best_epoch_ = stopping.best_epoch
                if bar is not None:
                    bar.report(epoch_in_call, appended, validation)
                # Every callback sees every epoch, even after one asked to stop.
                for callback in self.callbacks:
                    if callback(epoch, est.history_) is False:
                        stop = True
                if session is not None:  # all ranks stop together
                    stop = session.any(stop)
                if stop:
                    break
        finally:
            # Whatever stopped training, keep the epochs that happened (a pass
            # cut short is recorded by train_pass).
            if record is not None:
                self.append_epoch(record, None)
            if bar is not None:
                bar.close(est.n_iter_ - first_epoch)
            if stopping is not None:
                stopping.restore_best()
                if bar is not None:
                    note = early_stopping_note(stopping, stopped_early, est.n_iter_ - first_epoch,
                                               first_epoch, est.tol)
                    if note is not None:
                        bar.note(note)

    # ---- partial_fit: one pass -------------------------------------------------------

    def run_pass(self, rows):
        """partial_fit's pass over rows, recorded, then the callbacks."""
        self.append_epoch(self.train_pass(rows), None)
        for callback in self.callbacks:
            callback(self.estimator.n_iter_ - 1, self.estimator.history_)

    # ---- a pass ------------------------------------------------------------------------

    def epoch_beta(self, epoch):
        """The KL weight of an epoch (counted over every fit of the model):
        beta * min(1, epoch / kl_warmup_epochs), so 0 in the first epoch and
        beta from epoch kl_warmup_epochs on; beta without warm-up."""
        p = self.params
        if p["kl_warmup_epochs"] == 0:
            return float(p["beta"])
        return float(p["beta"]) * min(1.0, epoch / p["kl_warmup_epochs"])

    def train_pass(self, rows, progress=None):
        """One pass of minibatch updates over rows, block by block (one
        Model.fit epoch per chunk, chunks in ``chunk_order``); the unit of
        both fit (one per epoch) and partial_fit (one per call).

        Returns the pass's record for history_. If the pass stops with an
        exception after some minibatches, their record is appended to
        history_ (NaN validation terms) before the exception propagates.
        """
        est = self.estimator
        beta = self.epoch_beta(est.n_iter_)
        order = chunk_order(rows.n_chunks, self.model.seed, est.n_iter_, self.params["shuffle"])
        chunked = isinstance(rows, ChunkedRows)
        block_records = []  # Model.fit appends each block's record as it is made
        # beta-TCVAE's data set size: all the rows of the pass (over every
        # rank in a data-parallel fit, whose shard holds only some).
        parallel = getattr(rows, "parallel", None)
        self.n_data = float(rows.n_rows if parallel is None else parallel[1])
        started = time.perf_counter()
        try:
            for _, _, X_block, C_block in rows.blocks(order):
                self._train_block(X_block, C_block, beta, block_records, progress,
                                  getattr(rows, "parallel", None))
        except BaseException:
            if block_records:
                seconds = time.perf_counter() - started if chunked else None
                self.append_epoch(pass_record(block_records, beta, seconds), None)
            raise
        seconds = time.perf_counter() - started if chunked else None
        return pass_record(block_records, beta, seconds)

    def _train_block(self, X, C, beta, records, progress, parallel=None):
        """One Model.fit pass over rows in memory (float32 C-contiguous X,
        conditions C or None); its record is appended to records. With
        parallel = (session, n_global, shard_start), X is this rank's shard
        of a data-parallel pass."""
        p = self.params
        extra = {}
        if parallel is not None:
            session, n_global, shard_start = parallel
            extra = dict(reduce=session.reduce, n_global=n_global, shard_start=shard_start)
        self.model.fit(X, n_epochs=1, batch_size=p["batch_size"],
                       learning_rate=p["learning_rate"], optimizer=p["optimizer"],
                       beta=beta, weight_decay=p["weight_decay"], shuffle=p["shuffle"],
                       history=records, progress=progress, objective=p["objective"],
                       n_samples=draws_per_row(p), free_bits=p["free_bits"], cond=C,
                       temperature=p["temperature"], temperature_min=p["temperature_min"],
                       temperature_decay=p["temperature_decay"],
                       straight_through=bool(p["straight_through"]),
                       gradient_estimator=p["gradient_estimator"],
                       score_baseline=p["score_baseline"],
                       prior_lr_scale=(p["prior_learning_rate"] or p["learning_rate"])
                       / p["learning_rate"], tc_weight=p["tc_weight"],
                       tcvae_weights=p["tcvae_weights"],
                       n_data=self.n_data if p["tcvae_weights"] is not None else 0.0,
                       discriminator_learning_rate=p["discriminator_learning_rate"],
                       discriminator_betas=tuple(p["discriminator_betas"]), **extra)

    # ---- validation and history ------------------------------------------------------

    def validation_terms(self, rows):
        """Mean ELBO, reconstruction and per-layer KL of the validation rows,
        block by block."""
        elbo = reconstruction = 0.0
        kl = np.zeros(len(self.model.latent_dims))
        for _, _, X_val, C_val in rows.blocks():
            terms = self.model.elbo_terms(X_val, cond=C_val)
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

    def add_validation_history(self):
        """Adds the validation keys to history_, NaN for epochs without them."""
        history = self.estimator.history_
        n_layers = len(self.model.latent_dims)
        for key in VALIDATION_KEYS:
            if key not in history:
                missing = [math.nan] * n_layers if key == "val_kl" else math.nan
                history[key] = [missing for _ in range(len(history["elbo"]))]

    def append_epoch(self, record, validation):
        """Records a pass (and its validation terms, NaN when None) in
        history_ and counts it in n_iter_."""
        history = self.estimator.history_
        for key in HISTORY_KEYS:
            history[key].append(record[key])
        for key in DISCRIMINATOR_RECORD_KEYS:
            if key in history:
                history[key].append(record[key])
        # beta-TCVAE's terms (TCVAE_RECORD_KEYS, declared by the C core):
        # added by its first pass, NaN for the passes without them.
        for key in TCVAE_RECORD_KEYS:
            if key in record and key not in history:
                history[key] = [math.nan] * (len(history["elbo"]) - 1)
            if key in history:
                history[key].append(record.get(key, math.nan))
        if "val_elbo" in history:
            if validation is None:
                n_layers = len(self.model.latent_dims)
                validation = {"elbo": math.nan, "reconstruction": math.nan,
                              "kl": [math.nan] * n_layers}
            history["val_elbo"].append(validation["elbo"])
            history["val_reconstruction"].append(validation["reconstruction"])
            history["val_kl"].append(validation["kl"])
        self.estimator.n_iter_ += 1
