/* prior_vamp.c -- the VampPrior (Tomczak and Welling 2018, "VAE with a
 * VampPrior"): the top layer's prior is the mixture of the posteriors of K
 * learned pseudo-inputs u_1..u_K,
 *   p(z_T) = (1/K) sum_k N(z_T; m_k, diag(exp(l_k))),
 * (m_k, l_k) the top layer's posterior heads at u_k. For T > 1 the
 * pseudo-inputs' posterior runs through the whole encoder chain at the
 * means: encoder block i reads the mean head of block i - 1 (the ladder's
 * deterministic bottom-up pass, and for a Markov hierarchy q(z_T | z_{T-1})
 * at z_{T-1} = its mean; the exact marginal of u_k's Markov posterior over
 * z_T is not Gaussian). Either way p(z_T) is a proper density, so the ELBO
 * stays a bound.
 *
 * The KL has no closed form: the top layer's term is, at the sample
 * z = mu_q + exp(lv_q / 2) eps,
 *   log q(z) - log p(z) = sum_j -(lv_q + eps^2) / 2 + log K
 *                         - logsumexp_k a_k,
 *   a_k = -sum_j (l_kj + (z_j - m_kj)^2 exp(-l_kj)) / 2
 * (the 2 pi constants cancel), the log-sum-exp taken stably around its
 * largest term. Its gradient, with responsibilities w_k = softmax_k(a_k):
 *   d/dz_j = sum_k w_k (z_j - m_kj) exp(-l_kj),   d/dlv_q_j = -1/2,
 *   d/dm_kj = -w_k (z_j - m_kj) exp(-l_kj),
 *   d/dl_kj = w_k (1 - (z_j - m_kj)^2 exp(-l_kj)) / 2,
 * and from (m_k, l_k) back through the encoder to its weights and to u_k.
 *
 * Pseudo-inputs: one tensor "prior.pseudo_inputs" (K, D) of free values
 * P; u = P for a Gaussian likelihood, and for a Bernoulli one
 * u = hardtanh(P) = min(max(P, 0), 1) as the reference implementation's
 * pseudo-input layer does, so that u stays in the data's domain. The
 * gradient passes where 0 <= P <= 1 (bounds included, so that a value
 * started at a training pixel's 0 or 1 can move inward). hvae_model_init
 * draws P ~ N(0.5, 0.05^2) (Bernoulli) or N(0, 1) (Gaussian); the estimator
 * replaces them with K random training rows before training.
 *
 * Cost: per call, one encoder pass over the K pseudo-inputs (in the
 * workspace's prior_ws, computed once per minibatch, not per row), and
 * B * K * d multiply-adds for the mixture (three passes in the backward).
 *
 * log p(z) itself (hvae_prior_log_density) is the term's row log-sum-exp
 * with the 2 pi constants put back, after a pass over the pseudo-inputs
 * with rowwise products (the same bits on any number of threads).
 */
#include "internal.h"
#include "fastmath.h"

#include <math.h>
#include <string.h>

static hvae_status vamp_check_config(const hvae_config *config)
{
    /* The pseudo-inputs carry no condition for the encoder's first layer. */
    if (config->n_pseudo_inputs < 1 || config->n_pseudo_inputs > INT32_MAX ||
        config->n_conditions != 0)
        return HVAE_ERR_INVALID_ARGUMENT;
    return HVAE_OK;
}

static int64_t vamp_workspace_rows(const hvae_config *config)
{
    return config->n_pseudo_inputs;
}

static int32_t vamp_n_tensors(const hvae_config *config)
{
    (void)config;
    return 1;
}

static void vamp_tensor(const hvae_config *config, int32_t k, hvae_tensor_info *info)
{
    (void)k;
    strcpy(info->name, "pseudo_inputs");
    info->rows = config->n_pseudo_inputs;
    info->cols = config->n_features;
}

static int clipped(const hvae_config *config)
{
    return config->likelihood == HVAE_LIKELIHOOD_BERNOULLI;
}

static void vamp_init(const hvae_config *config, float *params, hvae_rng *rng)
{
    int64_t n = config->n_pseudo_inputs * config->n_features;
    hvae_rng_normal(rng, params, n);
    if (clipped(config))
        for (int64_t k = 0; k < n; k++)
            params[k] = 0.5f + 0.05f * params[k];
}

