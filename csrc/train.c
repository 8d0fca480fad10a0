/* train.c -- the objectives (ELBO, IWAE), their gradient, and the minibatch
 * training loop. */
#include "hvae.h"
#include "internal.h"

#include <math.h>
#include <string.h>

hvae_objective_options hvae_objective_options_default(void)
{
    hvae_objective_options o;
    o.objective = HVAE_OBJECTIVE_ELBO;
    o.n_samples = 1;
    o.beta = 1.0f;
    o.free_bits = 0.0f;
    o.temperature = 1.0f;
    o.temperature_min = 0.5f;
    o.temperature_decay = 0.0f;
    o.straight_through = 0;
    o.gradient_estimator = HVAE_GRADIENT_AUTO;
    o.score_baseline = HVAE_BASELINE_AUTO;
    o.tc_weight = 0.0f;
    o.tcvae = 0;
    o.tcvae_weights[0] = o.tcvae_weights[1] = o.tcvae_weights[2] = 1.0f;
    o.n_data = 0.0;
    return o;
}

static int objective_is_valid(const hvae_objective_options *o)
{
    return o && (o->objective == HVAE_OBJECTIVE_ELBO || o->objective == HVAE_OBJECTIVE_IWAE) &&
           o->n_samples >= 1 && isfinite(o->beta) && o->beta >= 0.0f &&
           isfinite(o->free_bits) && o->free_bits >= 0.0f &&
           isfinite(o->temperature) && o->temperature > 0.0f &&
           isfinite(o->temperature_min) && o->temperature_min > 0.0f &&
           isfinite(o->temperature_decay) && o->temperature_decay >= 0.0f &&
           hvae_gradient_estimator_name(o->gradient_estimator) &&
           hvae_score_baseline_name(o->score_baseline) &&
           (o->gradient_estimator != HVAE_GRADIENT_SCORE_FUNCTION ||
            o->objective == HVAE_OBJECTIVE_ELBO) &&
           (o->gradient_estimator != HVAE_GRADIENT_SCORE_FUNCTION ||
            o->score_baseline != HVAE_BASELINE_LEAVE_ONE_OUT || o->n_samples > 1) &&
           isfinite(o->tc_weight) &&
           o->tc_weight >= 0.0f && (o->tcvae == 0 || o->tcvae == 1) &&
           isfinite(o->tcvae_weights[0]) && o->tcvae_weights[0] >= 0.0f &&
           isfinite(o->tcvae_weights[1]) && o->tcvae_weights[1] >= 0.0f &&
           isfinite(o->tcvae_weights[2]) && o->tcvae_weights[2] >= 0.0f &&
           isfinite(o->n_data) && o->n_data >= 0.0 &&
           (!o->tcvae || (o->objective == HVAE_OBJECTIVE_ELBO && o->free_bits == 0.0f &&
                          o->tc_weight == 0.0f));
}

/* The estimator named must fit the model: reparameterisation has no
 * categorical layer to relax, Gumbel-softmax needs one; the score function
 * runs on the Markov passes. */
static int estimator_fits(const hvae_model *m, const hvae_objective_options *o)
{
    int categorical = 0;
    for (int32_t i = 0; i < m->config.n_layers; i++)
        categorical |= m->latent[i].K > 1;
    switch (o->gradient_estimator) {
    case HVAE_GRADIENT_REPARAMETERIZATION: return !categorical;
    case HVAE_GRADIENT_GUMBEL_SOFTMAX: return categorical;
    case HVAE_GRADIENT_SCORE_FUNCTION: return m->config.inference == HVAE_INFERENCE_MARKOV;
    default: return 1;
    }
}

/* A step's reduction over the processes of a data-parallel fit (fn NULL:
 * one process), and which of the minibatch's R_full rows (data rows times
 * draws, in minibatch order) this process holds: mine[r] (its own rows are
 * those, in that order). */
typedef struct {
    hvae_reduce_hook fn;
    void *ctx;
    const unsigned char *mine;
    int64_t R_full;
} reducer;

/* The score-function path's per-row weights, from the row signals
 * f_r = reconstruction_r - sum_i kl_weight[i] * term_ri (the row's
 * objective): score_weight[r] = -scale (f_r - b_r), b_r the baseline (see
 * hvae_score_baseline), which never uses draw r itself. The running mean
 * then moves towards this minibatch's mean signal: over every process's
 * rows (summed by `red`), so that all processes keep the one baseline a
 * single process would. Returns nonzero when the reduction stopped the
 * work. */
static int score_weights(hvae_workspace *ws, int64_t B, int64_t S, const float *kl_weight,
                         const hvae_objective_options *o, float scale, const reducer *red)
{
    int32_t T = ws->model->config.n_layers;
    int64_t R = B * S;
    hvae_score_baseline kind = o->score_baseline;
    if (kind == HVAE_BASELINE_AUTO)
        kind = S > 1 ? HVAE_BASELINE_LEAVE_ONE_OUT : HVAE_BASELINE_RUNNING_MEAN;
    double *f = ws->lse_sum; /* lse_sum: free outside IWAE */
    /* The signals' sum and the row count, in the reduction's T + 1 values
     * (hvae_train_reduce_values, which 0) as free bits sends them. */
    double signal[HVAE_MAX_LAYERS + 1] = {0.0};
    signal[T] = (double)R;
    for (int64_t r = 0; r < R; r++) {
        f[r] = ws->reconstruction[r];
        for (int32_t i = 0; i < T; i++)
            f[r] -= (double)kl_weight[i] * ws->kl[i * ws->max_rows + r];
        signal[0] += f[r];
    }
    int running = kind == HVAE_BASELINE_RUNNING_MEAN;
    if (running && red->fn && red->fn(red->ctx, NULL, 0, signal, T + 1))
        return 1;
    R = (int64_t)signal[T]; /* from here on, every process's rows */
    double mean = R > 0 ? signal[0] / (double)R : 0.0;
    /* The very first step has no earlier signal: it centres by its own
     * mean (a bias of one step, order 1/R). */
    if (running && !ws->baseline_set && R > 0) {
        ws->baseline = mean;
        ws->baseline_set = 1;
    }
    for (int64_t b = 0; b < B; b++) {
        double total = 0.0;
        for (int64_t s = 0; s < S; s++)
            total += f[b * S + s];
        for (int64_t s = 0; s < S; s++) {
            int64_t r = b * S + s;
            double base = kind == HVAE_BASELINE_NONE           ? 0.0
                          : kind == HVAE_BASELINE_RUNNING_MEAN ? ws->baseline
                          : (total - f[r]) / (double)(S - 1);
            ws->score_weight[r] = (float)(-(double)scale * (f[r] - base));
        }
    }
    if (running && R > 0)
        ws->baseline = 0.9 * ws->baseline + 0.1 * mean;
    return 0;
}

