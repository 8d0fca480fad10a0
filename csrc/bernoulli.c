/* bernoulli.c -- the Bernoulli log-likelihood with logits, forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

/* log p(x | l) = x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))
 *             = x l - softplus(l), which is stable for any logit. */
HVAE_AVX512_CLONES
void hvae_bernoulli_loglik_forward(double *ll, const float *x,
                                   const float *logits, int64_t B, int64_t D)
{
    float terms[HVAE_CHUNK];
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D, *lb = logits + b * D;
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < D; j0 += HVAE_CHUNK) {
            int64_t len = D - j0 < HVAE_CHUNK ? D - j0 : HVAE_CHUNK;
            for (int64_t j = 0; j < len; j++)
                terms[j] = xb[j0 + j] * lb[j0 + j] - hvae_softplusf(lb[j0 + j]);
            sum += hvae_sum_chunk(terms, len);
        }
        ll[b] = sum;
    }
}

HVAE_AVX2_CLONES
void hvae_bernoulli_loglik_backward(float *dlogits, float scale, const float *x,
                                    const float *logits, int64_t B, int64_t D)
{
    int64_t n = B * D;
    for (int64_t i = 0; i < n; i++)
        dlogits[i] += scale * (x[i] - hvae_sigmoidf(logits[i]));
}
