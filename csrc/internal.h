/*
 * internal.h -- internal: the model's layout and helpers shared by the
 * numeric C files. Nothing here is part of the public API.
 */
#ifndef HVAE_INTERNAL_H
#define HVAE_INTERNAL_H

#include "hvae.h"
#include "extension.h"
#include <math.h>

/* Independent partial sums per row reduction; lets the compiler vectorise
 * a reduction it may not reorder. */
#define HVAE_LANES 8

/* log(2 pi), for the Gaussian densities' constants. */
#define HVAE_LOG_2PI 1.83787706640934548356

/* Hot elementwise kernels are compiled twice, for AVX2 and for the baseline
 * ISA, and picked at load time by CPU feature (GCC function multiversioning);
 * the evaluation GEMM likewise for FMA. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(HVAE_NO_CLONES)
#define HVAE_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#define HVAE_FMA_CLONES __attribute__((target_clones("fma", "default")))
/* Latency-bound polynomial loops (the likelihood's softplus): twice the
 * lanes per dependency chain with AVX-512; the same IEEE operations per
 * element (no contraction under -std=c11), so the same bits. */
#define HVAE_AVX512_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HVAE_AVX512_CLONES
#define HVAE_AVX2_CLONES
#define HVAE_FMA_CLONES
#endif

/* Row reductions work on chunks of this many elements: terms computed into
 * a stack buffer by a vectorised loop, summed in float over 16 lanes (at
 * most 16 terms per lane), then added in double. */
#define HVAE_CHUNK 256

static inline double hvae_sum_chunk(const float *v, int64_t n)
{
    float lanes[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++)
            lanes[k] += v[j + k];
    double sum = 0.0;
    for (; j < n; j++)
        sum += v[j];
    for (int k = 0; k < 16; k++)
        sum += lanes[k];
    return sum;
}

/* One dense layer y = act([x, c] @ W + b) of a block, in llm.c's spirit: its
 * parameters' place in the flat buffers (the same offsets index the
 * gradients and the optimizer's moments) and its output's in the workspace. */
typedef struct {
    int64_t W, b;         /* offsets of W (n_in, n_out) and b (n_out) */
    int64_t n_in;         /* rows of W: n_data, then the condition's */
    int64_t n_data;       /* the rows fed by the layer's input */
    int takes_cond;       /* the condition's rows follow */
    int64_t n_out;
    int64_t col;          /* activation column of the output */
    hvae_activation act;
} hvae_dense_layer;

/* One MLP block: n_hidden dense layers with the model's activation, then
 * n_heads linear heads of n_out units each (mu and logvar, or one head). */
#define HVAE_MAX_DENSE (HVAE_MAX_HIDDEN + 2)
typedef struct {
    int32_t n_hidden;
    int32_t n_heads;
    int64_t n_out;                          /* units per head */
    hvae_dense_layer layer[HVAE_MAX_DENSE]; /* hidden1..H, then the heads */
} hvae_block;

/* One latent layer z_{i+1}: its size and family, and where its sample, its
 * noise and (ladder, below the top) its merged posterior live. */
typedef struct {
    int64_t dim;          /* columns of the sample: d, or M*K (categorical) */
    int64_t K;            /* classes per variable; 1 for a Gaussian */
    const hvae_latent_family_ops *family;   /* registry.c's table */
    int64_t z_col;        /* the sample among the activations */
    int64_t eps_col;      /* the noise in the noise buffer */
    int64_t q_col[2];     /* ladder: merged (mu, logvar) */
} hvae_latent_layer;

struct hvae_model {
    hvae_config config;
    /* The samples' widths (latent[i].dim: d_i, or M_i * K_i for a
     * categorical layer), which every pass sizes its buffers by; the
     * config's latent_dims point to config_latent_dims (M_i). */
    int64_t latent_dims[HVAE_MAX_LAYERS];
    int64_t config_latent_dims[HVAE_MAX_LAYERS];
    hvae_latent_family latent_families[HVAE_MAX_LAYERS];   /* config's copies */
    int64_t n_categories[HVAE_MAX_LAYERS];
    int64_t hidden_dims[HVAE_MAX_HIDDEN];
    hvae_block enc[HVAE_MAX_LAYERS];        /* enc[i] infers z_{i+1} */
    hvae_block dec[HVAE_MAX_LAYERS];        /* dec[i] generates z_i (x for i = 0) */
    hvae_latent_layer latent[HVAE_MAX_LAYERS];
    const hvae_prior_ops *prior;            /* p(z_T), registry.c's table */
    int64_t prior_offset;                   /* its tensors in the buffers */
    int32_t n_block_tensors;                /* the tensors before the prior's */
    int64_t act_cols;                       /* activation floats per row */
    int64_t eps_cols;                       /* sum of latent_dims */
    int64_t n_params;
    float *params;
    float *grads;
    int32_t n_tensors;
    hvae_tensor_info *tensors;
    /* The discriminator (discriminator.c), NULL without one: an MLP bound
     * to the buffer at disc_offset, and its scratch for 2 HVAE_DISC_CHUNK
     * rows. */
    hvae_mlp *disc;
    int64_t disc_offset;
    float *disc_rows, *disc_dout;
    int64_t *disc_perm;
};

