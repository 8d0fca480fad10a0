/* linear.c -- the dense layer out = act(inp @ W + b), forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "blas.h"

#include <math.h>

void hvae_dense_forward(float *out, const float *inp, const float *weight,
                        const float *bias, hvae_activation act, int64_t B,
                        int64_t n_in, int64_t n_out)
{
    /* inp (B, n_in), weight (n_in, n_out), bias (n_out) -> out (B, n_out) */
    hvae_dense_cond_forward(out, inp, NULL, weight, bias, act, B, n_in, 0, n_out, 0);
}

void hvae_dense_backward(float *dinp, float *dweight, float *dbias,
                         float *dout, const float *out, const float *inp,
                         const float *weight, hvae_activation act, int64_t B,
                         int64_t n_in, int64_t n_out)
{
    /* dout (B, n_out) becomes dpre in place; dweight (n_in, n_out) +=
     * inp^T @ dpre; dbias += column sums of dpre; dinp (B, n_in) +=
     * dpre @ weight^T. */
    if (B <= 0 || n_out <= 0)
        return;
    for (int64_t b = 0; b < B; b++)
        hvae_activation_backward_row_inplace(dout + b * n_out, dbias,
                                             out + b * n_out, act, n_out);
    hvae_sgemm(HVAE_CBLAS_TRANS, HVAE_CBLAS_NO_TRANS, (int)n_in, (int)n_out,
               (int)B, 1.0f, inp, (int)n_in, dout, (int)n_out, 1.0f, dweight,
               (int)n_out);
    if (dinp)
        hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_TRANS, (int)B, (int)n_in,
                   (int)n_out, 1.0f, dout, (int)n_out, weight, (int)n_out,
                   1.0f, dinp, (int)n_in);
}

/*
 * out (B, n_out) = inp (B, n_in) @ weight (n_in, n_out), computed so that
 * every output element is the same sequence of fused multiply-adds over
 * k = 0..n_in-1 whatever the other rows are. BLAS results depend on a row's
 * position in the batch (at the 1e-7 level); evaluation (transform,
 * score_samples, decode, sample) must not, so that a row's result does not
 * change when the data set is reordered or split.
 *
 * Register blocking: 4 rows x 16 columns of accumulators; weight panels of
 * 16 columns stay in cache while all rows stream past. fmaf is exact
 * (one rounding), so its vector and scalar forms agree bit for bit.
 */
#define RW_COLS 16
#define RW_ROWS 4

#if defined(__GNUC__) && defined(__x86_64__) && !defined(HVAE_NO_CLONES)
#include <immintrin.h>
#define HVAE_HAVE_FMA_KERNEL 1

/* The same computation with AVX + FMA registers: a 4 x 16 tile of
 * accumulators (8 ymm), one broadcast per row and two weight loads per k.
 * Vector and scalar FMAs round identically, so the column tail agrees. */
__attribute__((target("avx,fma")))
static void gemm_rowwise_fma(float *out, const float *inp, const float *weight,
                             int64_t B, int64_t n_in, int64_t n_out, int accumulate)
{
    int64_t full_cols = n_out - n_out % RW_COLS;
    for (int64_t j0 = 0; j0 < full_cols; j0 += RW_COLS) {
        const float *w = weight + j0;
        int64_t b = 0;
        for (; b + RW_ROWS <= B; b += RW_ROWS) {
            __m256 acc[RW_ROWS][2];
            for (int r = 0; r < RW_ROWS; r++) {
                float *o = out + (b + r) * n_out + j0;
                acc[r][0] = accumulate ? _mm256_loadu_ps(o) : _mm256_setzero_ps();
                acc[r][1] = accumulate ? _mm256_loadu_ps(o + 8) : _mm256_setzero_ps();
            }
            const float *x = inp + b * n_in;
            for (int64_t k = 0; k < n_in; k++) {
                __m256 w0 = _mm256_loadu_ps(w + k * n_out);
                __m256 w1 = _mm256_loadu_ps(w + k * n_out + 8);
                for (int r = 0; r < RW_ROWS; r++) {
                    __m256 v = _mm256_broadcast_ss(x + r * n_in + k);
                    acc[r][0] = _mm256_fmadd_ps(v, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(v, w1, acc[r][1]);
                }
            }
            for (int r = 0; r < RW_ROWS; r++) {
                float *o = out + (b + r) * n_out + j0;
                _mm256_storeu_ps(o, acc[r][0]);
                _mm256_storeu_ps(o + 8, acc[r][1]);
            }
        }
        for (; b < B; b++) {
            float *o = out + b * n_out + j0;
            __m256 a0 = accumulate ? _mm256_loadu_ps(o) : _mm256_setzero_ps();
            __m256 a1 = accumulate ? _mm256_loadu_ps(o + 8) : _mm256_setzero_ps();
            const float *x = inp + b * n_in;
            for (int64_t k = 0; k < n_in; k++) {
                __m256 v = _mm256_broadcast_ss(x + k);
                a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + k * n_out), a0);
                a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + k * n_out + 8), a1);
            }
            _mm256_storeu_ps(o, a0);
            _mm256_storeu_ps(o + 8, a1);
        }
    }
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = full_cols; j < n_out; j++) {
            __m128 acc = _mm_set_ss(accumulate ? out[b * n_out + j] : 0.0f);
            for (int64_t k = 0; k < n_in; k++)
                acc = _mm_fmadd_ss(_mm_set_ss(inp[b * n_in + k]),
                                   _mm_set_ss(weight[k * n_out + j]), acc);
            out[b * n_out + j] = _mm_cvtss_f32(acc);
        }
    }
}
#endif

