/*
 * gaussian.c -- the Gaussian terms: reparameterised sampling, the closed-form
 * KL divergence between diagonal Gaussians, its single-sample counterpart
 * (the log-density ratio) and the Gaussian log-density,
 * forward and backward. Row sums accumulate in double over LANES
 * independent partial sums so that the loops still vectorise.
 */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

#include <math.h>

#define HALF_LOG_2PI 0.91893853320467274178

void hvae_reparam_forward(float *z, const float *mu, const float *logvar,
                          const float *eps, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        z[i] = mu[i] + hvae_expf(0.5f * logvar[i]) * eps[i];
}

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

void hvae_gaussian_kl_forward(double *kl, const float *mu_q, const float *lv_q,
                              const float *mu_p, const float *lv_p, int64_t B,
                              int64_t d)
{
    for (int64_t b = 0; b < B; b++) {
        const float *mq = mu_q + b * d, *lq = lv_q + b * d;
        const float *mp = mu_p ? mu_p + b * d : NULL;
        const float *lp = lv_p ? lv_p + b * d : NULL;
        double lanes[HVAE_LANES] = {0};
        int64_t j = 0;
        for (; j + HVAE_LANES <= d; j += HVAE_LANES)
            for (int k = 0; k < HVAE_LANES; k++)
                lanes[k] += kl_term(mq[j + k], lq[j + k], mp ? mp[j + k] : 0.0f,
                                    lp ? lp[j + k] : 0.0f);
        double sum = 0.0;
        for (; j < d; j++)
            sum += kl_term(mq[j], lq[j], mp ? mp[j] : 0.0f, lp ? lp[j] : 0.0f);
        for (int k = 0; k < HVAE_LANES; k++)
            sum += lanes[k];
        kl[b] = sum;
    }
}

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

void hvae_gaussian_logratio_forward(double *kl, const float *z,
                                    const float *eps, const float *lv_q,
                                    const float *mu_p, const float *lv_p,
                                    int64_t B, int64_t d)
{
    for (int64_t b = 0; b < B; b++) {
        const float *zb = z + b * d, *eb = eps + b * d, *lq = lv_q + b * d;
        const float *mp = mu_p + b * d, *lp = lv_p ? lv_p + b * d : NULL;
        double lanes[HVAE_LANES] = {0};
        int64_t j = 0;
        for (; j + HVAE_LANES <= d; j += HVAE_LANES)
            for (int k = 0; k < HVAE_LANES; k++)
                lanes[k] += logratio_term(zb[j + k], eb[j + k], lq[j + k],
                                          mp[j + k], lp ? lp[j + k] : 0.0f);
        double sum = 0.0;
        for (; j < d; j++)
            sum += logratio_term(zb[j], eb[j], lq[j], mp[j], lp ? lp[j] : 0.0f);
        for (int k = 0; k < HVAE_LANES; k++)
            sum += lanes[k];
        kl[b] = sum;
    }
}

void hvae_gaussian_logratio_backward(float *dz, float *dlv_q, float *dmu_p,
                                     float *dlv_p, float scale, const float *z,
                                     const float *mu_p, const float *lv_p,
                                     int64_t B, int64_t d)
{
    /* log q(z) = -(log 2pi + lv_q + eps^2) / 2 along the reparameterisation
     * path (its z- and mu_q-dependence cancels), so only -1/2 reaches lv_q
     * directly; the prior's log-density sends (z - mu_p) / v_p to z. */
    int64_t n = B * d;
    for (int64_t i = 0; i < n; i++) {
        float inv_vp = lv_p ? hvae_expf(-lv_p[i]) : 1.0f;
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

void hvae_gaussian_loglik_forward(double *ll, const float *x, const float *mu,
                                  const float *lv, int64_t B, int64_t D)
{
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D, *mb = mu + b * D;
        const float *lb = lv ? lv + b * D : NULL;
        double lanes[HVAE_LANES] = {0};
        int64_t j = 0;
        for (; j + HVAE_LANES <= D; j += HVAE_LANES)
            for (int k = 0; k < HVAE_LANES; k++)
                lanes[k] += gaussian_ll_term(xb[j + k], mb[j + k],
                                             lb ? lb[j + k] : 0.0f);
        double sum = 0.0;
        for (; j < D; j++)
            sum += gaussian_ll_term(xb[j], mb[j], lb ? lb[j] : 0.0f);
        for (int k = 0; k < HVAE_LANES; k++)
            sum += lanes[k];
        ll[b] = sum - (double)D * HALF_LOG_2PI;
    }
}

void hvae_gaussian_loglik_backward(float *dmu, float *dlv, float scale,
                                   const float *x, const float *mu,
                                   const float *lv, int64_t B, int64_t D)
{
    /* dll/dmu = (x - mu) / v,  dll/dlv = ((x - mu)^2 / v - 1) / 2 */
    int64_t n = B * D;
    for (int64_t i = 0; i < n; i++) {
        float inv_v = lv ? hvae_expf(-lv[i]) : 1.0f;
        float diff = x[i] - mu[i];
        dmu[i] += scale * diff * inv_v;
        if (dlv)
            dlv[i] += scale * 0.5f * (diff * diff * inv_v - 1.0f);
    }
}
