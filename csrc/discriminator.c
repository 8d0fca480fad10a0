/* discriminator.c -- the model's discriminator T(z) over top-layer samples
 * (hvae.h, "The model's discriminator"): one mechanism for FactorVAE's
 * total-correlation penalty and the density-ratio prior. An hvae_mlp bound
 * to the end of the model's parameter buffer (so that saving, loading,
 * pickling and the epoch's rollback carry it), with leaky-ReLU hidden layers
 * and one linear output, trained by its own optimizer.
 *
 * Which rows each network sees per step (train.c, with
 * hvae_train_options.disc_opt): the VAE's step uses the minibatch's
 * samples z_T through T at the current discriminator (FactorVAE:
 * loss += gamma mean T(z); density-ratio prior:
 * the top term -= T(z)); then the discriminator steps on the same
 * minibatch's z_T (no gradient to the VAE) against their counterpart, as
 * disentanglement_lib's FactorVAE does (one batch; the PyTorch reference
 * 1Konny/FactorVAE permutes a second batch). Rows pass the MLP in chunks of
 * HVAE_DISC_CHUNK real rows with as many counterpart rows; FactorVAE's
 * permutation runs within a chunk, i.e. over the whole minibatch up to 256
 * rows. In a data-parallel fit every process gathers the minibatch's
 * samples, draws the same counterparts, differentiates its own rows' terms,
 * and the gradient is summed over the processes before the step
 * (hvae_discriminator_step_shared): the discriminators stay identical. */
#include "hvae.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int64_t hvae_discriminator_n_params(const hvae_model *m)
{
    return m && m->disc ? hvae_mlp_n_params(m->disc) : 0;
}

int64_t hvae_discriminator_offset(const hvae_model *m)
{
    return m && m->disc ? m->disc_offset : 0;
}

hvae_status hvae_discriminator_attach(hvae_model *m)
{
    const hvae_config *c = &m->config;
    int64_t d = m->latent_dims[c->n_layers - 1], widths[HVAE_MAX_HIDDEN + 1];
    int32_t H = c->discriminator_n_hidden;
    memcpy(widths, c->discriminator_hidden, (size_t)H * sizeof(int64_t));
    widths[H] = 1;
    hvae_status st = hvae_mlp_create(d, H + 1, widths, HVAE_ACT_LEAKY_RELU,
                                     2 * HVAE_DISC_CHUNK, &m->disc);
    if (st != HVAE_OK)
        return st;
    hvae_mlp_bind(m->disc, m->params + m->disc_offset);
    m->disc_rows = calloc((size_t)(2 * HVAE_DISC_CHUNK * d), sizeof(float));
    m->disc_dout = calloc(2 * HVAE_DISC_CHUNK, sizeof(float));
    m->disc_perm = calloc(HVAE_DISC_CHUNK, sizeof(int64_t));
    return m->disc_rows && m->disc_dout && m->disc_perm ? HVAE_OK : HVAE_ERR_OUT_OF_MEMORY;
}

void hvae_discriminator_detach(hvae_model *m)
{
    hvae_mlp_free(m->disc);
    free(m->disc_rows);
    free(m->disc_dout);
    free(m->disc_perm);
}

void hvae_discriminator_init(hvae_model *m, uint64_t seed)
{
    if (m->disc)
        hvae_mlp_init(m->disc, seed ^ 0xd15c0d15c0ULL);
}

/* term[r] += coeff * T(z_r) over B rows; returns sum_r T(z_r). rowwise:
 * each row computed alone (evaluation), else BLAS's products (training). */
