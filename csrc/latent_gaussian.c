/* latent_gaussian.c -- the diagonal Gaussian latent layer: heads mu and
 * logvar, z = mu + exp(logvar / 2) eps with eps ~ N(0, I); its KL and
 * sampled log-ratio are gaussian.c's kernels. */
#include "extension.h"
#include "fastmath.h"

static void gaussian_noise(float *eps, hvae_rng *rng, int64_t n)
{
    hvae_rng_normal(rng, eps, n);
}

static void gaussian_sample_forward(float *z, const float *mu, const float *lv,
                                    const float *eps, const hvae_latent_call *c)
{
    hvae_reparam_forward(z, mu, lv, eps, c->B * c->d);
}

static void gaussian_sample_backward(float *dmu, float *dlv, const float *dz,
                                     const float *mu, const float *lv, const float *eps,
                                     const hvae_latent_call *c)
{
    (void)mu;
    hvae_reparam_backward(dmu, dlv, dz, lv, eps, c->B * c->d);
}

/* d log N(z; mu, exp(lv)) / d mu = (z - mu) / var, / d lv = ((z - mu)^2 / var - 1) / 2. */
static void gaussian_score_backward(float *dmu, float *dlv, const float *row_scale,
                                    const float *z, const float *mu, const float *lv,
                                    const hvae_latent_call *c)
{
    for (int64_t r = 0; r < c->B; r++) {
        float s = row_scale[r];
        for (int64_t j = r * c->d; j < (r + 1) * c->d; j++) {
            float inv_var = hvae_expf(-lv[j]), diff = z[j] - mu[j];
            dmu[j] += s * diff * inv_var;
            dlv[j] += s * 0.5f * (diff * diff * inv_var - 1.0f);
        }
    }
}

static void gaussian_kl_forward(double *kl, const float *mu_q, const float *lv_q,
                                const float *mu_p, const float *lv_p, const hvae_latent_call *c)
{
    hvae_gaussian_kl_forward(kl, mu_q, lv_q, mu_p, lv_p, c->B, c->d);
}

static void gaussian_kl_backward(float *dmu_q, float *dlv_q, float *dmu_p, float *dlv_p,
                                 float scale, const float *mu_q, const float *lv_q,
                                 const float *mu_p, const float *lv_p, const hvae_latent_call *c)
{
    hvae_gaussian_kl_backward(dmu_q, dlv_q, dmu_p, dlv_p, scale, mu_q, lv_q, mu_p, lv_p, c->B,
                              c->d);
}

static void gaussian_logratio_forward(double *kl, const float *z, const float *eps,
                                      const float *mu_q, const float *lv_q, const float *mu_p,
                                      const float *lv_p, const hvae_latent_call *c)
{
    (void)mu_q;
    hvae_gaussian_logratio_forward(kl, z, eps, lv_q, mu_p, lv_p, c->B, c->d);
}

/* Without dlv_q (the score-function path) q's direct term -1/2 goes to dz,
 * which that path discards along with the rest of dz. */
static void gaussian_logratio_backward(float *dz, float *dmu_q, float *dlv_q, float *dmu_p,
                                       float *dlv_p, float scale, const float *z,
                                       const float *mu_q, const float *lv_q,
                                       const float *mu_p, const float *lv_p,
                                       const hvae_latent_call *c)
{
    (void)dmu_q;
    (void)mu_q;
    (void)lv_q;
    hvae_gaussian_logratio_backward(dz, dlv_q ? dlv_q : dz, dmu_p, dlv_p, scale, z, mu_p, lv_p,
                                    c->B, c->d);
}

static void gaussian_prior_sample(float *z, const float *mu, const float *lv, hvae_rng *rng,
                                  const hvae_latent_call *c)
{
    int64_t n = c->B * c->d;
    hvae_rng_normal(rng, z, n);
    if (!mu)
        return;
    for (int64_t k = 0; k < n; k++)
        z[k] = mu[k] + (lv ? hvae_expf(0.5f * lv[k]) : 1.0f) * z[k];
}

static void gaussian_summary(float *out_mu, float *out_lv, const float *mu, const float *lv,
                             const hvae_latent_call *c)
{
    for (int64_t k = 0; k < c->B * c->d; k++) {
        if (out_mu)
            out_mu[k] = mu[k];
        if (out_lv)
            out_lv[k] = lv[k];
    }
}

const hvae_latent_family_ops hvae_latent_gaussian = {
    .n_heads = 2,
    .top_prior_table = 1,
    .noise = gaussian_noise,
    .sample_forward = gaussian_sample_forward,
    .sample_backward = gaussian_sample_backward,
    .score_backward = gaussian_score_backward,
    .kl_forward = gaussian_kl_forward,
    .kl_backward = gaussian_kl_backward,
    .logratio_forward = gaussian_logratio_forward,
    .logratio_backward = gaussian_logratio_backward,
    .prior_sample = gaussian_prior_sample,
    .summary = gaussian_summary,
};