/* Activations and their gradients share one layout: a B-row matrix of
 * `cols` columns stands at base + max_rows * col. */
struct hvae_workspace {
    const hvae_model *model;
    int64_t max_rows;
    float *x;       /* (max_rows, D): a gathered minibatch */
    float *cond;    /* (max_rows, C): its conditions */
    float *row_weight;       /* (max_rows): IWAE's per-row gradient weights */
    double *lse_max, *lse_sum; /* (max_rows): running log-sum-exp */
    hvae_rng *row_rng;       /* (max_rows): per-row noise streams */
    float *eps;     /* noise, eps_cols per row, layer-blocked */
    float *acts;
    float *dacts;
    int64_t acts_touched;    /* floats of acts whose pages a write has mapped (train.c) */
    double *reconstruction;  /* (max_rows) */
    double *kl;              /* (T, max_rows), layer-major */
    hvae_poll_hook poll;     /* hvae_workspace_set_poll, or NULL */
    void *poll_ctx;
    /* The sampling mode of the passes (train.c sets it for a training step
     * and restores it; evaluation sees the exact default): the
     * Gumbel-softmax temperature (0: exact Gumbel-max samples) and
     * straight-through of categorical layers, and the score-function path
     * (no gradient through any sample; each row r adds score_weight[r] *
     * d log q(z_r) instead). */
    float temperature;
    int straight_through;
    int score;
    float *score_weight;     /* (max_rows) */
    double baseline;         /* the running-mean baseline, and whether set */
    int baseline_set;
    /* A prior's (hvae_prior_ops.workspace_rows; NULL without): its own
     * workspace of that many rows, whose dx holds the gradient of its x
     * (rows, D); and one double per row of this workspace. */
    struct hvae_workspace *prior_ws;
    float *dx;
    double *prior_rows;
    double *tc_scratch;      /* (max_rows, 2 d_T + 3): beta-TCVAE's (tcvae.c) */
    /* (max_rows, HVAE_GATHER_COLS d_T): beta-TCVAE's gradients of the rows
     * (dz, dmu, dlv), and a data-parallel step's gathers of the whole
     * minibatch (train.c: mu and lv, their gradients, z_T) */
    float *gathered;
    unsigned char *mine;     /* (max_rows): a data-parallel step's rows held here */
    /* packed.c: the weights packed for the row-wise kernel (NULL until a
     * large evaluation call), and whether the current call reads them. */
    struct hvae_packed_cache *packed;
    int packed_on;
};

/* packed.c: an evaluation call of n_rows rows brackets its passes with
 * hvae_packed_begin (checks the packed weights against the parameters,
 * repacks if they differ, and turns them on for calls large enough to gain)
 * and hvae_packed_end; hvae_packed_layer is layer l's packed W (part 0: its
 * data rows, 1: its condition rows) while on, else NULL. */
typedef struct hvae_packed_cache hvae_packed_cache;
void hvae_packed_begin(const hvae_model *m, hvae_workspace *ws, int64_t n_rows);
void hvae_packed_end(hvae_workspace *ws);
const float *hvae_packed_layer(const hvae_workspace *ws, const hvae_block *blk, int32_t l,
                               int part);
void hvae_packed_free(hvae_packed_cache *c);

/* Whether the workspace's poll hook asks the current call to stop. */
/* One term l into a running log-sum-exp (*top, *sum): afterwards
 * *top + log(*sum) is log sum_i exp(l_i) over the terms so far. Start from
 * top = -INFINITY, sum = 0. */
static inline void hvae_lse_add(double *top, double *sum, double l)
{
    if (l > *top) {
        *sum = *sum * exp(*top - l) + 1.0;
        *top = l;
    } else {
        *sum += exp(l - *top);
    }
}

static inline int ws_stop(const hvae_workspace *ws)
{
    return ws->poll && ws->poll(ws->poll_ctx);
}