/* beta-TCVAE's formulas are the diagonal Gaussian's against N(0, I). */
static int tcvae_fits(const hvae_model *m)
{
    return m->config.prior == HVAE_PRIOR_NORMAL &&
           m->latent[m->config.n_layers - 1].K <= 1;
}

/* FactorVAE's penalty needs a discriminator that is not the prior's, and
 * the ELBO. */
static int objective_fits_model(const hvae_model *m, const hvae_objective_options *o)
{
    if (o->tcvae && !tcvae_fits(m))
        return 0;
    return o->tc_weight == 0.0f ||
           (m->disc && m->config.prior != HVAE_PRIOR_DENSITY_RATIO &&
            o->objective == HVAE_OBJECTIVE_ELBO);
}

/* Data-parallel: n_mats matrices of this process's rows (R, d) each into
 * full (n_mats, R_full, d) at their places in the minibatch, zeros
 * elsewhere, summed over the processes: every process then holds the whole
 * minibatch's rows, in the order one process holding them all would see.
 * (Adding zeros is exact.) Nonzero when the reduction stopped the work. */
static int gather_rows(const reducer *red, float *full, const float *const *local,
                       int n_mats, int64_t d)
{
    int64_t R = red->R_full;
    double none = 0.0;
    memset(full, 0, (size_t)(n_mats * R * d) * sizeof(float));
    for (int k = 0; k < n_mats; k++)
        for (int64_t r = 0, i = 0; r < R; r++)
            if (red->mine[r])
                memcpy(full + (k * R + r) * d, local[k] + d * i++, (size_t)d * sizeof(float));
    return red->fn(red->ctx, full, n_mats * R * d, &none, 0);
}

/* Data-parallel: this process's rows of full (R_full, d) added to local
 * (R, d), in order. */
static void add_own_rows(float *local, const float *full, const reducer *red, int64_t d)
{
    for (int64_t r = 0, i = 0; r < red->R_full; r++)
        if (red->mine[r]) {
            for (int64_t k = 0; k < d; k++)
                local[i * d + k] += full[r * d + k];
            i++;
        }
}

/* beta-TCVAE's terms of the R rows of the last forward pass, into the
 * workspace's scratch (mi, tc, dw: R each, then what the backward needs),
 * estimated against the whole minibatch: these rows, or (data-parallel)
 * every process's (mu, lv), gathered into the workspace. Nonzero when the
 * reduction stopped the work. */
static int tcvae_terms_forward(const hvae_model *m, const hvae_workspace *ws,
                               const float *eps_top, int64_t R, double n_data,
                               const reducer *red)
{
    int32_t top = m->config.n_layers - 1;
    const hvae_block *enc = &m->enc[top];
    double *s = ws->tc_scratch;
    int64_t M = ws->max_rows, d = m->latent_dims[top], Rj = R;
    const float *mu = block_head(ws, enc, 0), *lv = block_head(ws, enc, 1);
    const float *mu_j = mu, *lv_j = lv;
    if (red && red->fn) {
        const float *local[2] = {mu, lv};
        float *full = ws->gathered + 3 * M * d;
        if (gather_rows(red, full, local, 2, d))
            return 1;
        Rj = red->R_full;
        mu_j = full;
        lv_j = full + Rj * d;
    }
    hvae_tcvae_forward(s, s + M, s + 2 * M, ws->lse_max, s + 3 * M,
                       ws_act(ws, m->latent[top].z_col), eps_top, lv, R, mu_j, lv_j, Rj, d,
                       n_data);
    return 0;
}

/* beta-TCVAE's gradients of the R rows (scale * d(alpha MI + beta TC +
 * gamma DW), after tcvae_terms_forward) into the workspace's dz, dmu, dlv
 * (R, d_T each, returned in *grads); data-parallel, the gradients of the
 * gathered rows (mu_j, lv_j) are summed over the processes and each takes
 * its own. Nonzero when the reduction stopped the work. */
