/* latent_gaussian.c -- the diagonal Gaussian latent layer: heads mu and
 * logvar, z = mu + exp(logvar / 2) eps with eps ~ N(0, I); its KL and
 * sampled log-ratio are gaussian.c's kernels. */
#include "extension.h"

static void gaussian_sample_forward(float *z, const float *mu, const float *lv,
                                    const float *eps, int64_t n)
{
    hvae_reparam_forward(z, mu, lv, eps, n);
}

static void gaussian_sample_backward(float *dmu, float *dlv, const float *dz,
                                     const float *mu, const float *lv, const float *eps,
                                     int64_t n)
{
    (void)mu;
    hvae_reparam_backward(dmu, dlv, dz, lv, eps, n);
}

const hvae_latent_family_ops hvae_latent_gaussian = {
    .n_heads = 2,
    .sample_forward = gaussian_sample_forward,
    .sample_backward = gaussian_sample_backward,
    .kl_forward = hvae_gaussian_kl_forward,
    .kl_backward = hvae_gaussian_kl_backward,
    .logratio_forward = hvae_gaussian_logratio_forward,
    .logratio_backward = hvae_gaussian_logratio_backward,
};
