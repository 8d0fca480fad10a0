/*
 * hvae.h -- the public C API of hvae, a hierarchical variational autoencoder
 * trained on the CPU.
 *
 * The model is a Markov hierarchy of T diagonal-Gaussian latent layers
 * z_1..z_T over data x = z_0 in R^D:
 *
 *   inference   q(z_i | z_{i-1}) = N(mu_i, exp(logvar_i))        i = 1..T
 *   generation  p(z_T) = N(0, I),  p(z_{i-1} | z_i)             i = T..1
 *               (the prior and the layers' family are extension points,
 *               see "Extension points" below)
 *   ELBO(x) = E_q[ log p(x | z_1) - KL(q(z_T|z_{T-1}) || N(0, I))
 *                  - sum_{i<T} (log q(z_i|z_{i-1}) - log p(z_i|z_{i+1})) ]
 *
 * estimated with one reparameterised sample z_i = mu_i + exp(logvar_i/2) eps_i.
 * The top layer's KL is taken in closed form. A lower layer's prior
 * p(z_i | z_{i+1}) depends on z_{i+1}, which was drawn given z_i, so the
 * closed-form KL(q(z_i|z_{i-1}) || p(z_i|z_{i+1})) at that z_{i+1} is not an
 * unbiased estimate of the ELBO (nor always a bound); those layers use the
 * sampled log-density ratio, whose expectation is exactly their term, unless
 * hvae_config.markov_kl = HVAE_MARKOV_KL_ANALYTIC asks for that closed form
 * (the lecture notes' estimator). Every objective (ELBO, multi-sample ELBO,
 * IWAE, log-likelihood) assembles a row's log p(x|z_1) - sum of the layer
 * terms in one function (model.c, hvae_row_terms).
 *
 * Files: model.c (layout, passes, evaluation), train.c (objectives, the
 * training loop, rollback), gaussian.c (the Gaussian KL, log-ratio and
 * likelihood kernels), optim.c (Adam, SGD), mlp.c (auxiliary networks),
 * discriminator.c (the model's discriminator: FactorVAE, the density-ratio
 * prior), tcvae.c (beta-TCVAE's terms), prior_*.c and latent_*.c (the
 * extension points' tables, registry.c).
 * Every block is an MLP of dense layers y = act(x @ W + b), W of shape
 * (in, out), row-major.
 *
 * Memory: the parameters, their gradients and the optimizer moments each
 * live in one flat float32 buffer with the same layout (see
 * hvae_model_tensor); the optimizer also keeps the epoch's rollback copy
 * (parameters and moments). Activations live in a workspace sized once for
 * a batch size; nothing is allocated inside a training step. Functions return an
 * hvae_status and never print or exit.
 *
 * Usage:
 *
 *   int64_t latent[] = {32, 16}, hidden[] = {512, 256};
 *   hvae_config cfg = hvae_config_default(784, 2, latent, 2, hidden);
 *   cfg.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
 *   hvae_model *model; hvae_workspace *ws; hvae_optimizer *opt;
 *   hvae_rng rng;
 *   if (hvae_model_create(&cfg, &model) != HVAE_OK) ...;
 *   hvae_model_init(model, 42);                    // PyTorch-default init
 *   hvae_workspace_create(model, 128, &ws);        // up to 128 rows a call
 *   hvae_optimizer_config oc = hvae_optimizer_config_default();
 *   hvae_optimizer_create(model, &oc, &opt);
 *   hvae_rng_seed(&rng, 42);
 *   hvae_train_options to = hvae_train_options_default();  // batch 128, ELBO
 *   hvae_epoch_stats stats;
 *   int64_t *order = malloc(n_rows * sizeof *order);  // shuffling scratch
 *   for (int e = 0; e < 10; e++)
 *       if (hvae_train_epoch(model, ws, opt, &rng, X, NULL, n_rows, order, &to,
 *                            &stats) == HVAE_ERR_NONFINITE_LOSS)
 *           ...;  // rolled back to the epoch's start: lower the learning
 *                 // rate (hvae_optimizer_configure) and go on
 *   double *ll = malloc(n_rows * sizeof *ll);
 *   hvae_log_likelihood(model, ws, X, NULL, n_rows, 1000, 0, ll, NULL, NULL);
 *   hvae_optimizer_free(opt); hvae_workspace_free(ws); hvae_model_free(model);
 *
 * Ownership: every *_create has a matching *_free; buffers returned by
 * accessors belong to the object and live as long as it does. Input arrays
 * are borrowed for the duration of a call and never written.
 *
 * Threads: one object must not be used by two threads at once; distinct
 * objects may. Matrix products run on OpenBLAS, split over hvae's own thread
 * pool (hvae_set_num_threads()).
 */
#ifndef HVAE_H
#define HVAE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define HVAE_API __declspec(dllexport)
#else
#define HVAE_API __attribute__((visibility("default")))
#endif

#define HVAE_VERSION_MAJOR 0
#define HVAE_VERSION_MINOR 1
#define HVAE_VERSION_PATCH 0

/* Limits: at most this many latent layers and hidden layers per block. */
#define HVAE_MAX_LAYERS 16
#define HVAE_MAX_HIDDEN 16

/* Status codes. New values are only ever added at the end. */
typedef enum {
    HVAE_OK = 0,
    HVAE_ERR_INVALID_ARGUMENT = 1, /* a size, option or pointer is invalid */
    HVAE_ERR_OUT_OF_MEMORY = 2,    /* an allocation failed */
    HVAE_ERR_SIZE_OVERFLOW = 3,    /* a requested size does not fit in memory */
    HVAE_ERR_NONFINITE_INPUT = 4,  /* the data contain NaN or infinity */
    HVAE_ERR_INPUT_RANGE = 5,      /* Bernoulli data outside [0, 1] */
    HVAE_ERR_NONFINITE_LOSS = 6,   /* loss or gradient became NaN/inf; the
                                      step was not applied */
    HVAE_ERR_STOPPED = 7,          /* the batch hook asked to stop */
    HVAE_ERR_BATCH_TOO_LARGE = 8,  /* more rows than the workspace holds */
    HVAE_ERR_INPUT_MAGNITUDE = 9   /* data beyond +-HVAE_MAX_ABS_INPUT */
} hvae_status;

/* A static, human-readable description of a status code. */
HVAE_API const char *hvae_status_to_string(hvae_status status);

/* Names. Every option a caller picks by name (Python does) is an enum E
 * with a sentinel HVAE_E_COUNT, one past its last value, and a function
 * hvae_E_name(value) giving the value's name: a static string, or NULL when
 * the value is out of range or not selectable by name (the internal
 * activations). A binding lists the choices by walking 0..HVAE_E_COUNT - 1
 * and skipping NULLs, and parses a name against the same list, so a new
 * value needs its enum entry and its name here and nothing else. New values
 * go at the end, before the sentinel. */

typedef enum {
    HVAE_LIKELIHOOD_GAUSSIAN = 0,  /* p(x|z_1) = N(mu, exp(logvar)) */
    HVAE_LIKELIHOOD_BERNOULLI = 1, /* p(x|z_1) = Bernoulli(sigmoid(logits)) */
    HVAE_LIKELIHOOD_COUNT
} hvae_likelihood;
HVAE_API const char *hvae_likelihood_name(hvae_likelihood likelihood);

typedef enum {
    HVAE_ACT_RELU = 0,
    HVAE_ACT_TANH = 1,
    HVAE_ACT_LEAKY_RELU = 2,   /* slope 0.01 below zero */
    HVAE_ACT_ELU = 3,          /* alpha 1 */
    HVAE_ACT_SOFTPLUS = 4,
    /* Internal: the heads' activations, never a hidden layer's choice; their
     * names are NULL. */
    HVAE_ACT_IDENTITY = 5,     /* used for the linear heads */
    HVAE_ACT_LOGVAR_CLIP = 6,  /* clip to [-HVAE_LOGVAR_BOUND, HVAE_LOGVAR_BOUND]:
                                  every log-variance head */
    /* A new hidden activation goes here (value 7 on), with its name. */
    HVAE_ACT_COUNT
} hvae_activation;
/* "relu", "tanh", "leaky_relu", "elu", "softplus"; NULL for the internal
 * head activations. */
