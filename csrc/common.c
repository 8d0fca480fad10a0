/* common.c -- status strings, the BLAS binding and its thread count. */
#include "hvae.h"
#include "blas.h"
#include "internal.h"

#include <stdatomic.h>
#include <string.h>

const char *hvae_status_to_string(hvae_status status)
{
    switch (status) {
    case HVAE_OK: return "success";
    case HVAE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case HVAE_ERR_OUT_OF_MEMORY: return "out of memory";
    case HVAE_ERR_SIZE_OVERFLOW: return "requested size is too large";
    case HVAE_ERR_NONFINITE_INPUT: return "the data contain NaN or infinity";
    case HVAE_ERR_INPUT_RANGE:
        return "the data are outside [0, 1], which a Bernoulli likelihood requires";
    case HVAE_ERR_NONFINITE_LOSS:
        return "the loss or its gradient became NaN or infinite";
    case HVAE_ERR_STOPPED: return "training was stopped";
    case HVAE_ERR_BATCH_TOO_LARGE: return "more rows than the workspace holds";
    case HVAE_ERR_INPUT_MAGNITUDE:
        return "the data hold values beyond +-1e12, too large for float32 training";
    }
    return "unknown status";
}

/* ---- names: see "Names" in hvae.h -------------------------------------- */

/* The name of value v in a table of n names, NULL outside it. */
static const char *table_name(const char *const *names, int n, int v)
{
    return v >= 0 && v < n ? names[v] : NULL;
}
#define NAME_FUNCTION(fn, type, count, ...)                                   \
    const char *fn(type v)                                                    \
    {                                                                         \
        static const char *const names[] = {__VA_ARGS__};                     \
        _Static_assert(sizeof names / sizeof names[0] == count,               \
                       #fn ": one name per value");                           \
        return table_name(names, count, (int)v);                              \
    }

NAME_FUNCTION(hvae_likelihood_name, hvae_likelihood, HVAE_LIKELIHOOD_COUNT,
              "gaussian", "bernoulli")
/* NULL entries: the heads' internal activations. */
NAME_FUNCTION(hvae_activation_name, hvae_activation, HVAE_ACT_COUNT,
              "relu", "tanh", "leaky_relu", "elu", "softplus", NULL, NULL)
NAME_FUNCTION(hvae_decoder_variance_name, hvae_decoder_variance,
              HVAE_DECODER_VARIANCE_COUNT, "learned", "unit")
NAME_FUNCTION(hvae_inference_name, hvae_inference, HVAE_INFERENCE_COUNT,
              "markov", "ladder")
NAME_FUNCTION(hvae_prior_name, hvae_prior_kind, HVAE_PRIOR_COUNT, "standard", "gmm",
              "vamp", "density_ratio")
NAME_FUNCTION(hvae_covariance_type_name, hvae_covariance_type, HVAE_COVARIANCE_COUNT,
              "diag", "full")
NAME_FUNCTION(hvae_latent_family_name, hvae_latent_family,
              HVAE_LATENT_FAMILY_COUNT, "gaussian", "categorical")
NAME_FUNCTION(hvae_markov_kl_name, hvae_markov_kl, HVAE_MARKOV_KL_COUNT,
              "sampled", "analytic")
NAME_FUNCTION(hvae_objective_name, hvae_objective, HVAE_OBJECTIVE_COUNT,
              "elbo", "iwae")
NAME_FUNCTION(hvae_gradient_estimator_name, hvae_gradient_estimator,
              HVAE_GRADIENT_ESTIMATOR_COUNT, "auto", "reparameterization",
              "gumbel_softmax", "score_function")
NAME_FUNCTION(hvae_score_baseline_name, hvae_score_baseline, HVAE_BASELINE_COUNT,
              "auto", "none", "running_mean", "leave_one_out")
NAME_FUNCTION(hvae_optimizer_name, hvae_optimizer_kind, HVAE_OPTIMIZER_COUNT,
              "adam", "sgd")

#ifndef HVAE_NO_BLAS

void HVAE_BLAS_NAME(cblas_sgemm)(int order, int trans_a, int trans_b, int M,
                                 int N, int K, float alpha, const float *A,
                                 int lda, const float *B, int ldb, float beta,
                                 float *C, int ldc);
void HVAE_BLAS_NAME(openblas_set_num_threads)(int n);
int HVAE_BLAS_NAME(openblas_get_num_threads)(void);
char *HVAE_BLAS_NAME(openblas_get_config)(void);

static void raw_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta,
                      float *C, int ldc)
{
    HVAE_BLAS_NAME(cblas_sgemm)(HVAE_CBLAS_ROW_MAJOR, trans_a, trans_b, M, N, K,
                                alpha, A, lda, B, ldb, beta, C, ldc);
}

const char *hvae_blas_info(void)
{
    return HVAE_BLAS_NAME(openblas_get_config)();
}