static int tcvae_gradients(const hvae_model *m, const hvae_workspace *ws, int64_t R,
                           const hvae_objective_options *o, double n_data, float scale,
                           const reducer *red, float **grads)
{
    int32_t top = m->config.n_layers - 1;
    const hvae_block *enc = &m->enc[top];
    int64_t M = ws->max_rows, d = m->latent_dims[top];
    float *dz = ws->gathered, *dmu = dz + M * d, *dlv = dz + 2 * M * d;
    const float *z = ws_act(ws, m->latent[top].z_col);
    const double *lse_dim = ws->tc_scratch + 3 * M;
    grads[0] = dz;
    grads[1] = dmu;
    grads[2] = dlv;
    for (int k = 0; k < 3; k++)
        memset(grads[k], 0, (size_t)(R * d) * sizeof(float));
    if (!red || !red->fn) {
        hvae_tcvae_backward(dz, dlv, dmu, dlv, ws->lse_max, lse_dim, z, R,
                            block_head(ws, enc, 0), block_head(ws, enc, 1), R, d, n_data,
                            o->tcvae_weights, scale);
        return 0;
    }
    int64_t Rf = red->R_full;
    const float *mu_j = ws->gathered + 3 * M * d, *lv_j = mu_j + Rf * d;
    float *full = ws->gathered + 5 * M * d;
    memset(full, 0, (size_t)(2 * Rf * d) * sizeof(float));
    hvae_tcvae_backward(dz, dlv, full, full + Rf * d, ws->lse_max, lse_dim, z, R, mu_j, lv_j,
                        Rf, d, n_data, o->tcvae_weights, scale);
    double none = 0.0;
    if (red->fn(red->ctx, full, 2 * Rf * d, &none, 0))
        return 1;
    add_own_rows(dmu, full, red, d);
    add_own_rows(dlv, full + Rf * d, red, d);
    return 0;
}

hvae_status hvae_tcvae_terms(hvae_model *m, hvae_workspace *ws, const float *x,
                             const float *cond, int64_t n, const float *const *eps,
                             uint64_t noise_seed, double n_data, double *mi, double *tc,
                             double *dw)
{
    if (!m || !ws || ws->model != m || !x || n < 1 || !mi || !tc || !dw ||
        !(n_data >= 1.0) || !isfinite(n_data) || (m->config.n_conditions > 0 && !cond) ||
        !tcvae_fits(m))
        return HVAE_ERR_INVALID_ARGUMENT;
    if (n > ws->max_rows)
        return HVAE_ERR_BATCH_TOO_LARGE;
    int32_t T = m->config.n_layers;
    const float *noise[HVAE_MAX_LAYERS];
    for (int32_t i = 0; i < T; i++)
        noise[i] = eps ? eps[i] : ws_eps(ws, i);
    if (!eps)
        hvae_hashed_noise(m, ws, x, n, 1, noise_seed);
    hvae_forward(m, ws, x, cond, noise, n, 0, 0);
    tcvae_terms_forward(m, ws, noise[T - 1], n, n_data, NULL);
    for (int64_t r = 0; r < n; r++) {
        mi[r] = ws->tc_scratch[r];
        tc[r] = ws->tc_scratch[ws->max_rows + r];
        dw[r] = ws->tc_scratch[2 * ws->max_rows + r];
    }
    return HVAE_OK;
}

/* Gathers the rows of the minibatch start .. start + B - 1 of `order` (all
 * rows when NULL) that x holds, global rows first .. first + n - 1 (a
 * data-parallel process's shard; one process holds them all), into the
 * workspace, each repeated S times (row b * S + s), with their conditions,
 * and moves their noise rows to the same positions. Returns how many it
 * holds. Polls every ws_poll_rows staged rows, and stops half done when
 * the poll fires (the caller's next poll sees it). */
static int64_t stage_shard_rows(const hvae_model *m, const hvae_workspace *ws,
                                const float *x, const float *cond,
                                const int64_t *order, int64_t start, int64_t B,
                                int64_t S, int64_t first, int64_t n)
{
    int64_t D = m->config.n_features, C = m->config.n_conditions;
    int64_t k = 0, piece = ws_poll_rows(D + C), since = 0;
    for (int64_t j = 0; j < B; j++) {
        int64_t g = order ? order[start + j] : start + j;
        if (g < first || g >= first + n)
            continue;
        for (int64_t s = 0; s < S; s++) {
            if (++since == piece) {
                since = 0;
                if (ws_stop(ws))
                    return k;
            }
            memcpy(ws->x + (k * S + s) * D, x + (g - first) * D, (size_t)D * sizeof(float));
            if (C > 0)
                memcpy(ws->cond + (k * S + s) * C, cond + (g - first) * C,
                       (size_t)C * sizeof(float));
        }
        if (k != j)
            for (int32_t i = 0; i < m->config.n_layers; i++) {
                int64_t d = m->latent_dims[i];
                float *e = ws_eps(ws, i);
                memmove(e + k * S * d, e + j * S * d, (size_t)(S * d) * sizeof(float));
            }
        k++;
    }
    return k;
}

/* The rows of one step on one process: stage_shard_rows, or x itself when
 * the rows are consecutive and drawn once (no copy). */
static const float *stage_rows(const hvae_model *m, const hvae_workspace *ws,
                               const float *x, const float *cond,
                               const int64_t *order, int64_t start, int64_t B,
                               int64_t S, const float **cond_out)
{
    int64_t D = m->config.n_features, C = m->config.n_conditions;
    if (!order && S == 1) {
        *cond_out = C > 0 ? cond + start * C : NULL;
        return x + start * D;
    }
    stage_shard_rows(m, ws, x, cond, order, start, B, S, 0, INT64_MAX);
    *cond_out = C > 0 ? ws->cond : NULL;
    return ws->x;
}

/* IWAE over B data rows of S draws whose log-weights log w are in
 * ws->lse_sum: returns the sum over rows of log (1/S) sum_s w_s, and writes
 * each draw's gradient weight softmax_s(log w) / n_total to ws->row_weight. */