HVAE_API const char *hvae_activation_name(hvae_activation act);

/* Log-variance heads are clipped to +-HVAE_LOGVAR_BOUND (variances between
 * 2e-9 and 5e8): every exp stays finite for unscaled data at initialisation,
 * and a Gaussian likelihood cannot grow without bound on a constant feature.
 * The clip passes no gradient outside the range. */
#define HVAE_LOGVAR_BOUND 20.0f

typedef enum {
    HVAE_DECODER_VARIANCE_LEARNED = 0, /* decoders have log-variance heads */
    HVAE_DECODER_VARIANCE_UNIT = 1,    /* decoder variances fixed to 1 */
    HVAE_DECODER_VARIANCE_COUNT
} hvae_decoder_variance;
HVAE_API const char *hvae_decoder_variance_name(hvae_decoder_variance v);

/* How q(z | x) is built; the generative model is the same for both. */
typedef enum {
    /* Bottom-up: q(z_i | z_{i-1}) from encoder block i at the sample z_{i-1}. */
    HVAE_INFERENCE_MARKOV = 0,
    /* Ladder (Sonderby et al. 2016): a deterministic bottom-up pass, encoder
     * block i reading the mean mu_hat_{i-1} of the block below, gives
     * (mu_hat_i, var_hat_i); then top-down q(z_T) = N(mu_hat_T, var_hat_T) and
     * for i < T the precision-weighted combination with the prior
     * p(z_i | z_{i+1}) = N(mu_p, var_p):
     *   var_q = 1 / (1/var_hat + 1/var_p),  mu_q = var_q (mu_hat/var_hat + mu_p/var_p).
     * q and p of a layer then share z_{i+1}, so every KL is closed-form. */
    HVAE_INFERENCE_LADDER = 1,
    HVAE_INFERENCE_COUNT
} hvae_inference;
HVAE_API const char *hvae_inference_name(hvae_inference inference);

/* The prior of the top layer, p(z_T). See "Extension points" below. */
typedef enum {
    HVAE_PRIOR_NORMAL = 0,     /* "standard": N(0, I), no parameters */
    /* "gmm": a mixture of hvae_config.n_components diagonal Gaussians with
     * learned weights, means and variances (VaDE, Jiang et al. 2017); see
     * csrc/prior_gmm.c for its ELBO term. */
    HVAE_PRIOR_GMM = 1,
    /* "vamp", the VampPrior (Tomczak and Welling 2018): the mixture
     * (1/K) sum_k q(z_T | u_k) of the posteriors of K learned
     * pseudo-inputs u_k (hvae_config.n_pseudo_inputs); see
     * csrc/prior_vamp.c. Not with a condition (n_conditions = 0). */
    HVAE_PRIOR_VAMP = 2,
    /* "density_ratio": the aggregate posterior q(z_T) as the prior, through
     * the model's discriminator (hvae_config.discriminator, required):
     * p(z_T) = N(z_T; 0, I) exp(T(z_T)), T the discriminator's logit, trained
     * to tell q's samples from N(0, I)'s (T* = log q/N at balance). See
     * csrc/prior_density_ratio.c. */
    HVAE_PRIOR_DENSITY_RATIO = 3,
    HVAE_PRIOR_COUNT
} hvae_prior_kind;
HVAE_API const char *hvae_prior_name(hvae_prior_kind prior);

/* The covariance of a mixture prior's components (hvae_config.
 * prior_covariance; only HVAE_PRIOR_GMM has components). */
typedef enum {
    /* "diag": diag(exp(logvar_c)), csrc/prior_gmm.c */
    HVAE_COVARIANCE_DIAG = 0,
    /* "full": Sigma_c = (P_c P_c^T)^{-1}, P_c the precision's lower-triangular
     * Cholesky factor (scikit-learn's precisions_cholesky_), learned; top
     * layer of at most HVAE_MAX_FULL_COVARIANCE_DIM units;
     * csrc/prior_gmm_full.c */
    HVAE_COVARIANCE_FULL = 1,
    HVAE_COVARIANCE_COUNT
} hvae_covariance_type;
HVAE_API const char *hvae_covariance_type_name(hvae_covariance_type covariance);

/* The distribution family of a latent layer. See "Extension points" below. */
typedef enum {
    HVAE_LATENT_GAUSSIAN = 0,  /* diagonal Gaussian: heads mu and logvar */
    /* M independent categorical variables of K classes (hvae_config.
     * n_categories): one head of M*K logits, z a one-hot (relaxed in
     * training by Gumbel-softmax) of width M*K; the prior is uniform at the
     * top and a categorical with logits from the decoder block below it.
     * See "Discrete latent layers" below. */
    HVAE_LATENT_CATEGORICAL = 1,
    HVAE_LATENT_FAMILY_COUNT
} hvae_latent_family;
HVAE_API const char *hvae_latent_family_name(hvae_latent_family family);

/* The ELBO's term of a lower Markov layer i < T (ladder layers are always
 * closed form). */
typedef enum {
    /* log q(z_i|z_{i-1}) - log p(z_i|z_{i+1}) at the samples: an unbiased
     * single-sample estimate of the term. */
    HVAE_MARKOV_KL_SAMPLED = 0,
    /* KL(q(z_i|z_{i-1}) || p(z_i|z_{i+1})) in closed form at the sampled
     * z_{i+1} (the lecture notes' estimator): z_{i+1} was drawn given z_i,
     * so it is a different, not an unbiased, estimate of the ELBO (on
     * Fashion-MNIST, T = 2, trained with SAMPLED: 3.3 nats lower, with a
     * larger single-draw spread; see the README). IWAE and log-likelihood
     * need true log-weights and keep the sampled ratio. */
    HVAE_MARKOV_KL_ANALYTIC = 1,
    HVAE_MARKOV_KL_COUNT
} hvae_markov_kl;
HVAE_API const char *hvae_markov_kl_name(hvae_markov_kl markov_kl);

/* The architecture. Arrays are copied by hvae_model_create. */
typedef struct {
    int64_t n_features;                 /* D */
    int32_t n_layers;                   /* T, 1..HVAE_MAX_LAYERS */
    const int64_t *latent_dims;         /* d_1..d_T */
    int32_t n_hidden;                   /* 0..HVAE_MAX_HIDDEN */
    const int64_t *hidden_dims;         /* encoder widths; decoders reverse them */
    hvae_likelihood likelihood;
    hvae_activation activation;
    hvae_decoder_variance decoder_variance;
    hvae_inference inference;
    /* Width of a condition c (conditional VAE), 0 for none. c enters the
     * first layer of every encoder and decoder block (its W gains n_conditions
     * rows after the n_in rows of the block's input). */
    int64_t n_conditions;
    hvae_markov_kl markov_kl;           /* default HVAE_MARKOV_KL_SAMPLED */
    hvae_prior_kind prior;              /* default HVAE_PRIOR_NORMAL */
    hvae_latent_family latent_family;   /* every layer's; default Gaussian */
    /* Per layer (T entries each; NULL: every layer latent_family). A
     * categorical layer i has latent_dims[i] = M variables of
     * n_categories[i] = K >= 2 classes each; its sample z_i has M*K
     * columns (hvae_model_latent_width), column m*K + k for class k of
     * variable m. n_categories may be NULL when no layer is categorical;
     * its entries for other layers are ignored. */
    const hvae_latent_family *latent_families;
    const int64_t *n_categories;
    /* Components K of a mixture prior (HVAE_PRIOR_GMM: 1..HVAE_MAX_COMPONENTS);
     * ignored by the other priors. Default 1. */
    int64_t n_components;
    /* HVAE_PRIOR_VAMP: the number K >= 1 of pseudo-inputs (the paper's
     * is HVAE_VAMP_PSEUDO_INPUTS, which bindings may offer as a default);
     * 0 (hvae_config_default's) for every other prior. */
    int64_t n_pseudo_inputs;
    /* A discriminator over the top layer's samples z_T (csrc/discriminator.c),
     * 0 for none: an MLP of discriminator_n_hidden leaky-ReLU layers of the
     * given widths and one linear output T(z), whose tensors
     * ("discriminator.*") close the parameter buffer. Its role: the
     * density-ratio prior's T (HVAE_PRIOR_DENSITY_RATIO), or otherwise
     * FactorVAE's total-correlation estimate (hvae_objective_options.tc_weight). */
    int32_t discriminator;
    int32_t discriminator_n_hidden;     /* 0..HVAE_MAX_HIDDEN */
    int64_t discriminator_hidden[HVAE_MAX_HIDDEN];
    /* HVAE_PRIOR_GMM's component covariance; default HVAE_COVARIANCE_DIAG,
     * which every other prior requires. */
    hvae_covariance_type prior_covariance;
} hvae_config;

