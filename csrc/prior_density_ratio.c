/* prior_density_ratio.c -- the "prior ELBO"'s learned prior: the aggregate
 * posterior q(z_T) = E_pD(x) q(z_T | x) written as
 *   p(z_T) = N(z_T; 0, I) exp(T(z_T)),
 * T the model's discriminator (discriminator.c), trained to tell q's
 * samples from N(0, I)'s, so that at its optimum T = log q(z_T) / N(z_T; 0, I)
 * and p = q. The top layer's term is then
 *   KL(q(z_T|.) || N(0, I)) - T(z_T)            (closed form, at the sample)
 *   log q(z_T|.) - log N(z_T; 0, I) - T(z_T)    (sampled ratio),
 * i.e. KL(q(z|x) || q(z)) = KL(q(z|x) || p) - E_q(z|x)[log q(z)/p(z)].
 * p is normalised only when T is exact: an ELBO or log-likelihood under it
 * estimates log p(x) under the unnormalised prior N exp(T), whose
 * normaliser E_N[exp T] is 1 at the optimum (hvae_discriminator_log_ratio
 * lets a caller estimate it); hvae_prior_log_density gives log N + T, that
 * unnormalised density. Sampling: sampling-importance-resampling,
 * HVAE_DISC_CHUNK draws from N(0, I) per sample, one kept with probability
 * proportional to exp(T). No parameters of its own: the discriminator's
 * close the buffer. */
#include "internal.h"

#include <math.h>
#include <string.h>

static int32_t dr_n_tensors(const hvae_config *config)
{
    (void)config;
    return 0;
}

static void dr_tensor(const hvae_config *config, int32_t k, hvae_tensor_info *info)
{
    (void)config;
    (void)k;
    (void)info;
}

static void dr_init(const hvae_config *config, float *params, hvae_rng *rng)
{
    (void)config;
    (void)params;
    (void)rng;
}

static void dr_term_forward(double *term, const hvae_prior_args *a, int closed_form)
{
    hvae_prior_normal.term_forward(term, a, closed_form);
    hvae_discriminator_term_forward(a->model, a->z, a->B, -1.0, term);
}

static void dr_term_backward(const hvae_prior_args *a, float scale, int closed_form)
{
    hvae_prior_normal.term_backward(a, scale, closed_form);
    /* The sample's gradient: closed form or not, -T is taken at z. */
    if (a->dz)
        hvae_discriminator_term_backward(a->model, a->z, a->B, -scale, a->dz);
}

/* log N(z; 0, I) + T(z): unnormalised, exactly the density the term and the
 * log-likelihood use (normalised when E_N[exp T] = 1, at T's optimum). */
static void dr_log_density(double *out, const hvae_prior_args *a)
{
    hvae_prior_normal.log_density(out, a);
    hvae_discriminator_rows_forward(a->model, a->z, a->B, 1.0, out);
}

static void dr_sample(float *z, const hvae_prior_args *a, hvae_rng *rng)
{
    const hvae_model *m = a->model;
    int64_t d = a->d, K = HVAE_DISC_CHUNK;
    float *cand = m->disc_rows;
    for (int64_t r = 0; r < a->B; r++) {
        hvae_rng_normal(rng, cand, K * d);
        hvae_mlp_forward(m->disc, cand, K, NULL);
        const float *t = hvae_mlp_output(m->disc);
        float mx = -INFINITY;
        for (int64_t k = 0; k < K; k++)
            mx = t[k] > mx ? t[k] : mx;
        double total = 0.0;
        for (int64_t k = 0; k < K; k++)
            total += exp((double)(t[k] - mx));
        double u = (double)hvae_rng_uniform_float(rng) * total, acc = 0.0;
        int64_t pick = K - 1;
        for (int64_t k = 0; k < K; k++) {
            acc += exp((double)(t[k] - mx));
            if (u < acc) {
                pick = k;
                break;
            }
        }
        memcpy(z + r * d, cand + pick * d, (size_t)d * sizeof(float));
    }
}

const hvae_prior_ops hvae_prior_density_ratio = {
    .n_tensors = dr_n_tensors,
    .tensor = dr_tensor,
    .init = dr_init,
    .term_forward = dr_term_forward,
    .term_backward = dr_term_backward,
    .sample = dr_sample,
    .log_density = dr_log_density,
};