static double term_forward(const hvae_model *m, const float *z, int64_t B, double coeff,
                           double *term, int rowwise)
{
    int64_t d = hvae_mlp_n_in(m->disc);
    double sum = 0.0;
    for (int64_t r0 = 0; r0 < B; r0 += 2 * HVAE_DISC_CHUNK) {
        int64_t n = B - r0 < 2 * HVAE_DISC_CHUNK ? B - r0 : 2 * HVAE_DISC_CHUNK;
        if (rowwise)
            hvae_mlp_forward_rowwise(m->disc, z + r0 * d, n, NULL);
        else
            hvae_mlp_forward(m->disc, z + r0 * d, n, NULL);
        const float *t = hvae_mlp_output(m->disc);
        for (int64_t r = 0; r < n; r++) {
            sum += t[r];
            if (term)
                term[r0 + r] += coeff * (double)t[r];
        }
    }
    return sum;
}

double hvae_discriminator_term_forward(const hvae_model *m, const float *z, int64_t B,
                                       double coeff, double *term)
{
    return term_forward(m, z, B, coeff, term, 0);
}

double hvae_discriminator_rows_forward(const hvae_model *m, const float *z, int64_t B,
                                       double coeff, double *term)
{
    return term_forward(m, z, B, coeff, term, 1);
}

/* dz (B, d) += coeff * dT/dz at each row (the forward recomputed per chunk,
 * so that any rows may be asked). The discriminator's own gradient buffer
 * receives a by-product, cleared by its next step. */
void hvae_discriminator_term_backward(const hvae_model *m, const float *z, int64_t B,
                                      float coeff, float *dz)
{
    int64_t d = hvae_mlp_n_in(m->disc);
    for (int64_t r = 0; r < 2 * HVAE_DISC_CHUNK; r++)
        m->disc_dout[r] = coeff;
    for (int64_t r0 = 0; r0 < B; r0 += 2 * HVAE_DISC_CHUNK) {
        int64_t n = B - r0 < 2 * HVAE_DISC_CHUNK ? B - r0 : 2 * HVAE_DISC_CHUNK;
        hvae_mlp_forward(m->disc, z + r0 * d, n, NULL);
        hvae_mlp_backward(m->disc, z + r0 * d, m->disc_dout, n, dz + r0 * d);
    }
}

hvae_status hvae_discriminator_log_ratio(hvae_model *m, const float *z, int64_t n, float *out)
{
    if (!m || !m->disc || !z || !out || n < 0)
        return HVAE_ERR_INVALID_ARGUMENT;
    int64_t d = hvae_mlp_n_in(m->disc);
    for (int64_t r0 = 0; r0 < n; r0 += 2 * HVAE_DISC_CHUNK) {
        int64_t b = n - r0 < 2 * HVAE_DISC_CHUNK ? n - r0 : 2 * HVAE_DISC_CHUNK;
        hvae_mlp_forward(m->disc, z + r0 * d, b, out + r0);
    }
    return HVAE_OK;
}

void hvae_permute_dims(float *out, const float *z, int64_t B, int64_t d, hvae_rng *rng,
                       int64_t *perm)
{
    for (int64_t j = 0; j < d; j++) {
        hvae_rng_permutation(rng, perm, B);
        for (int64_t r = 0; r < B; r++)
            out[r * d + j] = z[perm[r] * d + j];
    }
}

/* The clipped cross-entropy of one logit t for label y (1 real, 0 other):
 * -log clip(p), p = sigmoid(t) for y = 1, 1 - sigmoid(t) for y = 0, clipped
 * to [1e-6, 1 - 1e-6] (disentanglement_lib); its gradient in t into *g,
 * zero where the clip binds. */
static double clipped_xent(float t, int y, float *g)
{
    static const double lo = 1e-6, hi = 1.0 - 1e-6;
    double p = 1.0 / (1.0 + exp(-(double)t)); /* P(real) */
    double q = y ? p : 1.0 - p;
    if (q < lo || q > hi) {
        *g = 0.0f;
        return -log(q < lo ? lo : hi);
    }
    *g = (float)(y ? p - 1.0 : p); /* d(-log q)/dt */
    return -log(q);
}

