/* activations.c -- elementwise activations, forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

#include <math.h>

HVAE_AVX2_CLONES
void hvae_activation_forward(float *out, const float *inp,
                             hvae_activation act, int64_t n)
{
    switch (act) {
    case HVAE_ACT_RELU:
        for (int64_t i = 0; i < n; i++)
            out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
        break;
    case HVAE_ACT_LEAKY_RELU:
        for (int64_t i = 0; i < n; i++)
            out[i] = inp[i] > 0.0f ? inp[i] : 0.01f * inp[i];
        break;
    case HVAE_ACT_TANH:
        for (int64_t i = 0; i < n; i++)
            out[i] = tanhf(inp[i]);
        break;
    case HVAE_ACT_ELU:
        for (int64_t i = 0; i < n; i++)
            out[i] = inp[i] > 0.0f ? inp[i] : expm1f(inp[i]);
        break;
    case HVAE_ACT_SOFTPLUS:
        for (int64_t i = 0; i < n; i++)
            out[i] = hvae_softplusf(inp[i]);
        break;
    case HVAE_ACT_IDENTITY:
        if (out != inp)
            for (int64_t i = 0; i < n; i++)
                out[i] = inp[i];
        break;
    case HVAE_ACT_LOGVAR_CLIP:
        for (int64_t i = 0; i < n; i++) {
            float v = inp[i] > HVAE_LOGVAR_BOUND ? HVAE_LOGVAR_BOUND : inp[i];
            out[i] = v < -HVAE_LOGVAR_BOUND ? -HVAE_LOGVAR_BOUND : v;
        }
        break;
    case HVAE_ACT_COUNT: /* the sentinel, not an activation */
        break;
    }
}

/* The derivative act'(pre) written in terms of out = act(pre), so that the
 * pre-activations need not be kept: exact for every case (softplus:
 * sigmoid(pre) = 1 - exp(-out); the clip: a pre-activation exactly at the
 * bound counts as clipped). */
static inline float derivative_from_output(hvae_activation act, float out)
{
    switch (act) {
    case HVAE_ACT_RELU: return out > 0.0f ? 1.0f : 0.0f;
    case HVAE_ACT_LEAKY_RELU: return out > 0.0f ? 1.0f : 0.01f;
    case HVAE_ACT_TANH: return 1.0f - out * out;
    case HVAE_ACT_ELU: return out > 0.0f ? 1.0f : out + 1.0f;
    case HVAE_ACT_SOFTPLUS: return -expm1f(-out);
    case HVAE_ACT_IDENTITY: return 1.0f;
    case HVAE_ACT_LOGVAR_CLIP:
        return out > -HVAE_LOGVAR_BOUND && out < HVAE_LOGVAR_BOUND ? 1.0f : 0.0f;
    case HVAE_ACT_COUNT: /* the sentinel, not an activation */
        break;
    }
    return 1.0f;
}

HVAE_AVX2_CLONES
void hvae_activation_backward(float *dinp, const float *dout, const float *out,
                              hvae_activation act, int64_t n)
{
    switch (act) {
    case HVAE_ACT_RELU:
        for (int64_t i = 0; i < n; i++)
            dinp[i] += out[i] > 0.0f ? dout[i] : 0.0f;
        break;
    case HVAE_ACT_IDENTITY:
        for (int64_t i = 0; i < n; i++)
            dinp[i] += dout[i];
        break;
    default:
        for (int64_t i = 0; i < n; i++)
            dinp[i] += dout[i] * derivative_from_output(act, out[i]);
        break;
    }
}

/* In place: d <- d * act'(pre) for one row of n values; adds d to dbias. */
HVAE_AVX2_CLONES
void hvae_activation_backward_row_inplace(float *d, float *dbias,
                                          const float *out,
                                          hvae_activation act, int64_t n)
{
    switch (act) {
    case HVAE_ACT_RELU:
        for (int64_t j = 0; j < n; j++) {
            d[j] = out[j] > 0.0f ? d[j] : 0.0f;
            dbias[j] += d[j];
        }
        break;
    case HVAE_ACT_IDENTITY:
        for (int64_t j = 0; j < n; j++)
            dbias[j] += d[j];
        break;
    default:
        for (int64_t j = 0; j < n; j++) {
            d[j] *= derivative_from_output(act, out[j]);
            dbias[j] += d[j];
        }
        break;
    }
}

/* In place: x <- act(x + bias) for one row of n values. */
HVAE_AVX2_CLONES
void hvae_bias_activation_row_inplace(float *x, const float *bias,
                                      hvae_activation act, int64_t n)
{
    switch (act) {
    case HVAE_ACT_RELU:
        for (int64_t j = 0; j < n; j++) {
            float v = x[j] + bias[j];
            x[j] = v > 0.0f ? v : 0.0f;
        }
        break;
    case HVAE_ACT_IDENTITY:
        for (int64_t j = 0; j < n; j++)
            x[j] += bias[j];
        break;
    default:
        for (int64_t j = 0; j < n; j++)
            x[j] += bias[j];
        hvae_activation_forward(x, x, act, n);
        break;
    }
}