static double iwae_bounds(const hvae_workspace *ws, int64_t B, int64_t S, double n_total)
{
    double bounds = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double mx = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            double lw = ws->lse_sum[b * S + s];
            mx = lw > mx ? lw : mx;
        }
        double total = 0.0;
        for (int64_t s = 0; s < S; s++)
            total += exp(ws->lse_sum[b * S + s] - mx);
        for (int64_t s = 0; s < S; s++)
            ws->row_weight[b * S + s] =
                (float)(exp(ws->lse_sum[b * S + s] - mx) / total / n_total);
        bounds += mx + log(total) - log((double)S);
    }
    return bounds;
}

/* The training passes' sampling mode back to exact. */
static void end_sampling(hvae_workspace *ws)
{
    ws->temperature = 0.0f;
    ws->straight_through = ws->score = 0;
}

/* The layers' KL gradient weights (beta, 0 for a layer floored by free
 * bits, 1 for IWAE) into kl_weight[], and their sum over the layers into
 * *kl_total; returns the loss's KL penalty per data row. batch_kl holds
 * the layers' KL sums over every process's rows, then their count. */
static double kl_weights(const hvae_objective_options *o, int32_t T, int iwae,
                         int free_bits, const double *batch_kl, const double *kl_sum,
                         float *kl_weight, double *kl_total)
{
    double penalty = 0.0;
    for (int32_t i = 0; i < T; i++) {
        double mean = batch_kl[T] > 0.0 ? batch_kl[i] / batch_kl[T] : 0.0;
        /* Free bits: a layer whose batch-mean KL is under the floor counts
         * as the floor and receives no KL gradient. */
        int floored = free_bits && mean < (double)o->free_bits;
        kl_weight[i] = iwae ? 1.0f : floored ? 0.0f : o->beta;
        penalty += (iwae ? 1.0 : (double)o->beta) * (floored ? o->free_bits : mean);
        *kl_total += kl_sum[i];
    }
    return penalty;
}

/* beta-TCVAE: the top layer's weighted decomposition replaces beta KL in
 * the loss (its rows' terms, this process's share per data row): updates
 * *penalty, the top layer's kl_weight and the sums of the three terms.
 * Nonzero when the reduction stopped the work. */
static int tcvae_penalty(hvae_model *m, hvae_workspace *ws, const float *const *noise,
                         int64_t B, int64_t R, const hvae_objective_options *o,
                         double n_data, const double *batch_kl, float *kl_weight,
                         double *penalty, const reducer *red, hvae_epoch_stats *sums)
{
    int32_t T = m->config.n_layers, top = T - 1;
    kl_weight[top] = 0.0f;
    *penalty -= (double)o->beta * (batch_kl[T] > 0.0 ? batch_kl[top] / batch_kl[T] : 0.0);
    if (tcvae_terms_forward(m, ws, noise[top], R, n_data, red))
        return 1;
    double weighted = 0.0;
    for (int k = 0; k < 3; k++) {
        double sum = 0.0;
        for (int64_t r = 0; r < R; r++)
            sum += ws->tc_scratch[k * ws->max_rows + r];
        weighted += (double)o->tcvae_weights[k] * sum;
        sums->tcvae[k] += sum / (double)o->n_samples;
    }
    *penalty += B > 0 ? weighted / (double)R : 0.0;
    return 0;
}

/* The (multi-sample) ELBO's backward pass, with free bits, FactorVAE's
 * tc_weight * T(z_T) and beta-TCVAE's top terms; adds the rows' loss to
 * sums->loss. Nonzero when the reduction stopped the work. */
static int elbo_backward(hvae_model *m, hvae_workspace *ws, const float *xb,
                         const float *cb, const float *const *noise, int64_t B,
                         const hvae_objective_options *o, double n_total, double n_data,
                         double rec, double penalty, const float *kl_weight,
                         const reducer *red, hvae_epoch_stats *sums)
{
    int32_t T = m->config.n_layers;
    int64_t S = o->n_samples, R = B * S;
    float scale = (float)(1.0 / (n_total * (double)S));
    hvae_top_terms top_terms = {o->tc_weight, NULL, NULL, NULL};
    if (o->tcvae) {
        float *g[3];
        if (tcvae_gradients(m, ws, R, o, n_data, scale, red, g))
            return 1;
        top_terms.tcvae_dz = g[0];
        top_terms.tcvae_dmu = g[1];
        top_terms.tcvae_dlv = g[2];
    }
    /* FactorVAE: + tc_weight * T(z_T) per draw, at the discriminator
     * as it stands (it steps after the model's gradient). */
    double tc = 0.0;
    if (o->tc_weight != 0.0f && R > 0) {
        int32_t top = T - 1;
        tc = hvae_discriminator_term_forward(m, ws_act(ws, m->latent[top].z_col), R, 0.0,
                                             NULL);
    }
    if (ws->score && score_weights(ws, B, S, kl_weight, o, scale, red))
        return 1;
    if (R > 0)
        hvae_backward(m, ws, xb, cb, noise, R, scale, NULL, kl_weight, 0, &top_terms);
    /* The penalty is per data row: this process's share of it. */
    sums->loss += -(rec / (double)S - penalty * (double)B) +
                  (double)o->tc_weight * tc / (double)S;
    return 0;
}

/* Forward and backward over B data rows times S draws staged at xb, with
 * gradients scaled so that a full loss over n_total data rows accumulates.
 * Adds the rows' sums (per data row, draws averaged) to `sums`. B may be 0
 * (a data-parallel process holding none of a minibatch's rows). With free
 * bits, the layers' minibatch-mean KL terms are summed over the processes
 * by `red` first, so that every process floors the same layers. Returns
 * nonzero when the reduction stopped the work. */
