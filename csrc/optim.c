/* optim.c -- Adam and SGD over flat buffers: the model's parameter buffer,
 * or any (params, grads, n) block such as an auxiliary network's; and the
 * training loop's snapshot of an optimizer's block for rolling back. */
#include "hvae.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Kingma & Ba (2015), Algorithm 1, with the bias corrections folded into
 * the step size and the denominator as PyTorch does:
 *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * One pass reading p, g, m, v; with zero_grads it also clears g (the
 * training loop's zeroing for the next step, fused into this pass). */
typedef struct {
    float *params, *grads, *m, *v;
    int64_t n;
    float step, inv_sqrt_bc2, beta1, beta2, eps, weight_decay, lr, momentum;
    int zero_grads;
    int64_t scaled_begin, scaled_end; /* a group stepping at lr_scale times */
    float lr_scale;
    int n_parts;
    int finite[HVAE_MAX_THREADS]; /* hvae_optimizer_step_if_finite's check */
} update_args;

static update_args adam_args(float lr, float beta1, float beta2, float eps,
                             float weight_decay, int64_t t)
{
    update_args a = {0};
    double bc1 = 1.0 - pow((double)beta1, (double)t);
    double bc2 = 1.0 - pow((double)beta2, (double)t);
    a.step = (float)(lr / bc1);
    a.inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.weight_decay = weight_decay;
    return a;
}

HVAE_AVX2_CLONES
static void adam_range(const update_args *a, int64_t lo, int64_t hi)
{
    float *restrict params = a->params, *restrict grads = a->grads;
    float *restrict m = a->m, *restrict v = a->v;
    const float beta1 = a->beta1, beta2 = a->beta2, step = a->step;
    const float inv_sqrt_bc2 = a->inv_sqrt_bc2, eps = a->eps, wd = a->weight_decay;
    if (a->zero_grads) {
        for (int64_t i = lo; i < hi; i++) {
            float g = grads[i] + wd * params[i];
            grads[i] = 0.0f;
            m[i] = beta1 * m[i] + (1.0f - beta1) * g;
            v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
            params[i] -= step * m[i] / (sqrtf(v[i]) * inv_sqrt_bc2 + eps);
        }
        return;
    }
    for (int64_t i = lo; i < hi; i++) {
        float g = grads[i] + wd * params[i];
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        params[i] -= step * m[i] / (sqrtf(v[i]) * inv_sqrt_bc2 + eps);
    }
}

HVAE_AVX2_CLONES
static void sgd_range(const update_args *a, int64_t lo, int64_t hi)
{
    float *restrict params = a->params, *restrict grads = a->grads, *restrict buf = a->m;
    const float lr = a->lr, momentum = a->momentum, wd = a->weight_decay;
    if (momentum == 0.0f || buf == NULL) {
        for (int64_t i = lo; i < hi; i++) {
            params[i] -= lr * (grads[i] + wd * params[i]);
            if (a->zero_grads)
                grads[i] = 0.0f;
        }
        return;
    }
    for (int64_t i = lo; i < hi; i++) {
        float g = grads[i] + wd * params[i];
        if (a->zero_grads)
            grads[i] = 0.0f;
        buf[i] = momentum * buf[i] + g;
        params[i] -= lr * buf[i];
    }
}

/* [lo, hi) by f, the part inside the scaled group with the step size (and
 * SGD rate) times lr_scale: both are linear in the learning rate. */
static void scaled_ranges(const update_args *a, int64_t lo, int64_t hi,
                          void (*f)(const update_args *, int64_t, int64_t))
{
    int64_t b = a->scaled_begin > lo ? a->scaled_begin : lo;
    int64_t e = a->scaled_end < hi ? a->scaled_end : hi;
    if (a->lr_scale == 1.0f || b >= e) {
        f(a, lo, hi);
        return;
    }
    update_args scaled = *a;
    scaled.step *= a->lr_scale;
    scaled.lr *= a->lr_scale;
    f(a, lo, b);
    f(&scaled, b, e);
    f(a, e, hi);
}

/* Parts are whole cache lines; every element is updated alone, so the
 * split does not change any result. */
#define UPDATE_ALIGN 1024
#define UPDATE_PARALLEL_MIN (1 << 15)

static void adam_part(void *ctx, int part, int n_parts)
{
    update_args *a = ctx;
    int64_t lo, hi;
    hvae_split(a->n, part, n_parts, UPDATE_ALIGN, &lo, &hi);
    scaled_ranges(a, lo, hi, adam_range);
}

static void sgd_part(void *ctx, int part, int n_parts)
{
    update_args *a = ctx;
    int64_t lo, hi;
    hvae_split(a->n, part, n_parts, UPDATE_ALIGN, &lo, &hi);
    scaled_ranges(a, lo, hi, sgd_range);
}

static int parts_for(int64_t n)
{
    return hvae_parts((double)n, UPDATE_PARALLEL_MIN);
}

void hvae_adam_update(float *params, const float *grads, float *m, float *v,
                      int64_t n, float lr, float beta1, float beta2, float eps,
                      float weight_decay, int64_t t)
{
    update_args a = adam_args(lr, beta1, beta2, eps, weight_decay, t);
    a.params = params;
    a.grads = (float *)grads; /* not written: zero_grads is 0 */
    a.m = m;
    a.v = v;
    a.n = n;
    hvae_parallel(adam_part, &a, parts_for(n));
}

void hvae_sgd_update(float *params, const float *grads, float *buf, int64_t n,
                     float lr, float momentum, float weight_decay)
{
    update_args a = {0};
    a.params = params;
    a.grads = (float *)grads; /* not written: zero_grads is 0 */
    a.m = buf;
    a.n = n;
    a.lr = lr;
    a.momentum = momentum;
    a.weight_decay = weight_decay;
    hvae_parallel(sgd_part, &a, parts_for(n));
}

struct hvae_optimizer {
    hvae_optimizer_config config;
    int64_t n_params;
    int64_t step;
    float *m; /* Adam's first moment, or SGD's momentum buffer */
    float *v; /* Adam's second moment */
    /* The training loop's rollback point (hvae_train_epoch): parameters, m,
     * v and the step count at the start of an epoch. Allocated with the
     * optimizer so that training allocates nothing. */
    float *saved;   /* 3 n_params floats: params, m, v */
    int64_t saved_step;
    /* hvae_optimizer_set_lr_scale's group: [scaled_begin, scaled_end) steps
     * at lr_scale times the rate. */
    int64_t scaled_begin, scaled_end;
    float lr_scale;
};

hvae_optimizer_config hvae_optimizer_config_default(void)
{
    hvae_optimizer_config c;
    c.kind = HVAE_OPTIMIZER_ADAM;
    c.learning_rate = 1e-3f;
    c.beta1 = 0.9f;
    c.beta2 = 0.999f;
    c.eps = 1e-8f;
    c.momentum = 0.0f;
    c.weight_decay = 0.0f;
    return c;
}

static int config_is_valid(const hvae_optimizer_config *c)
{
    return (c->kind == HVAE_OPTIMIZER_ADAM || c->kind == HVAE_OPTIMIZER_SGD) &&
           isfinite(c->learning_rate) && c->learning_rate > 0.0f &&
           c->beta1 >= 0.0f && c->beta1 < 1.0f && c->beta2 >= 0.0f &&
           c->beta2 < 1.0f && c->eps >= 0.0f && isfinite(c->eps) &&
           c->momentum >= 0.0f && c->momentum < 1.0f &&
           c->weight_decay >= 0.0f && isfinite(c->weight_decay);
}

hvae_status hvae_optimizer_create_for(int64_t n_params,
                                      const hvae_optimizer_config *config,
                                      hvae_optimizer **out)
{
    if (!config || !out || n_params < 1)
        return HVAE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!config_is_valid(config))
        return HVAE_ERR_INVALID_ARGUMENT;
    if (n_params > (int64_t)(SIZE_MAX / 4 / sizeof(float)))
        return HVAE_ERR_SIZE_OVERFLOW;
    hvae_optimizer *opt = calloc(1, sizeof *opt);
    if (!opt)
        return HVAE_ERR_OUT_OF_MEMORY;
    opt->config = *config;
    opt->n_params = n_params;
    opt->lr_scale = 1.0f;
    opt->m = calloc((size_t)opt->n_params, sizeof(float));
    opt->v = calloc((size_t)opt->n_params, sizeof(float));
    opt->saved = malloc(3 * (size_t)opt->n_params * sizeof(float));
    if (!opt->m || !opt->v || !opt->saved) {
        hvae_optimizer_free(opt);
        return HVAE_ERR_OUT_OF_MEMORY;
    }
    *out = opt;
    return HVAE_OK;
}