/* ---- the pseudo-inputs' encoder pass ----------------------------------- */

/* u = constrain(P) into pw->x, then encoder blocks 1..T at the means
 * (rowwise: hvae_block_forward's products):
 * afterwards the top block's heads in pw hold (m_k, l_k) for k < K; the
 * inverse variances exp(-l_kj) go to pw's (otherwise unused) top sample
 * column and -sum_j l_kj / 2 - log K to pw->reconstruction. */
static void pseudo_forward(const hvae_model *m, const hvae_workspace *pw, const float *P,
                           int rowwise)
{
    const hvae_config *c = &m->config;
    int32_t T = c->n_layers;
    int64_t K = c->n_pseudo_inputs, D = c->n_features, d = m->latent_dims[T - 1];
    float *u = pw->x;
    for (int64_t k = 0; k < K * D; k++)
        u[k] = clipped(c) ? fminf(fmaxf(P[k], 0.0f), 1.0f) : P[k];
    const float *inp = u;
    for (int32_t i = 0; i < T; i++) {
        hvae_block_forward(m, pw, &m->enc[i], inp, NULL, K, rowwise);
        inp = block_head(pw, &m->enc[i], 0);
    }
    const float *lv = block_head(pw, &m->enc[T - 1], 1);
    float *inv_var = ws_act(pw, m->latent[T - 1].z_col);
    double log_K = log((double)K);
    for (int64_t k = 0; k < K; k++) {
        double sum = 0.0;
        for (int64_t j = 0; j < d; j++) {
            inv_var[k * d + j] = hvae_expf(-lv[k * d + j]);
            sum += lv[k * d + j];
        }
        pw->reconstruction[k] = -0.5 * sum - log_K;
    }
}

/* a_k + log(1/K) for one row z (d); the B * K calls are the prior's inner
 * loop, hence independent partial sums that the compiler can vectorise. */
static inline double component_logdensity(const float *z, const float *mu_k,
                                          const float *inv_var_k, double const_k, int64_t d)
{
    float lanes[HVAE_LANES] = {0};
    int64_t j = 0;
    for (; j + HVAE_LANES <= d; j += HVAE_LANES)
        for (int l = 0; l < HVAE_LANES; l++) {
            float diff = z[j + l] - mu_k[j + l];
            lanes[l] += diff * diff * inv_var_k[j + l];
        }
    float sum = 0.0f;
    for (; j < d; j++) {
        float diff = z[j] - mu_k[j];
        sum += diff * diff * inv_var_k[j];
    }
    for (int l = 0; l < HVAE_LANES; l++)
        sum += lanes[l];
    return const_k - 0.5 * (double)sum;
}

/* log p(z) of one row: a stable log-sum-exp over the K components, in one
 * pass (the running maximum rescales the running sum). */
static double row_log_prior(const hvae_workspace *pw, const float *mu, const float *inv_var,
                            const float *z, int64_t K, int64_t d)
{
    double max = -INFINITY, sum = 0.0;
    for (int64_t k = 0; k < K; k++) {
        hvae_lse_add(&max, &sum,
                     component_logdensity(z, mu + k * d, inv_var + k * d, pw->reconstruction[k], d));
    }
    return max + log(sum);
}

typedef struct {
    const hvae_prior_args *a;
    const hvae_workspace *pw;
    double *term;
    float scale;
} vamp_part_args;

static void vamp_parts(hvae_task_fn fn, vamp_part_args *pa, int64_t rows)
{
    const hvae_prior_args *a = pa->a;
    double work = (double)rows * (double)a->model->config.n_pseudo_inputs * (double)a->d;
    hvae_parallel(fn, pa, hvae_parts(work, 1 << 15));
}

/* ---- term --------------------------------------------------------------- */

/* row_log_prior of row b of a->z, the components being the pseudo-inputs'
 * posteriors in pa->pw. */
static double part_log_prior(const vamp_part_args *pa, int64_t b)
{
    const hvae_prior_args *a = pa->a;
    const hvae_model *m = a->model;
    int32_t T = m->config.n_layers;
    return row_log_prior(pa->pw, block_head(pa->pw, &m->enc[T - 1], 0),
                         ws_act(pa->pw, m->latent[T - 1].z_col), a->z + b * a->d,
                         m->config.n_pseudo_inputs, a->d);
}

