/* prior_gmm.c -- the mixture-of-Gaussians prior of VaDE (Jiang et al. 2017,
 * "Variational Deep Embedding") on the top layer z_T (d units), K components:
 *
 *   p(c) = softmax(pi_logits)_c,   p(z_T | c) = N(mu_c, diag(exp(logvar_c))).
 *
 * Tensors "prior.pi_logits" (K), "prior.mu" (K, d), "prior.logvar" (K, d).
 *
 * The ELBO term (closed form, training and hvae_elbo). With the
 * responsibilities
 *   gamma_c = q(c | x) = p(c) p(z | c) / sum_c' p(c') p(z | c')
 * evaluated at the SAMPLED z = z_T (VaDE's estimator: the optimal q(c | x)
 * is E_q(z|x)[p(c | z)], approximated by this one draw, the draw the rest
 * of the ELBO uses; the per-row term then stays a single-sample estimate,
 * and n_mc_samples > 1 averages it over draws like everything else), the
 * KL between q(z_T, c | x) = q(z_T | .) q(c | x) and p(z_T, c) is taken
 * analytically over the Gaussian part:
 *
 *   term = sum_c gamma_c [ KL(q(z_T|.) || N(mu_c, var_c)) + log gamma_c - log p(c) ].
 *
 * Gradients flow through gamma, as in the authors' Keras code
 * (slim1017/VaDE: gamma is computed inside the loss from the sampled z,
 * with no stop_gradient) and GuHongyang/VaDE-pytorch (likewise, no
 * detach): the term is differentiated as the function of z, q's (mu,
 * logvar) and the prior's tensors that it is. With l_c = log p(c) +
 * log N(z; mu_c, var_c), gamma = softmax(l), A_c = KL_c + log gamma_c -
 * log p(c) and w_c = gamma_c (A_c - term):
 *
 *   d term / d pi_logits_c = p(c) - gamma_c + w_c
 *   d term / d z           = sum_c w_c d log N(z; mu_c, var_c) / dz
 *   d term / d (mu_c, lv_c) = gamma_c dKL_c / d(mu_c, lv_c)
 *                             + w_c d log N(z; mu_c, var_c) / d(mu_c, lv_c)
 *   d term / d (mu_q, lv_q) = sum_c gamma_c dKL_c / d(mu_q, lv_q).
 *
 * (sum_c gamma_c d log gamma_c = 0 removes the rest.) With K = 1 and
 * N(0, I) the term is the standard prior's KL bit for bit: gamma = 1,
 * log gamma = log p(c) = 0, w = 0, and KL_c is gaussian.c's kernel.
 *
 * The sampled term (IWAE, log-likelihood) is the true log-density ratio
 * with the marginal p(z) = sum_c p(c) N(z; mu_c, var_c):
 *   log q(z) - log p(z) = -sum_j (log 2pi + lv_q + eps^2) / 2 - logsumexp_c l_c.
 *
 * The mixture's part (responsibilities, log-sum-exp, the chain through
 * gamma, sampling the component) is prior_mixture.c's, shared with the
 * full-covariance components of prior_gmm_full.c; this file gives the
 * diagonal component's density, KL, their gradients and its draw.
 */
#include "prior_mixture.h"
#include "fastmath.h"

#include <math.h>
#include <stdio.h>

/* The components' log-variances (K, d), after mu. */
static const float *logvar_of(const hvae_mixture *g, int64_t c)
{
    return g->shape + c * g->d;
}

/* log N(z; mu_c, exp(lv_c)) over d units. */
static double log_normal(const hvae_mixture *g, const float *z, int64_t c)
{
    const float *mu = g->mu + c * g->d, *lv = logvar_of(g, c);
    double sum = 0.0;
    for (int64_t j = 0; j < g->d; j++) {
        double diff = (double)z[j] - mu[j];
        sum += HVAE_LOG_2PI + lv[j] + diff * diff * exp(-(double)lv[j]);
    }
    return -0.5 * sum;
}

/* KL(q || N(mu_c, var_c)) of one row: gaussian.c's kernel, so that K = 1 at
 * N(0, I) reproduces the standard prior exactly. */
static double kl_to(const hvae_mixture *g, const float *mu_q, const float *lv_q, int64_t c)
{
    double kl;
    hvae_gaussian_kl_forward(&kl, mu_q, lv_q, g->mu + c * g->d, logvar_of(g, c), 1, g->d);
    return kl;
}

