/*
 * gaussian.c -- the Gaussian terms: reparameterised sampling, the closed-form
 * KL divergence between diagonal Gaussians, its single-sample counterpart
 * (the log-density ratio) and the Gaussian log-density,
 * forward and backward. Row sums go through hvae_sum_chunk so that the
 * loops vectorise.
 */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

#include <math.h>

#define HALF_LOG_2PI 0.91893853320467274178

HVAE_AVX2_CLONES
void hvae_reparam_forward(float *z, const float *mu, const float *logvar,
                          const float *eps, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        z[i] = mu[i] + hvae_expf(0.5f * logvar[i]) * eps[i];
}

HVAE_AVX2_CLONES
void hvae_reparam_backward(float *dmu, float *dlogvar, const float *dz,
                           const float *logvar, const float *eps, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        dmu[i] += dz[i];
        dlogvar[i] += dz[i] * eps[i] * 0.5f * hvae_expf(0.5f * logvar[i]);
    }
}

/* KL(N(mq, e^lq) || N(mp, e^lp)) for one coordinate. */
static inline float kl_term(float mq, float lq, float mp, float lp)
{
    float diff = mq - mp;
    return 0.5f * (lp - lq + (hvae_expf(lq) + diff * diff) * hvae_expf(-lp) - 1.0f);
}

HVAE_AVX2_CLONES
void hvae_gaussian_kl_forward(double *kl, const float *mu_q, const float *lv_q,
                              const float *mu_p, const float *lv_p, int64_t B,
                              int64_t d)
{
    static const float zeros[HVAE_CHUNK];
    float terms[HVAE_CHUNK];
    for (int64_t b = 0; b < B; b++) {
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < d; j0 += HVAE_CHUNK) {
            int64_t len = d - j0 < HVAE_CHUNK ? d - j0 : HVAE_CHUNK, at = b * d + j0;
            const float *mq = mu_q + at, *lq = lv_q + at;
            const float *mp = mu_p ? mu_p + at : zeros, *lp = lv_p ? lv_p + at : zeros;
            for (int64_t j = 0; j < len; j++)
                terms[j] = kl_term(mq[j], lq[j], mp[j], lp[j]);
            sum += hvae_sum_chunk(terms, len);
        }
        kl[b] = sum;
    }
}

HVAE_AVX2_CLONES
void hvae_gaussian_kl_backward(float *dmu_q, float *dlv_q, float *dmu_p,
                               float *dlv_p, float scale, const float *mu_q,
                               const float *lv_q, const float *mu_p,
                               const float *lv_p, int64_t B, int64_t d)
{
    /* dKL/dmq = (mq - mp) / vp        dKL/dmp = -(mq - mp) / vp
     * dKL/dlq = (vq / vp - 1) / 2     dKL/dlp = (1 - (vq + diff^2) / vp) / 2 */
    int64_t n = B * d;
    for (int64_t i = 0; i < n; i++) {
        float mp = mu_p ? mu_p[i] : 0.0f;
        float lp = lv_p ? lv_p[i] : 0.0f;
        float inv_vp = hvae_expf(-lp);
        float vq = hvae_expf(lv_q[i]);
        float diff = mu_q[i] - mp;
        float g_mu = scale * diff * inv_vp;
        dmu_q[i] += g_mu;
        dlv_q[i] += scale * 0.5f * (vq * inv_vp - 1.0f);
        if (dmu_p && mu_p)
            dmu_p[i] -= g_mu;
        if (dlv_p && lv_p)
            dlv_p[i] += scale * 0.5f * (1.0f - (vq + diff * diff) * inv_vp);
    }
}

static inline float logratio_term(float z, float eps, float lq, float mp,
                                  float lp)
{
    float diff = z - mp;
    return 0.5f * (lp - lq - eps * eps + diff * diff * hvae_expf(-lp));
}

HVAE_AVX2_CLONES
void hvae_gaussian_logratio_forward(double *kl, const float *z,
                                    const float *eps, const float *lv_q,
                                    const float *mu_p, const float *lv_p,
                                    int64_t B, int64_t d)
{
    static const float zeros[HVAE_CHUNK];
    float terms[HVAE_CHUNK];
    for (int64_t b = 0; b < B; b++) {
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < d; j0 += HVAE_CHUNK) {
            int64_t len = d - j0 < HVAE_CHUNK ? d - j0 : HVAE_CHUNK, at = b * d + j0;
            const float *zb = z + at, *eb = eps + at, *lq = lv_q + at;
            const float *mp = mu_p ? mu_p + at : zeros, *lp = lv_p ? lv_p + at : zeros;
            for (int64_t j = 0; j < len; j++)
                terms[j] = logratio_term(zb[j], eb[j], lq[j], mp[j], lp[j]);
            sum += hvae_sum_chunk(terms, len);
        }
        kl[b] = sum;
    }
}

