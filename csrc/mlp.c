/* mlp.c -- auxiliary networks: an MLP with its own flat parameter and
 * gradient buffers, for discriminators, density-ratio estimators and the
 * like, trained beside the model (its own hvae_optimizer from
 * hvae_optimizer_create_for; a hvae_train_options.aux_step hook runs it in
 * the training loop). Same layer code and layout rules as the model's
 * blocks: W (n_in, n_out) row-major then b, layer by layer. */
#include "hvae.h"
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct hvae_mlp {
    int32_t n_layers;
    int64_t n_in, max_rows;
    hvae_dense_layer layer[HVAE_MAX_DENSE]; /* the last one linear */
    int64_t act_cols;                       /* sum of the widths */
    int64_t n_params;
    float *params, *grads;
    float *acts, *dacts;                    /* (max_rows, act_cols) each */
    int owns_params;                        /* 0 after hvae_mlp_bind */
};

hvae_status hvae_mlp_create(int64_t n_in, int32_t n_layers, const int64_t *widths,
                            hvae_activation act, int64_t max_rows, hvae_mlp **out)
{
    if (!out)
        return HVAE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (n_in < 1 || n_in > INT_MAX || n_layers < 1 || n_layers > HVAE_MAX_DENSE ||
        !widths || max_rows < 1 || max_rows > INT_MAX ||
        !(hvae_activation_name(act) || act == HVAE_ACT_IDENTITY))
        return HVAE_ERR_INVALID_ARGUMENT;
    hvae_mlp *mlp = calloc(1, sizeof *mlp);
    if (!mlp)
        return HVAE_ERR_OUT_OF_MEMORY;
    mlp->n_layers = n_layers;
    mlp->n_in = n_in;
    mlp->max_rows = max_rows;
    int64_t in = n_in;
    int overflow = 0;
    for (int32_t l = 0; l < n_layers; l++) {
        hvae_dense_layer *L = &mlp->layer[l];
        if (widths[l] < 1 || widths[l] > INT_MAX) {
            free(mlp);
            return HVAE_ERR_INVALID_ARGUMENT;
        }
        L->n_in = L->n_data = in;
        L->n_out = widths[l];
        L->act = l == n_layers - 1 ? HVAE_ACT_IDENTITY : act;
        L->W = mlp->n_params;
        int64_t size;
        overflow |= __builtin_mul_overflow(in + 1, L->n_out, &size) ||
                    __builtin_add_overflow(mlp->n_params, size, &mlp->n_params);
        L->b = L->W + in * L->n_out;
        L->col = mlp->act_cols;
        mlp->act_cols += L->n_out;
        in = L->n_out;
    }
    int64_t act_floats;
    if (overflow || __builtin_mul_overflow(mlp->act_cols, max_rows, &act_floats) ||
        mlp->n_params > (int64_t)(SIZE_MAX / 4 / sizeof(float)) ||
        act_floats > (int64_t)(SIZE_MAX / 4 / sizeof(float))) {
        free(mlp);
        return HVAE_ERR_SIZE_OVERFLOW;
    }
    mlp->owns_params = 1;
    mlp->params = calloc((size_t)mlp->n_params, sizeof(float));
    mlp->grads = calloc((size_t)mlp->n_params, sizeof(float));
    mlp->acts = calloc((size_t)act_floats, sizeof(float));
    mlp->dacts = calloc((size_t)act_floats, sizeof(float));
    if (!mlp->params || !mlp->grads || !mlp->acts || !mlp->dacts) {
        hvae_mlp_free(mlp);
        return HVAE_ERR_OUT_OF_MEMORY;
    }
    *out = mlp;
    return HVAE_OK;
}

void hvae_mlp_free(hvae_mlp *mlp)
{
    if (!mlp)
        return;
    if (mlp->owns_params)
        free(mlp->params);
    free(mlp->grads);
    free(mlp->acts);
    free(mlp->dacts);
    free(mlp);
}

int64_t hvae_mlp_n_params(const hvae_mlp *mlp) { return mlp->n_params; }
int64_t hvae_mlp_n_in(const hvae_mlp *mlp) { return mlp->n_in; }

void hvae_mlp_bind(hvae_mlp *mlp, float *params)
{
    if (mlp->owns_params)
        free(mlp->params);
    mlp->params = params;
    mlp->owns_params = 0;
}
float *hvae_mlp_params(hvae_mlp *mlp) { return mlp->params; }
float *hvae_mlp_grads(hvae_mlp *mlp) { return mlp->grads; }
int64_t hvae_mlp_n_out(const hvae_mlp *mlp) { return mlp->layer[mlp->n_layers - 1].n_out; }

