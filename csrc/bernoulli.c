/* bernoulli.c -- the Bernoulli log-likelihood with logits, forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

/* log p(x | l) = x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))
 *             = x l - softplus(l), which is stable for any logit. */
void hvae_bernoulli_loglik_forward(double *ll, const float *x,
                                   const float *logits, int64_t B, int64_t D)
{
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D, *lb = logits + b * D;
        double lanes[HVAE_LANES] = {0};
        int64_t j = 0;
        for (; j + HVAE_LANES <= D; j += HVAE_LANES)
            for (int k = 0; k < HVAE_LANES; k++)
                lanes[k] += xb[j + k] * lb[j + k] - hvae_softplusf(lb[j + k]);
        double sum = 0.0;
        for (; j < D; j++)
            sum += xb[j] * lb[j] - hvae_softplusf(lb[j]);
        for (int k = 0; k < HVAE_LANES; k++)
            sum += lanes[k];
        ll[b] = sum;
    }
}

void hvae_bernoulli_loglik_backward(float *dlogits, float scale, const float *x,
                                    const float *logits, int64_t B, int64_t D)
{
    int64_t n = B * D;
    for (int64_t i = 0; i < n; i++)
        dlogits[i] += scale * (x[i] - hvae_sigmoidf(logits[i]));
}
