/* latent_categorical.c -- a layer of M independent categorical variables of
 * K classes (hvae.h, "Discrete latent layers"). Heads: one of M*K logits l;
 * q_mk = softmax(l_m)_k. Noise: K standard Gumbel draws per variable,
 * g = -log(-log u). Samples, by the call's mode:
 *   exact (tau = 0)      z_m = onehot(argmax_k (l_mk + g_mk))     Gumbel-max
 *   relaxed              z_m = softmax((l_m + g_m) / tau)          Gumbel-softmax
 *   straight-through     the exact one-hot forward, the relaxed backward.
 * (log pi + g and l + g differ by a constant per variable: the same argmax
 * and softmax.) The prior p is uniform (p heads NULL) or a softmax of the
 * decoder's logits. Terms, per variable:
 *   KL(q || p)           sum_k q_k (log q_k - log p_k)
 *   sampled ratio        sum_k z_k (log q_k - log p_k)   (= log q(z) - log p(z) at a one-hot z)
 * Every row's variables are independent groups of K; the work is linear in
 * B * M * K, with the log-sum-exp of each group in float and the row's sum
 * in double. */
#include "extension.h"
#include "fastmath.h"

#include <math.h>

static void categorical_noise(float *eps, hvae_rng *rng, int64_t n)
{
    /* u in (0, 1) from 53 bits, centred in its cell: never 0 or 1. */
    for (int64_t k = 0; k < n; k++) {
        double u = ((double)(hvae_rng_next(rng) >> 11) + 0.5) * 0x1.0p-53;
        eps[k] = (float)-log(-log(u));
    }
}

/* log sum_k exp(a_k) over a group of K. */
static float group_lse(const float *a, int64_t K)
{
    float mx = a[0];
    for (int64_t k = 1; k < K; k++)
        mx = a[k] > mx ? a[k] : mx;
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++)
        s += hvae_expf(a[k] - mx);
    return mx + logf(s);
}

/* log p_k of a group: log-softmax of its logits, or -log K (uniform). */
static inline float log_p(const float *p, int64_t k, float lse_p, float log_uniform)
{
    return p ? p[k] - lse_p : log_uniform;
}

static void categorical_sample_forward(float *z, const float *l, const float *unused,
                                       const float *g, const hvae_latent_call *c)
{
    (void)unused;
    int64_t K = c->K, groups = c->B * c->d / K;
    int hard = c->temperature <= 0.0f || c->straight_through;
    float inv_tau = hard ? 0.0f : 1.0f / c->temperature;
    for (int64_t v = 0; v < groups; v++) {
        const float *lv = l + v * K, *gv = g + v * K;
        float *zv = z + v * K;
        int64_t best = 0;
        float mx = lv[0] + gv[0];
        for (int64_t k = 1; k < K; k++)
            if (lv[k] + gv[k] > mx) {
                mx = lv[k] + gv[k];
                best = k;
            }
        if (hard) {
            for (int64_t k = 0; k < K; k++)
                zv[k] = k == best ? 1.0f : 0.0f;
            continue;
        }
        float s = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            zv[k] = hvae_expf((lv[k] + gv[k] - mx) * inv_tau);
            s += zv[k];
        }
        for (int64_t k = 0; k < K; k++)
            zv[k] /= s;
    }
}

/* y = softmax((l + g) / tau) (recomputed: straight-through stored the hard
 * z); dl_k += y_k (dz_k - sum_j y_j dz_j) / tau. */
