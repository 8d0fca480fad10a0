/* common.c -- status strings, the BLAS binding and its thread count. */
#include "hvae.h"
#include "blas.h"

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

#ifndef HVAE_NO_BLAS

void HVAE_BLAS_NAME(cblas_sgemm)(int order, int trans_a, int trans_b, int M,
                                 int N, int K, float alpha, const float *A,
                                 int lda, const float *B, int ldb, float beta,
                                 float *C, int ldc);
void HVAE_BLAS_NAME(openblas_set_num_threads)(int n);
int HVAE_BLAS_NAME(openblas_get_num_threads)(void);
char *HVAE_BLAS_NAME(openblas_get_config)(void);

/* The thread budget set by hvae_set_num_threads (0: never set, leave
 * OpenBLAS alone) and the count last given to OpenBLAS. Products below
 * HVAE_GEMM_PARALLEL_MIN multiply-adds run on one thread: waking a second
 * one costs more than it saves (a 64x64x64 product takes 4x longer on two
 * threads than on one here), and when another process holds the other core
 * a threaded small product can wait a whole scheduler slice (the digits demo
 * ran 100x slower so). OpenBLAS's own cut-off sits far lower. Racing writers
 * only ever store valid counts. */
#define HVAE_GEMM_PARALLEL_MIN (1 << 21)
static _Atomic int thread_budget;
static _Atomic int threads_in_use;

void hvae_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                const float *A, int lda, const float *B, int ldb, float beta,
                float *C, int ldc)
{
    int budget = atomic_load_explicit(&thread_budget, memory_order_relaxed);
    if (budget > 0) {
        int want = (double)M * N * K < HVAE_GEMM_PARALLEL_MIN ? 1 : budget;
        if (want != atomic_load_explicit(&threads_in_use, memory_order_relaxed)) {
            HVAE_BLAS_NAME(openblas_set_num_threads)(want);
            atomic_store_explicit(&threads_in_use, want, memory_order_relaxed);
        }
    }
    HVAE_BLAS_NAME(cblas_sgemm)(HVAE_CBLAS_ROW_MAJOR, trans_a, trans_b, M, N,
                                K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void hvae_set_num_threads(int n_threads)
{
    if (n_threads >= 1)
        atomic_store_explicit(&thread_budget, n_threads, memory_order_relaxed);
}

int hvae_get_num_threads(void)
{
    int budget = atomic_load_explicit(&thread_budget, memory_order_relaxed);
    return budget > 0 ? budget : HVAE_BLAS_NAME(openblas_get_num_threads)();
}

const char *hvae_blas_info(void)
{
    return HVAE_BLAS_NAME(openblas_get_config)();
}

#else /* HVAE_NO_BLAS: a straightforward reference GEMM. */

void hvae_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
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

void hvae_set_num_threads(int n_threads) { (void)n_threads; }
int hvae_get_num_threads(void) { return 1; }
const char *hvae_blas_info(void) { return "reference C GEMM (HVAE_NO_BLAS)"; }

#endif