/* Long row-wise passes (a training minibatch of a million rows times draws:
 * its staging, the likelihood passes, an activation's backward) run in
 * pieces of about HVAE_POLL_VALUES values, a few milliseconds of work, and
 * poll between them: in one piece such a pass ran for 0.1-0.5 s unpolled.
 * Random draws cost more (about 16 ns a normal): the noise is drawn in
 * pieces of HVAE_POLL_DRAWS values. Smaller pieces would cost parallel
 * regions (pieces of 2**20 values made a step 7% slower on two threads).
 * Only passes whose every value is computed alone, or summed in row order
 * whatever the pieces, are cut, so the pieces change no result.
 * ws_poll_rows: the rows of a piece of a pass `width` values wide. */
#define HVAE_POLL_VALUES ((int64_t)1 << 22)
#define HVAE_POLL_DRAWS ((int64_t)1 << 20)
static inline int64_t ws_poll_rows(int64_t width)
{
    int64_t rows = HVAE_POLL_VALUES / (width > 0 ? width : 1);
    return rows > 0 ? rows : 1;
}

static inline float *ws_act(const hvae_workspace *ws, int64_t col)
{
    return ws->acts + ws->max_rows * col;
}
static inline float *ws_dact(const hvae_workspace *ws, int64_t col)
{
    return ws->dacts + ws->max_rows * col;
}
static inline float *ws_eps(const hvae_workspace *ws, int32_t layer)
{
    return ws->eps + ws->max_rows * ws->model->latent[layer].eps_col;
}

/* Head h (0: mu or logits, 1: logvar) of a block as a matrix in acts. */
static inline float *block_head(const hvae_workspace *ws, const hvae_block *blk,
                                int h)
{
    return h < blk->n_heads ? ws_act(ws, blk->layer[blk->n_hidden + h].col) : NULL;
}
static inline float *block_dhead(const hvae_workspace *ws,
                                 const hvae_block *blk, int h)
{
    return h < blk->n_heads ? ws_dact(ws, blk->layer[blk->n_hidden + h].col) : NULL;
}

/* parallel.c: hvae's thread pool (see there). A task computes part `part`
 * of n_parts; hvae_parallel runs parts 0..n-1 of it, n at most n_parts and
 * the pool's thread count, the caller taking part 0 and any part no worker
 * has claimed, and returns when all are done (n = 1 when the pool is busy
 * or the call is nested). Any thread may run any part: a task must depend
 * on (ctx, part, n_parts) only, never on the thread that runs it, and its
 * parts must not wait for each other. */
#define HVAE_MAX_THREADS 64
typedef void (*hvae_task_fn)(void *ctx, int part, int n_parts);

#ifdef HVAE_POOL_STATS
/* bench/profile_step.c's view of the pool (parallel.c, profile builds
 * only): the last HVAE_POOL_TRACE regions, entry hvae_pool_regions %
 * HVAE_POOL_TRACE, times in CLOCK_MONOTONIC ns: the region's start, the end
 * of the caller's parts (part 0 and any it took), part 1 (run by a worker,
 * or by the caller when part1_by_caller), the end of the caller's wait for
 * the workers. */
#define HVAE_POOL_TRACE 8192
typedef struct {
    hvae_task_fn fn;
    int64_t start, caller_end, worker_start, worker_end, end;
    int part1_by_caller;
} hvae_pool_trace_entry;
extern hvae_pool_trace_entry hvae_pool_trace[HVAE_POOL_TRACE];
extern long hvae_pool_regions;
extern double hvae_pool_wait_seconds;
#endif
void hvae_parallel(hvae_task_fn fn, void *ctx, int n_parts);
/* Makes the pool n_threads strong (n_threads - 1 workers); returns the
 * thread count it has (fewer if threads could not be made). */
int hvae_pool_resize(int n_threads);
int hvae_pool_threads(void);
/* Parts to ask of hvae_parallel for `work` units (multiply-adds, elements)
 * when a part pays from min_work up: one per min_work (so that many cores
 * do not each get a sliver), 1 below it. Tests set hvae_parallel_min_scale
 * to 0 to split everything. */
extern double hvae_parallel_min_scale;
static inline int hvae_parts(double work, double min_work)
{
    double least = min_work * hvae_parallel_min_scale;
    if (least <= 0.0 || work >= least * HVAE_MAX_THREADS)
        return HVAE_MAX_THREADS;
    return work < least ? 1 : (int)(work / least);
}

/* Part `part` of [0, n) in n_parts pieces whose bounds are multiples of
 * align (but the last). */