hvae_status hvae_optimizer_create(const hvae_model *model,
                                  const hvae_optimizer_config *config,
                                  hvae_optimizer **out)
{
    if (!model)
        return HVAE_ERR_INVALID_ARGUMENT;
    return hvae_optimizer_create_for(hvae_model_n_params(model), config, out);
}

void hvae_optimizer_free(hvae_optimizer *opt)
{
    if (!opt)
        return;
    free(opt->m);
    free(opt->v);
    free(opt->saved);
    free(opt);
}

int64_t hvae_optimizer_n_params(const hvae_optimizer *opt) { return opt->n_params; }

void hvae_optimizer_save(hvae_optimizer *opt, const float *params)
{
    size_t bytes = (size_t)opt->n_params * sizeof(float);
    memcpy(opt->saved, params, bytes);
    memcpy(opt->saved + opt->n_params, opt->m, bytes);
    memcpy(opt->saved + 2 * opt->n_params, opt->v, bytes);
    opt->saved_step = opt->step;
}

void hvae_optimizer_restore(hvae_optimizer *opt, float *params)
{
    size_t bytes = (size_t)opt->n_params * sizeof(float);
    memcpy(params, opt->saved, bytes);
    memcpy(opt->m, opt->saved + opt->n_params, bytes);
    memcpy(opt->v, opt->saved + 2 * opt->n_params, bytes);
    opt->step = opt->saved_step;
}