/* The most components a mixture prior may have. */
#define HVAE_MAX_COMPONENTS 65536
#define HVAE_VAMP_PSEUDO_INPUTS 500
/* The widest top layer of a full-covariance mixture prior (its formulas
 * work on stack vectors of this many doubles). */
#define HVAE_MAX_FULL_COVARIANCE_DIM 512

HVAE_API hvae_config hvae_config_default(int64_t n_features, int32_t n_layers,
                                         const int64_t *latent_dims,
                                         int32_t n_hidden,
                                         const int64_t *hidden_dims);

/* ------------------------------------------------------------------------ */
/* Random numbers: xoshiro256** seeded through splitmix64. The state is a    */
/* plain struct so that callers can save and restore it.                     */

typedef struct {
    uint64_t s[4];
} hvae_rng;

HVAE_API void hvae_rng_seed(hvae_rng *rng, uint64_t seed);
HVAE_API uint64_t hvae_rng_next(hvae_rng *rng);
/* n standard normal floats (Box-Muller on 53-bit uniforms). */
HVAE_API void hvae_rng_normal(hvae_rng *rng, float *out, int64_t n);
/* A uniformly random permutation of 0..n-1 (Fisher-Yates, unbiased). */
HVAE_API void hvae_rng_permutation(hvae_rng *rng, int64_t *out, int64_t n);

/* ------------------------------------------------------------------------ */
/* Per-layer kernels on flat row-major buffers. Forward functions write     */
/* their outputs; backward functions ACCUMULATE into their gradient outputs */
/* (+=) so that a buffer fed by several consumers is zeroed once per step.  */
/* B is the number of rows.                                                 */

/* out (B, n_out) = act(inp (B, n_in) @ weight (n_in, n_out) + bias (n_out)) */
HVAE_API void hvae_dense_forward(float *out, const float *inp,
                                 const float *weight, const float *bias,
                                 hvae_activation act,
                                 int64_t B, int64_t n_in, int64_t n_out);
/* Given dout = dL/d(out), CONSUMES dout (turns it into dL/d(pre-activation)
 * in place) and accumulates dinp (B, n_in) (skipped when NULL),
 * dweight (n_in, n_out) and dbias (n_out). `out` is the forward output. */
HVAE_API void hvae_dense_backward(float *dinp, float *dweight, float *dbias,
                                  float *dout, const float *out,
                                  const float *inp, const float *weight,
                                  hvae_activation act,
                                  int64_t B, int64_t n_in, int64_t n_out);

/* Elementwise activation, out may alias inp. */
HVAE_API void hvae_activation_forward(float *out, const float *inp,
                                      hvae_activation act, int64_t n);
/* dinp += dout * act'(pre), computed from the activation output `out`. */
HVAE_API void hvae_activation_backward(float *dinp, const float *dout,
                                       const float *out, hvae_activation act,
                                       int64_t n);

/* z = mu + exp(logvar / 2) * eps, n elements. */
HVAE_API void hvae_reparam_forward(float *z, const float *mu,
                                   const float *logvar, const float *eps,
                                   int64_t n);
/* dmu += dz;  dlogvar += dz * eps * exp(logvar / 2) / 2. */
HVAE_API void hvae_reparam_backward(float *dmu, float *dlogvar,
                                    const float *dz, const float *logvar,
                                    const float *eps, int64_t n);

/* Per-row KL(N(mu_q, exp(lv_q)) || N(mu_p, exp(lv_p))) summed over d
 * dimensions, written to kl (B). mu_p and/or lv_p may be NULL for 0 (the
 * standard normal prior, or unit variance). */
HVAE_API void hvae_gaussian_kl_forward(double *kl, const float *mu_q,
                                       const float *lv_q, const float *mu_p,
                                       const float *lv_p, int64_t B,
                                       int64_t d);
/* Accumulates scale * dKL/d(each input). Gradients for a NULL input are
 * skipped; dmu_p and dlv_p may also be NULL when their input is given. */
HVAE_API void hvae_gaussian_kl_backward(float *dmu_q, float *dlv_q,
                                        float *dmu_p, float *dlv_p,
                                        float scale, const float *mu_q,
                                        const float *lv_q, const float *mu_p,
                                        const float *lv_p, int64_t B,
                                        int64_t d);

/* Per-row single-sample estimate of a KL term whose prior depends on another
 * sample: log q(z | .) - log p(z | .) at z = mu_q + exp(lv_q / 2) * eps,
 *   = sum_j (lv_p - lv_q - eps^2 + (z - mu_p)^2 exp(-lv_p)) / 2,
 * into kl (B). mu_p and/or lv_p may be NULL for 0 (standard normal prior). */
HVAE_API void hvae_gaussian_logratio_forward(double *kl, const float *z,
                                             const float *eps,
                                             const float *lv_q,
                                             const float *mu_p,
                                             const float *lv_p, int64_t B,
                                             int64_t d);
/* Accumulates scale * the pathwise partial derivatives of that estimate:
 * into dz (which the caller passes on through the reparameterisation),
 * dlv_q (the direct -1/2), dmu_p and dlv_p (skipped when NULL). */
HVAE_API void hvae_gaussian_logratio_backward(float *dz, float *dlv_q,
                                              float *dmu_p, float *dlv_p,
                                              float scale, const float *z,
                                              const float *mu_p,
                                              const float *lv_p, int64_t B,
                                              int64_t d);

/* The ladder's precision-weighted posterior, elementwise over n values:
 *   lv_q = -log(exp(-lv_hat) + exp(-lv_p)),
 *   mu_q = w mu_hat + (1 - w) mu_p,  w = sigmoid(lv_p - lv_hat).
 * lv_p may be NULL for unit variance. */
HVAE_API void hvae_precision_merge_forward(float *mu_q, float *lv_q,
                                           const float *mu_hat,
                                           const float *lv_hat,
                                           const float *mu_p,
                                           const float *lv_p, int64_t n);
/* Accumulates the gradients of (mu_hat, lv_hat, mu_p, lv_p) from those of
 * (mu_q, lv_q); dlv_p is skipped when NULL. */
HVAE_API void hvae_precision_merge_backward(float *dmu_hat, float *dlv_hat,
                                            float *dmu_p, float *dlv_p,
                                            const float *dmu_q,
                                            const float *dlv_q,
                                            const float *mu_hat,
                                            const float *lv_hat,
                                            const float *mu_p,
                                            const float *lv_p, int64_t n);

/* Per-row log N(x; mu, exp(lv)) in nats, constants included, into ll (B).
 * mu may be NULL for zero mean, lv for unit variance. */
HVAE_API void hvae_gaussian_loglik_forward(double *ll, const float *x,
                                           const float *mu, const float *lv,
                                           int64_t B, int64_t D);