static inline void hvae_split(int64_t n, int part, int n_parts, int64_t align,
                              int64_t *begin, int64_t *end)
{
    int64_t blocks = (n + align - 1) / align;
    int64_t b0 = blocks * part / n_parts, b1 = blocks * (part + 1) / n_parts;
    *begin = b0 * align < n ? b0 * align : n;
    *end = b1 * align < n ? b1 * align : n;
}

/* activations.c */
void hvae_activation_backward_row_inplace(float *d, float *dbias,
                                          const float *out,
                                          hvae_activation act, int64_t n);
void hvae_bias_activation_row_inplace(float *x, const float *bias,
                                      hvae_activation act, int64_t n);

/* linear.c: the dense layer with an optional condition, whose n_cond
 * columns meet the rows n_in.. of W (no concatenated copy is made). With
 * rowwise, each row's outputs are computed independently of the other rows
 * (evaluation; see gemm_rowwise). */
void hvae_dense_cond_forward(float *out, const float *inp, const float *cond,
                             const float *weight, const float *bias,
                             hvae_activation act, int64_t B, int64_t n_in,
                             int64_t n_cond, int64_t n_out, int rowwise);
/* The row-wise kernel's weights packed once (linear.c): W (n_in, n_out) in
 * the order its panels are read, hvae_rowwise_packed_floats(n_in, n_out)
 * floats, 32-byte aligned (0 when the kernel that reads them is not
 * available: then nothing is packed). hvae_dense_packed_forward is
 * hvae_dense_cond_forward reading the packed copies of W's data rows and
 * condition rows (either may be NULL: copied from weight as usual); the
 * results are the same bits. */
int64_t hvae_rowwise_packed_floats(int64_t n_in, int64_t n_out);
void hvae_rowwise_pack(float *packed, const float *weight, int64_t n_in, int64_t n_out);
void hvae_dense_packed_forward(float *out, const float *inp, const float *cond,
                               const float *weight, const float *packed,
                               const float *packed_cond, const float *bias,
                               hvae_activation act, int64_t B, int64_t n_in,
                               int64_t n_cond, int64_t n_out, int rowwise);
/* ws (NULL: none): a long backward polls its poll hook between pieces
 * (ws_poll_rows) and stops half done when it fires. */
void hvae_dense_cond_backward(float *dinp, float *dweight, float *dbias,
                              float *dout, const float *out, const float *inp,
                              const float *cond, const float *weight,
                              hvae_activation act, int64_t B, int64_t n_in,
                              int64_t n_cond, int64_t n_out, const hvae_workspace *ws);

/* optim.c: the training loop's update. When every gradient is finite,
 * applies one optimizer step and zeroes the gradient (fused into the same
 * pass), returning 1; otherwise changes nothing and returns 0. Both the
 * check and the update are split over the pool. */
int hvae_optimizer_step_if_finite(hvae_optimizer *opt, hvae_model *model);
/* The same over any block the optimizer was made for. */
int hvae_optimizer_block_step_if_finite(hvae_optimizer *opt, float *params, float *grads);
/* The training loop's rollback point: save copies params (the optimizer's
 * n_params floats), the moments and the step count into buffers the
 * optimizer allocated with itself; restore copies them back. */
void hvae_optimizer_save(hvae_optimizer *opt, const float *params);
void hvae_optimizer_restore(hvae_optimizer *opt, float *params);

/* mlp.c: the MLP's parameters at external memory of hvae_mlp_n_params
 * floats (its own are freed); its input width. */
void hvae_mlp_bind(hvae_mlp *mlp, float *params);
int64_t hvae_mlp_n_in(const hvae_mlp *mlp);
/* hvae_mlp_forward with linear.c's rowwise products: a row's output does
 * not depend on the other rows or on the thread count (evaluation). */
hvae_status hvae_mlp_forward_rowwise(hvae_mlp *mlp, const float *x, int64_t B, float *out);

/* discriminator.c: real rows per MLP pass of a discriminator step. */
#define HVAE_DISC_CHUNK 256
hvae_status hvae_discriminator_attach(hvae_model *m);
void hvae_discriminator_detach(hvae_model *m);
void hvae_discriminator_init(hvae_model *m, uint64_t seed);
/* term[r] += coeff * T(z_r) (term may be NULL); returns sum_r T(z_r). */
double hvae_discriminator_term_forward(const hvae_model *m, const float *z, int64_t B,
                                       double coeff, double *term);
/* The same with each row computed alone (hvae_mlp_forward_rowwise): the
 * same bits whatever the other rows and the thread count (evaluation). */
double hvae_discriminator_rows_forward(const hvae_model *m, const float *z, int64_t B,
                                       double coeff, double *term);
