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
 * Rows are independent; nothing is stored between forward and backward:
 * the backward recomputes the row's log-sum-exp and term (three passes of
 * K d work over a row, small beside the networks), so no scratch is
 * needed for any K.
 */
#include "internal.h"
#include "fastmath.h"

#include <math.h>
#include <stdio.h>

#define LOG_2PI 1.83787706640934548356

typedef struct {
    int64_t K, d;
    const float *pi_logits, *mu, *lv; /* (K), (K, d), (K, d) */
    float *dpi_logits, *dmu, *dlv;    /* NULL when not differentiating */
    double log_norm;                  /* logsumexp of pi_logits */
    double row_weight;                /* multiplies the prior's gradients */
} gmm_view;

static gmm_view view_of(const hvae_prior_args *a, int grad)
{
    gmm_view g;
    g.K = a->model ? hvae_model_n_components(a->model) : 0;
    g.d = a->d;
    g.pi_logits = a->params + a->offset;
    g.mu = g.pi_logits + g.K;
    g.lv = g.mu + g.K * g.d;
    g.dpi_logits = grad && a->grads ? a->grads + a->offset : NULL;
    g.dmu = g.dpi_logits ? g.dpi_logits + g.K : NULL;
    g.dlv = g.dmu ? g.dmu + g.K * g.d : NULL;
    double top = -INFINITY, sum = 0.0;
    for (int64_t c = 0; c < g.K; c++)
        top = g.pi_logits[c] > top ? g.pi_logits[c] : top;
    for (int64_t c = 0; c < g.K; c++)
        sum += exp(g.pi_logits[c] - top);
    g.log_norm = top + log(sum);
    g.row_weight = 1.0;
    return g;
}

static double log_weight(const gmm_view *g, int64_t c)
{
    return g->pi_logits[c] - g->log_norm;
}

/* log N(z; mu_c, exp(lv_c)) over d units. */
static double log_normal(const gmm_view *g, const float *z, int64_t c)
{
    const float *mu = g->mu + c * g->d, *lv = g->lv + c * g->d;
    double sum = 0.0;
    for (int64_t j = 0; j < g->d; j++) {
        double diff = (double)z[j] - mu[j];
        sum += LOG_2PI + lv[j] + diff * diff * exp(-(double)lv[j]);
    }
    return -0.5 * sum;
}

/* logsumexp_c l_c at z: log p(z). */
static double log_marginal(const gmm_view *g, const float *z)
{
    double top = -INFINITY, sum = 0.0;
    for (int64_t c = 0; c < g->K; c++) {
        double l = log_weight(g, c) + log_normal(g, z, c);
        if (l > top) {
            sum = sum * exp(top - l) + 1.0;
            top = l;
        } else {
            sum += exp(l - top);
        }
    }
    return top + log(sum);
}

/* KL(q || N(mu_c, var_c)) of one row: gaussian.c's kernel, so that K = 1 at
 * N(0, I) reproduces the standard prior exactly. */
static double kl_to(const gmm_view *g, const float *mu_q, const float *lv_q, int64_t c)
{
    double kl;
    hvae_gaussian_kl_forward(&kl, mu_q, lv_q, g->mu + c * g->d, g->lv + c * g->d, 1, g->d);
    return kl;
}

/* One row's closed-form term; log_gamma_c = l_c - lse. */
static double row_term(const gmm_view *g, const float *z, const float *mu_q,
                       const float *lv_q, double lse)
{
    double term = 0.0;
    for (int64_t c = 0; c < g->K; c++) {
        double log_gamma = log_weight(g, c) + log_normal(g, z, c) - lse;
        double A = kl_to(g, mu_q, lv_q, c) + log_gamma - log_weight(g, c);
        term += exp(log_gamma) * A;
    }
    return term;
}

static double row_log_q(const float *eps, const float *lv_q, int64_t d)
{
    double sum = 0.0;
    for (int64_t j = 0; j < d; j++)
        sum += LOG_2PI + lv_q[j] + (double)eps[j] * eps[j];
    return -0.5 * sum;
}

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
    for (int64_t c = 0; c < K; c++)
        params[c] = 0.0f;
    hvae_rng_normal(rng, params + K, K * d);
    for (int64_t k = 0; k < K * d; k++)
        params[K + K * d + k] = 0.0f;
}

static void gmm_term_forward(double *term, const hvae_prior_args *a, int closed_form)
{
    gmm_view g = view_of(a, 0);
    int64_t d = a->d;
    for (int64_t b = 0; b < a->B; b++) {
        const float *z = a->z + b * d, *lv_q = a->lv_q + b * d;
        double lse = log_marginal(&g, z);
        term[b] = closed_form ? row_term(&g, z, a->mu_q + b * d, lv_q, lse)
                              : row_log_q(a->eps + b * d, lv_q, d) - lse;
    }
}

/* Accumulates s * d log N(z; mu_c, var_c) into dz and (mu_c, lv_c)'s
 * gradients: d/dz = -(z - mu)/var, d/dmu = (z - mu)/var,
 * d/dlv = ((z - mu)^2/var - 1)/2. */
static void log_normal_backward(const gmm_view *g, const float *z, float *dz, int64_t c,
                                double s)
{
    const float *mu = g->mu + c * g->d, *lv = g->lv + c * g->d;
    for (int64_t j = 0; j < g->d; j++) {
        double inv_var = exp(-(double)lv[j]), diff = (double)z[j] - mu[j];
        double gz = diff * inv_var;
        if (dz)
            dz[j] -= (float)(s * gz);
        if (g->dmu) {
            g->dmu[c * g->d + j] += (float)(g->row_weight * s * gz);
            g->dlv[c * g->d + j] += (float)(g->row_weight * s * 0.5 * (diff * gz - 1.0));
        }
    }
}

