/* optim.c -- Adam and SGD over the flat parameter buffer. */
#include "hvae.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

HVAE_AVX2_CLONES
void hvae_adam_update(float *params, const float *grads, float *m, float *v,
                      int64_t n, float lr, float beta1, float beta2, float eps,
                      float weight_decay, int64_t t)
{
    /* Kingma & Ba (2015), Algorithm 1, with the bias corrections folded into
     * the step size and the denominator as PyTorch does:
     *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps) */
    double bc1 = 1.0 - pow((double)beta1, (double)t);
    double bc2 = 1.0 - pow((double)beta2, (double)t);
    float step = (float)(lr / bc1);
    float inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    for (int64_t i = 0; i < n; i++) {
        float g = grads[i] + weight_decay * params[i];
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        params[i] -= step * m[i] / (sqrtf(v[i]) * inv_sqrt_bc2 + eps);
    }
}

HVAE_AVX2_CLONES
void hvae_sgd_update(float *params, const float *grads, float *buf, int64_t n,
                     float lr, float momentum, float weight_decay)
{
    if (momentum == 0.0f || buf == NULL) {
        for (int64_t i = 0; i < n; i++)
            params[i] -= lr * (grads[i] + weight_decay * params[i]);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float g = grads[i] + weight_decay * params[i];
        buf[i] = momentum * buf[i] + g;
        params[i] -= lr * buf[i];
    }
}

struct hvae_optimizer {
    hvae_optimizer_config config;
    int64_t n_params;
    int64_t step;
    float *m; /* Adam's first moment, or SGD's momentum buffer */
    float *v; /* Adam's second moment */
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

hvae_status hvae_optimizer_create(const hvae_model *model,
                                  const hvae_optimizer_config *config,
                                  hvae_optimizer **out)
{
    if (!model || !config || !out)
        return HVAE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!config_is_valid(config))
        return HVAE_ERR_INVALID_ARGUMENT;
    hvae_optimizer *opt = calloc(1, sizeof *opt);
    if (!opt)
        return HVAE_ERR_OUT_OF_MEMORY;
    opt->config = *config;
    opt->n_params = hvae_model_n_params(model);
    opt->m = calloc((size_t)opt->n_params, sizeof(float));
    opt->v = calloc((size_t)opt->n_params, sizeof(float));
    if (!opt->m || !opt->v) {
        hvae_optimizer_free(opt);
        return HVAE_ERR_OUT_OF_MEMORY;
    }
    *out = opt;
    return HVAE_OK;
}

void hvae_optimizer_free(hvae_optimizer *opt)
{
    if (!opt)
        return;
    free(opt->m);
    free(opt->v);
    free(opt);
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

void hvae_optimizer_step(hvae_optimizer *opt, hvae_model *model)
{
    const hvae_optimizer_config *c = &opt->config;
    float *params = hvae_model_params(model);
    const float *grads = hvae_model_grads(model);
    opt->step++;
    if (c->kind == HVAE_OPTIMIZER_ADAM)
        hvae_adam_update(params, grads, opt->m, opt->v, opt->n_params,
                         c->learning_rate, c->beta1, c->beta2, c->eps,
                         c->weight_decay, opt->step);
    else
        hvae_sgd_update(params, grads, opt->m, opt->n_params, c->learning_rate,
                        c->momentum, c->weight_decay);
}
