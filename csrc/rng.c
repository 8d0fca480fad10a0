/*
 * rng.c -- xoshiro256** (Blackman & Vigna 2018) seeded through splitmix64,
 * Box-Muller normals and unbiased bounded integers (Lemire 2019).
 */
#include "hvae.h"
#include "internal.h"

#include <math.h>

uint64_t hvae_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void hvae_rng_seed(hvae_rng *rng, uint64_t seed)
{
    uint64_t sm = seed;
    for (int i = 0; i < 4; i++)
        rng->s[i] = hvae_splitmix64(&sm);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t hvae_rng_next(hvae_rng *rng)
{
    uint64_t *s = rng->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* A double uniform in [0, 1) with 53 random bits. */
static inline double uniform01(hvae_rng *rng)
{
    return (double)(hvae_rng_next(rng) >> 11) * 0x1.0p-53;
}

void hvae_rng_normal(hvae_rng *rng, float *out, int64_t n)
{
    const double two_pi = 6.283185307179586476925;
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
        double r = sqrt(-2.0 * log(1.0 - uniform01(rng))); /* 1-u in (0, 1] */
        double a = two_pi * uniform01(rng);
        out[i] = (float)(r * cos(a));
        out[i + 1] = (float)(r * sin(a));
    }
    if (i < n) {
        double r = sqrt(-2.0 * log(1.0 - uniform01(rng)));
        out[i] = (float)(r * cos(two_pi * uniform01(rng)));
    }
}

/* Uniform in [0, bound) without modulo bias. */
static uint64_t bounded(hvae_rng *rng, uint64_t bound)
{
    __uint128_t m = (__uint128_t)hvae_rng_next(rng) * bound;
    uint64_t low = (uint64_t)m;
    if (low < bound) {
        uint64_t threshold = (0 - bound) % bound;
        while (low < threshold) {
            m = (__uint128_t)hvae_rng_next(rng) * bound;
            low = (uint64_t)m;
        }
    }
    return (uint64_t)(m >> 64);
}

void hvae_rng_permutation(hvae_rng *rng, int64_t *out, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)bounded(rng, (uint64_t)i + 1);
        int64_t tmp = out[i];
        out[i] = out[j];
        out[j] = tmp;
    }
}

float hvae_rng_uniform_float(hvae_rng *rng)
{
    return (float)(hvae_rng_next(rng) >> 40) * 0x1.0p-24f;
}
