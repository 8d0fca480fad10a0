/*
 * fastmath.h -- internal: branch-free float exp, log and log1p that the compiler
 * can vectorise. libm's expf/log1pf/logf are scalar calls, and the likelihood
 * terms evaluate one per pixel per step, so they would dominate the
 * elementwise work. Cephes polynomials (Moshier), relative error about
 * 2 ulp over the ranges used here. NaN propagates; exp overflows to +inf
 * and underflows to 0 like libm.
 */
#ifndef HVAE_FASTMATH_H
#define HVAE_FASTMATH_H

#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float hvae_bits_to_float(int32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float hvae_expf(float x)
{
    /* Clamp so that 2^n stays a normal float; the select at the end
     * restores the true overflow and underflow results. */
    float xc = x > 88.0f ? 88.0f : x;
    xc = xc < -87.0f ? -87.0f : xc;
    /* Round to nearest by adding and removing 1.5 * 2^23 (|t| < 128):
     * branch-free, so the loop vectorises on every ISA. */
    float nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    /* A NaN converts to no integer (undefined behaviour in C): take 0; the
     * result is NaN all the same. */
    int32_t n = (int32_t)(nf == nf ? nf : 0.0f);
    /* Cody-Waite: ln 2 split in two so that r = x - n ln 2 is exact. */
    float r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    y *= hvae_bits_to_float((n + 127) << 23);
    y = x > 88.72283f ? INFINITY : y;
    y = x < -87.33654f ? 0.0f : y;
    return y;
}

/* log(m) + e log 2 for m = 1 + f in [sqrt(1/2), sqrt(2)): Cephes' logf
 * polynomial, ln 2 split in two as in hvae_expf. */
static inline float hvae_log_reduced(float f, float e)
{
    float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    float y = p * f * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return f + y + 0.693359375f * e;
}

/* log(1 + t) for t in [0, 1]; accurate for tiny t as well. */
static inline float hvae_log1p_unit(float t)
{
    /* Reduce 1 + t to m * 2^e with m in [sqrt(1/2), sqrt(2)). For t below
     * sqrt(2) - 1, f = m - 1 = t exactly; above it, f = (t - 1) / 2 and e = 1,
     * both exact in float. */
    int big = t > 0.41421356f;
    float f = big ? (t - 1.0f) * 0.5f : t;
    float e = big ? 1.0f : 0.0f;
    return hvae_log_reduced(f, e);
}

/* log(x) for x a positive normal float (the Gumbel noise's logs: no zero,
 * subnormal, infinity or NaN comes in), branch-free like hvae_expf. The
 * exponent and mantissa come from the bits: x = m 2^e, m in [1/2, 1), then
 * m below sqrt(1/2) is doubled, so f = m - 1 is exact (Sterbenz) and
 * log(x) near 1 keeps its relative accuracy. */
static inline float hvae_logf(float x)
{
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t ex = ((bits >> 23) & 0xff) - 126;
    float m = hvae_bits_to_float((bits & 0x007fffff) | 0x3f000000);
    int small = m < 0.70710678f;
    float f = small ? m + m - 1.0f : m - 1.0f;
    float e = (float)(small ? ex - 1 : ex);
    return hvae_log_reduced(f, e);
}

/* softplus(x) = log(1 + exp(x)), stable for any x. */
static inline float hvae_softplusf(float x)
{
    float ax = x < 0.0f ? -x : x;
    return (x > 0.0f ? x : 0.0f) + hvae_log1p_unit(hvae_expf(-ax));
}

/* sigmoid(x) = 1 / (1 + exp(-x)), stable for any x. */
static inline float hvae_sigmoidf(float x)
{
    float ax = x < 0.0f ? -x : x;
    float t = hvae_expf(-ax);
    float s = 1.0f / (1.0f + t);
    return x >= 0.0f ? s : t * s;
}

#endif
