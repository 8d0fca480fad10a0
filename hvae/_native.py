"""Loads the compiled core.

When hvae was built against the scipy-openblas32 wheel, importing that
package first loads its OpenBLAS into the process, so that the extension
finds it even where its run-time search path does not point (in-place and
editable builds).
"""
try:  # pragma: no cover - depends on how hvae was built
    import scipy_openblas32  # noqa: F401
except ImportError:
    pass

from ._core import (  # noqa: E402
    ACTIVATIONS,
    COVARIANCE_TYPES,
    DECODER_VARIANCES,
    DISCRIMINATOR_RECORD_KEYS,
    EPOCH_RECORD_KEYS,
    GRADIENT_ESTIMATORS,
    INFERENCES,
    LATENT_FAMILIES,
    LIKELIHOODS,
    MARKOV_KLS,
    MAX_BATCH_SIZE,
    MAX_COMPONENTS,
    MAX_FULL_COVARIANCE_DIM,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_SAMPLES,
    MAX_THREADS,
    OBJECTIVES,
    OPTIMIZERS,
    PRIORS,
    SCORE_BASELINES,
    TCVAE_RECORD_KEYS,
    DivergenceError,
    Model,
    blas_info,
    get_num_threads,
    set_num_threads,
)

# Names the C core accepts for each option (hvae.h, "Names") and the keys of
# Model.fit's per-epoch records.
__all__ = ["ACTIVATIONS", "COVARIANCE_TYPES", "MAX_FULL_COVARIANCE_DIM", "DECODER_VARIANCES", "DISCRIMINATOR_RECORD_KEYS", "EPOCH_RECORD_KEYS",
           "TCVAE_RECORD_KEYS", "GRADIENT_ESTIMATORS", "INFERENCES", "SCORE_BASELINES",
           "LATENT_FAMILIES", "LIKELIHOODS", "MARKOV_KLS", "OBJECTIVES", "OPTIMIZERS",
           "PRIORS", "MAX_BATCH_SIZE", "MAX_COMPONENTS", "MAX_HIDDEN", "MAX_LAYERS", "MAX_SAMPLES",
           "MAX_THREADS", "DivergenceError", "Model", "blas_info",
           "get_num_threads", "set_num_threads"]