/* Accumulates scale * dll/dmu and scale * dll/dlv (dlv skipped if NULL). */
HVAE_API void hvae_gaussian_loglik_backward(float *dmu, float *dlv,
                                            float scale, const float *x,
                                            const float *mu, const float *lv,
                                            int64_t B, int64_t D);

/* Per-row sum of x * l - softplus(l) (Bernoulli log-likelihood with logits
 * l, x in [0, 1]) into ll (B). */
HVAE_API void hvae_bernoulli_loglik_forward(double *ll, const float *x,
                                            const float *logits, int64_t B,
                                            int64_t D);
/* dlogits += scale * (x - sigmoid(l)). */
HVAE_API void hvae_bernoulli_loglik_backward(float *dlogits, float scale,
                                             const float *x,
                                             const float *logits, int64_t B,
                                             int64_t D);

/* ------------------------------------------------------------------------ */
/* Optimizers over flat buffers.                                             */

/* Adam (Kingma & Ba 2015), in PyTorch's arrangement, step t >= 1:
 *   g = grad + weight_decay * p
 *   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *   p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)            */
HVAE_API void hvae_adam_update(float *params, const float *grads, float *m,
                               float *v, int64_t n, float lr, float beta1,
                               float beta2, float eps, float weight_decay,
                               int64_t t);
/* SGD with optional momentum (PyTorch's form):
 *   g = grad + weight_decay * p;  buf = momentum * buf + g;  p -= lr * buf
 * (buf is unused and may be NULL when momentum is 0). */
HVAE_API void hvae_sgd_update(float *params, const float *grads, float *buf,
                              int64_t n, float lr, float momentum,
                              float weight_decay);

/* ------------------------------------------------------------------------ */
/* The model.                                                                */

typedef struct hvae_model hvae_model;

HVAE_API hvae_status hvae_model_create(const hvae_config *config,
                                       hvae_model **out);
HVAE_API void hvae_model_free(hvae_model *model);
HVAE_API const hvae_config *hvae_model_config(const hvae_model *model);

/* Number of float32 parameters (length of the parameter buffer). */
HVAE_API int64_t hvae_model_n_params(const hvae_model *model);
/* The columns of layer i's sample z_{i+1}: latent_dims[i], or M*K for a
 * categorical layer (0 for an invalid i). */
HVAE_API int64_t hvae_model_latent_width(const hvae_model *model, int32_t layer);
/* The parameter and gradient buffers, n_params floats each. */
HVAE_API float *hvae_model_params(hvae_model *model);
HVAE_API float *hvae_model_grads(hvae_model *model);

/* The named tensors that tile the parameter buffer, in buffer order:
 * encoder blocks enc1..encT, then decoder blocks dec1..decT; within a block
 * hidden1..hiddenH, then the heads (mu, logvar; or logits), W before b. */
typedef struct {
    char name[48];   /* e.g. "enc1.hidden1.W", "dec1.logits.b" */
    int64_t offset;  /* in floats from the start of the buffer */
    int64_t rows;    /* W: n_in; b: n_out */
    int64_t cols;    /* W: n_out; b: 0 (a vector) */
} hvae_tensor_info;

HVAE_API int32_t hvae_model_n_tensors(const hvae_model *model);
HVAE_API hvae_status hvae_model_tensor(const hvae_model *model, int32_t index,
                                       hvae_tensor_info *info);

/* PyTorch's default Linear initialisation: every W and b entry uniform in
 * [-1/sqrt(n_in), 1/sqrt(n_in)], drawn from an hvae_rng seeded with seed. */
HVAE_API void hvae_model_init(hvae_model *model, uint64_t seed);

/* Data of larger magnitude are refused: their squares, scaled by a variance
 * as small as exp(-20), would overflow float32. */
#define HVAE_MAX_ABS_INPUT 1e12f

/* Checks that x (n, D) is finite, within +-HVAE_MAX_ABS_INPUT and, for a
 * Bernoulli likelihood, in [0, 1].
 * On failure *bad_index (if not NULL) receives the flat index of the first
 * offending value. */
HVAE_API hvae_status hvae_model_check_data(const hvae_model *model,
                                           const float *x, int64_t n,
                                           int64_t *bad_index);

/* ------------------------------------------------------------------------ */
/* Workspace: activations and their gradients for up to max_rows rows.     */

typedef struct hvae_workspace hvae_workspace;

/* Bytes a workspace for max_rows rows needs (0 if it would overflow). */
HVAE_API size_t hvae_workspace_bytes(const hvae_model *model, int64_t max_rows);
HVAE_API hvae_status hvae_workspace_create(const hvae_model *model,
                                           int64_t max_rows,
                                           hvae_workspace **out);
HVAE_API void hvae_workspace_free(hvae_workspace *ws);
HVAE_API int64_t hvae_workspace_max_rows(const hvae_workspace *ws);

/* Interrupting long calls. poll(ctx) is called by the calling thread
 * between the chunks and the layers of hvae_elbo, hvae_loss_and_grad,
 * hvae_log_likelihood, hvae_encode, hvae_decode and hvae_sample (every few
 * milliseconds of work; rate-limit in poll itself), and before every
 * optimizer step of training; within a layer's long row-wise passes too
 * (a large training minibatch's noise, staging, likelihood, activation
 * backward), every few million values. The longest stretch without a
 * poll is one matrix product over all the rows of a call's chunk or of a
 * training minibatch (times draws): about 50 ms a million rows on one
 * core. A nonzero return stops the call with HVAE_ERR_STOPPED: outputs
 * (and hvae_model_grads) are then undefined, no optimizer step is applied
 * after it, the parameters are untouched (the generator stands wherever
 * the draws of a minibatch cut short had got to). Once
 * it has returned nonzero it must keep doing so until the call returns.
 * NULL (the default) removes it. On several threads hvae_elbo and
 * hvae_encode poll between chunks only (each thread takes its rows of a
 * chunk through the whole network at once). */
typedef int (*hvae_poll_hook)(void *ctx);
HVAE_API void hvae_workspace_set_poll(hvae_workspace *ws, hvae_poll_hook poll, void *ctx);

/* ------------------------------------------------------------------------ */
/* Evaluation. Functions taking n rows process them in chunks of the        */
/* workspace's max_rows, so n is unbounded.                                  */
/*                                                                           */
/* Noise: `eps` is NULL or an array of T pointers, eps[i] pointing to        */
/* (n, d_{i+1}) standard-normal draws. With NULL, each row's noise is drawn  */
/* from a generator seeded by a hash of the row's values and `noise_seed`:  */
/* a row always gets the same draw, wherever it sits in x.                   */
/*                                                                           */
/* Every row's result is independent of the other rows, bit for bit (and of  */
/* the thread count): hvae_elbo, hvae_encode and hvae_decode compute each    */
/* output element by the same operations in the same order whatever the     */
/* batch. Calls of 2048 rows or more to hvae_elbo and                       */
/* hvae_encode keep the weights packed for their product kernel with the     */
/* workspace (two copies of the encoder and decoder parameters, allocated at */
/* the first such call, freed with the workspace); each such call compares   */
/* the parameters with the packed version and repacks when they changed, by */
/* whatever means (training, hvae_model_params writes).                      */

/* Conditions: every function taking data also takes `cond`, (n, C) with the
 * rows' conditions for a conditional model (C = n_conditions), or NULL when
 * C = 0. */

/* Per-row terms: elbo (n), reconstruction log p(x|z_1) (n) and kl (n, T),
 * kl[:, i] the KL term of layer i+1 (closed-form where it is exact or
 * markov_kl asks for it, else the sampled log-density ratio; see the top of
 * this file). Any output may be NULL. */
HVAE_API hvae_status hvae_elbo(hvae_model *model, hvae_workspace *ws,
                               const float *x, const float *cond, int64_t n,
                               const float *const *eps, uint64_t noise_seed,
                               double *elbo, double *reconstruction,
                               double *kl);