static int objective_step(hvae_model *m, hvae_workspace *ws,
                          const float *xb, const float *cb,
                          const float *const *noise, int64_t B,
                          const hvae_objective_options *o, double n_total,
                          double n_data, const reducer *red, hvae_epoch_stats *sums)
{
    int32_t T = m->config.n_layers;
    int64_t S = o->n_samples, R = B * S;
    int iwae = o->objective == HVAE_OBJECTIVE_IWAE;
    /* The training passes' sampling mode, back to exact on the way out. */
    ws->temperature = o->temperature;
    ws->straight_through = o->straight_through;
    ws->score = o->gradient_estimator == HVAE_GRADIENT_SCORE_FUNCTION;
    if (R > 0)
        hvae_forward(m, ws, xb, cb, noise, R, 0, iwae);

    /* Each row's log-weight (IWAE's draws keep theirs in lse_sum) and the
     * minibatch sums of its terms. */
    double rec = 0.0, kl_sum[HVAE_MAX_LAYERS] = {0}, kl_row[HVAE_MAX_LAYERS];
    for (int64_t r = 0; r < R; r++) {
        double log_w = hvae_row_terms(ws, r, kl_row, NULL);
        if (iwae)
            ws->lse_sum[r] = log_w;
        rec += ws->reconstruction[r];
        for (int32_t i = 0; i < T; i++)
            kl_sum[i] += kl_row[i];
    }

    /* Free bits compare each layer's KL, averaged over the minibatch, with
     * the floor: over every process's rows. */
    int free_bits = !iwae && o->free_bits > 0.0f;
    double batch_kl[HVAE_MAX_LAYERS + 1];
    for (int32_t i = 0; i < T; i++)
        batch_kl[i] = kl_sum[i];
    batch_kl[T] = (double)R;
    if (free_bits && red->fn && red->fn(red->ctx, NULL, 0, batch_kl, T + 1)) {
        end_sampling(ws);
        return 1;
    }

    float kl_weight[HVAE_MAX_LAYERS];
    double kl_total = 0.0;
    double penalty = kl_weights(o, T, iwae, free_bits, batch_kl, kl_sum, kl_weight,
                                &kl_total);
    if (o->tcvae &&
        tcvae_penalty(m, ws, noise, B, R, o, n_data, batch_kl, kl_weight, &penalty, red, sums)) {
        end_sampling(ws);
        return 1;
    }

    double objective = 0.0;
    if (iwae) {
        objective = iwae_bounds(ws, B, S, n_total);
        if (R > 0)
            hvae_backward(m, ws, xb, cb, noise, R, 0.0f, ws->row_weight, kl_weight, 1, NULL);
        sums->loss += -objective;
    } else {
        objective = (rec - kl_total) / (double)S;
        if (elbo_backward(m, ws, xb, cb, noise, B, o, n_total, n_data, rec, penalty,
                          kl_weight, red, sums)) {
            end_sampling(ws);
            return 1;
        }
    }
    sums->objective += objective;
    sums->elbo += (rec - kl_total) / (double)S;
    sums->reconstruction += rec / (double)S;
    for (int32_t i = 0; i < T; i++)
        sums->kl[i] += kl_sum[i] / (double)S;
    sums->n_rows += B;
    end_sampling(ws);
    return 0;
}

static void scale_sums(hvae_epoch_stats *s, double factor, int32_t T)
{
    s->loss *= factor;
    s->objective *= factor;
    s->elbo *= factor;
    s->reconstruction *= factor;
    for (int32_t i = 0; i < T; i++)
        s->kl[i] *= factor;
    for (int k = 0; k < 3; k++)
        s->tcvae[k] *= factor;
}

static void add_sums(hvae_epoch_stats *into, const hvae_epoch_stats *from, int32_t T)
{
    into->loss += from->loss;
    into->objective += from->objective;
    into->elbo += from->elbo;
    into->reconstruction += from->reconstruction;
    for (int32_t i = 0; i < T; i++)
        into->kl[i] += from->kl[i];
    for (int k = 0; k < 3; k++)
        into->tcvae[k] += from->tcvae[k];
    into->n_rows += from->n_rows;
    into->n_batches += from->n_batches;
}

/* True when every gradient is finite. Independent partial sums keep this
 * one vectorised pass; NaN and inf propagate into them. */
HVAE_AVX2_CLONES
int hvae_all_finite(const float *v, int64_t n)
{
    float lanes[2 * HVAE_LANES] = {0};
    int64_t i = 0;
    for (; i + 2 * HVAE_LANES <= n; i += 2 * HVAE_LANES)
        for (int k = 0; k < 2 * HVAE_LANES; k++)
            lanes[k] += v[i + k] * 0.0f;
    float sum = 0.0f;
    for (; i < n; i++)
        sum += v[i] * 0.0f;
    for (int k = 0; k < 2 * HVAE_LANES; k++)
        sum += lanes[k];
    return sum == 0.0f;
}

/* Maps the activations' pages ahead of a workspace's first training step
 * or hvae_loss_and_grad, in polled pieces: calloc leaves them unmapped, and
 * their first writes, inside products that cannot poll, took 0.2 s for one
 * layer of a million rows. Each page's first float is written back
 * unchanged, so nothing changes; once done, never again for this
 * workspace. Nonzero when a poll stopped it. */
static int touch_activations(hvae_workspace *ws)
{
    enum { PAGE_FLOATS = 1024 };
    volatile float *acts = ws->acts;
    int64_t total = ws->max_rows * ws->model->act_cols;
    while (ws->acts_touched < total) {
        int64_t end = total - ws->acts_touched < HVAE_POLL_VALUES
                          ? total
                          : ws->acts_touched + HVAE_POLL_VALUES;
        for (int64_t i = ws->acts_touched; i < end; i += PAGE_FLOATS)
            acts[i] = acts[i];
        ws->acts_touched = end;
        if (ws_stop(ws))
            return 1;
    }
    return 0;
}