HVAE_AVX2_CLONES
void hvae_gaussian_logratio_backward(float *dz, float *dlv_q, float *dmu_p,
                                     float *dlv_p, float scale, const float *z,
                                     const float *mu_p, const float *lv_p,
                                     int64_t B, int64_t d)
{
    /* log q(z) = -(log 2pi + lv_q + eps^2) / 2 along the reparameterisation
     * path (its z- and mu_q-dependence cancels), so only -1/2 reaches lv_q
     * directly; the prior's log-density sends (z - mu_p) / v_p to z. */
    int64_t n = B * d;
    if (!mu_p) {
        /* The standard normal prior: no prior gradients to pass on. */
        for (int64_t i = 0; i < n; i++) {
            dz[i] += scale * z[i];
            dlv_q[i] -= 0.5f * scale;
        }
        return;
    }
    if (!lv_p) {
        for (int64_t i = 0; i < n; i++) {
            float g = scale * (z[i] - mu_p[i]);
            dz[i] += g;
            dlv_q[i] -= 0.5f * scale;
            if (dmu_p)
                dmu_p[i] -= g;
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float inv_vp = hvae_expf(-lv_p[i]);
        float diff = z[i] - mu_p[i];
        float g = scale * diff * inv_vp;
        dz[i] += g;
        dlv_q[i] -= 0.5f * scale;
        if (dmu_p)
            dmu_p[i] -= g;
        if (dlv_p)
            dlv_p[i] += scale * 0.5f * (1.0f - diff * diff * inv_vp);
    }
}

static inline float gaussian_ll_term(float x, float mu, float lv)
{
    float diff = x - mu;
    return -0.5f * (lv + diff * diff * hvae_expf(-lv));
}

HVAE_AVX2_CLONES
void hvae_gaussian_loglik_forward(double *ll, const float *x, const float *mu,
                                  const float *lv, int64_t B, int64_t D)
{
    static const float zeros[HVAE_CHUNK];
    float terms[HVAE_CHUNK];
    for (int64_t b = 0; b < B; b++) {
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < D; j0 += HVAE_CHUNK) {
            int64_t len = D - j0 < HVAE_CHUNK ? D - j0 : HVAE_CHUNK, at = b * D + j0;
            const float *xb = x + at, *mb = mu ? mu + at : zeros, *lb = lv ? lv + at : zeros;
            for (int64_t j = 0; j < len; j++)
                terms[j] = gaussian_ll_term(xb[j], mb[j], lb[j]);
            sum += hvae_sum_chunk(terms, len);
        }
        ll[b] = sum - (double)D * HALF_LOG_2PI;
    }
}

HVAE_AVX2_CLONES
void hvae_gaussian_loglik_backward(float *dmu, float *dlv, float scale,
                                   const float *x, const float *mu,
                                   const float *lv, int64_t B, int64_t D)
{
    /* dll/dmu = (x - mu) / v,  dll/dlv = ((x - mu)^2 / v - 1) / 2 */
    int64_t n = B * D;
    if (!lv) {
        for (int64_t i = 0; i < n; i++)
            dmu[i] += scale * (x[i] - mu[i]);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float inv_v = hvae_expf(-lv[i]);
        float diff = x[i] - mu[i];
        dmu[i] += scale * diff * inv_v;
        if (dlv)
            dlv[i] += scale * 0.5f * (diff * diff * inv_v - 1.0f);
    }
}

HVAE_AVX2_CLONES
void hvae_precision_merge_forward(float *mu_q, float *lv_q, const float *mu_hat,
                                  const float *lv_hat, const float *mu_p,
                                  const float *lv_p, int64_t n)
{
    /* With a = exp(-lv_hat), c = exp(-lv_p): lv_q = -log(a + c), and the
     * weight of mu_hat is a / (a + c) = sigmoid(lv_p - lv_hat). Computed
     * from the difference so that neither precision overflows. */
    for (int64_t i = 0; i < n; i++) {
        float lp = lv_p ? lv_p[i] : 0.0f;
        float s = lp - lv_hat[i];
        float w = hvae_sigmoidf(s);
        /* -log(a + c) = min(lv_hat, lp) - log(1 + exp(-|s|)) */
        float lo = s > 0.0f ? lv_hat[i] : lp;
        lv_q[i] = lo - hvae_softplusf(-(s > 0.0f ? s : -s));
        mu_q[i] = w * mu_hat[i] + (1.0f - w) * mu_p[i];
    }
}

HVAE_AVX2_CLONES
void hvae_precision_merge_backward(float *dmu_hat, float *dlv_hat, float *dmu_p,
                                   float *dlv_p, const float *dmu_q,
                                   const float *dlv_q, const float *mu_hat,
                                   const float *lv_hat, const float *mu_p,
                                   const float *lv_p, int64_t n)
{
    /* dlv_q/dlv_hat = w, dlv_q/dlv_p = 1 - w; dmu_q/dmu_hat = w,
     * dmu_q/dmu_p = 1 - w; dw/dlv_hat = -w (1 - w) = -dw/dlv_p. */
    for (int64_t i = 0; i < n; i++) {
        float lp = lv_p ? lv_p[i] : 0.0f;
        float w = hvae_sigmoidf(lp - lv_hat[i]);
        float dw = dmu_q[i] * (mu_hat[i] - mu_p[i]) * w * (1.0f - w);
        dmu_hat[i] += dmu_q[i] * w;
        dmu_p[i] += dmu_q[i] * (1.0f - w);
        dlv_hat[i] += dlv_q[i] * w - dw;
        if (dlv_p)
            dlv_p[i] += dlv_q[i] * (1.0f - w) + dw;
    }
}
