/* prior_gmm_full.c -- VaDE's mixture-of-Gaussians prior with FULL-covariance
 * components (hvae_config.prior = HVAE_PRIOR_GMM with prior_covariance =
 * HVAE_COVARIANCE_FULL): on the top layer z_T (d units), K components,
 *
 *   p(c) = softmax(pi_logits)_c,   p(z_T | c) = N(mu_c, Sigma_c),
 *   Sigma_c^{-1} = P_c P_c^T,
 *
 * P_c lower triangular with a positive diagonal: the precision's Cholesky
 * factor, as scikit-learn's GaussianMixture keeps it (precisions_cholesky_),
 * so that every formula is polynomial in P and no matrix is factored or
 * inverted in training. Tensors "prior.pi_logits" (K), "prior.mu" (K, d),
 * "prior.prec_log_diag" (K, d) = log P_jj, and "prior.prec_lower"
 * (K, d(d-1)/2) = the strictly-lower P_ij (i > j), packed row by row
 * (P_10, P_20, P_21, P_30, ...: entry i(i-1)/2 + j), absent when d = 1.
 * Any real values give a valid Sigma_c.
 *
 * With v = z - mu_c and y = P^T v,
 *   log N(z; mu_c, Sigma_c) = -d/2 log 2pi + sum_j log P_jj - ||y||^2 / 2,
 * and with s^2 = exp(lv_q), u = mu_c - mu_q, y = P^T u,
 *   KL(N(mu_q, diag s^2) || N(mu_c, Sigma_c))
 *     = 1/2 [ sum_ij P_ij^2 s_i^2 + ||y||^2 - d - 2 sum_j log P_jj - sum_i lv_q_i ].
 * Their gradients:
 *   d log N / dz = -P y = -d log N / dmu_c,  d log N / dP_ij = -v_i y_j,
 *   dKL / dmu_q = -P y = -dKL / dmu_c,  dKL / dlv_q_i = (s_i^2 sum_j P_ij^2 - 1) / 2,
 *   dKL / dP_ij = P_ij s_i^2 + u_i y_j,
 * and a diagonal entry's log-gradient is P_jj times its gradient (-1 from
 * the log-determinant of the KL). The mixture's part (responsibilities at
 * the sampled z, VaDE's term sum_c gamma_c [KL_c + log gamma_c - log p(c)]
 * with gradients through gamma, the sampled term with the full marginal,
 * the component draw) is prior_mixture.c's, shared with the diagonal prior
 * (prior_gmm.c): the same estimator, documented there.
 *
 * With P = diag(exp(-logvar / 2)) the term is the diagonal prior's to
 * rounding (tests/test_prior_gmm_full.py). Cost: O(K d^2) per row, on
 * stack vectors of HVAE_MAX_FULL_COVARIANCE_DIM doubles (no allocation).
 */
#include "prior_mixture.h"

#include <math.h>
#include <stdio.h>

/* Component c's factor: log P_jj (d) and the packed strictly-lower P_ij. */
typedef struct {
    const float *log_diag, *lower;
    float *dlog_diag, *dlower; /* NULL when not differentiating */
} factor;

static int64_t n_lower(int64_t d)
{
    return d * (d - 1) / 2;
}

static factor factor_of(const hvae_mixture *g, int64_t c)
{
    int64_t K = g->K, d = g->d;
    factor f;
    f.log_diag = g->shape + c * d;
    f.lower = g->shape + K * d + c * n_lower(d);
    f.dlog_diag = g->dshape ? g->dshape + c * d : NULL;
    f.dlower = g->dshape ? g->dshape + K * d + c * n_lower(d) : NULL;
    return f;
}

/* v = a - b and y = P^T v (d each); returns ||y||^2. Row i of P holds
 * P_i0..P_i(i-1) in lower[i(i-1)/2 ...] and exp(log_diag[i]). */