hvae_status hvae_loss_and_grad(hvae_model *m, hvae_workspace *ws,
                               const float *x, const float *cond, int64_t n,
                               const float *const *eps, uint64_t noise_seed,
                               const hvae_objective_options *o,
                               hvae_epoch_stats *stats)
{
    if (!m || !ws || ws->model != m || !x || n < 1 || !stats || !objective_is_valid(o) ||
        !estimator_fits(m, o) || !objective_fits_model(m, o) ||
        (m->config.n_conditions > 0 && !cond))
        return HVAE_ERR_INVALID_ARGUMENT;
    int32_t T = m->config.n_layers;
    int64_t S = o->n_samples, rows = ws->max_rows / S;
    if (rows < 1)
        return HVAE_ERR_BATCH_TOO_LARGE;
    memset(stats, 0, sizeof *stats);
    memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
    if (touch_activations(ws))
        return HVAE_ERR_STOPPED;
    const float *noise[HVAE_MAX_LAYERS];
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
        int64_t B = n - r0 < rows ? n - r0 : rows;
        const float *cb;
        const float *xb = stage_rows(m, ws, x, cond, NULL, r0, B, S, &cb);
        for (int32_t i = 0; i < T; i++)
            noise[i] = eps ? eps[i] + r0 * S * m->latent_dims[i] : ws_eps(ws, i);
        if (ws_stop(ws))
            return HVAE_ERR_STOPPED;
        if (!eps)
            hvae_hashed_noise(m, ws, x + r0 * m->config.n_features, B, S, noise_seed);
        static const reducer none = {NULL, NULL, NULL, 0};
        if (ws_stop(ws))
            return HVAE_ERR_STOPPED;
        objective_step(m, ws, xb, cb, noise, B, o, (double)n,
                       o->n_data > 0.0 ? o->n_data : (double)n, &none, stats);
        if (ws_stop(ws))
            return HVAE_ERR_STOPPED;
        stats->n_batches++;
    }
    scale_sums(stats, 1.0 / (double)n, T);
    return HVAE_OK;
}

hvae_train_options hvae_train_options_default(void)
{
    hvae_train_options o;
    o.batch_size = 128;
    o.objective = hvae_objective_options_default();
    o.shuffle = 1;
    o.hook = NULL;
    o.hook_ctx = NULL;
    o.n_global = 0;
    o.shard_start = 0;
    o.reduce = NULL;
    o.reduce_ctx = NULL;
    o.aux_step = NULL;
    o.disc_opt = NULL;
    o.disc_stats = NULL;
    o.aux_ctx = NULL;
    return o;
}

/* The reduction's two kinds of call: the free bits' layer sums and row
 * count (T + 1 doubles; the score function's running-mean baseline sends
 * its signal sum and row count in the same T + 1), and a minibatch's loss
 * terms (PACKED_SUMS + T, then beta-TCVAE's three terms when it trains). */
#define PACKED_SUMS 5

int64_t hvae_train_reduce_values(const hvae_model *m, int which)
{
    int32_t T = m->config.n_layers;
    return which == 0 ? T + 1 : which == 1 ? PACKED_SUMS + T : 0;
}

/* The loss terms of a minibatch as the doubles a reduction sums. */
static int64_t pack_sums(const hvae_epoch_stats *s, int32_t T, int tcvae, double *v)
{
    v[0] = s->loss;
    v[1] = s->objective;
    v[2] = s->elbo;
    v[3] = s->reconstruction;
    v[4] = (double)s->n_rows;
    for (int32_t i = 0; i < T; i++)
        v[PACKED_SUMS + i] = s->kl[i];
    for (int k = 0; tcvae && k < 3; k++)
        v[PACKED_SUMS + T + k] = s->tcvae[k];
    return PACKED_SUMS + T + (tcvae ? 3 : 0);
}

static void unpack_sums(const double *v, int32_t T, int tcvae, hvae_epoch_stats *s)
{
    s->loss = v[0];
    s->objective = v[1];
    s->elbo = v[2];
    s->reconstruction = v[3];
    s->n_rows = (int64_t)v[4];
    for (int32_t i = 0; i < T; i++)
        s->kl[i] = v[PACKED_SUMS + i];
    for (int k = 0; tcvae && k < 3; k++)
        s->tcvae[k] = v[PACKED_SUMS + T + k];
}

/* The minibatch's noise, R rows of every layer, in pieces of
 * HVAE_POLL_DRAWS values with a poll after each (a family draws pieces as
 * it would draw them at once: extension.h). Nonzero when a poll stopped it:
 * the generator has then drawn part of the noise. */
static int draw_noise(const hvae_model *m, const hvae_workspace *ws, hvae_rng *rng, int64_t R)
{
    for (int32_t i = 0; i < m->config.n_layers; i++) {
        float *eps = ws_eps(ws, i);
        int64_t n = R * m->latent_dims[i];
        for (int64_t k = 0; k < n; k += HVAE_POLL_DRAWS) {
            m->latent[i].family->noise(eps + k, rng,
                                       n - k < HVAE_POLL_DRAWS ? n - k : HVAE_POLL_DRAWS);
            if (ws_stop(ws))
                return 1;
        }
    }
    return 0;
}

/* The rows of the minibatch start .. start + B - 1 of `order` this process
 * holds, staged for a step (see stage_rows and stage_shard_rows); their
 * count into *held, their conditions into *cond_out. */