/* Accumulates s * dKL(q || N(mu_c, var_c)) / d(mu_c, lv_c):
 * dKL/dmu_c = -(mu_q - mu_c)/var_c, dKL/dlv_c = (1 - (var_q + diff^2)/var_c)/2. */
static void kl_prior_backward(const gmm_view *g, const float *mu_q, const float *lv_q,
                              int64_t c, double s)
{
    const float *mu = g->mu + c * g->d, *lv = g->lv + c * g->d;
    for (int64_t j = 0; j < g->d; j++) {
        double inv_var = exp(-(double)lv[j]), diff = (double)mu_q[j] - mu[j];
        g->dmu[c * g->d + j] -= (float)(s * diff * inv_var);
        g->dlv[c * g->d + j] +=
            (float)(s * 0.5 * (1.0 - (exp((double)lv_q[j]) + diff * diff) * inv_var));
    }
}

static void gmm_term_backward(const hvae_prior_args *a, float scale, int closed_form)
{
    gmm_view g0 = view_of(a, 1);
    int64_t d = a->d;
    for (int64_t b = 0; b < a->B; b++) {
        /* Row weights (IWAE) reach the prior's tensors here; the model
         * weights the rows of dz, dmu_q and dlv_q itself. */
        gmm_view g = g0;
        g.row_weight = a->row_weight ? a->row_weight[b] : 1.0;
        const float *z = a->z + b * d, *mu_q = a->mu_q + b * d, *lv_q = a->lv_q + b * d;
        float *dz = a->dz ? a->dz + b * d : NULL;
        double lse = log_marginal(&g, z);
        if (!closed_form) {
            /* -d log p(z): -sum_c gamma_c d log N_c; log q sends -1/2 to lv_q. */
            if (a->dlv_q)
                for (int64_t j = 0; j < d; j++)
                    a->dlv_q[b * d + j] -= 0.5f * scale;
            for (int64_t c = 0; c < g.K; c++) {
                double gamma = exp(log_weight(&g, c) + log_normal(&g, z, c) - lse);
                log_normal_backward(&g, z, dz, c, -scale * gamma);
                if (g.dpi_logits)
                    g.dpi_logits[c] +=
                        (float)(g.row_weight * scale * (exp(log_weight(&g, c)) - gamma));
            }
            continue;
        }
        double term = row_term(&g, z, mu_q, lv_q, lse);
        for (int64_t c = 0; c < g.K; c++) {
            double log_gamma = log_weight(&g, c) + log_normal(&g, z, c) - lse;
            double gamma = exp(log_gamma);
            double A = kl_to(&g, mu_q, lv_q, c) + log_gamma - log_weight(&g, c);
            double w = gamma * (A - term);
            if (g.dpi_logits)
                g.dpi_logits[c] +=
                    (float)(g.row_weight * scale * (exp(log_weight(&g, c)) - gamma + w));
            if (a->dmu_q && a->dlv_q)
                hvae_gaussian_kl_backward(a->dmu_q + b * d, a->dlv_q + b * d, NULL, NULL,
                                          (float)(scale * gamma), mu_q, lv_q,
                                          g.mu + c * d, g.lv + c * d, 1, d);
            if (g.dmu)
                kl_prior_backward(&g, mu_q, lv_q, c, g.row_weight * scale * gamma);
            log_normal_backward(&g, z, dz, c, scale * w);
        }
    }
}

static void gmm_sample(float *z, const hvae_prior_args *a, hvae_rng *rng)
{
    gmm_view g = view_of(a, 0);
    int64_t d = a->d;
    for (int64_t b = 0; b < a->B; b++) {
        /* c by inversion of the cumulative weights. */
        double u = hvae_rng_uniform_float(rng), cum = 0.0;
        int64_t c = g.K - 1;
        for (int64_t k = 0; k < g.K; k++) {
            cum += exp(log_weight(&g, k));
            if (u < cum) {
                c = k;
                break;
            }
        }
        float *zb = z + b * d;
        hvae_rng_normal(rng, zb, d);
        for (int64_t j = 0; j < d; j++)
            zb[j] = g.mu[c * d + j] + hvae_expf(0.5f * g.lv[c * d + j]) * zb[j];
    }
}

static int64_t gmm_n_components(const hvae_config *config)
{
    return config->n_components;
}

static void gmm_responsibilities(double *gamma, const hvae_prior_args *a)
{
    gmm_view g = view_of(a, 0);
    for (int64_t b = 0; b < a->B; b++) {
        const float *z = a->z + b * a->d;
        double lse = log_marginal(&g, z);
        for (int64_t c = 0; c < g.K; c++)
            gamma[b * g.K + c] = exp(log_weight(&g, c) + log_normal(&g, z, c) - lse);
    }
}

const hvae_prior_ops hvae_prior_gmm = {
    .n_tensors = gmm_n_tensors,
    .tensor = gmm_tensor,
    .init = gmm_init,
    .term_forward = gmm_term_forward,
    .term_backward = gmm_term_backward,
    .sample = gmm_sample,
    .n_components = gmm_n_components,
    .responsibilities = gmm_responsibilities,
};