static double difference_norm(double *v, double *y, const factor *f, const float *a,
                              const float *b, int64_t d)
{
    for (int64_t j = 0; j < d; j++) {
        v[j] = (double)a[j] - b[j];
        y[j] = exp((double)f->log_diag[j]) * v[j];
    }
    for (int64_t i = 1; i < d; i++) {
        const float *row = f->lower + i * (i - 1) / 2;
        for (int64_t j = 0; j < i; j++)
            y[j] += row[j] * v[i];
    }
    double sum = 0.0;
    for (int64_t j = 0; j < d; j++)
        sum += y[j] * y[j];
    return sum;
}

/* py = P y (d). */
static void factor_times(double *py, const factor *f, const double *y, int64_t d)
{
    for (int64_t i = 0; i < d; i++) {
        const float *row = f->lower + i * (i - 1) / 2;
        double sum = exp((double)f->log_diag[i]) * y[i];
        for (int64_t j = 0; j < i; j++)
            sum += row[j] * y[j];
        py[i] = sum;
    }
}

static double sum_log_diag(const factor *f, int64_t d)
{
    double sum = 0.0;
    for (int64_t j = 0; j < d; j++)
        sum += f->log_diag[j];
    return sum;
}

static double log_normal(const hvae_mixture *g, const float *z, int64_t c)
{
    double v[HVAE_MAX_FULL_COVARIANCE_DIM], y[HVAE_MAX_FULL_COVARIANCE_DIM];
    int64_t d = g->d;
    factor f = factor_of(g, c);
    const float *mu = g->mu + c * d;
    double q = difference_norm(v, y, &f, z, mu, d);
    return -0.5 * (double)d * HVAE_LOG_2PI + sum_log_diag(&f, d) - 0.5 * q;
}

static double kl_to(const hvae_mixture *g, const float *mu_q, const float *lv_q, int64_t c)
{
    double u[HVAE_MAX_FULL_COVARIANCE_DIM], y[HVAE_MAX_FULL_COVARIANCE_DIM];
    int64_t d = g->d;
    factor f = factor_of(g, c);
    const float *mu = g->mu + c * d;
    double trace = 0.0, sum_lv = 0.0;
    for (int64_t i = 0; i < d; i++) {
        const float *row = f.lower + i * (i - 1) / 2;
        double p = exp((double)f.log_diag[i]), norm = p * p;
        for (int64_t j = 0; j < i; j++)
            norm += (double)row[j] * row[j];
        trace += norm * exp((double)lv_q[i]);
        sum_lv += lv_q[i];
    }
    double q = difference_norm(u, y, &f, mu, mu_q, d);
    return 0.5 * (trace + q - (double)d - 2.0 * sum_log_diag(&f, d) - sum_lv);
}

static void log_normal_backward(const hvae_mixture *g, const float *z, float *dz, int64_t c,
                                double s)
{
    double v[HVAE_MAX_FULL_COVARIANCE_DIM], y[HVAE_MAX_FULL_COVARIANCE_DIM];
    double py[HVAE_MAX_FULL_COVARIANCE_DIM];
    int64_t d = g->d;
    factor f = factor_of(g, c);
    const float *mu = g->mu + c * d;
    difference_norm(v, y, &f, z, mu, d);
    factor_times(py, &f, y, d);
    if (dz)
        for (int64_t i = 0; i < d; i++)
            dz[i] -= (float)(s * py[i]);
    if (!g->dmu)
        return;
    double t = g->row_weight * s;
    for (int64_t i = 0; i < d; i++) {
        g->dmu[c * d + i] += (float)(t * py[i]);
        double p = exp((double)f.log_diag[i]);
        f.dlog_diag[i] += (float)(t * (1.0 - p * v[i] * y[i]));
        float *drow = f.dlower + i * (i - 1) / 2;
        for (int64_t j = 0; j < i; j++)
            drow[j] -= (float)(t * v[i] * y[j]);
    }
}