static const float *stage_step(const hvae_model *m, const hvae_workspace *ws,
                               const float *x, const float *cond, int64_t n,
                               const int64_t *order, int64_t start, int64_t B,
                               const hvae_train_options *o, const float **cond_out,
                               int64_t *held)
{
    int64_t S = o->objective.n_samples;
    if (o->n_global > 0) {
        *held = stage_shard_rows(m, ws, x, cond, order, start, B, S, o->shard_start, n);
        *cond_out = m->config.n_conditions > 0 ? ws->cond : NULL;
        return ws->x;
    }
    *held = B;
    return stage_rows(m, ws, x, cond, order, start, B, S, cond_out);
}

/* Data-parallel: sums the gradient and the minibatch's loss terms over the
 * processes, in place. Nonzero when the reduction stopped the work. */
static int reduce_step(hvae_model *m, const hvae_train_options *o, hvae_epoch_stats *batch)
{
    int32_t T = m->config.n_layers;
    double v[PACKED_SUMS + HVAE_MAX_LAYERS + 3];
    int64_t nv = pack_sums(batch, T, o->objective.tcvae, v);
    if (o->reduce(o->reduce_ctx, m->grads, m->n_params, v, nv))
        return 1;
    unpack_sums(v, T, o->objective.tcvae, batch);
    return 0;
}

/* train_steps' arguments: HVAE_OK, or the status it returns for them. */
static hvae_status check_train_args(const hvae_model *m, const hvae_workspace *ws,
                                    const hvae_optimizer *opt, const hvae_rng *rng,
                                    const float *x, const float *cond, int64_t n,
                                    const int64_t *order, const hvae_train_options *o,
                                    const hvae_epoch_stats *stats)
{
    int parallel = o && o->n_global > 0;
    if (!m || !ws || ws->model != m || !opt || !rng || !o || !stats ||
        o->batch_size < 1 || !objective_is_valid(&o->objective) ||
        !estimator_fits(m, &o->objective) || !objective_fits_model(m, &o->objective))
        return HVAE_ERR_INVALID_ARGUMENT;
    /* One process needs rows; a data-parallel one may hold none. */
    if (parallel ? (!o->reduce || n < 0 || o->shard_start < 0 ||
                    o->shard_start > o->n_global - n)
                 : n < 1)
        return HVAE_ERR_INVALID_ARGUMENT;
    if ((n > 0 && (!x || (m->config.n_conditions > 0 && !cond))) || (o->shuffle && !order))
        return HVAE_ERR_INVALID_ARGUMENT;
    int64_t S = o->objective.n_samples;
    if (o->batch_size > ws->max_rows / S)
        return HVAE_ERR_BATCH_TOO_LARGE;
    if (hvae_optimizer_n_params(opt) != m->n_params ||
        (o->disc_opt && (!m->disc || hvae_optimizer_n_params(o->disc_opt) !=
                                         hvae_discriminator_n_params(m))))
        return HVAE_ERR_INVALID_ARGUMENT;
    return HVAE_OK;
}

/* The objective of the next step: the annealed temperature
 * (hvae_objective_options) at the optimizer's step count. */
static hvae_objective_options annealed_objective(const hvae_objective_options *objective,
                                                 hvae_optimizer *opt)
{
    hvae_objective_options step_objective = *objective;
    double tau = objective->temperature *
                 exp(-(double)objective->temperature_decay *
                     (double)*hvae_optimizer_step_count(opt));
    step_objective.temperature =
        (float)(tau > objective->temperature_min ? tau : objective->temperature_min);
    return step_objective;
}

/* Data-parallel: which rows of the minibatch start .. start + B - 1 of
 * `order` (all rows when NULL) this process holds, each repeated S times
 * (as stage_shard_rows stages them), into ws->mine. */
static void mark_own_rows(const hvae_workspace *ws, const int64_t *order, int64_t start,
                          int64_t B, int64_t S, int64_t first, int64_t n)
{
    for (int64_t j = 0; j < B; j++) {
        int64_t g = order ? order[start + j] : start + j;
        for (int64_t s = 0; s < S; s++)
            ws->mine[j * S + s] = g >= first && g < first + n;
    }
}

/* The model's discriminator's step (hvae_train_options.disc_opt) on the R
 * top-layer samples of the last forward pass: on one process those; in a
 * data-parallel fit every process's, gathered in minibatch order, of which
 * each process differentiates its own and the gradient is summed
 * (hvae_discriminator_step_shared), so that every process takes the same
 * step, the one a single process would take. */
static hvae_status discriminator_step(hvae_model *m, const hvae_workspace *ws,
                                      const hvae_train_options *o, hvae_rng *rng,
                                      const reducer *red, int64_t R)
{
    int32_t top = m->config.n_layers - 1;
    const float *z = ws_act(ws, m->latent[top].z_col);
    if (!red->fn)
        return hvae_discriminator_step(m, o->disc_opt, rng, z, NULL, R, o->disc_stats);
    int64_t d = m->latent_dims[top];
    float *full = ws->gathered + 7 * ws->max_rows * d;
    if (gather_rows(red, full, &z, 1, d))
        return HVAE_ERR_STOPPED;
    return hvae_discriminator_step_shared(m, o->disc_opt, rng, full, NULL, red->R_full,
                                          red->mine, red->fn, red->ctx, o->disc_stats);
}

/* The minibatch steps of one epoch (hvae_train_epoch without the
 * rollback). */
