/* train.c -- the loss and its gradient, and the minibatch training loop. */
#include "hvae.h"
#include "internal.h"

#include <math.h>
#include <string.h>

/* Adds the sums of the first B rows' terms to stats (means are taken by
 * finish_stats). */
static void add_batch_terms(const hvae_model *m, const hvae_workspace *ws,
                            int64_t B, float beta, hvae_epoch_stats *stats)
{
    int32_t T = m->config.n_layers;
    for (int64_t b = 0; b < B; b++) {
        double kl_total = 0.0;
        for (int32_t i = 0; i < T; i++) {
            double k = ws->kl[i * ws->max_rows + b];
            stats->kl[i] += k;
            kl_total += k;
        }
        double rec = ws->reconstruction[b];
        stats->reconstruction += rec;
        stats->elbo += rec - kl_total;
        stats->loss += -(rec - (double)beta * kl_total);
    }
    stats->n_rows += B;
}

static void finish_stats(hvae_epoch_stats *stats, int32_t T)
{
    if (stats->n_rows == 0)
        return;
    double inv = 1.0 / (double)stats->n_rows;
    stats->loss *= inv;
    stats->elbo *= inv;
    stats->reconstruction *= inv;
    for (int32_t i = 0; i < T; i++)
        stats->kl[i] *= inv;
}

/* Accumulates sums into `into` from another stats block holding sums. */
static void merge_sums(hvae_epoch_stats *into, const hvae_epoch_stats *from,
                       int32_t T)
{
    into->loss += from->loss;
    into->elbo += from->elbo;
    into->reconstruction += from->reconstruction;
    for (int32_t i = 0; i < T; i++)
        into->kl[i] += from->kl[i];
    into->n_rows += from->n_rows;
    into->n_batches += from->n_batches;
}

static void scale_sums(hvae_epoch_stats *s, double factor, int32_t T)
{
    s->loss *= factor;
    s->elbo *= factor;
    s->reconstruction *= factor;
    for (int32_t i = 0; i < T; i++)
        s->kl[i] *= factor;
}

/* True when every gradient is finite. Independent partial sums keep this
 * one vectorised pass; NaN and inf propagate into them. */
static int all_finite(const float *v, int64_t n)
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

hvae_status hvae_loss_and_grad(hvae_model *m, hvae_workspace *ws,
                               const float *x, int64_t n,
                               const float *const *eps, uint64_t noise_seed,
                               float beta, hvae_epoch_stats *stats)
{
    if (!m || !ws || ws->model != m || !x || n < 1 || !stats)
        return HVAE_ERR_INVALID_ARGUMENT;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features;
    memset(stats, 0, sizeof *stats);
    memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
    const float *noise[HVAE_MAX_LAYERS];
    for (int64_t r0 = 0; r0 < n; r0 += ws->max_rows) {
        int64_t B = n - r0 < ws->max_rows ? n - r0 : ws->max_rows;
        const float *xb = x + r0 * D;
        hvae_chunk_noise(m, ws, x, r0, B, eps, noise_seed, noise);
        hvae_forward(m, ws, xb, noise, B, 0);
        hvae_backward(m, ws, xb, noise, B, (float)(1.0 / (double)n), beta);
        add_batch_terms(m, ws, B, beta, stats);
        stats->n_batches++;
    }
    finish_stats(stats, T);
    return HVAE_OK;
}

hvae_train_options hvae_train_options_default(void)
{
    hvae_train_options o;
    o.batch_size = 128;
    o.beta = 1.0f;
    o.shuffle = 1;
    o.hook = NULL;
    o.hook_ctx = NULL;
    return o;
}

hvae_status hvae_train_epoch(hvae_model *m, hvae_workspace *ws,
                             hvae_optimizer *opt, hvae_rng *rng,
                             const float *x, int64_t n, int64_t *order,
                             const hvae_train_options *o,
                             hvae_epoch_stats *stats)
{
    if (!m || !ws || ws->model != m || !opt || !rng || !x || n < 1 || !o ||
        !stats || (o->shuffle && !order) || o->batch_size < 1 ||
        !isfinite(o->beta) || o->beta < 0.0f)
        return HVAE_ERR_INVALID_ARGUMENT;
    if (o->batch_size > ws->max_rows)
        return HVAE_ERR_BATCH_TOO_LARGE;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features;
    const float *noise[HVAE_MAX_LAYERS];
    for (int32_t i = 0; i < T; i++)
        noise[i] = ws_eps(ws, i);
    memset(stats, 0, sizeof *stats);
    if (o->shuffle)
        hvae_rng_permutation(rng, order, n);

    hvae_status status = HVAE_OK;
    for (int64_t start = 0; start < n; start += o->batch_size) {
        int64_t B = n - start < o->batch_size ? n - start : o->batch_size;
        const float *xb = x + start * D;
        if (o->shuffle) {
            for (int64_t b = 0; b < B; b++)
                memcpy(ws->x + b * D, x + order[start + b] * D,
                       (size_t)D * sizeof(float));
            xb = ws->x;
        }
        for (int32_t i = 0; i < T; i++)
            hvae_rng_normal(rng, ws_eps(ws, i),
                            B * m->latent_dims[i]);
        memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
        hvae_forward(m, ws, xb, noise, B, 0);
        hvae_backward(m, ws, xb, noise, B, (float)(1.0 / (double)B), o->beta);

        hvae_epoch_stats batch;
        memset(&batch, 0, sizeof batch);
        add_batch_terms(m, ws, B, o->beta, &batch);
        batch.n_batches = 1;
        if (!isfinite(batch.loss) || !all_finite(m->grads, m->n_params)) {
            status = HVAE_ERR_NONFINITE_LOSS;
            break;
        }
        hvae_optimizer_step(opt, m);
        merge_sums(stats, &batch, T);
        if (o->hook) {
            hvae_epoch_stats mean = batch;
            scale_sums(&mean, 1.0 / (double)B, T);
            if (o->hook(o->hook_ctx, stats->n_batches - 1, &mean)) {
                status = HVAE_ERR_STOPPED;
                break;
            }
        }
    }
    finish_stats(stats, T);
    return status;
}