static void term_forward_part(void *ctx, int part, int n_parts)
{
    const vamp_part_args *pa = ctx;
    const hvae_prior_args *a = pa->a;
    int64_t d = a->d, lo, hi;
    hvae_split(a->B, part, n_parts, 1, &lo, &hi);
    for (int64_t b = lo; b < hi; b++) {
        double log_q = 0.0;
        for (int64_t j = 0; j < d; j++) {
            float e = a->eps[b * d + j];
            log_q -= 0.5 * ((double)a->lv_q[b * d + j] + (double)(e * e));
        }
        pa->term[b] = log_q - part_log_prior(pa, b);
    }
}

static void vamp_term_forward(double *term, const hvae_prior_args *a, int closed_form)
{
    (void)closed_form; /* no closed form */
    const hvae_workspace *pw = a->ws->prior_ws;
    pseudo_forward(a->model, pw, a->params + a->offset, 0);
    vamp_part_args pa = {a, pw, term, 0.0f};
    vamp_parts(term_forward_part, &pa, a->B);
}

/* Backward, rows: each row's log p(z) into ws->prior_rows, and its own
 * gradients (dz, dlv_q). */
static void term_backward_rows(void *ctx, int part, int n_parts)
{
    const vamp_part_args *pa = ctx;
    const hvae_prior_args *a = pa->a;
    const hvae_model *m = a->model;
    int32_t T = m->config.n_layers;
    int64_t K = m->config.n_pseudo_inputs, d = a->d, lo, hi;
    const float *mu = block_head(pa->pw, &m->enc[T - 1], 0);
    const float *inv_var = ws_act(pa->pw, m->latent[T - 1].z_col);
    float s = pa->scale;
    hvae_split(a->B, part, n_parts, 1, &lo, &hi);
    for (int64_t b = lo; b < hi; b++) {
        const float *z = a->z + b * d;
        double lse = row_log_prior(pa->pw, mu, inv_var, z, K, d);
        a->ws->prior_rows[b] = lse;
        if (a->dlv_q)
            for (int64_t j = 0; j < d; j++)
                a->dlv_q[b * d + j] -= 0.5f * s;
        if (!a->dz)
            continue;
        float *dz = a->dz + b * d;
        for (int64_t k = 0; k < K; k++) {
            const float *mu_k = mu + k * d, *iv_k = inv_var + k * d;
            double w = exp(component_logdensity(z, mu_k, iv_k, pa->pw->reconstruction[k], d) - lse);
            float sw = (float)(s * w);
            for (int64_t j = 0; j < d; j++)
                dz[j] += sw * (z[j] - mu_k[j]) * iv_k[j];
        }
    }
}

/* Backward, components: the gradients of (m_k, l_k) for a range of k from
 * every row (ranges of components never share a gradient). */
static void term_backward_components(void *ctx, int part, int n_parts)
{
    const vamp_part_args *pa = ctx;
    const hvae_prior_args *a = pa->a;
    const hvae_model *m = a->model;
    const hvae_block *top = &m->enc[m->config.n_layers - 1];
    int64_t K = m->config.n_pseudo_inputs, d = a->d, lo, hi;
    const float *mu = block_head(pa->pw, top, 0);
    const float *inv_var = ws_act(pa->pw, m->latent[m->config.n_layers - 1].z_col);
    float *dmu = block_dhead(pa->pw, top, 0), *dlv = block_dhead(pa->pw, top, 1);
    hvae_split(K, part, n_parts, 1, &lo, &hi);
    for (int64_t k = lo; k < hi; k++) {
        const float *mu_k = mu + k * d, *iv_k = inv_var + k * d;
        for (int64_t b = 0; b < a->B; b++) {
            const float *z = a->z + b * d;
            double w = exp(component_logdensity(z, mu_k, iv_k, pa->pw->reconstruction[k], d) -
                           a->ws->prior_rows[b]);
            float sw = (float)(pa->scale * (a->row_weight ? a->row_weight[b] : 1.0f) * w);
            for (int64_t j = 0; j < d; j++) {
                float diff = z[j] - mu_k[j], t = diff * iv_k[j];
                dmu[k * d + j] -= sw * t;
                dlv[k * d + j] += 0.5f * sw * (1.0f - diff * t);
            }
        }
    }
}

