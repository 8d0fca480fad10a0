/* registry.c -- the extension points' tables by enum value (hvae.h,
 * "Extension points"): a new prior or latent family adds its line here. */
#include "extension.h"

const hvae_prior_ops *const hvae_prior_table[HVAE_PRIOR_COUNT] = {
    [HVAE_PRIOR_NORMAL] = &hvae_prior_normal,
    [HVAE_PRIOR_GMM] = &hvae_prior_gmm,
    [HVAE_PRIOR_VAMP] = &hvae_prior_vamp,
    [HVAE_PRIOR_DENSITY_RATIO] = &hvae_prior_density_ratio,
};

const hvae_latent_family_ops *const hvae_latent_family_table[HVAE_LATENT_FAMILY_COUNT] = {
    [HVAE_LATENT_GAUSSIAN] = &hvae_latent_gaussian,
    [HVAE_LATENT_CATEGORICAL] = &hvae_latent_categorical,
};

const hvae_prior_ops *hvae_prior_ops_for(const hvae_config *config)
{
    if (config->prior == HVAE_PRIOR_GMM && config->prior_covariance == HVAE_COVARIANCE_FULL)
        return &hvae_prior_gmm_full;
    return hvae_prior_table[config->prior];
}