hvae_status hvae_optimizer_configure(hvae_optimizer *opt,
                                     const hvae_optimizer_config *config)
{
    if (!opt || !config || !config_is_valid(config))
        return HVAE_ERR_INVALID_ARGUMENT;
    if (config->kind != opt->config.kind) {
        /* Moments of one method mean nothing to the other. */
        memset(opt->m, 0, (size_t)opt->n_params * sizeof(float));
        memset(opt->v, 0, (size_t)opt->n_params * sizeof(float));
        opt->step = 0;
    }
    opt->config = *config;
    return HVAE_OK;
}

const hvae_optimizer_config *hvae_optimizer_get_config(const hvae_optimizer *opt)
{
    return &opt->config;
}

float *hvae_optimizer_state(hvae_optimizer *opt, int which)
{
    if (which == 0)
        return opt->m;
    if (which == 1)
        return opt->config.kind == HVAE_OPTIMIZER_ADAM ? opt->v : NULL;
    return NULL;
}

int64_t *hvae_optimizer_step_count(hvae_optimizer *opt)
{
    return &opt->step;
}

static update_args step_args(hvae_optimizer *opt, float *params, float *grads,
                             int zero_grads)
{
    const hvae_optimizer_config *c = &opt->config;
    update_args a = {0};
    if (c->kind == HVAE_OPTIMIZER_ADAM)
        a = adam_args(c->learning_rate, c->beta1, c->beta2, c->eps, c->weight_decay,
                      opt->step);
    a.params = params;
    a.grads = grads;
    a.m = opt->m;
    a.v = opt->v;
    a.n = opt->n_params;
    a.lr = c->learning_rate;
    a.momentum = c->momentum;
    a.weight_decay = c->weight_decay;
    a.zero_grads = zero_grads;
    a.scaled_begin = opt->scaled_begin;
    a.scaled_end = opt->scaled_end;
    a.lr_scale = opt->lr_scale;
    return a;
}

void hvae_optimizer_step(hvae_optimizer *opt, hvae_model *model)
{
    hvae_optimizer_step_block(opt, hvae_model_params(model), hvae_model_grads(model));
}

void hvae_optimizer_step_block(hvae_optimizer *opt, float *params, const float *grads)
{
    opt->step++;
    update_args a = step_args(opt, params, (float *)grads, 0); /* grads not written */
    hvae_parallel(opt->config.kind == HVAE_OPTIMIZER_ADAM ? adam_part : sgd_part, &a,
                  parts_for(a.n));
}

/* Two regions: every part checks its range of the gradient, then, if all
 * were finite, every part updates its range (any thread may run any part of
 * a region, so the parts of one region cannot wait for each other). */
static void check_part(void *ctx, int part, int n_parts)
{
    update_args *a = ctx;
    int64_t lo, hi;
    hvae_split(a->n, part, n_parts, UPDATE_ALIGN, &lo, &hi);
    a->finite[part] = hvae_all_finite(a->grads + lo, hi - lo);
    if (part == 0)
        a->n_parts = n_parts;
}

int hvae_optimizer_step_if_finite(hvae_optimizer *opt, hvae_model *model)
{
    return hvae_optimizer_block_step_if_finite(opt, hvae_model_params(model),
                                               hvae_model_grads(model));
}

int hvae_optimizer_block_step_if_finite(hvae_optimizer *opt, float *params, float *grads)
{
    update_args check = {0};
    check.grads = grads;
    check.n = opt->n_params;
    hvae_parallel(check_part, &check, parts_for(check.n));
    for (int k = 0; k < check.n_parts; k++)
        if (!check.finite[k])
            return 0;
    opt->step++;
    update_args a = step_args(opt, params, grads, 1);
    hvae_parallel(opt->config.kind == HVAE_OPTIMIZER_ADAM ? adam_part : sgd_part, &a,
                  parts_for(a.n));
    return 1;
}

hvae_status hvae_optimizer_set_lr_scale(hvae_optimizer *opt, int64_t begin, int64_t end,
                                        float scale)
{
    if (!opt || begin < 0 || end < begin || end > opt->n_params || !isfinite(scale) ||
        !(scale > 0.0f))
        return HVAE_ERR_INVALID_ARGUMENT;
    opt->scaled_begin = begin;
    opt->scaled_end = end;
    opt->lr_scale = scale;
    return HVAE_OK;
}