static void vamp_term_backward(const hvae_prior_args *a, float scale, int closed_form)
{
    (void)closed_form;
    /* The model is the caller's (hvae_backward's) non-const one: the blocks'
     * backward accumulates into its gradient buffer, a->grads. */
    hvae_model *m = (hvae_model *)a->model;
    const hvae_workspace *pw = a->ws->prior_ws;
    int32_t T = m->config.n_layers;
    int64_t K = m->config.n_pseudo_inputs, D = m->config.n_features;
    /* Zero the pseudo-inputs' encoder gradients (the pass's K rows). */
    for (int32_t i = 0; i < T; i++) {
        const hvae_block *blk = &m->enc[i];
        for (int32_t l = 0; l < blk->n_hidden + blk->n_heads; l++)
            memset(ws_dact(pw, blk->layer[l].col), 0,
                   (size_t)(K * blk->layer[l].n_out) * sizeof(float));
    }
    memset(pw->dx, 0, (size_t)(K * D) * sizeof(float));

    vamp_part_args pa = {a, pw, NULL, scale};
    vamp_parts(term_backward_rows, &pa, a->B);
    vamp_parts(term_backward_components, &pa, a->B);

    for (int32_t i = T - 1; i >= 0; i--)
        hvae_block_backward(m, pw, &m->enc[i], i == 0 ? pw->x : block_head(pw, &m->enc[i - 1], 0),
                            NULL, i == 0 ? pw->dx : block_dhead(pw, &m->enc[i - 1], 0), K);
    const float *P = a->params + a->offset;
    float *dP = a->grads + a->offset;
    for (int64_t k = 0; k < K * D; k++)
        if (!clipped(&m->config) || (P[k] >= 0.0f && P[k] <= 1.0f))
            dP[k] += pw->dx[k];
}

/* ---- log-density ------------------------------------------------------- */

/* log p(z) = row_log_prior's log-sum-exp (the term's, without the 2 pi
 * constants that cancel there) - d/2 log 2 pi. */
static void log_density_part(void *ctx, int part, int n_parts)
{
    const vamp_part_args *pa = ctx;
    int64_t lo, hi;
    hvae_split(pa->a->B, part, n_parts, 1, &lo, &hi);
    for (int64_t b = lo; b < hi; b++)
        pa->term[b] = part_log_prior(pa, b) - 0.5 * (double)pa->a->d * HVAE_LOG_2PI;
}

/* The pseudo-inputs' pass with rowwise products here (the term's BLAS
 * products round their last bit by the threads' column split): the same
 * components to rounding, and the same bits on any number of threads. */
static void vamp_log_density(double *out, const hvae_prior_args *a)
{
    const hvae_workspace *pw = a->ws->prior_ws;
    pseudo_forward(a->model, pw, a->params + a->offset, 1);
    vamp_part_args pa = {a, pw, out, 0.0f};
    vamp_parts(log_density_part, &pa, a->B);
}

/* A component uniformly, then z_T ~ q(z_T | u_k) = N(m_k, diag(exp(l_k))). */
static void vamp_sample(float *z, const hvae_prior_args *a, hvae_rng *rng)
{
    const hvae_model *m = a->model;
    const hvae_workspace *pw = a->ws->prior_ws;
    int32_t T = m->config.n_layers;
    int64_t K = m->config.n_pseudo_inputs, d = a->d;
    pseudo_forward(m, pw, a->params + a->offset, 0);
    const float *mu = block_head(pw, &m->enc[T - 1], 0);
    const float *lv = block_head(pw, &m->enc[T - 1], 1);
    hvae_rng_normal(rng, z, a->B * d);
    for (int64_t b = 0; b < a->B; b++) {
        int64_t k = (int64_t)((double)(hvae_rng_next(rng) >> 11) * 0x1.0p-53 * (double)K);
        k = k < K ? k : K - 1;
        for (int64_t j = 0; j < d; j++)
            z[b * d + j] = mu[k * d + j] + hvae_expf(0.5f * lv[k * d + j]) * z[b * d + j];
    }
}

const hvae_prior_ops hvae_prior_vamp = {
    .check_config = vamp_check_config,
    .workspace_rows = vamp_workspace_rows,
    .n_tensors = vamp_n_tensors,
    .tensor = vamp_tensor,
    .init = vamp_init,
    .term_forward = vamp_term_forward,
    .term_backward = vamp_term_backward,
    .sample = vamp_sample,
    .log_density = vamp_log_density,
};
