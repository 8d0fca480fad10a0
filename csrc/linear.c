/* linear.c -- the dense layer out = act(inp @ W + b), forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "blas.h"

void hvae_dense_forward(float *out, const float *inp, const float *weight,
                        const float *bias, hvae_activation act, int64_t B,
                        int64_t n_in, int64_t n_out)
{
    /* inp (B, n_in), weight (n_in, n_out), bias (n_out) -> out (B, n_out) */
    if (B <= 0 || n_out <= 0)
        return;
    hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_NO_TRANS, (int)B, (int)n_out,
               (int)n_in, 1.0f, inp, (int)n_in, weight, (int)n_out, 0.0f, out,
               (int)n_out);
    for (int64_t b = 0; b < B; b++)
        hvae_bias_activation_row_inplace(out + b * n_out, bias, act, n_out);
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
