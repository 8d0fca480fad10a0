/* prior_mixture.c -- the part of VaDE's mixture prior that does not depend
 * on the components' covariance (see prior_mixture.h for the formulas):
 * responsibilities, log-sum-exp, the closed-form term and its chain
 * w_c = gamma_c (A_c - term), the sampled term, the component draw. Used by
 * prior_gmm.c (diagonal components) and prior_gmm_full.c (full ones).
 *
 * Rows are independent; nothing is stored between forward and backward:
 * the backward recomputes the row's log-sum-exp and term (three passes of
 * K components over a row, small beside the networks), so no scratch is
 * needed for any K.
 */
#include "prior_mixture.h"

#include <math.h>

/* The mixture at a's tensors (with their gradients when grad); its
 * component formulas are the model's prior table's data. */
static hvae_mixture view_of(const hvae_prior_args *a, int grad)
{
    hvae_mixture g;
    g.ops = a->model ? a->model->prior->data : NULL;
    g.K = a->model ? hvae_model_n_components(a->model) : 0;
    g.d = a->d;
    g.pi_logits = a->params + a->offset;
    g.mu = g.pi_logits + g.K;
    g.shape = g.mu + g.K * g.d;
    g.dpi_logits = grad && a->grads ? a->grads + a->offset : NULL;
    g.dmu = g.dpi_logits ? g.dpi_logits + g.K : NULL;
    g.dshape = g.dmu ? g.dmu + g.K * g.d : NULL;
    double top = -INFINITY, sum = 0.0;
    for (int64_t c = 0; c < g.K; c++)
        top = g.pi_logits[c] > top ? g.pi_logits[c] : top;
    for (int64_t c = 0; c < g.K; c++)
        sum += exp(g.pi_logits[c] - top);
    g.log_norm = top + log(sum);
    g.row_weight = 1.0;
    return g;
}

void hvae_mixture_init_weights_means(float *params, int64_t K, int64_t d, hvae_rng *rng)
{
    for (int64_t c = 0; c < K; c++)
        params[c] = 0.0f;
    hvae_rng_normal(rng, params + K, K * d);
}

int64_t hvae_mixture_n_components(const hvae_config *config)
{
    return config->n_components;
}

static double log_weight(const hvae_mixture *g, int64_t c)
{
    return g->pi_logits[c] - g->log_norm;
}

/* logsumexp_c l_c at z: log p(z). */
static double log_marginal(const hvae_mixture *g, const float *z)
{
    double top = -INFINITY, sum = 0.0;
    for (int64_t c = 0; c < g->K; c++) {
        hvae_lse_add(&top, &sum, log_weight(g, c) + g->ops->log_density(g, z, c));
    }
    return top + log(sum);
}

/* One row's closed-form term; log_gamma_c = l_c - lse. */
static double row_term(const hvae_mixture *g, const float *z, const float *mu_q,
                       const float *lv_q, double lse)
{
    double term = 0.0;
    for (int64_t c = 0; c < g->K; c++) {
        double log_gamma = log_weight(g, c) + g->ops->log_density(g, z, c) - lse;
        double A = g->ops->kl(g, mu_q, lv_q, c) + log_gamma - log_weight(g, c);
        term += exp(log_gamma) * A;
    }
    return term;
}

static double row_log_q(const float *eps, const float *lv_q, int64_t d)
{
    double sum = 0.0;
    for (int64_t j = 0; j < d; j++)
        sum += HVAE_LOG_2PI + lv_q[j] + (double)eps[j] * eps[j];
    return -0.5 * sum;
}

void hvae_mixture_term_forward(double *term, const hvae_prior_args *a, int closed_form)
{
    hvae_mixture g = view_of(a, 0);
    int64_t d = a->d;
    for (int64_t b = 0; b < a->B; b++) {
        const float *z = a->z + b * d, *lv_q = a->lv_q + b * d;
        double lse = log_marginal(&g, z);
        term[b] = closed_form ? row_term(&g, z, a->mu_q + b * d, lv_q, lse)
                              : row_log_q(a->eps + b * d, lv_q, d) - lse;
    }
}

void hvae_mixture_term_backward(const hvae_prior_args *a, float scale, int closed_form)
{
    hvae_mixture g0 = view_of(a, 1);
    const hvae_mixture_component_ops *ops = g0.ops;
    int64_t d = a->d;
    for (int64_t b = 0; b < a->B; b++) {
        /* Row weights (IWAE) reach the prior's tensors here; the model
         * weights the rows of dz, dmu_q and dlv_q itself. */
        hvae_mixture g = g0;
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
                double gamma = exp(log_weight(&g, c) + ops->log_density(&g, z, c) - lse);
                ops->log_density_backward(&g, z, dz, c, -scale * gamma);
                if (g.dpi_logits)
                    g.dpi_logits[c] +=
                        (float)(g.row_weight * scale * (exp(log_weight(&g, c)) - gamma));
            }
            continue;
        }
        double term = row_term(&g, z, mu_q, lv_q, lse);
        int dq = a->dmu_q && a->dlv_q;
        for (int64_t c = 0; c < g.K; c++) {
            double log_gamma = log_weight(&g, c) + ops->log_density(&g, z, c) - lse;
            double gamma = exp(log_gamma);
            double A = ops->kl(&g, mu_q, lv_q, c) + log_gamma - log_weight(&g, c);
            double w = gamma * (A - term);
            if (g.dpi_logits)
                g.dpi_logits[c] +=
                    (float)(g.row_weight * scale * (exp(log_weight(&g, c)) - gamma + w));
            ops->kl_backward(&g, dq ? a->dmu_q + b * d : NULL, dq ? a->dlv_q + b * d : NULL,
                             mu_q, lv_q, c, scale * gamma, g.row_weight * scale * gamma);
            ops->log_density_backward(&g, z, dz, c, scale * w);
        }
    }
}

void hvae_mixture_sample(float *z, const hvae_prior_args *a, hvae_rng *rng)
{
    hvae_mixture g = view_of(a, 0);
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
        g.ops->sample(&g, z + b * a->d, c, rng);
    }
}

void hvae_mixture_log_density(double *out, const hvae_prior_args *a)
{
    hvae_mixture g = view_of(a, 0);
    for (int64_t b = 0; b < a->B; b++)
        out[b] = log_marginal(&g, a->z + b * a->d);
}

void hvae_mixture_responsibilities(double *gamma, const hvae_prior_args *a)
{
    hvae_mixture g = view_of(a, 0);
    for (int64_t b = 0; b < a->B; b++) {
        const float *z = a->z + b * a->d;
        double lse = log_marginal(&g, z);
        for (int64_t c = 0; c < g.K; c++)
            gamma[b * g.K + c] = exp(log_weight(&g, c) + g.ops->log_density(&g, z, c) - lse);
    }
}