/* dz += coeff * dT/dz over B rows. */
void hvae_discriminator_term_backward(const hvae_model *m, const float *z, int64_t B,
                                      float coeff, float *dz);

/* tcvae.c: beta-TCVAE's terms of Bi rows i of the top layer (z, its noise
 * and q's lv_self, (Bi, d) each) against the B rows j of the minibatch (q's
 * mu and lv, (B, d) each; the same rows when one process holds them all)
 * from a data set of n_data rows, into mi, tc, dw (Bi each); lse_joint (Bi)
 * and lse_dim (2 Bi d) keep what the backward needs. The backward
 * accumulates scale * the gradient of the rows' weights[0] MI + weights[1]
 * TC + weights[2] DW into dz, dlv_self (Bi, d) and dmu, dlv (B, d). */
void hvae_tcvae_forward(double *mi, double *tc, double *dw, double *lse_joint,
                        double *lse_dim, const float *z, const float *eps,
                        const float *lv_self, int64_t Bi, const float *mu, const float *lv,
                        int64_t B, int64_t d, double n_data);
void hvae_tcvae_backward(float *dz, float *dlv_self, float *dmu, float *dlv,
                         const double *lse_joint, const double *lse_dim, const float *z,
                         int64_t Bi, const float *mu, const float *lv, int64_t B, int64_t d,
                         double n_data, const float *weights, float scale);

/* The training terms beyond the layers' (FactorVAE's, beta-TCVAE's) that
 * hvae_backward differentiates into the top layer. */
typedef struct {
    float tc_weight;          /* FactorVAE's gamma, 0 for none */
    /* beta-TCVAE (then the top layer's kl_weight is 0): the gradients of
     * its terms, computed ahead (train.c), added to the top layer's dz,
     * dmu and dlv (B, d_T each); NULL for none. */
    const float *tcvae_dz, *tcvae_dmu, *tcvae_dlv;
} hvae_top_terms;

/* Columns (times d_T) of hvae_workspace.gathered. */
#define HVAE_GATHER_COLS 8

/* rng.c */
uint64_t hvae_splitmix64(uint64_t *state);
float hvae_rng_uniform_float(hvae_rng *rng);

/* model.c: passes over the first B rows of the workspace. eps[i] points to
 * (B, d_{i+1}) noise; cond to (B, C) conditions or NULL. rowwise picks the
 * evaluation GEMM; sampled makes every layer's term the sampled log-density
 * ratio (IWAE, log-likelihood) instead of a closed-form KL where exact. */
void hvae_block_forward(const hvae_model *m, const hvae_workspace *ws,
                        const hvae_block *blk, const float *inp,
                        const float *cond, int64_t B, int rowwise);
void hvae_block_backward(hvae_model *m, const hvae_workspace *ws,
                         const hvae_block *blk, const float *inp,
                         const float *cond, float *dinp, int64_t B);
void hvae_forward(const hvae_model *m, const hvae_workspace *ws,
                  const float *x, const float *cond, const float *const *eps,
                  int64_t B, int rowwise, int sampled);
/* Gradient of sum_r row_weight[r] * (-reconstruction_r
 * + sum_i kl_weight[i] * kl_ri + the top terms' (FactorVAE's tc_weight *
 * T(z_T,r), beta-TCVAE's weighted terms, after their forward); row_weight
 * NULL means `scale` for every row; top_terms may be NULL. */
void hvae_backward(hvae_model *m, const hvae_workspace *ws, const float *x,
                   const float *cond, const float *const *eps, int64_t B,
                   float scale, const float *row_weight, const float *kl_weight,
                   int sampled, const hvae_top_terms *top_terms);
/* Row r's log-weight log p(x|z_1) - sum_i term_i after hvae_forward (the
 * one place the objectives assemble it; see model.c), its layer terms into
 * kl (T, or NULL) and its ELBO into *elbo (or NULL). */
double hvae_row_terms(const hvae_workspace *ws, int64_t r, double *kl, double *elbo);
/* Fills the workspace noise for B data rows, each replicated S times (row
 * b * S + s), from each data row's hashed generator. One row's long run of
 * draws polls between pieces (ws_poll_rows) and stops half done when the
 * poll fires. */
void hvae_hashed_noise(const hvae_model *m, const hvae_workspace *ws,
                       const float *x, int64_t B, int64_t S,
                       uint64_t noise_seed);
/* Seeds rng from a row's values and a seed. */
void hvae_row_rng(hvae_rng *rng, const float *row, int64_t D, uint64_t seed);

#endif
