/* prior_normal.c -- the standard normal prior p(z_T) = N(0, I): no
 * parameters;
 *   KL(N(mu, exp(lv)) || N(0, I)) = sum_j (exp(lv) + mu^2 - 1 - lv) / 2,
 *   log q(z) - log p(z) = sum_j (z^2 - lv - eps^2) / 2  at z = mu + exp(lv/2) eps,
 *   log p(z) = -sum_j (log 2pi + z^2) / 2  (gaussian.c's log-density). */
#include "extension.h"

/* n_pseudo_inputs belongs to the VampPrior. */
static hvae_status normal_check_config(const hvae_config *config)
{
    return config->n_pseudo_inputs == 0 ? HVAE_OK : HVAE_ERR_INVALID_ARGUMENT;
}

static int32_t normal_n_tensors(const hvae_config *config)
{
    (void)config;
    return 0;
}

static void normal_tensor(const hvae_config *config, int32_t k, hvae_tensor_info *info)
{
    (void)config;
    (void)k;
    (void)info;
}

static void normal_init(const hvae_config *config, float *params, hvae_rng *rng)
{
    (void)config;
    (void)params;
    (void)rng;
}

static void normal_term_forward(double *term, const hvae_prior_args *a, int closed_form)
{
    if (closed_form)
        hvae_gaussian_kl_forward(term, a->mu_q, a->lv_q, NULL, NULL, a->B, a->d);
    else
        hvae_gaussian_logratio_forward(term, a->z, a->eps, a->lv_q, NULL, NULL, a->B, a->d);
}

static void normal_term_backward(const hvae_prior_args *a, float scale, int closed_form)
{
    if (closed_form)
        hvae_gaussian_kl_backward(a->dmu_q, a->dlv_q, NULL, NULL, scale, a->mu_q, a->lv_q,
                                  NULL, NULL, a->B, a->d);
    else
        hvae_gaussian_logratio_backward(a->dz, a->dlv_q, NULL, NULL, scale, a->z, NULL, NULL,
                                        a->B, a->d);
}

static void normal_sample(float *z, const hvae_prior_args *a, hvae_rng *rng)
{
    hvae_rng_normal(rng, z, a->B * a->d);
}

static void normal_log_density(double *out, const hvae_prior_args *a)
{
    hvae_gaussian_loglik_forward(out, a->z, NULL, NULL, a->B, a->d);
}

const hvae_prior_ops hvae_prior_normal = {
    .check_config = normal_check_config,
    .n_tensors = normal_n_tensors,
    .tensor = normal_tensor,
    .init = normal_init,
    .term_forward = normal_term_forward,
    .term_backward = normal_term_backward,
    .sample = normal_sample,
    .log_density = normal_log_density,
};