/* Of the chunk's n real rows (rows, n d) and their n counterparts (from
 * rows + n d), those with mine[r] set moved to the front of each half:
 * real to rows, counterparts to rows + k d, k their count (returned). Both
 * moves go to lower addresses in row order, so nothing is overwritten
 * before it is read. */
static int64_t keep_own_rows(float *rows, int64_t n, int64_t d, const unsigned char *mine)
{
    int64_t k = 0;
    for (int64_t r = 0; r < n; r++)
        if (mine[r])
            memmove(rows + k++ * d, rows + r * d, (size_t)d * sizeof(float));
    for (int64_t r = 0, i = 0; r < n; r++)
        if (mine[r])
            memmove(rows + (k + i++) * d, rows + (n + r) * d, (size_t)d * sizeof(float));
    return k;
}

hvae_status hvae_discriminator_step_shared(hvae_model *m, hvae_optimizer *opt, hvae_rng *rng,
                                           const float *z, const float *other, int64_t B,
                                           const unsigned char *mine, hvae_reduce_hook reduce,
                                           void *reduce_ctx, hvae_discriminator_stats *stats)
{
    if (!m || !m->disc || !opt || !z || B < 1 || (!other && !rng) ||
        hvae_optimizer_n_params(opt) != hvae_mlp_n_params(m->disc))
        return HVAE_ERR_INVALID_ARGUMENT;
    hvae_mlp *mlp = m->disc;
    int64_t d = hvae_mlp_n_in(mlp), P = hvae_mlp_n_params(mlp);
    float *grads = hvae_mlp_grads(mlp);
    memset(grads, 0, (size_t)P * sizeof(float));
    int density = m->config.prior == HVAE_PRIOR_DENSITY_RATIO;
    double sums[2] = {0.0, 0.0}; /* T on the real rows; rows classified right */
    for (int64_t r0 = 0; r0 < B; r0 += HVAE_DISC_CHUNK) {
        int64_t n = B - r0 < HVAE_DISC_CHUNK ? B - r0 : HVAE_DISC_CHUNK;
        float *rows = m->disc_rows;
        memcpy(rows, z + r0 * d, (size_t)(n * d) * sizeof(float));
        /* Every row's counterpart, on every process: the same draws. */
        if (other)
            memcpy(rows + n * d, other + r0 * d, (size_t)(n * d) * sizeof(float));
        else if (density)
            hvae_rng_normal(rng, rows + n * d, n * d);
        else
            hvae_permute_dims(rows + n * d, z + r0 * d, n, d, rng, m->disc_perm);
        int64_t k = mine ? keep_own_rows(rows, n, d, mine + r0) : n;
        if (k == 0)
            continue;
        hvae_mlp_forward(mlp, rows, 2 * k, NULL);
        const float *t = hvae_mlp_output(mlp);
        for (int64_t r = 0; r < 2 * k; r++) {
            int real = r < k;
            clipped_xent(t[r], real, &m->disc_dout[r]);
            m->disc_dout[r] /= (float)(2 * B);
            if (real)
                sums[0] += t[r];
            sums[1] += real ? t[r] > 0.0f : t[r] < 0.0f;
        }
        hvae_mlp_backward(mlp, rows, m->disc_dout, 2 * k, NULL);
    }
    if (reduce && reduce(reduce_ctx, grads, P, sums, 2))
        return HVAE_ERR_STOPPED;
    hvae_optimizer_block_step_if_finite(opt, hvae_mlp_params(mlp), grads);
    if (stats) {
        stats->log_ratio += sums[0] / (double)B;
        stats->accuracy += sums[1] / (double)(2 * B);
        stats->n_steps++;
    }
    return HVAE_OK;
}

hvae_status hvae_discriminator_step(hvae_model *m, hvae_optimizer *opt, hvae_rng *rng,
                                    const float *z, const float *other, int64_t B,
                                    hvae_discriminator_stats *stats)
{
    return hvae_discriminator_step_shared(m, opt, rng, z, other, B, NULL, NULL, NULL, stats);
}