static void categorical_sample_backward(float *dl, float *unused_d, const float *dz,
                                        const float *l, const float *unused, const float *g,
                                        const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused;
    if (c->temperature <= 0.0f)
        return; /* an exact sample passes no pathwise gradient */
    int64_t K = c->K, groups = c->B * c->d / K;
    float inv_tau = 1.0f / c->temperature;
    for (int64_t v = 0; v < groups; v++) {
        const float *lv = l + v * K, *gv = g + v * K, *dzv = dz + v * K;
        float *dlv = dl + v * K;
        float mx = lv[0] + gv[0];
        for (int64_t k = 1; k < K; k++)
            mx = lv[k] + gv[k] > mx ? lv[k] + gv[k] : mx;
        float s = 0.0f, dot = 0.0f;
        for (int64_t k = 0; k < K; k++)
            s += hvae_expf((lv[k] + gv[k] - mx) * inv_tau);
        for (int64_t k = 0; k < K; k++)
            dot += hvae_expf((lv[k] + gv[k] - mx) * inv_tau) / s * dzv[k];
        for (int64_t k = 0; k < K; k++) {
            float y = hvae_expf((lv[k] + gv[k] - mx) * inv_tau) / s;
            dlv[k] += y * (dzv[k] - dot) * inv_tau;
        }
    }
}

/* d log q(z) / d l_k = z_k - q_k sum_j z_j. */
static void categorical_score_backward(float *dl, float *unused_d, const float *row_scale,
                                       const float *z, const float *l, const float *unused,
                                       const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused;
    int64_t K = c->K, per_row = c->d / K;
    for (int64_t v = 0; v < c->B * per_row; v++) {
        float s = row_scale[v / per_row];
        const float *lv = l + v * K, *zv = z + v * K;
        float lse = group_lse(lv, K), total = 0.0f;
        for (int64_t k = 0; k < K; k++)
            total += zv[k];
        for (int64_t k = 0; k < K; k++)
            dl[v * K + k] += s * (zv[k] - hvae_expf(lv[k] - lse) * total);
    }
}

static void categorical_kl_forward(double *kl, const float *l, const float *unused,
                                   const float *p, const float *unused_p,
                                   const hvae_latent_call *c)
{
    (void)unused;
    (void)unused_p;
    int64_t K = c->K, per_row = c->d / K;
    float log_uniform = -logf((float)K);
    for (int64_t r = 0; r < c->B; r++) {
        double total = 0.0;
        for (int64_t m = 0; m < per_row; m++) {
            int64_t o = r * c->d + m * K;
            float lse_q = group_lse(l + o, K), lse_p = p ? group_lse(p + o, K) : 0.0f;
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                float lq = l[o + k] - lse_q;
                sum += hvae_expf(lq) * (lq - log_p(p ? p + o : NULL, k, lse_p, log_uniform));
            }
            total += sum;
        }
        kl[r] = total;
    }
}

/* dKL/dl_j = q_j (log q_j - log p_j - KL_m); dKL/dlp_j = p_j - q_j. */
static void categorical_kl_backward(float *dl, float *unused_d, float *dp, float *unused_dp,
                                    float scale, const float *l, const float *unused,
                                    const float *p, const float *unused_p,
                                    const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused_dp;
    (void)unused;
    (void)unused_p;
    int64_t K = c->K, groups = c->B * c->d / K;
    float log_uniform = -logf((float)K);
    for (int64_t v = 0; v < groups; v++) {
        int64_t o = v * K;
        const float *pv = p ? p + o : NULL;
        float lse_q = group_lse(l + o, K), lse_p = p ? group_lse(pv, K) : 0.0f;
        float klv = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float lq = l[o + k] - lse_q;
            klv += hvae_expf(lq) * (lq - log_p(pv, k, lse_p, log_uniform));
        }
        for (int64_t k = 0; k < K; k++) {
            float lq = l[o + k] - lse_q, q = hvae_expf(lq);
            dl[o + k] += scale * q * (lq - log_p(pv, k, lse_p, log_uniform) - klv);
            if (pv && dp)
                dp[o + k] += scale * (hvae_expf(pv[k] - lse_p) - q);
        }
    }
}