static void gemm_rowwise(float *out, const float *inp, const float *weight,
                         int64_t B, int64_t n_in, int64_t n_out, int accumulate)
{
#ifdef HVAE_HAVE_FMA_KERNEL
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("fma")) {
        gemm_rowwise_fma(out, inp, weight, B, n_in, n_out, accumulate);
        return;
    }
#endif
    int64_t full_cols = n_out - n_out % RW_COLS;
    for (int64_t j0 = 0; j0 < full_cols; j0 += RW_COLS) {
        const float *w = weight + j0;
        int64_t b = 0;
        for (; b + RW_ROWS <= B; b += RW_ROWS) {
            float acc[RW_ROWS][RW_COLS] = {{0}};
            if (accumulate)
                for (int r = 0; r < RW_ROWS; r++)
                    for (int j = 0; j < RW_COLS; j++)
                        acc[r][j] = out[(b + r) * n_out + j0 + j];
            const float *x = inp + b * n_in;
            for (int64_t k = 0; k < n_in; k++) {
                const float *wk = w + k * n_out;
                for (int r = 0; r < RW_ROWS; r++) {
                    float xr = x[r * n_in + k];
                    for (int j = 0; j < RW_COLS; j++)
                        acc[r][j] = fmaf(xr, wk[j], acc[r][j]);
                }
            }
            for (int r = 0; r < RW_ROWS; r++)
                for (int j = 0; j < RW_COLS; j++)
                    out[(b + r) * n_out + j0 + j] = acc[r][j];
        }
        for (; b < B; b++) {
            float acc[RW_COLS] = {0};
            if (accumulate)
                for (int j = 0; j < RW_COLS; j++)
                    acc[j] = out[b * n_out + j0 + j];
            const float *x = inp + b * n_in;
            for (int64_t k = 0; k < n_in; k++)
                for (int j = 0; j < RW_COLS; j++)
                    acc[j] = fmaf(x[k], w[k * n_out + j], acc[j]);
            for (int j = 0; j < RW_COLS; j++)
                out[b * n_out + j0 + j] = acc[j];
        }
    }
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = full_cols; j < n_out; j++) {
            float acc = accumulate ? out[b * n_out + j] : 0.0f;
            for (int64_t k = 0; k < n_in; k++)
                acc = fmaf(inp[b * n_in + k], weight[k * n_out + j], acc);
            out[b * n_out + j] = acc;
        }
    }
}

/* out = inp @ weight[:n_in] (+ cond @ weight[n_in:]), by BLAS or row by row. */
static void product(float *out, const float *inp, const float *cond,
                    const float *weight, int64_t B, int64_t n_in,
                    int64_t n_cond, int64_t n_out, int rowwise)
{
    const float *w_cond = weight + n_in * n_out;
    if (rowwise) {
        gemm_rowwise(out, inp, weight, B, n_in, n_out, 0);
        if (n_cond > 0)
            gemm_rowwise(out, cond, w_cond, B, n_cond, n_out, 1);
        return;
    }
    hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_NO_TRANS, (int)B, (int)n_out,
               (int)n_in, 1.0f, inp, (int)n_in, weight, (int)n_out, 0.0f, out,
               (int)n_out);
    if (n_cond > 0)
        hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_NO_TRANS, (int)B, (int)n_out,
                   (int)n_cond, 1.0f, cond, (int)n_cond, w_cond, (int)n_out,
                   1.0f, out, (int)n_out);
}

void hvae_dense_cond_forward(float *out, const float *inp, const float *cond,
                             const float *weight, const float *bias,
                             hvae_activation act, int64_t B, int64_t n_in,
                             int64_t n_cond, int64_t n_out, int rowwise)
{
    if (B <= 0 || n_out <= 0)
        return;
    product(out, inp, cond, weight, B, n_in, n_cond, n_out, rowwise);
    for (int64_t b = 0; b < B; b++)
        hvae_bias_activation_row_inplace(out + b * n_out, bias, act, n_out);
}

void hvae_dense_cond_backward(float *dinp, float *dweight, float *dbias,
                              float *dout, const float *out, const float *inp,
                              const float *cond, const float *weight,
                              hvae_activation act, int64_t B, int64_t n_in,
                              int64_t n_cond, int64_t n_out)
{
    if (B <= 0 || n_out <= 0)
        return;
    hvae_dense_backward(dinp, dweight, dbias, dout, out, inp, weight, act, B,
                        n_in, n_out);
    /* The condition's rows of W: dW[n_in:] += cond^T @ dpre (dout now holds
     * dpre); the condition itself needs no gradient. */
    if (n_cond > 0)
        hvae_sgemm(HVAE_CBLAS_TRANS, HVAE_CBLAS_NO_TRANS, (int)n_cond, (int)n_out,
                   (int)B, 1.0f, cond, (int)n_cond, dout, (int)n_out, 1.0f,
                   dweight + n_in * n_out, (int)n_out);
}