static void kl_backward(const hvae_mixture *g, float *dmu_q, float *dlv_q, const float *mu_q,
                        const float *lv_q, int64_t c, double s_q, double s_prior)
{
    double u[HVAE_MAX_FULL_COVARIANCE_DIM], y[HVAE_MAX_FULL_COVARIANCE_DIM];
    double py[HVAE_MAX_FULL_COVARIANCE_DIM];
    int64_t d = g->d;
    factor f = factor_of(g, c);
    const float *mu = g->mu + c * d;
    difference_norm(u, y, &f, mu, mu_q, d);
    factor_times(py, &f, y, d);
    for (int64_t i = 0; i < d; i++) {
        const float *row = f.lower + i * (i - 1) / 2;
        double p = exp((double)f.log_diag[i]), var_q = exp((double)lv_q[i]);
        if (dmu_q && dlv_q) {
            double norm = p * p;
            for (int64_t j = 0; j < i; j++)
                norm += (double)row[j] * row[j];
            dmu_q[i] -= (float)(s_q * py[i]);
            dlv_q[i] += (float)(s_q * 0.5 * (norm * var_q - 1.0));
        }
        if (!g->dmu)
            continue;
        g->dmu[c * d + i] += (float)(s_prior * py[i]);
        f.dlog_diag[i] += (float)(s_prior * (p * (p * var_q + u[i] * y[i]) - 1.0));
        float *drow = f.dlower + i * (i - 1) / 2;
        for (int64_t j = 0; j < i; j++)
            drow[j] += (float)(s_prior * (row[j] * var_q + u[i] * y[j]));
    }
}

/* z = mu_c + x with P^T x = eps (back substitution): Cov(x) =
 * P^{-T} P^{-1} = Sigma_c. */
static void sample_component(const hvae_mixture *g, float *z, int64_t c, hvae_rng *rng)
{
    double x[HVAE_MAX_FULL_COVARIANCE_DIM];
    int64_t d = g->d;
    factor f = factor_of(g, c);
    hvae_rng_normal(rng, z, d);
    for (int64_t j = d - 1; j >= 0; j--) {
        double sum = z[j];
        for (int64_t i = j + 1; i < d; i++)
            sum -= f.lower[i * (i - 1) / 2 + j] * x[i];
        x[j] = sum * exp(-(double)f.log_diag[j]);
    }
    for (int64_t j = 0; j < d; j++)
        z[j] = (float)(g->mu[c * d + j] + x[j]);
}

static const hvae_mixture_component_ops full = {
    .log_density = log_normal,
    .kl = kl_to,
    .log_density_backward = log_normal_backward,
    .kl_backward = kl_backward,
    .sample = sample_component,
};

static int64_t top_dim(const hvae_config *config)
{
    return config->latent_dims[config->n_layers - 1];
}

static hvae_status full_check_config(const hvae_config *config)
{
    return top_dim(config) <= HVAE_MAX_FULL_COVARIANCE_DIM ? HVAE_OK
                                                           : HVAE_ERR_INVALID_ARGUMENT;
}

static int32_t full_n_tensors(const hvae_config *config)
{
    return top_dim(config) > 1 ? 4 : 3;
}

static void full_tensor(const hvae_config *config, int32_t k, hvae_tensor_info *info)
{
    static const char *const names[4] = {"pi_logits", "mu", "prec_log_diag", "prec_lower"};
    int64_t d = top_dim(config);
    snprintf(info->name, sizeof info->name, "%s", names[k]);
    info->rows = config->n_components;
    info->cols = k == 0 ? 0 : k == 3 ? n_lower(d) : d;
}

/* As the diagonal prior's: equal weights, N(0, I) means, identity
 * precisions (VaDE's initialisation from a GaussianMixture is hvae.VaDE's). */
static void full_init(const hvae_config *config, float *params, hvae_rng *rng)
{
    int64_t K = config->n_components, d = top_dim(config);
    hvae_mixture_init_weights_means(params, K, d, rng);
    for (int64_t k = 0; k < K * d + K * n_lower(d); k++)
        params[K + K * d + k] = 0.0f;
}

const hvae_prior_ops hvae_prior_gmm_full = {
    .check_config = full_check_config,
    .n_tensors = full_n_tensors,
    .tensor = full_tensor,
    .init = full_init,
    .term_forward = hvae_mixture_term_forward,
    .term_backward = hvae_mixture_term_backward,
    .sample = hvae_mixture_sample,
    .log_density = hvae_mixture_log_density,
    .n_components = hvae_mixture_n_components,
    .responsibilities = hvae_mixture_responsibilities,
    .data = &full,
};
