/*
 * extension.h -- internal: the tables behind hvae.h's extension points (see
 * "Extension points" there for how to add a prior or a latent family). Each
 * prior and each latent family is one file defining one table; registry.c
 * lists the tables by enum value. The model calls them for every use of
 * the top layer's prior and of a layer's distribution, so the standard
 * N(0, I) prior and the diagonal Gaussian go through them too.
 */
#ifndef HVAE_EXTENSION_H
#define HVAE_EXTENSION_H

#include "hvae.h"

/* What a prior's operations see of one call: B rows of the top layer z_T
 * (d units each). Backward functions ACCUMULATE into dz, dmu_q, dlv_q (each
 * may be NULL when not wanted) and into the prior's own gradients at
 * grads + offset. */
typedef struct {
    const hvae_model *model;      /* a VampPrior runs the encoder on its pseudo-inputs */
    const hvae_workspace *ws;
    const float *params;          /* the model's flat buffers; the prior's */
    float *grads;                 /* tensors start at `offset` */
    int64_t offset;
    int64_t B, d;
    const float *z, *eps;         /* the sample z_T = mu_q + exp(lv_q / 2) eps */
    const float *mu_q, *lv_q;     /* q(z_T | .) */
    float *dz, *dmu_q, *dlv_q;
} hvae_prior_args;

typedef struct {
    /* The named tensors the prior adds after the blocks' (so that Adam,
     * save/load and named_parameters cover them): how many, and tensor k's
     * name after "prior." and its shape (rows, cols as hvae_tensor_info;
     * the model fills the offset). */
    int32_t (*n_tensors)(const hvae_config *config);
    void (*tensor)(const hvae_config *config, int32_t k, hvae_tensor_info *info);
    /* Initial values of the prior's tensors, params at the first of them. */
    void (*init)(const hvae_config *config, float *params, hvae_rng *rng);
    /* Per-row term of the top layer into term (B): with closed_form, the
     * KL(q(z_T|.) || p(z_T)) from (mu_q, lv_q); else log q(z_T) - log p(z_T)
     * at the sample. A prior without a closed form ignores the flag. */
    void (*term_forward)(double *term, const hvae_prior_args *a, int closed_form);
    /* Accumulates scale * the gradient of that term. */
    void (*term_backward)(const hvae_prior_args *a, float scale, int closed_form);
    /* Draws z (B, d) from the prior. */
    void (*sample)(float *z, const hvae_prior_args *a, hvae_rng *rng);
} hvae_prior_ops;

/* A latent layer's distribution: q(z_i | .) from the encoder's heads, p(z_i
 * | z_{i+1}) from the decoder's (below the top). Heads are passed as two
 * pointers (a family with one head, a categorical's M*K logits, leaves the
 * second NULL); p's may be NULL for a standard prior. Backward functions
 * ACCUMULATE. n counts elements (B * d). */
typedef struct {
    int32_t n_heads;                      /* encoder heads (Gaussian: mu, logvar) */
    /* The reparameterised sample z = f(q heads, eps) and its backward. */
    void (*sample_forward)(float *z, const float *q0, const float *q1, const float *eps,
                           int64_t n);
    void (*sample_backward)(float *dq0, float *dq1, const float *dz, const float *q0,
                            const float *q1, const float *eps, int64_t n);
    /* Per-row closed-form KL(q || p) over d units and its gradient. */
    void (*kl_forward)(double *kl, const float *q0, const float *q1, const float *p0,
                       const float *p1, int64_t B, int64_t d);
    void (*kl_backward)(float *dq0, float *dq1, float *dp0, float *dp1, float scale,
                        const float *q0, const float *q1, const float *p0, const float *p1,
                        int64_t B, int64_t d);
    /* Per-row log q(z) - log p(z) at the sample, and its pathwise gradient
     * into dz (passed on through sample_backward), dq1 and p's heads. */
    void (*logratio_forward)(double *kl, const float *z, const float *eps, const float *q1,
                             const float *p0, const float *p1, int64_t B, int64_t d);
    void (*logratio_backward)(float *dz, float *dq1, float *dp0, float *dp1, float scale,
                              const float *z, const float *p0, const float *p1, int64_t B,
                              int64_t d);
} hvae_latent_family_ops;

/* registry.c: the tables by enum value. */
extern const hvae_prior_ops *const hvae_prior_table[HVAE_PRIOR_COUNT];
extern const hvae_latent_family_ops *const hvae_latent_family_table[HVAE_LATENT_FAMILY_COUNT];

/* One file each. */
extern const hvae_prior_ops hvae_prior_normal;
extern const hvae_prior_ops hvae_prior_density_ratio;
extern const hvae_latent_family_ops hvae_latent_gaussian;

#endif
