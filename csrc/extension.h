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
 * grads + offset (and, for a prior that runs the model's blocks, into
 * theirs). row_weight (B, or NULL for none) are IWAE's per-row gradient
 * weights: the model weights the rows of dz, dmu_q and dlv_q itself after
 * term_backward, so a prior applies them only to gradients that mix rows
 * (its parameters'). */
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
    /* Backward with per-row weights (IWAE), else NULL: the model weights
     * the rows of dz, dmu_q and dlv_q afterwards, but gradients of the
     * prior's own tensors mix rows, so the prior weights row r's
     * contribution to them by row_weight[r] itself. */
    const float *row_weight;
} hvae_prior_args;

typedef struct {
    /* Optional (NULL: any config): HVAE_OK when the config suits the
     * prior (its own fields in range, no unsupported combination). */
    hvae_status (*check_config)(const hvae_config *config);
    /* Optional (NULL: 0): rows of a second workspace, with the model's
     * layout, that every workspace carries for the prior (ws->prior_ws):
     * a VampPrior runs the encoder on its K pseudo-inputs there. */
    int64_t (*workspace_rows)(const hvae_config *config);
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
    /* log p(z_T) at the B rows a->z into out (B) (hvae_prior_log_density):
     * each row computed alone, so the same bits whatever the other rows and
     * the thread count. The density ratio's is unnormalised (its
     * normaliser is 1 only at the discriminator's optimum). Every prior
     * here has one; NULL makes hvae_prior_log_density refuse the model. */
    void (*log_density)(double *out, const hvae_prior_args *a);
    /* A mixture prior's components (NULL: none): how many, and p(c | z)
     * at a->z into gamma (B, K). */
    int64_t (*n_components)(const hvae_config *config);
    void (*responsibilities)(double *gamma, const hvae_prior_args *a);
    /* Optional: constant data of the table, for operations shared by
     * several tables (the mixture's component formulas, prior_mixture.h),
     * read through a->model->prior. */
    const void *data;
} hvae_prior_ops;

/* What a latent family's operations see of one call: B rows of d columns
 * (a Gaussian's d units; a categorical's M*K, in M groups of K), and the
 * sampling mode of the pass. */
typedef struct {
    int64_t B, d;
    int64_t K;            /* classes per variable (1 for a Gaussian) */
    float temperature;    /* relaxed sample's tau; 0: exact (Gumbel-max) */
    int straight_through; /* hard forward, relaxed backward */
} hvae_latent_call;

/* A latent layer's distribution: q(z_i | .) from the encoder's heads, p(z_i
 * | z_{i+1}) from the decoder's (below the top). Heads are passed as two
 * pointers (a family with one head, a categorical's M*K logits, leaves the
 * second NULL); p's may be NULL for the family's standard prior (N(0, I),
 * uniform). Backward functions ACCUMULATE; a NULL gradient is skipped
 * (dq0/dq1 of the sampled ratio: the score-function path, which keeps only
 * p's gradient at the fixed sample). */
typedef struct {
    int32_t n_heads;                      /* encoder heads (Gaussian: mu, logvar) */
    /* 1: the top layer's p is the prior table's (hvae_prior_ops); 0: the
     * family's standard prior (p heads NULL) */
    int top_prior_table;
    /* The layer's noise, c->B * c->d values (standard normal; Gumbel).
     * Training draws a large minibatch's in pieces of an even length
     * (HVAE_POLL_DRAWS, internal.h), polling between them: pieces must
     * give the values one call would. */
    void (*noise)(float *eps, hvae_rng *rng, int64_t n);
    /* The sample z = f(q heads, eps) (reparameterised, relaxed or exact per
     * c) and its pathwise backward. */
    void (*sample_forward)(float *z, const float *q0, const float *q1, const float *eps,
                           const hvae_latent_call *c);
    void (*sample_backward)(float *dq0, float *dq1, const float *dz, const float *q0,
                            const float *q1, const float *eps, const hvae_latent_call *c);
    /* Accumulates row_scale[r] * d log q(z_r) / d(q heads) at the (exact)
     * sample: the score function. */
    void (*score_backward)(float *dq0, float *dq1, const float *row_scale, const float *z,
                           const float *q0, const float *q1, const hvae_latent_call *c);
    /* Per-row closed-form KL(q || p) and its gradient. */
    void (*kl_forward)(double *kl, const float *q0, const float *q1, const float *p0,
                       const float *p1, const hvae_latent_call *c);
    void (*kl_backward)(float *dq0, float *dq1, float *dp0, float *dp1, float scale,
                        const float *q0, const float *q1, const float *p0, const float *p1,
                        const hvae_latent_call *c);
    /* Per-row log q(z) - log p(z) at the sample, and its pathwise gradient
     * into dz (passed on through sample_backward), q's and p's heads. */
    void (*logratio_forward)(double *kl, const float *z, const float *eps, const float *q0,
                             const float *q1, const float *p0, const float *p1,
                             const hvae_latent_call *c);
    void (*logratio_backward)(float *dz, float *dq0, float *dq1, float *dp0, float *dp1,
                              float scale, const float *z, const float *q0, const float *q1,
                              const float *p0, const float *p1, const hvae_latent_call *c);
    /* A draw z from p (heads p0, p1; NULL: the standard prior). */
    void (*prior_sample)(float *z, const float *p0, const float *p1, hvae_rng *rng,
                         const hvae_latent_call *c);
    /* What encode reports of q: its mean (Gaussian: mu, logvar; categorical:
     * the class probabilities and their logs) into out0, out1. */
    void (*summary)(float *out0, float *out1, const float *q0, const float *q1,
                    const hvae_latent_call *c);
} hvae_latent_family_ops;

/* registry.c: the tables by enum value. */
extern const hvae_prior_ops *const hvae_prior_table[HVAE_PRIOR_COUNT];
extern const hvae_latent_family_ops *const hvae_latent_family_table[HVAE_LATENT_FAMILY_COUNT];

/* The table of config's prior: hvae_prior_table's, except that the
 * mixture's full-covariance components (prior_covariance) have their own. */
const hvae_prior_ops *hvae_prior_ops_for(const hvae_config *config);

/* One file each (the mixture's two component kinds share prior_mixture.c). */
extern const hvae_prior_ops hvae_prior_normal;
extern const hvae_prior_ops hvae_prior_gmm;
extern const hvae_prior_ops hvae_prior_gmm_full;
extern const hvae_prior_ops hvae_prior_vamp;
extern const hvae_prior_ops hvae_prior_density_ratio;
extern const hvae_latent_family_ops hvae_latent_gaussian;
extern const hvae_latent_family_ops hvae_latent_categorical;

#endif