static void categorical_logratio_forward(double *kl, const float *z, const float *g,
                                         const float *l, const float *unused,
                                         const float *p, const float *unused_p,
                                         const hvae_latent_call *c)
{
    (void)g;
    (void)unused;
    (void)unused_p;
    int64_t K = c->K, per_row = c->d / K;
    float log_uniform = -logf((float)K);
    for (int64_t r = 0; r < c->B; r++) {
        double total = 0.0;
        for (int64_t m = 0; m < per_row; m++) {
            int64_t o = r * c->d + m * K;
            float lse_q = group_lse(l + o, K), lse_p = p ? group_lse(p + o, K) : 0.0f;
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++)
                sum += z[o + k] *
                       (l[o + k] - lse_q - log_p(p ? p + o : NULL, k, lse_p, log_uniform));
            total += sum;
        }
        kl[r] = total;
    }
}

/* d/dz_k = log q_k - log p_k; d/dl_j = z_j - q_j Z; d/dlp_j = -(z_j - p_j Z),
 * Z = sum_k z_k (1 for one-hot and relaxed samples alike). */
static void categorical_logratio_backward(float *dz, float *dl, float *unused_d, float *dp,
                                          float *unused_dp, float scale, const float *z,
                                          const float *l, const float *unused, const float *p,
                                          const float *unused_p, const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused_dp;
    (void)unused;
    (void)unused_p;
    int64_t K = c->K, groups = c->B * c->d / K;
    float log_uniform = -logf((float)K);
    for (int64_t v = 0; v < groups; v++) {
        int64_t o = v * K;
        const float *pv = p ? p + o : NULL;
        float lse_q = group_lse(l + o, K), lse_p = p ? group_lse(pv, K) : 0.0f;
        float Z = 0.0f;
        for (int64_t k = 0; k < K; k++)
            Z += z[o + k];
        for (int64_t k = 0; k < K; k++) {
            float lq = l[o + k] - lse_q;
            dz[o + k] += scale * (lq - log_p(pv, k, lse_p, log_uniform));
            if (dl)
                dl[o + k] += scale * (z[o + k] - hvae_expf(lq) * Z);
            if (pv && dp)
                dp[o + k] -= scale * (z[o + k] - hvae_expf(pv[k] - lse_p) * Z);
        }
    }
}

/* Gumbel-max from p's logits (uniform when NULL): exact one-hot draws. */
static void categorical_prior_sample(float *z, const float *p, const float *unused,
                                     hvae_rng *rng, const hvae_latent_call *c)
{
    (void)unused;
    int64_t K = c->K, groups = c->B * c->d / K;
    categorical_noise(z, rng, c->B * c->d);
    for (int64_t v = 0; v < groups; v++) {
        float *zv = z + v * K;
        int64_t best = 0;
        float mx = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            float a = (p ? p[v * K + k] : 0.0f) + zv[k];
            if (a > mx) {
                mx = a;
                best = k;
            }
        }
        for (int64_t k = 0; k < K; k++)
            zv[k] = k == best ? 1.0f : 0.0f;
    }
}

/* The class probabilities and their logs. */
static void categorical_summary(float *prob, float *log_prob, const float *l,
                                const float *unused, const hvae_latent_call *c)
{
    (void)unused;
    int64_t K = c->K, groups = c->B * c->d / K;
    for (int64_t v = 0; v < groups; v++) {
        float lse = group_lse(l + v * K, K);
        for (int64_t k = 0; k < K; k++) {
            float lq = l[v * K + k] - lse;
            if (prob)
                prob[v * K + k] = hvae_expf(lq);
            if (log_prob)
                log_prob[v * K + k] = lq;
        }
    }
}

const hvae_latent_family_ops hvae_latent_categorical = {
    .n_heads = 1,
    .top_prior_table = 0,
    .noise = categorical_noise,
    .sample_forward = categorical_sample_forward,
    .sample_backward = categorical_sample_backward,
    .score_backward = categorical_score_backward,
    .kl_forward = categorical_kl_forward,
    .kl_backward = categorical_kl_backward,
    .logratio_forward = categorical_logratio_forward,
    .logratio_backward = categorical_logratio_backward,
    .prior_sample = categorical_prior_sample,
    .summary = categorical_summary,
};
