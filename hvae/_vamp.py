"""The estimator's side of the VampPrior (``prior='vamp'``, csrc/prior_vamp.c):
which Model options it takes, and where its pseudo-inputs start."""
import numpy as np

#: The prior's name in the C core's PRIORS.
VAMP = "vamp"


def vamp_model_options(options):
    """Model options with ``n_pseudo_inputs`` as the Model takes and reports
    it: the estimator's value for the VampPrior, 0 for another prior (which
    has no pseudo-inputs)."""
    if options["prior"] != VAMP:
        options["n_pseudo_inputs"] = 0
    return options


def init_pseudo_inputs(model, rows):
    """Sets a new VampPrior model's pseudo-inputs to K random training rows.

    Parameters
    ----------
    model : hvae.Model
        Just created; nothing happens unless its prior is the VampPrior.
    rows : InMemoryRows or ChunkedRows
        The fit's training rows: K rows are drawn from those in memory, or
        from the first chunk of rows read in chunks, without replacement
        when there are at least K of them, else with. Data-parallel rows
        (a shard per process) are left alone: every process must start from
        the same model, and the model's seeded initialisation is that.

    The draw comes from ``np.random.default_rng(model.seed)``, so a seeded
    fit is reproducible. For a Bernoulli likelihood the rows lie in [0, 1],
    where the prior's clip passes the gradient (bounds included).
    """
    if model.prior != VAMP or getattr(rows, "parallel", None) is not None:
        return
    blocks = rows.blocks()
    try:
        _, _, X, _ = next(blocks)
        if X.shape[0] == 0:
            return
        K = model.n_pseudo_inputs
        rng = np.random.default_rng(model.seed)
        picked = rng.choice(X.shape[0], size=K, replace=K > X.shape[0])
        dict(model.named_parameters())["prior.pseudo_inputs"][:] = X[picked]
    finally:
        blocks.close()
