/*
 * blas.h -- internal: the few BLAS entry points hvae uses, declared here so
 * that no BLAS header is needed. OpenBLAS builds such as scipy-openblas32
 * prefix every symbol (scipy_cblas_sgemm); HVAE_BLAS_PREFIX names that prefix.
 * With HVAE_NO_BLAS defined a plain C fallback is compiled instead (slow;
 * for sanitizer and valgrind builds).
 */
#ifndef HVAE_BLAS_H
#define HVAE_BLAS_H

#define HVAE_CBLAS_ROW_MAJOR 101
#define HVAE_CBLAS_NO_TRANS 111
#define HVAE_CBLAS_TRANS 112

#ifndef HVAE_BLAS_PREFIX
#define HVAE_BLAS_PREFIX
#endif
#define HVAE_CONCAT_(a, b) a##b
#define HVAE_CONCAT(a, b) HVAE_CONCAT_(a, b)
#define HVAE_BLAS_NAME(name) HVAE_CONCAT(HVAE_BLAS_PREFIX, name)

/* C = alpha * op(A) @ op(B) + beta * C, row-major, 32-bit BLAS integers. */
void hvae_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                const float *A, int lda, const float *B, int ldb, float beta,
                float *C, int ldc);

#endif