typedef enum {
    HVAE_OBJECTIVE_ELBO = 0, /* the ELBO, averaged over n_samples draws */
    HVAE_OBJECTIVE_IWAE = 1, /* log (1/k) sum_j w_j over k = n_samples draws,
                                w_j = p(x, z_j) / q(z_j | x) (Burda et al. 2016) */
    HVAE_OBJECTIVE_COUNT
} hvae_objective;
HVAE_API const char *hvae_objective_name(hvae_objective objective);

/* How the gradient passes through the sampled latent variables (see
 * "Discrete latent layers" below). */
typedef enum {
    /* Each layer its family's pathwise estimator: reparameterisation for a
     * Gaussian layer, Gumbel-softmax for a categorical one. */
    HVAE_GRADIENT_AUTO = 0,
    HVAE_GRADIENT_REPARAMETERIZATION = 1, /* AUTO, for models without
                                             categorical layers */
    HVAE_GRADIENT_GUMBEL_SOFTMAX = 2,     /* AUTO, for models with some */
    /* REINFORCE on exact samples (Gumbel-max for categorical layers):
     * grad E_q[f] = E_q[grad f + (f - b) grad log q(z|x)], f the row's
     * ELBO estimate (with beta and free bits), b a baseline. ELBO only;
     * Markov inference only. */
    HVAE_GRADIENT_SCORE_FUNCTION = 3,
    HVAE_GRADIENT_ESTIMATOR_COUNT
} hvae_gradient_estimator;
HVAE_API const char *hvae_gradient_estimator_name(hvae_gradient_estimator estimator);

/* The score-function estimator's baseline b (variance reduction; every
 * choice keeps the estimate unbiased, since b never depends on the draw it
 * centres). */
typedef enum {
    HVAE_BASELINE_AUTO = 0,          /* leave-one-out with n_samples > 1,
                                        else the running mean */
    HVAE_BASELINE_NONE = 1,          /* b = 0 */
    /* b = an exponential moving average (weight 0.1 on the newest) of the
     * minibatch-mean signal (over every process's rows) of earlier steps;
     * kept in the workspace, it starts from the first minibatch of each
     * training epoch, and carries over from one loss_and_grad to the next */
    HVAE_BASELINE_RUNNING_MEAN = 2,
    /* n_samples > 1: draw s of a row is centred by the mean signal of that
     * row's other draws (VIMCO's leave-one-out, for the ELBO) */
    HVAE_BASELINE_LEAVE_ONE_OUT = 3,
    HVAE_BASELINE_COUNT
} hvae_score_baseline;
HVAE_API const char *hvae_score_baseline_name(hvae_score_baseline baseline);

typedef struct {
    hvae_objective objective;
    int32_t n_samples;  /* draws per data row, >= 1 */
    float beta;         /* ELBO only: weight of the KL terms */
    float free_bits;    /* ELBO only, when > 0: each layer's KL term, averaged
                           over the minibatch, counts as at least this many
                           nats; below it the layer gets no KL gradient */
    /* Categorical layers (ignored without them). Gumbel-softmax temperature
     * tau > 0; hvae_train_epoch anneals it per optimizer step t as
     * tau_t = max(temperature_min, temperature * exp(-temperature_decay * t))
     * (Jang et al. 2017); hvae_loss_and_grad uses `temperature` as is. */
    float temperature;        /* default 1 */
    float temperature_min;    /* default 0.5 */
    float temperature_decay;  /* default 0: no annealing */
    int straight_through;     /* hard one-hot forward, relaxed backward */
    hvae_gradient_estimator gradient_estimator;  /* default AUTO */
    hvae_score_baseline score_baseline;          /* default AUTO */
    float tc_weight;    /* ELBO only, FactorVAE's gamma (Kim and Mnih 2018):
                           the loss gains tc_weight * mean_r T(z_T,r), T the
                           model's discriminator (needs one, and a prior other
                           than density_ratio); 0 for none */
    /* ELBO only, nonzero: beta-TCVAE (Chen et al. 2018; csrc/tcvae.c): the
     * top layer's training term is alpha MI + beta TC + gamma DW, the
     * decomposition of its KL into index-code mutual information, total
     * correlation and dimension-wise KL by minibatch-weighted sampling, with
     * tcvae_weights = (alpha, beta, gamma) (N(0, I) prior, Gaussian layers,
     * no free bits). `beta` still weights the layers below. */
    int32_t tcvae;
    float tcvae_weights[3];
    /* The data set's size N in minibatch-weighted sampling; 0: the rows of
     * the call (hvae_train_epoch: of the epoch, n_global when parallel). */
    double n_data;
} hvae_objective_options;

HVAE_API hvae_objective_options hvae_objective_options_default(void);

/* Means over a batch or an epoch, in nats per data row. */
typedef struct {
    double loss;            /* what training minimises: -objective, with beta
                               and free bits for the ELBO */
    double objective;       /* the bound trained: ELBO or IWAE bound (beta = 1) */
    double elbo;            /* single-draw ELBO, averaged over all draws */
    double reconstruction;  /* log p(x | z_1) */
    double kl[HVAE_MAX_LAYERS]; /* KL term per layer */
    int64_t n_rows;
    int64_t n_batches;
    /* beta-TCVAE (hvae_objective_options.tcvae; 0 otherwise): the top
     * layer's index-code mutual information, total correlation and
     * dimension-wise KL as estimated in training (minibatch-weighted
     * sampling); they sum to the sampled estimate of kl[top]. */
    double tcvae[3];
} hvae_epoch_stats;

/* Running means of the discriminator's steps (reset by the caller). */
typedef struct {
    double log_ratio;   /* sum over steps of mean_r T(z_r) on the real rows */
    double accuracy;    /* sum over steps of the fraction classified right
                           (T > 0 real, T < 0 other), both classes */
    int64_t n_steps;
} hvae_discriminator_stats;


/* Called after every minibatch (training: with that batch's stats) or every
 * pass of draws (log-likelihood: batch NULL); a nonzero return stops the
 * work, which then returns HVAE_ERR_STOPPED. */
typedef int (*hvae_batch_hook)(void *ctx, int64_t batch_index,
                               const hvae_epoch_stats *batch);

/* The loss over the n rows of x and its gradient, written to
 * hvae_model_grads (overwriting it). With n_samples = S, the eps arrays
 * hold (n * S, d_i) draws, row b * S + s for draw s of data row b. Free
 * bits apply per workspace chunk of rows. */
HVAE_API hvae_status hvae_loss_and_grad(hvae_model *model, hvae_workspace *ws,
                                        const float *x, const float *cond,
                                        int64_t n, const float *const *eps,
                                        uint64_t noise_seed,
                                        const hvae_objective_options *objective,
                                        hvae_epoch_stats *stats);

/* Importance-sampled estimate of log p(x) per row, with the posterior as
 * proposal: log (1/S) sum_s p(x, z_s) / q(z_s | x) over S = n_samples draws
 * (the IWAE bound of S draws; it tends to log p(x) as S grows). Draws are
 * streamed through the workspace, so memory does not grow with S; each
 * row's draws come from a generator seeded by its values and noise_seed.
 * hook (may be NULL) runs after every pass of draws. */
HVAE_API hvae_status hvae_log_likelihood(hvae_model *model, hvae_workspace *ws,
                                         const float *x, const float *cond,
                                         int64_t n, int64_t n_samples,
                                         uint64_t noise_seed, double *out,
                                         hvae_batch_hook hook, void *hook_ctx);

/* Posterior means and log-variances of every layer: mu[i] and logvar[i]
 * point to (n, d_{i+1}) outputs (either array or entry may be NULL); for a
 * categorical layer the class probabilities and their logs, (n, M*K), the
 * probabilities feeding the encoder above.
 * Markov: layers above the first are evaluated at the posterior mean of the
 * layer below. Ladder: top-down, each layer's prior evaluated at the
 * posterior mean of the layer above. */