#else /* HVAE_NO_BLAS: a straightforward reference GEMM. */

static void raw_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta,
                      float *C, int ldc)
{
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) {
                float a = trans_a == HVAE_CBLAS_TRANS ? A[(size_t)k * lda + i]
                                                      : A[(size_t)i * lda + k];
                float b = trans_b == HVAE_CBLAS_TRANS ? B[(size_t)j * ldb + k]
                                                      : B[(size_t)k * ldb + j];
                acc += a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = alpha * acc + (beta == 0.0f ? 0.0f : beta * *c);
        }
    }
}

const char *hvae_blas_info(void) { return "reference C GEMM (HVAE_NO_BLAS)"; }

#endif

/* The thread budget set by hvae_set_num_threads (0: never set, leave
 * OpenBLAS alone) and the count last given to OpenBLAS. With a budget,
 * OpenBLAS runs on one thread and hvae's own pool (parallel.c) splits a
 * product of at least hvae_gemm_split_min multiply-adds into column (or
 * row) blocks, one per thread: one pool for the products and the
 * elementwise work, rather than OpenBLAS's threads and ours taking turns on
 * the same cores. Smaller products run on one thread. Racing writers only
 * ever store valid counts.
 *
 * hvae_gemm_use_openblas_threads = 1 restores the former policy (OpenBLAS's
 * threads for products of at least 2M multiply-adds), for measurements. */
static _Atomic int thread_budget;
static _Atomic int threads_in_use;
int hvae_gemm_use_openblas_threads;
double hvae_gemm_split_min = (double)(1 << 18);
#define OPENBLAS_PARALLEL_MIN (1 << 21)

static void set_blas_threads(int want)
{
#ifndef HVAE_NO_BLAS
    if (want != atomic_load_explicit(&threads_in_use, memory_order_relaxed)) {
        HVAE_BLAS_NAME(openblas_set_num_threads)(want);
        atomic_store_explicit(&threads_in_use, want, memory_order_relaxed);
    }
#else
    (void)want;
    (void)threads_in_use;
#endif
}

typedef struct {
    int trans_a, trans_b, M, N, K;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int lda, ldb, ldc;
    int split_n; /* split the columns of C, else its rows */
} gemm_args;

/* Rows or columns of C in blocks of 16 (OpenBLAS's kernels are 16 wide on
 * AVX2): every element of C is computed by the same single-threaded kernel
 * over the whole of K, whatever the split. */
static void gemm_part(void *ctx, int part, int n_parts)
{
    const gemm_args *g = ctx;
    int64_t lo, hi;
    if (g->split_n) {
        hvae_split(g->N, part, n_parts, 16, &lo, &hi);
        if (hi > lo)
            raw_sgemm(g->trans_a, g->trans_b, g->M, (int)(hi - lo), g->K, g->alpha,
                      g->A, g->lda,
                      g->trans_b == HVAE_CBLAS_NO_TRANS ? g->B + lo : g->B + lo * g->ldb,
                      g->ldb, g->beta, g->C + lo, g->ldc);
    } else {
        hvae_split(g->M, part, n_parts, 16, &lo, &hi);
        if (hi > lo)
            raw_sgemm(g->trans_a, g->trans_b, (int)(hi - lo), g->N, g->K, g->alpha,
                      g->trans_a == HVAE_CBLAS_NO_TRANS ? g->A + lo * g->lda : g->A + lo,
                      g->lda, g->B, g->ldb, g->beta, g->C + lo * g->ldc, g->ldc);
    }
}

void hvae_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                const float *A, int lda, const float *B, int ldb, float beta,
                float *C, int ldc)
{
    int budget = atomic_load_explicit(&thread_budget, memory_order_relaxed);
    double macs = (double)M * N * K;
    if (budget > 0 && hvae_gemm_use_openblas_threads) {
        set_blas_threads(macs < OPENBLAS_PARALLEL_MIN ? 1 : budget);
    } else if (budget > 0) {
        set_blas_threads(1);
        int parts = budget > 1 ? hvae_parts(macs, hvae_gemm_split_min) : 1;
        if (parts > 1) {
            gemm_args g = {trans_a, trans_b, M, N, K, alpha, beta, A, B, C,
                           lda, ldb, ldc, N >= M};
            hvae_parallel(gemm_part, &g, parts < budget ? parts : budget);
            return;
        }
    }
    raw_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void hvae_set_num_threads(int n_threads)
{
    if (n_threads >= 1) {
        atomic_store_explicit(&thread_budget, n_threads, memory_order_relaxed);
        hvae_pool_resize(n_threads);
    }
}

int hvae_get_num_threads(void)
{
    int budget = atomic_load_explicit(&thread_budget, memory_order_relaxed);
#ifndef HVAE_NO_BLAS
    return budget > 0 ? budget : HVAE_BLAS_NAME(openblas_get_num_threads)();
#else
    return budget > 0 ? budget : 1;
#endif
}
