/* prior_mixture.h -- internal: what the two mixture-of-Gaussians priors
 * share (VaDE's ELBO term, its gradient chain through the responsibilities,
 * the sampled term, sampling, the responsibilities). A mixture prior is
 *
 *   p(c) = softmax(pi_logits)_c,   p(z_T | c) = a Gaussian component c,
 *
 * with its tensors laid out as "prior.pi_logits" (K), "prior.mu" (K, d),
 * then the components' shape tensors (diagonal: "prior.logvar" (K, d),
 * csrc/prior_gmm.c; full: the precision's Cholesky factor, csrc/
 * prior_gmm_full.c). The component's densities and KLs are its own; the
 * rest (prior_mixture.c) is written once:
 *
 *   l_c = log p(c) + log N_c(z),   gamma = softmax(l)  (at the sampled z),
 *   term = sum_c gamma_c [ KL(q(z_T|.) || N_c) + log gamma_c - log p(c) ],
 *
 * with A_c = KL_c + log gamma_c - log p(c) and w_c = gamma_c (A_c - term):
 *
 *   d term / d pi_logits_c = p(c) - gamma_c + w_c
 *   d term / d z           = sum_c w_c d log N_c(z) / dz
 *   d term / d (component c) = gamma_c dKL_c + w_c d log N_c(z)
 *   d term / d (mu_q, lv_q) = sum_c gamma_c dKL_c / d(mu_q, lv_q)
 *
 * and the sampled term (IWAE, log-likelihood) log q(z) - logsumexp_c l_c,
 * its log p(z) = logsumexp_c l_c also the prior's log-density.
 */
#ifndef HVAE_PRIOR_MIXTURE_H
#define HVAE_PRIOR_MIXTURE_H

#include "internal.h"

typedef struct hvae_mixture hvae_mixture;

/* One component family's formulas; c indexes the component. Backward
 * functions ACCUMULATE; gradients of the component's tensors (m->dmu,
 * m->dshape) only when m->dmu is not NULL. */
typedef struct {
    /* log N_c(z) over d units. */
    double (*log_density)(const hvae_mixture *m, const float *z, int64_t c);
    /* KL(N(mu_q, diag exp(lv_q)) || N_c). */
    double (*kl)(const hvae_mixture *m, const float *mu_q, const float *lv_q, int64_t c);
    /* s * d log N_c(z) / dz into dz (skipped when NULL), and
     * m->row_weight * s * d log N_c(z) / d(component c's tensors). */
    void (*log_density_backward)(const hvae_mixture *m, const float *z, float *dz, int64_t c,
                                 double s);
    /* s_q * dKL_c / d(mu_q, lv_q) into dmu_q, dlv_q (both or neither
     * NULL), then s_prior * dKL_c / d(component c's tensors). */
    void (*kl_backward)(const hvae_mixture *m, float *dmu_q, float *dlv_q, const float *mu_q,
                        const float *lv_q, int64_t c, double s_q, double s_prior);
    /* One draw z (d) from component c. */
    void (*sample)(const hvae_mixture *m, float *z, int64_t c, hvae_rng *rng);
} hvae_mixture_component_ops;

struct hvae_mixture {
    const hvae_mixture_component_ops *ops;
    int64_t K, d;
    const float *pi_logits, *mu; /* (K), (K, d) */
    const float *shape;          /* the components' other tensors, after mu */
    float *dpi_logits, *dmu, *dshape; /* NULL when not differentiating */
    double log_norm;             /* logsumexp of pi_logits */
    double row_weight;           /* multiplies the prior's gradients */
};

/* The hvae_prior_ops operations of a mixture prior, the same for every
 * component family: the table's `data` is its hvae_mixture_component_ops. */
void hvae_mixture_term_forward(double *term, const hvae_prior_args *a, int closed_form);
void hvae_mixture_term_backward(const hvae_prior_args *a, float scale, int closed_form);
void hvae_mixture_sample(float *z, const hvae_prior_args *a, hvae_rng *rng);
void hvae_mixture_responsibilities(double *gamma, const hvae_prior_args *a);
/* log p(z) = logsumexp_c l_c per row (the sampled term's, written once). */
void hvae_mixture_log_density(double *out, const hvae_prior_args *a);
/* hvae_config.n_components. */
int64_t hvae_mixture_n_components(const hvae_config *config);
/* Equal weights, means N(0, I) draws (so that the components differ);
 * the shape tensors are the caller's. */
void hvae_mixture_init_weights_means(float *params, int64_t K, int64_t d, hvae_rng *rng);

#endif