HVAE_API hvae_status hvae_encode(hvae_model *model, hvae_workspace *ws,
                                 const float *x, const float *cond, int64_t n,
                                 float *const *mu, float *const *logvar);

/* The mean of p(x | z_1) for z1 (n, d_1) into x_mean (n, D); for a Gaussian
 * likelihood with learned variance, the log-variance into x_logvar (n, D)
 * when not NULL (zeros for unit variance). */
HVAE_API hvae_status hvae_decode(hvae_model *model, hvae_workspace *ws,
                                 const float *z1, const float *cond, int64_t n,
                                 float *x_mean, float *x_logvar);

/* Ancestral sampling: z_T ~ p(z_T) (the prior's sampler: N(0, I), a
 * component of a mixture then its Gaussian, or for the VampPrior a uniformly
 * drawn pseudo-input's q(z_T | u_k); uniform categories by Gumbel-max for a
 * categorical top layer), z_{i-1} ~ p(z_{i-1} | z_i), then the
 * mean of p(x | z_1) into x (n, D), or a draw from it when
 * observation_noise is nonzero. */
HVAE_API hvae_status hvae_sample(hvae_model *model, hvae_workspace *ws,
                                 hvae_rng *rng, int64_t n, const float *cond,
                                 int observation_noise, float *x);

/* Ancestral sampling below a given top layer: z_T = z_top (n, d_T), then
 * as hvae_sample (a mixture prior's component c is sampled by drawing z_top
 * from N(mu_c, var_c)). */
HVAE_API hvae_status hvae_sample_top(hvae_model *model, hvae_workspace *ws,
                                     hvae_rng *rng, int64_t n, const float *z_top,
                                     const float *cond, int observation_noise,
                                     float *x);

/* Components of the model's prior: K for a mixture prior, 0 for a prior
 * without components (the standard normal). */
HVAE_API int64_t hvae_model_n_components(const hvae_model *model);

/* The posterior over a mixture prior's components, q(c | x) = p(c | z_T)
 * evaluated at the posterior mean z_T = E[z_T | x] (hvae_encode's top-layer
 * mean), into gamma (n, K) (rows sum to 1): a deterministic cluster
 * assignment, as VaDE's predict uses. HVAE_ERR_INVALID_ARGUMENT when the
 * prior has no components. */
HVAE_API hvae_status hvae_responsibilities(hvae_model *model, hvae_workspace *ws,
                                           const float *x, const float *cond,
                                           int64_t n, double *gamma);

/* The top layer's prior density, log p(z_T), at n rows z (n, d_T) into out
 * (n), in nats: N(0, I)'s; a mixture's logsumexp_c [log p(c) + log
 * N(z; mu_c, Sigma_c)]; the VampPrior's log (1/K) sum_k q(z | u_k); the
 * density ratio's log N(z; 0, I) + T(z), UNNORMALISED (normalised only at
 * the discriminator's optimum, as the log-likelihood under it). Each row
 * is computed alone (the same bits whatever the other rows and the thread
 * count); ws provides the VampPrior's pass over its pseudo-inputs (any
 * max_rows). HVAE_ERR_INVALID_ARGUMENT for a categorical top layer (its
 * uniform prior is over classes, not a density over z_T) or a prior table
 * without the operation. */
HVAE_API hvae_status hvae_prior_log_density(hvae_model *model, hvae_workspace *ws,
                                            const float *z, int64_t n, double *out);

/* Where the prior's own tensors ("prior.*") start in the flat parameter
 * buffer; they run to its end (hvae_model_n_params). */
HVAE_API int64_t hvae_model_prior_offset(const hvae_model *model);

/* ------------------------------------------------------------------------ */
/* Training.                                                                  */

typedef enum {
    HVAE_OPTIMIZER_ADAM = 0,
    HVAE_OPTIMIZER_SGD = 1,
    HVAE_OPTIMIZER_COUNT
} hvae_optimizer_kind;
HVAE_API const char *hvae_optimizer_name(hvae_optimizer_kind kind);

typedef struct {
    hvae_optimizer_kind kind;
    float learning_rate;
    float beta1, beta2, eps;  /* Adam */
    float momentum;           /* SGD */
    float weight_decay;
} hvae_optimizer_config;

HVAE_API hvae_optimizer_config hvae_optimizer_config_default(void);

typedef struct hvae_optimizer hvae_optimizer;

/* An optimizer for the model's parameter buffer. */
HVAE_API hvae_status hvae_optimizer_create(const hvae_model *model,
                                           const hvae_optimizer_config *config,
                                           hvae_optimizer **out);
/* An optimizer for any block of n_params floats (an auxiliary network's
 * parameters, say): its own moments and step count. */
HVAE_API hvae_status hvae_optimizer_create_for(int64_t n_params,
                                               const hvae_optimizer_config *config,
                                               hvae_optimizer **out);
HVAE_API int64_t hvae_optimizer_n_params(const hvae_optimizer *opt);
HVAE_API void hvae_optimizer_free(hvae_optimizer *opt);
/* Settings may change between steps (a new learning rate keeps moments). */
HVAE_API hvae_status hvae_optimizer_configure(hvae_optimizer *opt,
                                              const hvae_optimizer_config *config);
HVAE_API const hvae_optimizer_config *hvae_optimizer_get_config(
    const hvae_optimizer *opt);
/* The moment buffers (n_params floats each; the second is NULL for SGD) and
 * the step counter, for saving and restoring. */
HVAE_API float *hvae_optimizer_state(hvae_optimizer *opt, int which);
HVAE_API int64_t *hvae_optimizer_step_count(hvae_optimizer *opt);
/* Applies one update from hvae_model_grads to hvae_model_params. */
HVAE_API void hvae_optimizer_step(hvae_optimizer *opt, hvae_model *model);
/* Applies one update from grads to params, n_params floats each (the block
 * the optimizer was made for). */
HVAE_API void hvae_optimizer_step_block(hvae_optimizer *opt, float *params,
                                        const float *grads);
/* A learning-rate multiplier for one group of parameters: the entries
 * [begin, end) of the optimizer's block take steps of scale * learning_rate
 * (Adam's step size, SGD's rate), the others learning_rate (VaDE trains its
 * mixture prior's tensors, hvae_model_prior_offset onwards, at another
 * rate). begin = end, or scale 1, turns it off (the default). Kept across
 * hvae_optimizer_configure; not part of the saved state. */
HVAE_API hvae_status hvae_optimizer_set_lr_scale(hvae_optimizer *opt, int64_t begin,
                                                 int64_t end, float scale);


/* Data-parallel training: sums values across the processes, in place
 * (an MPI Allreduce with MPI_SUM, say). grads (n_grads floats) may be NULL
 * with n_grads = 0; values holds n_values doubles (n_values may be 0).
 * grads is the model's gradient buffer (hvae_model_grads), the
 * discriminator's (hvae_discriminator_step_shared), or a gather of the
 * minibatch's rows (each process fills its rows, zeros elsewhere). Every
 * process makes the same sequence of calls with the same sizes. A nonzero
 * return stops the work, which then returns HVAE_ERR_STOPPED. */
typedef int (*hvae_reduce_hook)(void *ctx, float *grads, int64_t n_grads,
                                double *values, int64_t n_values);

typedef int (*hvae_aux_step)(void *ctx, hvae_model *model, const hvae_workspace *ws,
                             const float *x, const float *cond, int64_t B);