void hvae_mlp_init(hvae_mlp *mlp, uint64_t seed)
{
    /* PyTorch's Linear default, as hvae_model_init: U(-1/sqrt(n_in), +). */
    hvae_rng rng;
    hvae_rng_seed(&rng, seed);
    for (int32_t l = 0; l < mlp->n_layers; l++) {
        const hvae_dense_layer *L = &mlp->layer[l];
        float bound = (float)(1.0 / sqrt((double)L->n_in));
        for (int64_t k = 0; k < (L->n_in + 1) * L->n_out; k++)
            mlp->params[L->W + k] = bound * (2.0f * hvae_rng_uniform_float(&rng) - 1.0f);
    }
}

/* Layer l's output rows in the activations (B rows, n_out columns). */
static float *mlp_act(const hvae_mlp *mlp, int32_t l)
{
    return mlp->acts + mlp->max_rows * mlp->layer[l].col;
}
static float *mlp_dact(const hvae_mlp *mlp, int32_t l)
{
    return mlp->dacts + mlp->max_rows * mlp->layer[l].col;
}

static hvae_status mlp_forward(hvae_mlp *mlp, const float *x, int64_t B, float *out,
                               int rowwise)
{
    if (!mlp || !x || B < 0 || B > mlp->max_rows)
        return !mlp || !x || B < 0 ? HVAE_ERR_INVALID_ARGUMENT : HVAE_ERR_BATCH_TOO_LARGE;
    const float *in = x;
    for (int32_t l = 0; l < mlp->n_layers; l++) {
        const hvae_dense_layer *L = &mlp->layer[l];
        hvae_dense_cond_forward(mlp_act(mlp, l), in, NULL, mlp->params + L->W,
                                mlp->params + L->b, L->act, B, L->n_in, 0, L->n_out, rowwise);
        in = mlp_act(mlp, l);
    }
    if (out)
        memcpy(out, in, (size_t)(B * hvae_mlp_n_out(mlp)) * sizeof(float));
    return HVAE_OK;
}

/* h_0 = x (B, n_in); h_l = act(h_{l-1} @ W_l + b_l); the last layer linear.
 * The output (B, n_out) is copied to out when not NULL, and stays readable
 * through hvae_mlp_output until the next forward. */
hvae_status hvae_mlp_forward(hvae_mlp *mlp, const float *x, int64_t B, float *out)
{
    return mlp_forward(mlp, x, B, out, 0);
}

hvae_status hvae_mlp_forward_rowwise(hvae_mlp *mlp, const float *x, int64_t B, float *out)
{
    return mlp_forward(mlp, x, B, out, 1);
}

const float *hvae_mlp_output(const hvae_mlp *mlp)
{
    return mlp_act(mlp, mlp->n_layers - 1);
}

/* After hvae_mlp_forward on the same x: given dout = dL/d(out) (B, n_out),
 * ACCUMULATES dL/dW, dL/db into the gradient buffer and dL/dx into dx
 * (skipped when NULL). dout is not written. */
hvae_status hvae_mlp_backward(hvae_mlp *mlp, const float *x, const float *dout, int64_t B,
                              float *dx)
{
    if (!mlp || !x || !dout || B < 0 || B > mlp->max_rows)
        return HVAE_ERR_INVALID_ARGUMENT;
    int32_t last = mlp->n_layers - 1;
    /* The layers' gradients are consumed in place: start from copies. */
    for (int32_t l = 0; l < last; l++)
        memset(mlp_dact(mlp, l), 0, (size_t)(B * mlp->layer[l].n_out) * sizeof(float));
    memcpy(mlp_dact(mlp, last), dout, (size_t)(B * mlp->layer[last].n_out) * sizeof(float));
    for (int32_t l = last; l >= 0; l--) {
        const hvae_dense_layer *L = &mlp->layer[l];
        hvae_dense_backward(l > 0 ? mlp_dact(mlp, l - 1) : dx, mlp->grads + L->W,
                            mlp->grads + L->b, mlp_dact(mlp, l), mlp_act(mlp, l),
                            l > 0 ? mlp_act(mlp, l - 1) : x, mlp->params + L->W, L->act, B,
                            L->n_in, L->n_out);
    }
    return HVAE_OK;
}
