/* bernoulli.c -- the Bernoulli log-likelihood with logits, forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(HVAE_NO_CLONES)
#include <immintrin.h>
#define HVAE_HAVE_AVX512_TERMS 1
#define TERMS_VECTORS 4

/* x l - softplus(l) for 4 x 16 elements at once: hvae_softplusf's
 * operations one for one (each multiply and add rounded alone, the same
 * constants, the same selects), so the same bits as the scalar form; but
 * four vectors side by side. The polynomials are chains of dependent
 * operations, about 110 cycles for one vector, and compiled as a loop of
 * one vector per iteration they ran one chain at a time (6.6 cycles a
 * pixel on W2's logits). */
__attribute__((target("avx512f")))
static void bernoulli_terms_avx512(float *terms, const float *x, const float *l, int64_t n)
{
#define SET(c) _mm512_set1_ps(c)
#define FOR_V for (int v = 0; v < TERMS_VECTORS; v++)
    for (int64_t j = 0; j + 16 * TERMS_VECTORS <= n; j += 16 * TERMS_VECTORS) {
        __m512 lv[TERMS_VECTORS], t[TERMS_VECTORS], xc[TERMS_VECTORS], nf[TERMS_VECTORS];
        __m512 r[TERMS_VECTORS], p[TERMS_VECTORS], y[TERMS_VECTORS];
        __m512 f[TERMS_VECTORS], e[TERMS_VECTORS], z[TERMS_VECTORS];
        FOR_V {
            lv[v] = _mm512_loadu_ps(l + j + 16 * v);
            /* -|l|: the argument of exp */
            __mmask16 neg = _mm512_cmp_ps_mask(lv[v], SET(0.0f), _CMP_LT_OQ);
            __m512 ax = _mm512_mask_blend_ps(neg, lv[v], _mm512_sub_ps(SET(0.0f), lv[v]));
            t[v] = _mm512_sub_ps(SET(0.0f), ax);
            /* hvae_expf(t) */
            xc[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t[v], SET(88.0f), _CMP_GT_OQ), t[v],
                                         SET(88.0f));
            xc[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xc[v], SET(-87.0f), _CMP_LT_OQ),
                                         xc[v], SET(-87.0f));
            nf[v] = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc[v], SET(1.44269504088896341f)),
                                                SET(12582912.0f)),
                                  SET(12582912.0f));
            r[v] = _mm512_add_ps(_mm512_sub_ps(xc[v], _mm512_mul_ps(nf[v], SET(0.693359375f))),
                                 _mm512_mul_ps(nf[v], SET(2.12194440e-4f)));
            p[v] = SET(1.9875691500e-4f);
        }
        static const float exp_poly[5] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                          1.6666665459e-1f, 5.0000001201e-1f};
        for (int c = 0; c < 5; c++)
            FOR_V p[v] = _mm512_add_ps(_mm512_mul_ps(p[v], r[v]), SET(exp_poly[c]));
        FOR_V {
            y[v] = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p[v], r[v]), r[v]),
                                               r[v]),
                                 SET(1.0f));
            __m512i n = _mm512_cvttps_epi32(nf[v]);
            __m512 scale = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
            y[v] = _mm512_mul_ps(y[v], scale);
            y[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t[v], SET(88.72283f), _CMP_GT_OQ),
                                        y[v], SET(INFINITY));
            y[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t[v], SET(-87.33654f), _CMP_LT_OQ),
                                        y[v], SET(0.0f));
            /* hvae_log1p_unit(y) */
            __mmask16 big = _mm512_cmp_ps_mask(y[v], SET(0.41421356f), _CMP_GT_OQ);
            f[v] = _mm512_mask_blend_ps(big, y[v],
                                        _mm512_mul_ps(_mm512_sub_ps(y[v], SET(1.0f)), SET(0.5f)));
            e[v] = _mm512_mask_blend_ps(big, SET(0.0f), SET(1.0f));
            z[v] = _mm512_mul_ps(f[v], f[v]);
            p[v] = SET(7.0376836292e-2f);
        }
        static const float log_poly[8] = {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                                          1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                                          -2.4999993993e-1f, 3.3333331174e-1f};
        for (int c = 0; c < 8; c++)
            FOR_V p[v] = _mm512_add_ps(_mm512_mul_ps(p[v], f[v]), SET(log_poly[c]));
        FOR_V {
            __m512 q = _mm512_mul_ps(_mm512_mul_ps(p[v], f[v]), z[v]);
            q = _mm512_add_ps(q, _mm512_mul_ps(SET(-2.12194440e-4f), e[v]));
            q = _mm512_add_ps(q, _mm512_mul_ps(SET(-0.5f), z[v]));
            __m512 log1p = _mm512_add_ps(_mm512_add_ps(f[v], q),
                                         _mm512_mul_ps(SET(0.693359375f), e[v]));
            /* softplus = max(l, 0) + log1p; the term x l - softplus */
            __m512 pos = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(lv[v], SET(0.0f), _CMP_GT_OQ),
                                              SET(0.0f), lv[v]);
            __m512 sp = _mm512_add_ps(pos, log1p);
            __m512 xv = _mm512_loadu_ps(x + j + 16 * v);
            _mm512_storeu_ps(terms + j + 16 * v, _mm512_sub_ps(_mm512_mul_ps(xv, lv[v]), sp));
        }
    }
#undef SET
#undef FOR_V
}
#endif

/* log p(x | l) = x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))
 *             = x l - softplus(l), which is stable for any logit. */
HVAE_AVX512_CLONES
void hvae_bernoulli_loglik_forward(double *ll, const float *x,
                                   const float *logits, int64_t B, int64_t D)
{
    float terms[HVAE_CHUNK];
    int64_t vectorised = 0;
#ifdef HVAE_HAVE_AVX512_TERMS
    if (__builtin_cpu_supports("avx512f"))
        vectorised = 16 * TERMS_VECTORS;
#endif
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D, *lb = logits + b * D;
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < D; j0 += HVAE_CHUNK) {
            int64_t len = D - j0 < HVAE_CHUNK ? D - j0 : HVAE_CHUNK, done = 0;
#ifdef HVAE_HAVE_AVX512_TERMS
            if (vectorised) {
                done = len - len % vectorised;
                bernoulli_terms_avx512(terms, xb + j0, lb + j0, done);
            }
#endif
            for (int64_t j = done; j < len; j++)
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