typedef struct {
    int64_t batch_size;    /* data rows per step; batch_size * n_samples at
                              most the workspace's max_rows */
    hvae_objective_options objective;
    int shuffle;           /* draw a new row order from rng each epoch */
    hvae_batch_hook hook;  /* may be NULL */
    void *hook_ctx;
    /* Data parallelism, off when n_global = 0. Otherwise x holds the rows
     * shard_start .. shard_start + n - 1 of a data set of n_global rows
     * spread over processes that all run the same epoch with the same
     * generator state: each step takes batch_size rows of the order of all
     * n_global rows, and the noise of all of them; every process computes
     * the loss and gradient of the rows it holds, scaled for the whole
     * minibatch, and `reduce` sums gradients and loss terms over the
     * processes before the optimizer step. The result equals one process
     * holding all rows, up to float rounding. `order` then needs n_global
     * entries. */
    int64_t n_global;
    int64_t shard_start;
    hvae_reduce_hook reduce;
    void *reduce_ctx;
    /* Auxiliary training (may be NULL): called in every step after the
     * model's gradient is complete (and reduced) and before the model's
     * optimizer step, with the staged minibatch x (B, D), its conditions
     * (or NULL) and the workspace (hvae_workspace_samples). It may train
     * its own networks (an hvae_mlp and its optimizer) and may ADD terms to
     * hvae_model_grads (a discriminator's penalty); a nonzero return stops
     * the work with HVAE_ERR_STOPPED. */
    hvae_aux_step aux_step;
    void *aux_ctx;
    /* The model's discriminator (hvae_config.discriminator), trained here
     * when disc_opt is not NULL (hvae_optimizer_create_for(
     * hvae_discriminator_n_params(model))): in every step, after the
     * model's gradient is complete (and reduced) and before the model's
     * optimizer step, one step of disc_opt on the minibatch's top-layer
     * samples (hvae_discriminator_step), its stats into disc_stats (may be
     * NULL). Data-parallel: every process gathers the whole minibatch's
     * samples (through `reduce`), differentiates the discriminator's loss
     * on its own rows and their counterparts, and the gradient is summed
     * (hvae_discriminator_step_shared): every process takes the step one
     * process holding all rows would take, so the discriminators stay
     * identical. */
    hvae_optimizer *disc_opt;
    hvae_discriminator_stats *disc_stats;
} hvae_train_options;

HVAE_API hvae_train_options hvae_train_options_default(void);

/* One pass of minibatch steps over x (n, D): reparameterisation noise from
 * rng, loss and gradient, a check that both are finite, an optimizer step.
 * `order` is scratch for n row indices (int64).
 * Divergence: when a step's loss or gradient, or the parameters after the
 * last step, are NaN or infinite, the call returns HVAE_ERR_NONFINITE_LOSS
 * with the model's parameters, the optimizer's moments and step count and
 * *rng back at their state at the start of the call (the optimizer keeps
 * that copy, made without allocating), so training can go on from a finite
 * model. `stats` receives the means over the batches that were applied
 * (before a rollback). */
HVAE_API hvae_status hvae_train_epoch(hvae_model *model, hvae_workspace *ws,
                                      hvae_optimizer *opt, hvae_rng *rng,
                                      const float *x, const float *cond,
                                      int64_t n, int64_t *order,
                                      const hvae_train_options *options,
                                      hvae_epoch_stats *stats);

/* Data-parallel training: how many doubles the reduce hook receives in its
 * two kinds of call for this model (values of which == 0: the layers'
 * minibatch KL sums and the row count, for free bits, or the learning
 * signal's sum and the row count, for the score function's running-mean
 * baseline; which == 1: the minibatch's loss terms, 3 more with
 * beta-TCVAE). 0 for another `which`. Its gathers and the discriminator's
 * step add calls of other sizes. */
HVAE_API int64_t hvae_train_reduce_values(const hvae_model *model, int which);

/* 1 when all n values are finite. */
HVAE_API int hvae_all_finite(const float *v, int64_t n);

/* ------------------------------------------------------------------------ */
/* Auxiliary networks: an MLP with its own flat parameter and gradient       */
/* buffers (same layout rules as the model's: W (n_in, n_out) row-major,     */
/* then b, layer by layer), trained by its own optimizer                     */
/* (hvae_optimizer_create_for(hvae_mlp_n_params(mlp), ...) and               */
/* hvae_optimizer_step_block), for discriminators (FactorVAE, adversarial    */
/* priors) and density-ratio estimators. hvae_train_options.aux_step runs    */
/* one inside the training loop.                                             */

typedef struct hvae_mlp hvae_mlp;

/* n_layers dense layers of widths[0..n_layers-1] over inputs of n_in
 * features: act on every layer but the last, which is linear. Forward and
 * backward take at most max_rows rows (activations are allocated here, not
 * in the calls). */
HVAE_API hvae_status hvae_mlp_create(int64_t n_in, int32_t n_layers,
                                     const int64_t *widths, hvae_activation act,
                                     int64_t max_rows, hvae_mlp **out);
HVAE_API void hvae_mlp_free(hvae_mlp *mlp);
HVAE_API int64_t hvae_mlp_n_params(const hvae_mlp *mlp);
HVAE_API int64_t hvae_mlp_n_out(const hvae_mlp *mlp);
HVAE_API float *hvae_mlp_params(hvae_mlp *mlp);
HVAE_API float *hvae_mlp_grads(hvae_mlp *mlp);
/* PyTorch's Linear default, as hvae_model_init. */
HVAE_API void hvae_mlp_init(hvae_mlp *mlp, uint64_t seed);
/* h_0 = x (B, n_in), h_l = act(h_{l-1} @ W_l + b_l), out = h_L (B, n_out)
 * (the last layer linear), copied to out when not NULL. */
HVAE_API hvae_status hvae_mlp_forward(hvae_mlp *mlp, const float *x, int64_t B,
                                      float *out);
/* The last forward's output (B, n_out), owned by the MLP. */
HVAE_API const float *hvae_mlp_output(const hvae_mlp *mlp);
/* After a forward on the same x: ACCUMULATES dL/dW, dL/db into
 * hvae_mlp_grads and dL/dx into dx (B, n_in; skipped when NULL) from
 * dout = dL/d(out) (B, n_out), which is not written. */
HVAE_API hvae_status hvae_mlp_backward(hvae_mlp *mlp, const float *x,
                                       const float *dout, int64_t B, float *dx);

/* The samples z_{layer+1} (B, d_{layer+1}) of the workspace's last forward
 * pass (the rows of the minibatch being trained, inside aux_step). */
HVAE_API const float *hvae_workspace_samples(const hvae_workspace *ws,
                                             int32_t layer);

/* ------------------------------------------------------------------------ */
/* The model's discriminator (hvae_config.discriminator; csrc/discriminator.c) */
/* T(z) over top-layer samples, a logit: D(z) = sigmoid(T(z)) is its belief  */
/* that z came from the "real" side, q(z_T) (the minibatch's samples), not   */
/* the other: FactorVAE: the same rows with each dimension independently     */
/* permuted across rows (samples of prod_j q(z_j)); density-ratio prior:     */
/* N(0, I) draws. With balanced classes the optimum is T* = log q/other:     */
/* FactorVAE's E_q[T] estimates the total correlation KL(q(z)||prod q(z_j)). */
/* Its parameters live in the model's buffer (saved and loaded with it; the  */
/* model's optimizer sees a zero gradient for them), trained by their own    */
/* optimizer (hvae_optimizer_create_for(hvae_discriminator_n_params(model))) */

/* The discriminator's parameter count and offset in hvae_model_params (0, 0
 * without one). */
HVAE_API int64_t hvae_discriminator_n_params(const hvae_model *model);
HVAE_API int64_t hvae_discriminator_offset(const hvae_model *model);

/* T(z) for n rows z (n, d_T) into out (n). */
HVAE_API hvae_status hvae_discriminator_log_ratio(hvae_model *model, const float *z,
                                                  int64_t n, float *out);

/* One step of the discriminator's optimizer on B real rows z (B, d_T)
 * against B rows of `other` (B, d_T), or, when other is NULL, the model's
 * own counterpart drawn from rng: the rows of z with each dimension
 * permuted independently (FactorVAE), or N(0, I) draws (density-ratio
 * prior). Loss (disentanglement_lib's FactorVAE, probabilities clipped to
 * [1e-6, 1 - 1e-6], where the clip passes no gradient):
 *   -(1/2B) sum_r [log D(z_r) + log(1 - D(other_r))].
 * Rows go through the MLP in chunks; a step with a nonfinite gradient is
 * skipped. stats (may be NULL) accumulates. Allocates nothing. */