/* Accumulates s * d log N(z; mu_c, var_c) into dz and (mu_c, lv_c)'s
 * gradients: d/dz = -(z - mu)/var, d/dmu = (z - mu)/var,
 * d/dlv = ((z - mu)^2/var - 1)/2. */
static void log_normal_backward(const hvae_mixture *g, const float *z, float *dz, int64_t c,
                                double s)
{
    const float *mu = g->mu + c * g->d, *lv = logvar_of(g, c);
    for (int64_t j = 0; j < g->d; j++) {
        double inv_var = exp(-(double)lv[j]), diff = (double)z[j] - mu[j];
        double gz = diff * inv_var;
        if (dz)
            dz[j] -= (float)(s * gz);
        if (g->dmu) {
            g->dmu[c * g->d + j] += (float)(g->row_weight * s * gz);
            g->dshape[c * g->d + j] += (float)(g->row_weight * s * 0.5 * (diff * gz - 1.0));
        }
    }
}

/* Accumulates s_q * dKL/d(mu_q, lv_q) (gaussian.c's kernel), then
 * s_prior * dKL(q || N(mu_c, var_c)) / d(mu_c, lv_c):
 * dKL/dmu_c = -(mu_q - mu_c)/var_c, dKL/dlv_c = (1 - (var_q + diff^2)/var_c)/2. */
static void kl_backward(const hvae_mixture *g, float *dmu_q, float *dlv_q, const float *mu_q,
                        const float *lv_q, int64_t c, double s_q, double s_prior)
{
    const float *mu = g->mu + c * g->d, *lv = logvar_of(g, c);
    if (dmu_q && dlv_q)
        hvae_gaussian_kl_backward(dmu_q, dlv_q, NULL, NULL, (float)s_q, mu_q, lv_q, mu, lv, 1,
                                  g->d);
    if (!g->dmu)
        return;
    for (int64_t j = 0; j < g->d; j++) {
        double inv_var = exp(-(double)lv[j]), diff = (double)mu_q[j] - mu[j];
        g->dmu[c * g->d + j] -= (float)(s_prior * diff * inv_var);
        g->dshape[c * g->d + j] +=
            (float)(s_prior * 0.5 * (1.0 - (exp((double)lv_q[j]) + diff * diff) * inv_var));
    }
}

static void sample_component(const hvae_mixture *g, float *z, int64_t c, hvae_rng *rng)
{
    const float *mu = g->mu + c * g->d, *lv = logvar_of(g, c);
    hvae_rng_normal(rng, z, g->d);
    for (int64_t j = 0; j < g->d; j++)
        z[j] = mu[j] + hvae_expf(0.5f * lv[j]) * z[j];
}

static const hvae_mixture_component_ops diagonal = {
    .log_density = log_normal,
    .kl = kl_to,
    .log_density_backward = log_normal_backward,
    .kl_backward = kl_backward,
    .sample = sample_component,
};

static int32_t gmm_n_tensors(const hvae_config *config)
{
    (void)config;
    return 3;
}

static void gmm_tensor(const hvae_config *config, int32_t k, hvae_tensor_info *info)
{
    static const char *const names[3] = {"pi_logits", "mu", "logvar"};
    int64_t d = config->latent_dims[config->n_layers - 1];
    snprintf(info->name, sizeof info->name, "%s", names[k]);
    info->rows = config->n_components;
    info->cols = k == 0 ? 0 : d;
}

/* Equal weights, unit variances, means N(0, I) draws so that the components
 * differ (VaDE initialises them from a GaussianMixture fitted to pretrained
 * codes instead: hvae.VaDE does). */
static void gmm_init(const hvae_config *config, float *params, hvae_rng *rng)
{
    int64_t K = config->n_components, d = config->latent_dims[config->n_layers - 1];
    hvae_mixture_init_weights_means(params, K, d, rng);
    for (int64_t k = 0; k < K * d; k++)
        params[K + K * d + k] = 0.0f;
}

const hvae_prior_ops hvae_prior_gmm = {
    .n_tensors = gmm_n_tensors,
    .tensor = gmm_tensor,
    .init = gmm_init,
    .term_forward = hvae_mixture_term_forward,
    .term_backward = hvae_mixture_term_backward,
    .sample = hvae_mixture_sample,
    .log_density = hvae_mixture_log_density,
    .n_components = hvae_mixture_n_components,
    .responsibilities = hvae_mixture_responsibilities,
    .data = &diagonal,
};