static hvae_status train_steps(hvae_model *m, hvae_workspace *ws, hvae_optimizer *opt,
                               hvae_rng *rng, const float *x, const float *cond,
                               int64_t n, int64_t *order, const hvae_train_options *o,
                               hvae_epoch_stats *stats)
{
    hvae_status checked = check_train_args(m, ws, opt, rng, x, cond, n, order, o, stats);
    if (checked != HVAE_OK)
        return checked;
    int parallel = o->n_global > 0;
    int64_t S = o->objective.n_samples, N = parallel ? o->n_global : n;
    int32_t T = m->config.n_layers;
    const float *noise[HVAE_MAX_LAYERS];
    for (int32_t i = 0; i < T; i++)
        noise[i] = ws_eps(ws, i);
    reducer red = {parallel ? o->reduce : NULL, o->reduce_ctx, ws->mine, 0};
    memset(stats, 0, sizeof *stats);
    /* The running-mean baseline starts afresh each epoch: were it carried
     * in the workspace from whatever ran there last, a workspace made anew
     * (grown for a larger evaluation, say) would restart it, and a fit's
     * result would depend on that. */
    ws->baseline_set = 0;
    if (o->shuffle)
        hvae_rng_permutation(rng, order, N);

    hvae_status status = HVAE_OK;
    /* Zeroed here once; each optimizer step zeroes it again as it goes. */
    memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
    if (touch_activations(ws))
        status = HVAE_ERR_STOPPED;
    for (int64_t start = 0; status == HVAE_OK && start < N; start += o->batch_size) {
        int64_t B = N - start < o->batch_size ? N - start : o->batch_size;
        /* Every process draws the whole minibatch's noise, so each row
         * gets the same draws wherever it is held. */
        if (draw_noise(m, ws, rng, B * S)) {
            status = HVAE_ERR_STOPPED;
            break;
        }
        /* The annealed temperature of this step (hvae_objective_options). */
        hvae_objective_options step_objective = annealed_objective(&o->objective, opt);
        const float *cb;
        int64_t held;
        const float *xb = stage_step(m, ws, x, cond, n, o->shuffle ? order : NULL, start, B,
                                     o, &cb, &held);
        if (parallel) {
            mark_own_rows(ws, o->shuffle ? order : NULL, start, B, S, o->shard_start, n);
            red.R_full = B * S;
        }
        if (ws_stop(ws)) {
            status = HVAE_ERR_STOPPED;
            break;
        }
        hvae_epoch_stats batch;
        memset(&batch, 0, sizeof batch);
        if (objective_step(m, ws, xb, cb, noise, held, &step_objective, (double)B,
                           o->objective.n_data > 0.0 ? o->objective.n_data : (double)N, &red,
                           &batch)) {
            status = HVAE_ERR_STOPPED;
            break;
        }
        if (parallel && reduce_step(m, o, &batch)) {
            status = HVAE_ERR_STOPPED;
            break;
        }
        if (o->disc_opt) {
            hvae_status disc = discriminator_step(m, ws, o, rng, &red, held * S);
            if (disc != HVAE_OK) {
                status = disc;
                break;
            }
        }
        if (o->aux_step && o->aux_step(o->aux_ctx, m, ws, xb, cb, held * S)) {
            status = HVAE_ERR_STOPPED;
            break;
        }
        batch.n_batches = 1;
        if (ws_stop(ws)) { /* a poll cut the step short: not applied */
            status = HVAE_ERR_STOPPED;
            break;
        }
        if (!isfinite(batch.loss) || !hvae_optimizer_step_if_finite(opt, m)) {
            status = HVAE_ERR_NONFINITE_LOSS;
            break;
        }
        add_sums(stats, &batch, T);
        if (o->hook) {
            scale_sums(&batch, 1.0 / (double)B, T);
            if (o->hook(o->hook_ctx, stats->n_batches - 1, &batch)) {
                status = HVAE_ERR_STOPPED;
                break;
            }
        }
    }
    if (stats->n_rows > 0)
        scale_sums(stats, 1.0 / (double)stats->n_rows, T);
    return status;
}

/* Divergence handling for every caller: the epoch starts from a saved copy
 * of the parameters, the optimizer's state and the generator; a nonfinite
 * loss or gradient (checked before every step) or nonfinite parameters
 * after the last step (which the per-step check cannot see) bring all of
 * them back, so the model is the last finite one that belongs with its
 * optimizer and generator. */
hvae_status hvae_train_epoch(hvae_model *m, hvae_workspace *ws,
                             hvae_optimizer *opt, hvae_rng *rng,
                             const float *x, const float *cond, int64_t n,
                             int64_t *order, const hvae_train_options *o,
                             hvae_epoch_stats *stats)
{
    if (!m || !opt || !rng)
        return HVAE_ERR_INVALID_ARGUMENT;
    int64_t n_params = m->n_params;
    if (hvae_optimizer_n_params(opt) == n_params)
        hvae_optimizer_save(opt, m->params);
    /* The discriminator's optimizer goes back with the model (its
     * parameters are the model's last tensors, restored above too). */
    float *disc_params = o && o->disc_opt && m->disc &&
                                 hvae_optimizer_n_params(o->disc_opt) ==
                                     hvae_discriminator_n_params(m)
                             ? m->params + m->disc_offset
                             : NULL;
    if (disc_params)
        hvae_optimizer_save(o->disc_opt, disc_params);
    hvae_rng saved_rng = *rng;
    hvae_status st = train_steps(m, ws, opt, rng, x, cond, n, order, o, stats);
    if ((st == HVAE_OK || st == HVAE_ERR_STOPPED) && !hvae_all_finite(m->params, n_params))
        st = HVAE_ERR_NONFINITE_LOSS;
    if (st == HVAE_ERR_NONFINITE_LOSS) {
        hvae_optimizer_restore(opt, m->params);
        if (disc_params)
            hvae_optimizer_restore(o->disc_opt, disc_params);
        *rng = saved_rng;
    }
    return st;
}