HVAE_API hvae_status hvae_discriminator_step(hvae_model *model, hvae_optimizer *opt,
                                             hvae_rng *rng, const float *z,
                                             const float *other, int64_t B,
                                             hvae_discriminator_stats *stats);

/* The same step shared by the processes of a data-parallel fit: every
 * process passes the whole minibatch z (B, d_T) and draws every row's
 * counterpart (so that the generators stay equal), differentiates the loss
 * terms of the rows r with mine[r] != 0 (its own) and their counterparts,
 * and reduce (hvae_reduce_hook; called once, with the discriminator's
 * gradient and the stats' two sums) sums the gradient over the processes
 * before the optimizer step. mine NULL and reduce NULL: all rows, one
 * process (hvae_discriminator_step). HVAE_ERR_STOPPED when reduce
 * stopped. */
HVAE_API hvae_status hvae_discriminator_step_shared(hvae_model *model, hvae_optimizer *opt,
                                                    hvae_rng *rng, const float *z,
                                                    const float *other, int64_t B,
                                                    const unsigned char *mine,
                                                    hvae_reduce_hook reduce, void *reduce_ctx,
                                                    hvae_discriminator_stats *stats);

/* beta-TCVAE's three terms per row of one minibatch of n rows (at most the
 * workspace's max_rows), at the same samples as hvae_elbo (eps or hashed
 * noise): mi, tc, dw (n each; see hvae_objective_options.tcvae), from a
 * data set of n_data rows. mi + tc + dw is the sampled KL estimate
 * log q(z_T|.) - log N(z_T; 0, I) of each row. */
HVAE_API hvae_status hvae_tcvae_terms(hvae_model *model, hvae_workspace *ws,
                                      const float *x, const float *cond, int64_t n,
                                      const float *const *eps, uint64_t noise_seed,
                                      double n_data, double *mi, double *tc, double *dw);

/* out (B, d): column j of z (B, d) under its own uniformly random
 * permutation of the rows (Fisher-Yates from rng), so each column keeps
 * exactly its values; perm is scratch for B indices. */
HVAE_API void hvae_permute_dims(float *out, const float *z, int64_t B, int64_t d,
                                hvae_rng *rng, int64_t *perm);

/* ------------------------------------------------------------------------ */
/* Extension points. How to add ...                                          */
/*                                                                           */
/* A top-layer prior (hvae_prior_kind): add HVAE_PRIOR_<NAME> before         */
/* HVAE_PRIOR_COUNT, write csrc/prior_<name>.c defining an hvae_prior_ops    */
/* (csrc/extension.h) and list it in csrc/registry.c. The table says how     */
/* many named tensors the prior adds to the end of the model's flat          */
/* parameter buffer (so Adam, save/load and named_parameters cover them),    */
/* initialises them, gives each row's term of the top layer (the closed-form */
/* KL(q(z_T|.) || p(z_T)) from q's (mu, logvar) when it has one, else       */
/* log q(z_T) - log p(z_T) at the sample) and its gradient into dz, dmu_q,   */
/* dlogvar_q and the prior's own parameter gradients, draws z_T, and gives  */
/* log p(z_T) at given rows (hvae_prior_log_density, row by row). Its       */
/* create/free hooks own any state: a mixture of Gaussians (learned          */
/* weights, means, variances; per-component closed-form KL and              */
/* responsibilities as in VaDE) needs only tensors; a VampPrior runs the    */
/* encoder on its learned pseudo-inputs (the ops receive the model and      */
/* workspace, and ask for workspace columns); a prior corrected by a        */
/* learned density ratio keeps an hvae_mlp (above) in its state. N(0, I),   */
/* csrc/prior_normal.c, goes through this interface, and so does VaDE's     */
/* mixture, csrc/prior_gmm.c (its optional n_components and                 */
/* responsibilities operations give hvae_responsibilities); its full-      */
/* covariance components (hvae_config.prior_covariance) are a second table, */
/* csrc/prior_gmm_full.c, picked by hvae_prior_ops_for (registry.c), both   */
/* sharing the mixture's chain in csrc/prior_mixture.c. The VampPrior,      */
/* csrc/prior_vamp.c, shows the other optional parts: check_config (its own */
/* config fields), workspace_rows (every workspace then carries a second    */
/* one of that many rows, ws->prior_ws, where it runs the encoder on its    */
/* pseudo-inputs once per call), and IWAE's per-row weights, which a prior  */
/* applies to the gradients it accumulates across rows.                     */
/*                                                                           */
/* A latent family (hvae_latent_family): add HVAE_LATENT_<NAME> before       */
/* HVAE_LATENT_FAMILY_COUNT, write csrc/latent_<name>.c defining an          */
/* hvae_latent_family_ops and list it in csrc/registry.c. The table gives    */
/* the encoder heads (count and width per latent unit: a Gumbel-softmax      */
/* layer of M variables with K classes has one head of M*K logits), the     */
/* noise per unit, the reparameterised sample forward and backward (with     */
/* its temperature), and the closed-form KL and the sampled log-ratio with  */
/* their gradients. The diagonal Gaussian, csrc/latent_gaussian.c, goes    */
/* through this interface.                                                   */
/*                                                                           */
/* Discrete latent layers (HVAE_LATENT_CATEGORICAL, latent_categorical.c).   */
/* A layer of M categorical variables with K classes: q(z_m = k | .) =       */
/* softmax(l_m)_k from the encoder's logits l, p(z_m | z_above) likewise     */
/* from the decoder block above (uniform, 1/K, at the top). Evaluation       */
/* (ELBO, log-likelihood, sampling) draws exact one-hot categories by the    */
/* Gumbel-max trick, z_m = onehot(argmax_k (l_mk + g_mk)), g ~ Gumbel(0, 1)  */
/* (the layer's noise: K Gumbel draws per variable). Training with the      */
/* pathwise estimator relaxes it (Gumbel-softmax, Jang et al. 2017;         */
/* Maddison et al. 2017): z_m = softmax((l_m + g_m) / tau), or with          */
/* straight_through the hard one-hot in the forward pass and the relaxed     */
/* sample's gradient in the backward. A layer's term is the closed-form     */
/*   KL(q || p) = sum_m sum_k q_mk (log q_mk - log p_mk)                     */
/* over the unrelaxed q where the Gaussian would take its closed form (the  */
/* top layer; markov_kl = analytic); a lower Markov layer's sampled term is */
/* sum_mk z_mk (log q_mk - log p_mk), exactly log q(z) - log p(z) at a      */
/* one-hot z and its linear interpolation at a relaxed one. The top layer   */
/* of a categorical layer has its own uniform prior (hvae_config.prior must */
/* be the normal, which then applies to nothing); the ladder is Gaussian    */
/* only. With HVAE_GRADIENT_SCORE_FUNCTION every layer (Gaussian too) is    */
/* sampled exactly and passes no gradient through its sample; each row     */
/* adds (f - b) grad log q(z | x) instead.                                   */
/*                                                                           */
/* An auxiliary network: an hvae_mlp with its own optimizer, stepped from   */
/* hvae_train_options.aux_step (see hvae_train_epoch).                       */

/* ------------------------------------------------------------------------ */
/* Threads: the most hvae's work may use (process-wide). hvae's own pool    */
/* splits large matrix products (each part on OpenBLAS with one thread) and  */
/* the elementwise work; small products run on one thread whatever the       */
/* budget. Other libraries' BLAS copies are unaffected.                      */
HVAE_API void hvae_set_num_threads(int n_threads);
HVAE_API int hvae_get_num_threads(void);
/* The BLAS library's configuration string. */
HVAE_API const char *hvae_blas_info(void);

#ifdef __cplusplus
}
#endif
#endif /* HVAE_H */
