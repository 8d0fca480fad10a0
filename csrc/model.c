/*
 * model.c -- the model's layout (parameters, named tensors, workspace), its
 * initialisation, and the forward and backward passes of the Markov
 * hierarchy; evaluation entry points (ELBO, encode, decode, sample).
 */
#include "hvae.h"
#include "internal.h"
#include "fastmath.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

hvae_config hvae_config_default(int64_t n_features, int32_t n_layers,
                                const int64_t *latent_dims, int32_t n_hidden,
                                const int64_t *hidden_dims)
{
    hvae_config c;
    c.n_features = n_features;
    c.n_layers = n_layers;
    c.latent_dims = latent_dims;
    c.n_hidden = n_hidden;
    c.hidden_dims = hidden_dims;
    c.likelihood = HVAE_LIKELIHOOD_GAUSSIAN;
    c.activation = HVAE_ACT_RELU;
    c.decoder_variance = HVAE_DECODER_VARIANCE_LEARNED;
    c.inference = HVAE_INFERENCE_MARKOV;
    c.n_conditions = 0;
    c.markov_kl = HVAE_MARKOV_KL_SAMPLED;
    c.prior = HVAE_PRIOR_NORMAL;
    c.latent_family = HVAE_LATENT_GAUSSIAN;
    c.latent_families = NULL;
    c.n_categories = NULL;
    c.n_components = 1;
    c.n_pseudo_inputs = 0;
    c.discriminator = 0;
    c.discriminator_n_hidden = 0;
    c.prior_covariance = HVAE_COVARIANCE_DIAG;
    for (int32_t j = 0; j < HVAE_MAX_HIDDEN; j++)
        c.discriminator_hidden[j] = 0;
    return c;
}

/* ---- layout ------------------------------------------------------------ */

typedef struct {
    hvae_model *m;
    int64_t n_params;
    int64_t act_cols;
    int overflow;
} layout_state;

static int64_t checked_add(layout_state *st, int64_t *counter, int64_t a, int64_t b)
{
    int64_t product, offset = *counter;
    if (__builtin_mul_overflow(a, b, &product) ||
        __builtin_add_overflow(*counter, product, counter))
        st->overflow = 1;
    return offset;
}

static void add_tensor(layout_state *st, const char *name, int64_t offset,
                       int64_t rows, int64_t cols)
{
    hvae_tensor_info *t = &st->m->tensors[st->m->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->offset = offset;
    t->rows = rows;
    t->cols = cols;
}

static void layout_block(layout_state *st, hvae_block *blk, const char *prefix,
                         int64_t n_in, const int64_t *widths, int32_t n_hidden,
                         int32_t n_heads, int64_t n_out,
                         const char *const *head_names)
{
    char name[48];
    blk->n_hidden = n_hidden;
    blk->n_heads = n_heads;
    blk->n_out = n_out;
    int64_t in = n_in, C = st->m->config.n_conditions;
    for (int32_t l = 0; l < n_hidden + n_heads; l++) {
        int head = l >= n_hidden;
        int64_t out = head ? n_out : widths[l];
        hvae_dense_layer *L = &blk->layer[l];
        /* The condition meets the block's first layer: hidden1, or every
         * head of a block without hidden layers. */
        L->takes_cond = C > 0 && (l == 0 || (head && n_hidden == 0));
        L->n_data = in;
        L->n_in = in + (L->takes_cond ? C : 0);
        L->n_out = out;
        L->W = checked_add(st, &st->n_params, L->n_in, out);
        L->b = checked_add(st, &st->n_params, 1, out);
        L->col = checked_add(st, &st->act_cols, 1, out);
        if (!head)
            L->act = st->m->config.activation;
        else if (strcmp(head_names[l - n_hidden], "logvar") == 0)
            L->act = HVAE_ACT_LOGVAR_CLIP;
        else
            L->act = HVAE_ACT_IDENTITY;
        if (head)
            snprintf(name, sizeof name, "%s.%s", prefix, head_names[l - n_hidden]);
        else
            snprintf(name, sizeof name, "%s.hidden%d", prefix, (int)l + 1);
        size_t len = strlen(name);
        snprintf(name + len, sizeof name - len, ".W");
        add_tensor(st, name, L->W, L->n_in, out);
        snprintf(name + len, sizeof name - len, ".b");
        add_tensor(st, name, L->b, out, 0);
        if (!head)
            in = out;
    }
}

/* The prior's own tensors, if any, close the buffer (named "prior.*"). */
static void layout_prior(layout_state *st, int32_t n_prior_tensors)
{
    hvae_model *m = st->m;
    m->n_block_tensors = m->n_tensors;
    m->prior_offset = st->n_params;
    for (int32_t k = 0; k < n_prior_tensors; k++) {
        hvae_tensor_info info = {{0}, 0, 0, 0};
        m->prior->tensor(&m->config, k, &info);
        char name[sizeof info.name];
        snprintf(name, sizeof name, "prior.%.40s", info.name);
        int64_t offset = checked_add(st, &st->n_params, info.rows,
                                     info.cols > 0 ? info.cols : 1);
        add_tensor(st, name, offset, info.rows, info.cols);
    }
}

/* The discriminator's tensors, if any, after the prior's
 * ("discriminator.hidden1.W", ..., "discriminator.out.b"), in hvae_mlp's
 * layout. */
static void layout_discriminator(layout_state *st)
{
    hvae_model *m = st->m;
    const hvae_config *c = &m->config;
    m->disc_offset = st->n_params;
    if (!c->discriminator)
        return;
    int64_t in = m->latent_dims[c->n_layers - 1];
    for (int32_t l = 0; l <= c->discriminator_n_hidden; l++) {
        int last = l == c->discriminator_n_hidden;
        int64_t out = last ? 1 : c->discriminator_hidden[l];
        char name[48];
        if (last)
            snprintf(name, sizeof name, "discriminator.out");
        else
            snprintf(name, sizeof name, "discriminator.hidden%d", (int)l + 1);
        size_t len = strlen(name);
        snprintf(name + len, sizeof name - len, ".W");
        add_tensor(st, name, checked_add(st, &st->n_params, in, out), in, out);
        snprintf(name + len, sizeof name - len, ".b");
        add_tensor(st, name, checked_add(st, &st->n_params, out, 1), out, 0);
        in = out;
    }
}

static hvae_status validate_config(const hvae_config *c)
{
    if (c->n_features < 1 || c->n_features > INT_MAX)
        return HVAE_ERR_INVALID_ARGUMENT;
    if (c->n_layers < 1 || c->n_layers > HVAE_MAX_LAYERS || !c->latent_dims)
        return HVAE_ERR_INVALID_ARGUMENT;
    if (c->n_hidden < 0 || c->n_hidden > HVAE_MAX_HIDDEN ||
        (c->n_hidden > 0 && !c->hidden_dims))
        return HVAE_ERR_INVALID_ARGUMENT;
    for (int32_t i = 0; i < c->n_layers; i++)
        if (c->latent_dims[i] < 1 || c->latent_dims[i] > INT_MAX)
            return HVAE_ERR_INVALID_ARGUMENT;
    for (int32_t j = 0; j < c->n_hidden; j++)
        if (c->hidden_dims[j] < 1 || c->hidden_dims[j] > INT_MAX)
            return HVAE_ERR_INVALID_ARGUMENT;
    /* Every named option must have a name; a hidden layer may also be the
     * identity (linear), which the C API has always allowed. */
    for (int32_t i = 0; i < c->n_layers; i++) {
        hvae_latent_family f = c->latent_families ? c->latent_families[i] : c->latent_family;
        if (!hvae_latent_family_name(f))
            return HVAE_ERR_INVALID_ARGUMENT;
        if (f == HVAE_LATENT_CATEGORICAL) {
            int64_t K = c->n_categories ? c->n_categories[i] : 0, width;
            if (K < 2 || K > INT_MAX ||
                __builtin_mul_overflow(c->latent_dims[i], K, &width) || width > INT_MAX)
                return HVAE_ERR_INVALID_ARGUMENT;
            /* The ladder's precision-weighted merge is the Gaussian's; a
             * categorical top layer has its own uniform prior. */
            if (c->inference == HVAE_INFERENCE_LADDER ||
                (i == c->n_layers - 1 && c->prior != HVAE_PRIOR_NORMAL))
                return HVAE_ERR_INVALID_ARGUMENT;
        }
    }
    if (!hvae_likelihood_name(c->likelihood) ||
        !(hvae_activation_name(c->activation) || c->activation == HVAE_ACT_IDENTITY) ||
        !hvae_decoder_variance_name(c->decoder_variance) ||
        !hvae_inference_name(c->inference) || !hvae_markov_kl_name(c->markov_kl) ||
        !hvae_prior_name(c->prior) || !hvae_latent_family_name(c->latent_family))
        return HVAE_ERR_INVALID_ARGUMENT;
    /* The ladder's precision-weighted merge is the Gaussian's. */
    if (c->inference == HVAE_INFERENCE_LADDER && c->latent_family != HVAE_LATENT_GAUSSIAN)
        return HVAE_ERR_INVALID_ARGUMENT;
    if (c->n_conditions < 0 || c->n_conditions > INT_MAX || c->n_pseudo_inputs < 0)
        return HVAE_ERR_INVALID_ARGUMENT;
    if ((c->discriminator != 0 && c->discriminator != 1) ||
        c->discriminator_n_hidden < 0 || c->discriminator_n_hidden > HVAE_MAX_HIDDEN ||
        (c->prior == HVAE_PRIOR_DENSITY_RATIO && !c->discriminator))
        return HVAE_ERR_INVALID_ARGUMENT;
    for (int32_t j = 0; c->discriminator && j < c->discriminator_n_hidden; j++)
        if (c->discriminator_hidden[j] < 1 || c->discriminator_hidden[j] > INT_MAX)
            return HVAE_ERR_INVALID_ARGUMENT;
    if (!hvae_covariance_type_name(c->prior_covariance) ||
        (c->prior_covariance != HVAE_COVARIANCE_DIAG && c->prior != HVAE_PRIOR_GMM))
        return HVAE_ERR_INVALID_ARGUMENT;
    const hvae_prior_ops *prior = hvae_prior_ops_for(c);
    if (prior->n_components &&
        (c->n_components < 1 || c->n_components > HVAE_MAX_COMPONENTS))
        return HVAE_ERR_INVALID_ARGUMENT;
    return prior->check_config ? prior->check_config(c) : HVAE_OK;
}

/* The model's own copy of the config: its latent and hidden sizes, each
 * layer's family and categories (latent_dims count a categorical layer's
 * one-hot columns). */
static void copy_config(hvae_model *m, const hvae_config *config)
{
    m->config = *config;
    int32_t T = config->n_layers, H = config->n_hidden;
    memcpy(m->config_latent_dims, config->latent_dims, (size_t)T * sizeof(int64_t));
    for (int32_t i = 0; i < T; i++) {
        m->latent_families[i] =
            config->latent_families ? config->latent_families[i] : config->latent_family;
        int categorical = m->latent_families[i] == HVAE_LATENT_CATEGORICAL;
        m->n_categories[i] = categorical ? config->n_categories[i] : 1;
        m->latent_dims[i] = config->latent_dims[i] * m->n_categories[i];
        m->latent[i].K = m->n_categories[i];
        m->latent[i].family = hvae_latent_family_table[m->latent_families[i]];
    }
    if (H > 0)
        memcpy(m->hidden_dims, config->hidden_dims, (size_t)H * sizeof(int64_t));
    m->config.latent_dims = m->config_latent_dims;
    m->config.latent_families = m->latent_families;
    m->config.n_categories = m->n_categories;
    m->config.hidden_dims = m->hidden_dims;
}

static const char *const gaussian_heads[] = {"mu", "logvar"};
static const char *const logits_head[] = {"logits"};

/* The encoder blocks enc1..encT, each layer's z (and the ladder's merged
 * posterior below the top) and its noise columns. */
static void layout_encoders(layout_state *ls)
{
    hvae_model *m = ls->m;
    const hvae_config *config = &m->config;
    int32_t T = config->n_layers, H = config->n_hidden;
    int64_t D = config->n_features;
    char prefix[16];
    for (int32_t i = 0; i < T; i++) {
        snprintf(prefix, sizeof prefix, "enc%d", (int)i + 1);
        int one_head = m->latent[i].family->n_heads == 1;
        layout_block(ls, &m->enc[i], prefix, i == 0 ? D : m->latent_dims[i - 1],
                     m->hidden_dims, H, one_head ? 1 : 2, m->latent_dims[i],
                     one_head ? logits_head : gaussian_heads);
        m->latent[i].dim = m->latent_dims[i];
        m->latent[i].z_col = checked_add(ls, &ls->act_cols, 1, m->latent_dims[i]);
        m->latent[i].eps_col = m->eps_cols;
        m->eps_cols += m->latent_dims[i];
        /* The ladder's merged posterior of every layer below the top. */
        if (config->inference == HVAE_INFERENCE_LADDER && i < T - 1) {
            m->latent[i].q_col[0] = checked_add(ls, &ls->act_cols, 1, m->latent_dims[i]);
            m->latent[i].q_col[1] = checked_add(ls, &ls->act_cols, 1, m->latent_dims[i]);
        }
    }
}

/* The decoder blocks dec1..decT, their hidden widths reversed. */
static void layout_decoders(layout_state *ls)
{
    hvae_model *m = ls->m;
    const hvae_config *config = &m->config;
    int32_t T = config->n_layers, H = config->n_hidden;
    int64_t D = config->n_features, reversed[HVAE_MAX_HIDDEN];
    for (int32_t j = 0; j < H; j++)
        reversed[j] = m->hidden_dims[H - 1 - j];
    char prefix[16];
    int unit = config->decoder_variance == HVAE_DECODER_VARIANCE_UNIT;
    for (int32_t i = 0; i < T; i++) {
        snprintf(prefix, sizeof prefix, "dec%d", (int)i + 1);
        /* A logits head: the Bernoulli likelihood's, or the prior of a
         * categorical layer below. */
        int logits = i == 0 ? config->likelihood == HVAE_LIKELIHOOD_BERNOULLI
                            : m->latent[i - 1].family->n_heads == 1;
        layout_block(ls, &m->dec[i], prefix, m->latent_dims[i], reversed, H,
                     logits || unit ? 1 : 2, i == 0 ? D : m->latent_dims[i - 1],
                     logits ? logits_head : gaussian_heads);
    }
}

hvae_status hvae_model_create(const hvae_config *config, hvae_model **out)
{
    if (!config || !out)
        return HVAE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    hvae_status st = validate_config(config);
    if (st != HVAE_OK)
        return st;
    hvae_model *m = calloc(1, sizeof *m);
    if (!m)
        return HVAE_ERR_OUT_OF_MEMORY;
    copy_config(m, config);
    int32_t T = config->n_layers, H = config->n_hidden;
    m->prior = hvae_prior_ops_for(config);
    int32_t n_prior_tensors = m->prior->n_tensors(config);
    /* 2 * T blocks of at most H hidden layers and 2 heads, W and b each;
     * a prior's own tensors are few (a table of names, not of sizes); the
     * discriminator's, W and b of at most HVAE_MAX_HIDDEN + 1 layers. */
    if (n_prior_tensors < 0 || n_prior_tensors > 4096) {
        free(m);
        return HVAE_ERR_INVALID_ARGUMENT;
    }
    m->tensors = calloc((size_t)(2 * T * (H + 2) * 2 + n_prior_tensors +
                                 2 * (HVAE_MAX_HIDDEN + 1)), sizeof *m->tensors);
    if (!m->tensors) {
        free(m);
        return HVAE_ERR_OUT_OF_MEMORY;
    }

    layout_state ls = {m, 0, 0, 0};
    layout_encoders(&ls);
    layout_decoders(&ls);
    layout_prior(&ls, n_prior_tensors);
    layout_discriminator(&ls);
    m->n_params = ls.n_params;
    m->act_cols = ls.act_cols;
    if (ls.overflow || m->n_params > (int64_t)(SIZE_MAX / 4 / sizeof(float))) {
        hvae_model_free(m);
        return HVAE_ERR_SIZE_OVERFLOW;
    }
    m->params = calloc((size_t)m->n_params, sizeof(float));
    m->grads = calloc((size_t)m->n_params, sizeof(float));
    if (!m->params || !m->grads) {
        hvae_model_free(m);
        return HVAE_ERR_OUT_OF_MEMORY;
    }
    if (config->discriminator && (st = hvae_discriminator_attach(m)) != HVAE_OK) {
        hvae_model_free(m);
        return st;
    }
    *out = m;
    return HVAE_OK;
}

void hvae_model_free(hvae_model *m)
{
    if (!m)
        return;
    hvae_discriminator_detach(m);
    free(m->params);
    free(m->grads);
    free(m->tensors);
    free(m);
}

const hvae_config *hvae_model_config(const hvae_model *m) { return &m->config; }
int64_t hvae_model_latent_width(const hvae_model *m, int32_t layer)
{
    return m && layer >= 0 && layer < m->config.n_layers ? m->latent_dims[layer] : 0;
}
int64_t hvae_model_n_params(const hvae_model *m) { return m->n_params; }
float *hvae_model_params(hvae_model *m) { return m->params; }
float *hvae_model_grads(hvae_model *m) { return m->grads; }
int32_t hvae_model_n_tensors(const hvae_model *m) { return m->n_tensors; }
int64_t hvae_model_prior_offset(const hvae_model *m) { return m->prior_offset; }

int64_t hvae_model_n_components(const hvae_model *m)
{
    return m->prior->n_components ? m->prior->n_components(&m->config) : 0;
}

hvae_status hvae_model_tensor(const hvae_model *m, int32_t index,
                              hvae_tensor_info *info)
{
    if (!m || !info || index < 0 || index >= m->n_tensors)
        return HVAE_ERR_INVALID_ARGUMENT;
    *info = m->tensors[index];
    return HVAE_OK;
}

void hvae_model_init(hvae_model *m, uint64_t seed)
{
    /* PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5) for W,
     * and the same bound for b): U(-1/sqrt(n_in), 1/sqrt(n_in)). */
    hvae_rng rng;
    hvae_rng_seed(&rng, seed);
    for (int32_t t = 0; t < m->n_block_tensors; t++) {
        const hvae_tensor_info *info = &m->tensors[t];
        /* A bias follows its weight, whose row count is the fan-in. */
        int64_t fan_in = info->cols > 0 ? info->rows : m->tensors[t - 1].rows;
        float bound = (float)(1.0 / sqrt((double)fan_in));
        int64_t count = info->cols > 0 ? info->rows * info->cols : info->rows;
        float *p = m->params + info->offset;
        for (int64_t k = 0; k < count; k++)
            p[k] = bound * (2.0f * hvae_rng_uniform_float(&rng) - 1.0f);
    }
    m->prior->init(&m->config, m->params + m->prior_offset, &rng);
    hvae_discriminator_init(m, seed);
}

hvae_status hvae_model_check_data(const hvae_model *m, const float *x,
                                  int64_t n, int64_t *bad_index)
{
    int64_t total = n * m->config.n_features;
    int bern = m->config.likelihood == HVAE_LIKELIHOOD_BERNOULLI;
    /* One branch-free pass; locate the culprit only when something is off. */
    int bad = 0;
    for (int64_t i = 0; i < total; i++) {
        float v = x[i];
        bad |= !(v - v == 0.0f);                     /* NaN or inf */
        bad |= (v > HVAE_MAX_ABS_INPUT) | (v < -HVAE_MAX_ABS_INPUT);
        bad |= bern & ((v < 0.0f) | (v > 1.0f));
    }
    if (!bad)
        return HVAE_OK;
    for (int64_t i = 0; i < total; i++) {
        float v = x[i];
        hvae_status st = !isfinite(v) ? HVAE_ERR_NONFINITE_INPUT
                         : fabsf(v) > HVAE_MAX_ABS_INPUT ? HVAE_ERR_INPUT_MAGNITUDE
                         : bern && (v < 0.0f || v > 1.0f) ? HVAE_ERR_INPUT_RANGE
                         : HVAE_OK;
        if (st != HVAE_OK) {
            if (bad_index)
                *bad_index = i;
            return st;
        }
    }
    return HVAE_OK;
}

/* ---- workspace ---------------------------------------------------------- */

/* Rows of the prior's own workspace (see hvae_prior_ops.workspace_rows). */
static int64_t prior_workspace_rows(const hvae_model *m)
{
    return m->prior->workspace_rows ? m->prior->workspace_rows(&m->config) : 0;
}

/* The bytes of a workspace without the prior's (its own rows only). */
static size_t workspace_own_bytes(const hvae_model *m, int64_t max_rows)
{
    if (!m || max_rows < 1 || max_rows > INT_MAX)
        return 0;
    int64_t floats_per_row, total;
    int64_t doubles_per_row = 1 + m->config.n_layers + 3 +
                              2 * m->latent_dims[m->config.n_layers - 1];
    if (__builtin_mul_overflow(m->act_cols, 2, &floats_per_row) ||
        __builtin_add_overflow(floats_per_row,
                               m->config.n_features + m->eps_cols,
                               &floats_per_row))
        return 0;
    if (__builtin_add_overflow(floats_per_row, m->config.n_conditions + 4 +
                                                   HVAE_GATHER_COLS *
                                                       m->latent_dims[m->config.n_layers - 1],
                               &floats_per_row))
        return 0;
    int64_t per_row;
    if (__builtin_mul_overflow(floats_per_row, (int64_t)sizeof(float), &per_row) ||
        __builtin_add_overflow(per_row, (doubles_per_row + 2) * (int64_t)sizeof(double) +
                                            (int64_t)sizeof(hvae_rng), &per_row))
        return 0;
    if (__builtin_mul_overflow(per_row, max_rows, &total) ||
        total > (int64_t)(SIZE_MAX / 2))
        return 0;
    return (size_t)total;
}

/* With the prior's workspace: its rows hold the whole layout plus their
 * input gradient (rows, D), and the caller's rows a double each. */
size_t hvae_workspace_bytes(const hvae_model *m, int64_t max_rows)
{
    size_t own = workspace_own_bytes(m, max_rows);
    int64_t rows = own ? prior_workspace_rows(m) : 0;
    if (rows == 0)
        return own;
    size_t prior = workspace_own_bytes(m, rows);
    size_t extra = (size_t)rows * (size_t)m->config.n_features * sizeof(float) +
                   (size_t)max_rows * sizeof(double);
    if (prior == 0 || prior > SIZE_MAX / 4 - own - extra)
        return 0;
    return own + prior + extra;
}

static hvae_status workspace_create(const hvae_model *m, int64_t max_rows, int with_prior,
                                    hvae_workspace **out);

hvae_status hvae_workspace_create(const hvae_model *m, int64_t max_rows,
                                  hvae_workspace **out)
{
    if (!m || !out || max_rows < 1)
        return HVAE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (hvae_workspace_bytes(m, max_rows) == 0)
        return HVAE_ERR_SIZE_OVERFLOW;
    return workspace_create(m, max_rows, 1, out);
}

static hvae_status workspace_create(const hvae_model *m, int64_t max_rows, int with_prior,
                                    hvae_workspace **out)
{
    hvae_workspace *ws = calloc(1, sizeof *ws);
    if (!ws)
        return HVAE_ERR_OUT_OF_MEMORY;
    size_t R = (size_t)max_rows;
    ws->model = m;
    ws->max_rows = max_rows;
    ws->x = malloc(R * (size_t)m->config.n_features * sizeof(float));
    ws->cond = malloc(R * (size_t)(m->config.n_conditions + 1) * sizeof(float));
    ws->row_weight = malloc(R * sizeof(float));
    ws->score_weight = malloc(R * sizeof(float));
    ws->lse_max = malloc(R * sizeof(double));
    ws->lse_sum = malloc(R * sizeof(double));
    ws->row_rng = malloc(R * sizeof(hvae_rng));
    ws->eps = malloc(R * (size_t)m->eps_cols * sizeof(float));
    ws->acts = calloc(R * (size_t)m->act_cols, sizeof(float));
    ws->dacts = calloc(R * (size_t)m->act_cols, sizeof(float));
    ws->reconstruction = malloc(R * sizeof(double));
    ws->kl = malloc(R * (size_t)m->config.n_layers * sizeof(double));
    ws->tc_scratch = malloc(R * (size_t)(3 + 2 * m->latent_dims[m->config.n_layers - 1]) *
                            sizeof(double));
    ws->gathered = malloc(R * HVAE_GATHER_COLS *
                          (size_t)m->latent_dims[m->config.n_layers - 1] * sizeof(float));
    ws->mine = malloc(R);
    if (!ws->tc_scratch || !ws->gathered || !ws->mine || !ws->x || !ws->eps || !ws->acts || !ws->dacts || !ws->reconstruction ||
        !ws->kl || !ws->cond || !ws->row_weight || !ws->score_weight ||
        !ws->lse_max ||
        !ws->lse_sum || !ws->row_rng) {
        hvae_workspace_free(ws);
        return HVAE_ERR_OUT_OF_MEMORY;
    }
    int64_t prior_rows = with_prior ? prior_workspace_rows(m) : 0;
    if (prior_rows > 0) {
        hvae_status st = workspace_create(m, prior_rows, 0, &ws->prior_ws);
        if (st == HVAE_OK) {
            ws->prior_ws->dx = malloc((size_t)prior_rows * (size_t)m->config.n_features *
                                      sizeof(float));
            ws->prior_rows = malloc(R * sizeof(double));
            if (!ws->prior_ws->dx || !ws->prior_rows)
                st = HVAE_ERR_OUT_OF_MEMORY;
        }
        if (st != HVAE_OK) {
            hvae_workspace_free(ws);
            return st;
        }
    }
    *out = ws;
    return HVAE_OK;
}

void hvae_workspace_free(hvae_workspace *ws)
{
    if (!ws)
        return;
    free(ws->x);
    free(ws->cond);
    free(ws->row_weight);
    free(ws->score_weight);
    free(ws->tc_scratch);
    free(ws->gathered);
    free(ws->mine);
    free(ws->lse_max);
    free(ws->lse_sum);
    free(ws->row_rng);
    free(ws->eps);
    free(ws->acts);
    free(ws->dacts);
    free(ws->reconstruction);
    free(ws->kl);
    free(ws->dx);
    free(ws->prior_rows);
    hvae_packed_free(ws->packed);
    hvae_workspace_free(ws->prior_ws);
    free(ws);
}

int64_t hvae_workspace_max_rows(const hvae_workspace *ws) { return ws->max_rows; }

void hvae_workspace_set_poll(hvae_workspace *ws, hvae_poll_hook poll, void *ctx)
{
    if (!ws)
        return;
    ws->poll = poll;
    ws->poll_ctx = poll ? ctx : NULL;
}

const float *hvae_workspace_samples(const hvae_workspace *ws, int32_t layer)
{
    if (!ws || layer < 0 || layer >= ws->model->config.n_layers)
        return NULL;
    return ws_act(ws, ws->model->latent[layer].z_col);
}

/* ---- passes -------------------------------------------------------------- */

/* A block's layers in order: each hidden layer reads the one before (the
 * first reads inp), every head reads the last hidden layer (or inp):
 *   h_l = act_l([h_{l-1}, c] @ W_l + b_l),  the condition only where taken. */
void hvae_block_forward(const hvae_model *m, const hvae_workspace *ws,
                        const hvae_block *blk, const float *inp,
                        const float *cond, int64_t B, int rowwise)
{
    const float *in = inp;
    for (int32_t l = 0; l < blk->n_hidden + blk->n_heads; l++) {
        if (ws_stop(ws))
            return; /* the caller sees the stop at its next poll */
        const hvae_dense_layer *L = &blk->layer[l];
        float *out = ws_act(ws, L->col);
        int64_t n_cond = L->n_in - L->n_data;
        hvae_dense_packed_forward(out, in, n_cond ? cond : NULL, m->params + L->W,
                                  hvae_packed_layer(ws, blk, l, 0),
                                  hvae_packed_layer(ws, blk, l, 1), m->params + L->b, L->act,
                                  B, L->n_data, n_cond, L->n_out, rowwise);
        if (l < blk->n_hidden)
            in = out;
    }
}

/* Accumulates the block's parameter gradients and dinp (skipped when NULL)
 * from the gradients of its heads in dacts. */
void hvae_block_backward(hvae_model *m, const hvae_workspace *ws,
                         const hvae_block *blk, const float *inp,
                         const float *cond, float *dinp, int64_t B)
{
    /* The heads read the last hidden layer (or the input); every hidden layer
     * reads the one before it. */
    int32_t H = blk->n_hidden;
    for (int32_t l = H + blk->n_heads - 1; l >= 0; l--) {
        if (ws_stop(ws))
            return; /* the caller sees the stop at its next poll */
        const hvae_dense_layer *L = &blk->layer[l];
        int from_input = l == 0 || (l >= H && H == 0);
        int64_t reads = l >= H ? H - 1 : l - 1; /* the layer this one reads */
        const float *in = from_input ? inp : ws_act(ws, blk->layer[reads].col);
        float *din = from_input ? dinp : ws_dact(ws, blk->layer[reads].col);
        int64_t n_cond = L->n_in - L->n_data;
        hvae_dense_cond_backward(din, m->grads + L->W, m->grads + L->b, ws_dact(ws, L->col),
                                 ws_act(ws, L->col), in, n_cond ? cond : NULL,
                                 m->params + L->W, L->act, B, L->n_data, n_cond, L->n_out, ws);
    }
}

/* Layer i's posterior (mu, logvar): the encoder's heads, or for the ladder
 * below the top the merged buffers. dacts variants for gradients. */
static int merged(const hvae_model *m, int32_t i)
{
    return m->config.inference == HVAE_INFERENCE_LADDER && i < m->config.n_layers - 1;
}
static float *post(const hvae_model *m, const hvae_workspace *ws, int32_t i, int h)
{
    return merged(m, i) ? ws_act(ws, m->latent[i].q_col[h]) : block_head(ws, &m->enc[i], h);
}
static float *dpost(const hvae_model *m, const hvae_workspace *ws, int32_t i, int h)
{
    return merged(m, i) ? ws_dact(ws, m->latent[i].q_col[h]) : block_dhead(ws, &m->enc[i], h);
}

/* The prior over z_{i+1}: decoder block i + 1's heads, NULL for the top. */
static float *prior(const hvae_model *m, const hvae_workspace *ws, int32_t i, int h)
{
    return i == m->config.n_layers - 1 ? NULL : block_head(ws, &m->dec[i + 1], h);
}
static float *dprior(const hvae_model *m, const hvae_workspace *ws, int32_t i, int h)
{
    return i == m->config.n_layers - 1 ? NULL : block_dhead(ws, &m->dec[i + 1], h);
}

/* Whether layer i's term is the closed-form KL rather than the sampled
 * log-density ratio. The KL is exact when q and p of the layer condition on
 * the same things: the top layer, and every ladder layer. A lower Markov
 * layer takes it too with markov_kl = analytic (at the sampled z_{i+1}; see
 * hvae.h). `sampled` (IWAE, log-likelihood) asks for true log-weights. */
static int closed_form(const hvae_model *m, int32_t i, int sampled)
{
    return !sampled && (i == m->config.n_layers - 1 ||
                        m->config.inference == HVAE_INFERENCE_LADDER ||
                        m->config.markov_kl == HVAE_MARKOV_KL_ANALYTIC);
}

/* Row r's terms after a forward pass, the one place every objective
 * assembles them:
 *   log w_r = log p(x|z_1) + sum of the prior terms - sum of the posterior
 *           = reconstruction_r - term_1 - ... - term_T,
 * term_i = log q(z_i|.) - log p(z_i|.) at the samples (a true log-weight:
 * IWAE, log-likelihood), or the closed-form KL where the pass took it (then
 * log w_r is the row's ELBO estimate). Also writes the layer terms into kl
 * (T entries, may be NULL) and returns through elbo (may be NULL) the same
 * quantity summed as reconstruction_r - (term_1 + ... + term_T): the two
 * orders of rounding are those the ELBO and the importance-weighted paths
 * have always used, kept so that results stay bit for bit. */
double hvae_row_terms(const hvae_workspace *ws, int64_t r, double *kl, double *elbo)
{
    int32_t T = ws->model->config.n_layers;
    double reconstruction = ws->reconstruction[r], log_w = reconstruction, total = 0.0;
    for (int32_t i = 0; i < T; i++) {
        double term = ws->kl[i * ws->max_rows + r];
        log_w -= term;
        total += term;
        if (kl)
            kl[i] = term;
    }
    if (elbo)
        *elbo = reconstruction - total;
    return log_w;
}

/* The input of encoder block i: x, the sample z_i (Markov) or the mean
 * mu_hat_i of the block below (ladder's deterministic pass). */
static float *enc_input(const hvae_model *m, const hvae_workspace *ws, int32_t i,
                        int grad)
{
    if (m->config.inference == HVAE_INFERENCE_LADDER)
        return grad ? block_dhead(ws, &m->enc[i - 1], 0) : block_head(ws, &m->enc[i - 1], 0);
    return grad ? ws_dact(ws, m->latent[i - 1].z_col) : ws_act(ws, m->latent[i - 1].z_col);
}

/* The likelihood terms, over rows split between the pool's threads (each
 * row's terms are computed alone, so the split changes nothing): rows
 * first .. first + B - 1 of the pass. */
typedef struct {
    const hvae_model *m;
    const hvae_workspace *ws;
    const float *x;
    int64_t first, B;
    float scale; /* backward: the likelihood gradient's scale */
} likelihood_args;

static int likelihood_parts(const hvae_model *m, int64_t B)
{
    return hvae_parts((double)(B * m->config.n_features), 1 << 14);
}

/* Runs fn over the pass's B rows in pieces of `width`-wide rows
 * (ws_poll_rows), polling after each. Nonzero when a poll stopped it. */
static int likelihood_pass(likelihood_args *a, hvae_task_fn fn, int64_t B, int64_t width)
{
    int64_t piece = ws_poll_rows(width);
    for (int64_t first = 0; first < B; first += piece) {
        a->first = first;
        a->B = B - first < piece ? B - first : piece;
        hvae_parallel(fn, a, likelihood_parts(a->m, a->B));
        if (ws_stop(a->ws))
            return 1;
    }
    return 0;
}

static void likelihood_forward_part(void *ctx, int part, int n_parts)
{
    const likelihood_args *a = ctx;
    const hvae_model *m = a->m;
    const hvae_block *dec1 = &m->dec[0];
    int64_t D = m->config.n_features, lo, hi;
    hvae_split(a->B, part, n_parts, 1, &lo, &hi);
    if (hi <= lo)
        return;
    lo += a->first;
    hi += a->first;
    const float *head = block_head(a->ws, dec1, 0) + lo * D;
    if (m->config.likelihood == HVAE_LIKELIHOOD_BERNOULLI) {
        hvae_bernoulli_loglik_forward(a->ws->reconstruction + lo, a->x + lo * D, head,
                                      hi - lo, D);
    } else {
        const float *lv = block_head(a->ws, dec1, 1);
        hvae_gaussian_loglik_forward(a->ws->reconstruction + lo, a->x + lo * D, head,
                                     lv ? lv + lo * D : NULL, hi - lo, D);
    }
}

/* Rows lo..hi of a workspace matrix of `width` columns at column col. */
static void zero_rows(const hvae_workspace *ws, int64_t col, int64_t width, int64_t lo,
                      int64_t hi)
{
    memset(ws_dact(ws, col) + lo * width, 0, (size_t)((hi - lo) * width) * sizeof(float));
}

/* The start of the backward pass: zero the first B rows of every gradient
 * matrix (not the whole workspace, which may hold many more rows), then the
 * likelihood's gradient. */
static void backward_start_part(void *ctx, int part, int n_parts)
{
    const likelihood_args *a = ctx;
    const hvae_model *m = a->m;
    const hvae_workspace *ws = a->ws;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features, lo, hi;
    hvae_split(a->B, part, n_parts, 1, &lo, &hi);
    if (hi <= lo)
        return;
    lo += a->first;
    hi += a->first;
    for (int32_t e = 0; e < 2 * T; e++) {
        const hvae_block *blk = e < T ? &m->enc[e] : &m->dec[e - T];
        for (int32_t l = 0; l < blk->n_hidden + blk->n_heads; l++)
            zero_rows(ws, blk->layer[l].col, blk->layer[l].n_out, lo, hi);
    }
    for (int32_t i = 0; i < T; i++) {
        zero_rows(ws, m->latent[i].z_col, m->latent_dims[i], lo, hi);
        if (merged(m, i)) {
            zero_rows(ws, m->latent[i].q_col[0], m->latent_dims[i], lo, hi);
            zero_rows(ws, m->latent[i].q_col[1], m->latent_dims[i], lo, hi);
        }
    }
    const hvae_block *dec1 = &m->dec[0];
    const float *head = block_head(ws, dec1, 0) + lo * D;
    float *dhead = block_dhead(ws, dec1, 0) + lo * D;
    if (m->config.likelihood == HVAE_LIKELIHOOD_BERNOULLI) {
        hvae_bernoulli_loglik_backward(dhead, a->scale, a->x + lo * D, head, hi - lo, D);
    } else {
        const float *lv = block_head(ws, dec1, 1);
        float *dlv = block_dhead(ws, dec1, 1);
        hvae_gaussian_loglik_backward(dhead, dlv ? dlv + lo * D : NULL, a->scale,
                                      a->x + lo * D, head, lv ? lv + lo * D : NULL,
                                      hi - lo, D);
    }
}

/* Layer i's reparameterised sample z_{i+1} = f(q's heads, eps) of B rows,
 * through its family's table, and the backward of it (accumulating into
 * q's head gradients from dz). */
/* A family call's view of layer i over B rows in the workspace's mode
 * (ws NULL: exact). */
static hvae_latent_call latent_call(const hvae_model *m, const hvae_workspace *ws, int32_t i,
                                    int64_t B)
{
    hvae_latent_call c = {B, m->latent_dims[i], m->latent[i].K, 0.0f, 0};
    if (ws && !ws->score) {
        c.temperature = ws->temperature;
        c.straight_through = ws->straight_through;
    }
    return c;
}

static void latent_sample_forward(const hvae_model *m, const hvae_workspace *ws, int32_t i,
                                  const float *eps, int64_t B)
{
    hvae_latent_call c = latent_call(m, ws, i, B);
    m->latent[i].family->sample_forward(ws_act(ws, m->latent[i].z_col), post(m, ws, i, 0),
                                        post(m, ws, i, 1), eps, &c);
}

/* The pathwise backward of the sample, or on the score-function path each
 * row's score_weight times the score d log q(z) / d(q's heads). */
static void latent_sample_backward(const hvae_model *m, const hvae_workspace *ws, int32_t i,
                                   const float *eps, int64_t B)
{
    hvae_latent_call c = latent_call(m, ws, i, B);
    if (ws->score)
        m->latent[i].family->score_backward(dpost(m, ws, i, 0), dpost(m, ws, i, 1),
                                            ws->score_weight, ws_act(ws, m->latent[i].z_col),
                                            post(m, ws, i, 0), post(m, ws, i, 1), &c);
    else
        m->latent[i].family->sample_backward(dpost(m, ws, i, 0), dpost(m, ws, i, 1),
                                             ws_dact(ws, m->latent[i].z_col),
                                             post(m, ws, i, 0), post(m, ws, i, 1), eps, &c);
}

/* The top layer's prior's view of the workspace (gradients when grad). */
static hvae_prior_args top_prior_args(const hvae_model *m, const hvae_workspace *ws,
                                      const float *eps_top, int64_t B, int grad,
                                      const float *row_weight)
{
    int32_t top = m->config.n_layers - 1;
    hvae_prior_args a = {.model = m, .ws = ws, .params = m->params, .grads = m->grads,
                         .offset = m->prior_offset, .B = B, .d = m->latent_dims[top],
                         .eps = eps_top, .row_weight = row_weight};
    if (ws) {
        a.z = ws_act(ws, m->latent[top].z_col);
        a.mu_q = post(m, ws, top, 0);
        a.lv_q = post(m, ws, top, 1);
        if (grad) {
            a.dz = ws_dact(ws, m->latent[top].z_col);
            a.dmu_q = dpost(m, ws, top, 0);
            a.dlv_q = dpost(m, ws, top, 1);
        }
    }
    return a;
}

/* Every layer's term, into ws->kl (T, B): the closed-form KL(q || p) where
 * closed_form() says so, else the sampled log-density ratio log q(z) -
 * log p(z); p the decoder above's heads (the layer's family's formulas), or
 * for the top layer the prior's table. For the diagonal Gaussian,
 *   KL = sum_j (lv_p - lv_q + (var_q + (mu_q - mu_p)^2) / var_p - 1) / 2,
 *   log q - log p = sum_j (lv_p - lv_q - eps^2 + (z - mu_p)^2 / var_p) / 2. */
static void layer_terms_forward(const hvae_model *m, const hvae_workspace *ws,
                                const float *const *eps, int64_t B, int sampled)
{
    int32_t top = m->config.n_layers - 1;
    /* A family without the prior table (categorical) takes its own
     * standard prior at the top (prior() is NULL there). */
    int32_t own = m->latent[top].family->top_prior_table ? top : top + 1;
    for (int32_t i = 0; i < own; i++) {
        double *kl = ws->kl + i * ws->max_rows;
        const hvae_latent_family_ops *f = m->latent[i].family;
        hvae_latent_call c = latent_call(m, ws, i, B);
        if (closed_form(m, i, sampled))
            f->kl_forward(kl, post(m, ws, i, 0), post(m, ws, i, 1), prior(m, ws, i, 0),
                          prior(m, ws, i, 1), &c);
        else
            f->logratio_forward(kl, ws_act(ws, m->latent[i].z_col), eps[i], post(m, ws, i, 0),
                                post(m, ws, i, 1), prior(m, ws, i, 0), prior(m, ws, i, 1), &c);
    }
    if (own > top)
        return;
    hvae_prior_args a = top_prior_args(m, ws, eps[top], B, 0, NULL);
    m->prior->term_forward(ws->kl + top * ws->max_rows, &a, closed_form(m, top, sampled));
}

void hvae_forward(const hvae_model *m, const hvae_workspace *ws,
                  const float *x, const float *cond, const float *const *eps,
                  int64_t B, int rowwise, int sampled)
{
    int32_t T = m->config.n_layers;
    int ladder = m->config.inference == HVAE_INFERENCE_LADDER;
    for (int32_t i = 0; i < T; i++) {
        hvae_block_forward(m, ws, &m->enc[i], i == 0 ? x : enc_input(m, ws, i, 0), cond,
                           B, rowwise);
        if (!ladder || i == T - 1)
            latent_sample_forward(m, ws, i, eps[i], B);
    }
    for (int32_t i = T - 1; i >= 0; i--) {
        hvae_block_forward(m, ws, &m->dec[i], ws_act(ws, m->latent[i].z_col), cond, B, rowwise);
        if (ladder && i > 0) {
            /* Top-down: the prior of z_i, just computed, meets the bottom-up
             * estimate; z_i is drawn from the result. */
            int64_t count = B * m->latent_dims[i - 1];
            hvae_precision_merge_forward(post(m, ws, i - 1, 0), post(m, ws, i - 1, 1),
                                         block_head(ws, &m->enc[i - 1], 0),
                                         block_head(ws, &m->enc[i - 1], 1),
                                         prior(m, ws, i - 1, 0), prior(m, ws, i - 1, 1),
                                         count);
            latent_sample_forward(m, ws, i - 1, eps[i - 1], B);
        }
    }

    if (ws_stop(ws))
        return;
    likelihood_args la = {m, ws, x, 0, 0, 0.0f};
    if (likelihood_pass(&la, likelihood_forward_part, B, m->config.n_features))
        return;
    layer_terms_forward(m, ws, eps, B, sampled);
}

/* Accumulates scale * kl_weight[i] * d(term_i) into the posterior's, the
 * prior's and (sampled ratio) the sample's gradients. */
static void layer_terms_backward(hvae_model *m, const hvae_workspace *ws, int64_t B,
                                 float scale, const float *kl_weight, int sampled,
                                 const float *row_weight, const hvae_top_terms *tt)
{
    int32_t top = m->config.n_layers - 1;
    int32_t own = m->latent[top].family->top_prior_table ? top : top + 1;
    for (int32_t i = 0; i < own; i++) {
        const hvae_latent_family_ops *f = m->latent[i].family;
        hvae_latent_call c = latent_call(m, ws, i, B);
        if (kl_weight[i] == 0.0f)
            continue;
        if (closed_form(m, i, sampled))
            f->kl_backward(dpost(m, ws, i, 0), dpost(m, ws, i, 1), dprior(m, ws, i, 0),
                           dprior(m, ws, i, 1), scale * kl_weight[i], post(m, ws, i, 0),
                           post(m, ws, i, 1), prior(m, ws, i, 0), prior(m, ws, i, 1), &c);
        else /* the score-function path keeps only p's gradient at the fixed
                sample: q's direct gradient, -score, has mean zero */
            f->logratio_backward(ws_dact(ws, m->latent[i].z_col),
                                 ws->score ? NULL : dpost(m, ws, i, 0),
                                 ws->score ? NULL : dpost(m, ws, i, 1), dprior(m, ws, i, 0),
                                 dprior(m, ws, i, 1), scale * kl_weight[i],
                                 ws_act(ws, m->latent[i].z_col), post(m, ws, i, 0),
                                 post(m, ws, i, 1), prior(m, ws, i, 0), prior(m, ws, i, 1), &c);
    }
    if (own == top && kl_weight[top] != 0.0f) {
        hvae_prior_args a = top_prior_args(m, ws, NULL, B, 1, row_weight);
        m->prior->term_backward(&a, scale * kl_weight[top], closed_form(m, top, sampled));
    }
    if (!tt)
        return;
    /* FactorVAE's penalty tc_weight * T(z_T) at the current discriminator. */
    if (tt->tc_weight != 0.0f)
        hvae_discriminator_term_backward(m, ws_act(ws, m->latent[top].z_col), B,
                                         scale * tt->tc_weight,
                                         ws_dact(ws, m->latent[top].z_col));
    if (tt->tcvae_dz) {
        float *to[3] = {ws_dact(ws, m->latent[top].z_col), dpost(m, ws, top, 0),
                        dpost(m, ws, top, 1)};
        const float *from[3] = {tt->tcvae_dz, tt->tcvae_dmu, tt->tcvae_dlv};
        for (int k = 0; k < 3; k++)
            for (int64_t j = 0; j < B * m->latent_dims[top]; j++)
                to[k][j] += from[k][j];
    }
}

/* Multiplies row r of every activation gradient by row_weight[r]: every
 * gradient so far is a sum of per-row terms (IWAE's draw weights). */
static void weight_gradient_rows(const hvae_model *m, const hvae_workspace *ws,
                                 int64_t B, const float *row_weight)
{
    int32_t T = m->config.n_layers;
    for (int32_t e = 0; e < 2 * T; e++) {
        const hvae_block *blk = e < T ? &m->enc[e] : &m->dec[e - T];
        for (int32_t l = 0; l < blk->n_hidden + blk->n_heads; l++) {
            const hvae_dense_layer *L = &blk->layer[l];
            float *g = ws_dact(ws, L->col);
            for (int64_t r = 0; r < B; r++)
                for (int64_t j = 0; j < L->n_out; j++)
                    g[r * L->n_out + j] *= row_weight[r];
        }
    }
    for (int32_t i = 0; i < T; i++) {
        int ladder = merged(m, i);
        float *mats[3] = {ws_dact(ws, m->latent[i].z_col),
                          ladder ? ws_dact(ws, m->latent[i].q_col[0]) : NULL,
                          ladder ? ws_dact(ws, m->latent[i].q_col[1]) : NULL};
        for (int k = 0; k < 3; k++)
            for (int64_t r = 0; mats[k] && r < B; r++)
                for (int64_t j = 0; j < m->latent_dims[i]; j++)
                    mats[k][r * m->latent_dims[i] + j] *= row_weight[r];
    }
}

/* Markov: the decoders only need the gradients of their heads, so they run
 * first; then the encoders top-down, each completing dz of the layer below
 * before its reparameterisation (dmu += dz, dlv += dz eps exp(lv/2) / 2) is
 * differentiated. */
static void markov_backward(hvae_model *m, const hvae_workspace *ws, const float *x,
                            const float *cond, const float *const *eps, int64_t B)
{
    int32_t T = m->config.n_layers;
    for (int32_t i = 0; i < T; i++)
        hvae_block_backward(m, ws, &m->dec[i], ws_act(ws, m->latent[i].z_col), cond,
                            ws_dact(ws, m->latent[i].z_col), B);
    for (int32_t i = T - 1; i >= 0; i--) {
        latent_sample_backward(m, ws, i, eps[i], B);
        hvae_block_backward(m, ws, &m->enc[i], i == 0 ? x : enc_input(m, ws, i, 0), cond,
                            i == 0 ? NULL : enc_input(m, ws, i, 1), B);
    }
}

/* Ladder: bottom-up through the top-down pass. z_i feeds decoder block i
 * only; its posterior came from merging encoder i's heads with decoder
 * i+1's (precision weighting), whose input is z_{i+1}. Then the
 * deterministic encoder pass top-down, each block passing its input
 * gradient to the mean head of the block below. */
static void ladder_backward(hvae_model *m, const hvae_workspace *ws, const float *x,
                            const float *cond, const float *const *eps, int64_t B)
{
    int32_t T = m->config.n_layers;
    hvae_block_backward(m, ws, &m->dec[0], ws_act(ws, m->latent[0].z_col), cond,
                        ws_dact(ws, m->latent[0].z_col), B);
    for (int32_t i = 0; i < T - 1; i++) {
        int64_t count = B * m->latent_dims[i];
        latent_sample_backward(m, ws, i, eps[i], B);
        hvae_precision_merge_backward(block_dhead(ws, &m->enc[i], 0),
                                      block_dhead(ws, &m->enc[i], 1),
                                      dprior(m, ws, i, 0), dprior(m, ws, i, 1),
                                      dpost(m, ws, i, 0), dpost(m, ws, i, 1),
                                      block_head(ws, &m->enc[i], 0),
                                      block_head(ws, &m->enc[i], 1),
                                      prior(m, ws, i, 0), prior(m, ws, i, 1), count);
        hvae_block_backward(m, ws, &m->dec[i + 1], ws_act(ws, m->latent[i + 1].z_col), cond,
                            ws_dact(ws, m->latent[i + 1].z_col), B);
    }
    latent_sample_backward(m, ws, T - 1, eps[T - 1], B);
    for (int32_t i = T - 1; i >= 0; i--)
        hvae_block_backward(m, ws, &m->enc[i], i == 0 ? x : enc_input(m, ws, i, 0), cond,
                            i == 0 ? NULL : enc_input(m, ws, i, 1), B);
}

void hvae_backward(hvae_model *m, const hvae_workspace *ws, const float *x,
                   const float *cond, const float *const *eps, int64_t B,
                   float scale, const float *row_weight, const float *kl_weight,
                   int sampled, const hvae_top_terms *top_terms)
{
    /* With per-row weights the terms are differentiated at unit scale and
     * every gradient row is weighted once, before anything mixes rows. */
    float s = row_weight ? 1.0f : scale;
    if (ws_stop(ws))
        return;
    /* It zeroes every gradient matrix's rows too: act_cols values a row. */
    likelihood_args la = {m, ws, x, 0, 0, -s};
    if (likelihood_pass(&la, backward_start_part, B, m->act_cols + m->config.n_features))
        return;
    layer_terms_backward(m, ws, B, s, kl_weight, sampled, row_weight, top_terms);
    if (row_weight && !ws_stop(ws))
        weight_gradient_rows(m, ws, B, row_weight);
    if (ws_stop(ws))
        return;
    if (m->config.inference == HVAE_INFERENCE_LADDER)
        ladder_backward(m, ws, x, cond, eps, B);
    else
        markov_backward(m, ws, x, cond, eps, B);
}

/* ---- noise --------------------------------------------------------------- */

/* A row's noise stream: FNV-1a over the row's bit patterns, mixed with the
 * seed, then splitmix64. */
static inline uint64_t row_hash_start(uint64_t seed)
{
    return 0xcbf29ce484222325ULL ^ seed;
}
static inline uint64_t row_hash_step(uint64_t h, float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (h ^ bits) * 0x100000001b3ULL;
}

void hvae_row_rng(hvae_rng *rng, const float *row, int64_t D, uint64_t seed)
{
    uint64_t h = row_hash_start(seed);
    for (int64_t j = 0; j < D; j++)
        h = row_hash_step(h, row[j]);
    hvae_rng_seed(rng, hvae_splitmix64(&h));
}

/* Draw s of every layer for data row b goes to workspace row b * S + s. */
static void row_noise(const hvae_model *m, const hvae_workspace *ws, hvae_rng *rng,
                      int64_t r)
{
    for (int32_t i = 0; i < m->config.n_layers; i++)
        m->latent[i].family->noise(ws_eps(ws, i) + r * m->latent_dims[i], rng,
                                   m->latent_dims[i]);
}

typedef struct {
    const hvae_model *m;
    const hvae_workspace *ws;
    const float *x;
    int64_t B, S;
    uint64_t noise_seed;
} noise_args;

/* Rows are hashed and drawn independently: split between the threads.
 * FNV-1a is one chain of dependent multiplies per row (about 4 cycles a
 * pixel), so four rows' chains run side by side: the same hashes, in a
 * quarter of the time. */
#define NOISE_HASH_ROWS 4
static void hashed_noise_part(void *ctx, int part, int n_parts)
{
    const noise_args *a = ctx;
    int64_t D = a->m->config.n_features, lo, hi;
    hvae_split(a->B, part, n_parts, 1, &lo, &hi);
    for (int64_t b0 = lo; b0 < hi; b0 += NOISE_HASH_ROWS) {
        int64_t rows = hi - b0 < NOISE_HASH_ROWS ? hi - b0 : NOISE_HASH_ROWS;
        hvae_rng rng[NOISE_HASH_ROWS];
        if (rows == NOISE_HASH_ROWS) {
            uint64_t h[NOISE_HASH_ROWS];
            const float *x = a->x + b0 * D;
            for (int r = 0; r < NOISE_HASH_ROWS; r++)
                h[r] = row_hash_start(a->noise_seed);
            for (int64_t j = 0; j < D; j++)
                for (int r = 0; r < NOISE_HASH_ROWS; r++)
                    h[r] = row_hash_step(h[r], x[r * D + j]);
            for (int r = 0; r < NOISE_HASH_ROWS; r++)
                hvae_rng_seed(&rng[r], hvae_splitmix64(&h[r]));
        } else {
            for (int64_t r = 0; r < rows; r++)
                hvae_row_rng(&rng[r], a->x + (b0 + r) * D, D, a->noise_seed);
        }
        for (int64_t r = 0; r < rows; r++)
            for (int64_t s = 0; s < a->S; s++)
                row_noise(a->m, a->ws, &rng[r], (b0 + r) * a->S + s);
    }
}

void hvae_hashed_noise(const hvae_model *m, const hvae_workspace *ws,
                       const float *x, int64_t B, int64_t S, uint64_t noise_seed)
{
    int64_t piece = HVAE_POLL_DRAWS / m->eps_cols + 1;
    if (B == 1 && S > piece) {
        /* One row's draws (loss_and_grad's n_samples=2**20) are one stream,
         * drawn by one thread anyway: in pieces, polling between them. */
        hvae_rng rng;
        hvae_row_rng(&rng, x, m->config.n_features, noise_seed);
        for (int64_t s0 = 0; s0 < S; s0 += piece) {
            for (int64_t s = s0; s < S && s < s0 + piece; s++)
                row_noise(m, ws, &rng, s);
            if (ws_stop(ws))
                return; /* the caller sees the stop at its next poll */
        }
        return;
    }
    noise_args a = {m, ws, x, B, S, noise_seed};
    int64_t work = B * (m->config.n_features + S * m->eps_cols);
    hvae_parallel(hashed_noise_part, &a, hvae_parts((double)work, 1 << 14));
}

/* ---- evaluation ------------------------------------------------------------ */

static hvae_status check_call(const hvae_model *m, const hvae_workspace *ws,
                              int64_t n, const float *cond)
{
    if (!m || !ws || ws->model != m || n < 0 ||
        (m->config.n_conditions > 0 && n > 0 && !cond))
        return HVAE_ERR_INVALID_ARGUMENT;
    return HVAE_OK;
}

static const float *rows_of(const float *a, int64_t r0, int64_t width)
{
    return a ? a + r0 * width : NULL;
}

/* Evaluation without a barrier per layer: every evaluation pass is row by
 * row (rowwise products, per-row noise, likelihood and KL), so the pool's
 * threads can each take a block of the chunk's rows through the whole
 * network in one parallel region, instead of meeting at the end of every
 * layer. Each part works in its own slice of the workspace, a workspace of
 * hi - lo rows laid out as usual (a B-row matrix of `cols` columns at
 * base + B * col) in the floats of rows lo..hi: the slices do not overlap,
 * and each row meets the same operations as in one pass over all rows, so
 * the results are the same bits. A prior with a workspace of its own
 * (VampPrior's pseudo-inputs) is shared by all rows: such models keep the
 * pass over all rows. The slices have no poll hook (it may need the
 * caller's thread); the callers poll between chunks.
 *
 * Parts of a chunk's rows: each row costs about one multiply-add per
 * parameter. */
static int rows_parts(const hvae_model *m, int64_t B)
{
    return hvae_parts((double)B * (double)m->n_params, 1 << 18);
}

static int rows_split(const hvae_model *m, const hvae_workspace *ws, int64_t B)
{
    /* Nor can the density ratio's term split: it runs the model's one
     * discriminator, whose MLP has one set of activation buffers. */
    return ws->prior_ws == NULL && m->config.prior != HVAE_PRIOR_DENSITY_RATIO &&
           hvae_pool_threads() > 1 && rows_parts(m, B) > 1;
}

static hvae_workspace row_slice(const hvae_workspace *ws, int64_t lo, int64_t hi)
{
    const hvae_model *m = ws->model;
    int32_t T = m->config.n_layers;
    hvae_workspace v = *ws;
    v.max_rows = hi - lo;
    v.x = ws->x + lo * m->config.n_features;
    v.cond = ws->cond + lo * (m->config.n_conditions + 1);
    v.row_weight = ws->row_weight + lo;
    v.score_weight = ws->score_weight + lo;
    v.lse_max = ws->lse_max + lo;
    v.lse_sum = ws->lse_sum + lo;
    v.row_rng = ws->row_rng + lo;
    v.eps = ws->eps + lo * m->eps_cols;
    v.acts = ws->acts + lo * m->act_cols;
    v.dacts = ws->dacts + lo * m->act_cols;
    v.reconstruction = ws->reconstruction + lo;
    v.kl = ws->kl + lo * T;
    v.tc_scratch = NULL; /* training only */
    v.gathered = NULL;
    v.mine = NULL;
    v.poll = NULL;
    v.poll_ctx = NULL;
    return v;
}

typedef struct {
    const hvae_model *m;
    const hvae_workspace *ws;
    const float *x, *cond;
    const float *const *eps; /* the caller's noise at the chunk's rows, or NULL */
    int64_t B;
    uint64_t noise_seed;
    double *elbo, *reconstruction, *kl; /* at the chunk's first row, or NULL */
} elbo_args;

/* Rows lo..hi of a chunk: noise, the forward pass, the row terms. */
static void elbo_rows(const elbo_args *a, const hvae_workspace *ws, int64_t lo, int64_t hi)
{
    const hvae_model *m = a->m;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features, C = m->config.n_conditions, B = hi - lo;
    const float *noise[HVAE_MAX_LAYERS];
    const float *xb = a->x + lo * D;
    for (int32_t i = 0; i < T; i++)
        noise[i] = a->eps ? a->eps[i] + lo * m->latent_dims[i] : ws_eps(ws, i);
    if (!a->eps)
        hvae_hashed_noise(m, ws, xb, B, 1, a->noise_seed);
    hvae_forward(m, ws, xb, rows_of(a->cond, lo, C), noise, B, 1, 0);
    for (int64_t b = 0; b < B; b++) {
        hvae_row_terms(ws, b, a->kl ? a->kl + (lo + b) * T : NULL,
                       a->elbo ? a->elbo + lo + b : NULL);
        if (a->reconstruction)
            a->reconstruction[lo + b] = ws->reconstruction[b];
    }
}

static void elbo_rows_part(void *ctx, int part, int n_parts)
{
    const elbo_args *a = ctx;
    int64_t lo, hi;
    /* Whole 12-row tiles of the products per part. */
    hvae_split(a->B, part, n_parts, 12, &lo, &hi);
    if (hi <= lo)
        return;
    hvae_workspace slice = row_slice(a->ws, lo, hi);
    elbo_rows(a, &slice, lo, hi);
}

hvae_status hvae_elbo(hvae_model *m, hvae_workspace *ws, const float *x,
                      const float *cond, int64_t n, const float *const *eps,
                      uint64_t noise_seed, double *elbo, double *reconstruction,
                      double *kl)
{
    hvae_status st = check_call(m, ws, n, cond);
    if (st != HVAE_OK)
        return st;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features, C = m->config.n_conditions;
    const float *noise[HVAE_MAX_LAYERS];
    hvae_packed_begin(m, ws, n);
    for (int64_t r0 = 0; r0 < n; r0 += ws->max_rows) {
        int64_t B = n - r0 < ws->max_rows ? n - r0 : ws->max_rows;
        if (ws_stop(ws)) {
            hvae_packed_end(ws);
            return HVAE_ERR_STOPPED;
        }
        for (int32_t i = 0; eps && i < T; i++)
            noise[i] = eps[i] + r0 * m->latent_dims[i];
        elbo_args a = {m, ws, x + r0 * D, rows_of(cond, r0, C), eps ? noise : NULL, B,
                       noise_seed, elbo ? elbo + r0 : NULL,
                       reconstruction ? reconstruction + r0 : NULL, kl ? kl + r0 * T : NULL};
        if (rows_split(m, ws, B))
            hvae_parallel(elbo_rows_part, &a, rows_parts(m, B));
        else
            elbo_rows(&a, ws, 0, B);
    }
    hvae_packed_end(ws);
    return HVAE_OK;
}

hvae_status hvae_log_likelihood(hvae_model *m, hvae_workspace *ws, const float *x,
                                const float *cond, int64_t n, int64_t n_samples,
                                uint64_t noise_seed, double *out, hvae_batch_hook hook,
                                void *hook_ctx)
{
    int64_t passes = 0;
    hvae_status st = check_call(m, ws, n, cond);
    if (st != HVAE_OK || n_samples < 1 || !out)
        return st != HVAE_OK ? st : HVAE_ERR_INVALID_ARGUMENT;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features, C = m->config.n_conditions;
    /* Pass: R data rows times S draws each; draws stream through the
     * workspace while a running log-sum-exp per row accumulates. */
    int64_t S = n_samples < ws->max_rows ? n_samples : ws->max_rows;
    int64_t R = ws->max_rows / S;
    const float *noise[HVAE_MAX_LAYERS];
    for (int32_t i = 0; i < T; i++)
        noise[i] = ws_eps(ws, i);
    for (int64_t r0 = 0; r0 < n; r0 += R) {
        int64_t rows = n - r0 < R ? n - r0 : R;
        for (int64_t b = 0; b < rows; b++) {
            hvae_row_rng(&ws->row_rng[b], x + (r0 + b) * D, D, noise_seed);
            ws->lse_max[b] = -INFINITY;
            ws->lse_sum[b] = 0.0;
        }
        for (int64_t s0 = 0; s0 < n_samples; s0 += S) {
            int64_t draws = n_samples - s0 < S ? n_samples - s0 : S;
            for (int64_t b = 0; b < rows; b++) {
                for (int64_t s = 0; s < draws; s++) {
                    int64_t r = b * draws + s;
                    memcpy(ws->x + r * D, x + (r0 + b) * D, (size_t)D * sizeof(float));
                    if (C > 0)
                        memcpy(ws->cond + r * C, cond + (r0 + b) * C,
                               (size_t)C * sizeof(float));
                    row_noise(m, ws, &ws->row_rng[b], r);
                }
            }
            hvae_forward(m, ws, ws->x, C > 0 ? ws->cond : NULL, noise, rows * draws, 0, 1);
            if (ws_stop(ws) || (hook && hook(hook_ctx, passes++, NULL)))
                return HVAE_ERR_STOPPED;
            for (int64_t b = 0; b < rows; b++) {
                for (int64_t s = 0; s < draws; s++) {
                    double log_w = hvae_row_terms(ws, b * draws + s, NULL, NULL);
                    if (log_w > ws->lse_max[b]) {
                        ws->lse_sum[b] = ws->lse_sum[b] * exp(ws->lse_max[b] - log_w) + 1.0;
                        ws->lse_max[b] = log_w;
                    } else {
                        ws->lse_sum[b] += exp(log_w - ws->lse_max[b]);
                    }
                }
            }
        }
        for (int64_t b = 0; b < rows; b++)
            out[r0 + b] = ws->lse_max[b] + log(ws->lse_sum[b]) - log((double)n_samples);
    }
    return HVAE_OK;
}

typedef struct {
    const hvae_model *m;
    const hvae_workspace *ws;
    const float *x, *cond; /* at the chunk's first row */
    int64_t B;
    float *const *mu, *const *logvar; /* the caller's, or NULL */
    int64_t r0;                       /* the chunk's first row in them */
} encode_args;

/* Rows lo..hi of a chunk, in ws (the chunk's workspace or a slice of it). */
static void encode_rows(const encode_args *a, const hvae_workspace *ws, int64_t lo, int64_t hi)
{
    const hvae_model *m = a->m;
    int32_t T = m->config.n_layers;
    int ladder = m->config.inference == HVAE_INFERENCE_LADDER;
    int64_t B = hi - lo;
    const float *cb = rows_of(a->cond, lo, m->config.n_conditions);
    const float *inp = a->x + lo * m->config.n_features;
    for (int32_t i = 0; i < T; i++) {
        hvae_block_forward(m, ws, &m->enc[i], inp, cb, B, 1);
        inp = block_head(ws, &m->enc[i], 0);
        if (m->latent[i].family->n_heads == 1) {
            /* A categorical layer passes up its class probabilities. */
            hvae_latent_call c = latent_call(m, NULL, i, B);
            float *probs = ws_act(ws, m->latent[i].z_col);
            m->latent[i].family->summary(probs, NULL, inp, NULL, &c);
            inp = probs;
        }
    }
    if (ladder) {
        /* Top-down at the means: z_T = mu_hat_T, then each layer's
         * merged posterior with the prior at the mean above. */
        float *z_top = ws_act(ws, m->latent[T - 1].z_col);
        memcpy(z_top, post(m, ws, T - 1, 0),
               (size_t)(B * m->latent_dims[T - 1]) * sizeof(float));
        for (int32_t i = T - 1; i >= 1; i--) {
            int64_t count = B * m->latent_dims[i - 1];
            hvae_block_forward(m, ws, &m->dec[i], ws_act(ws, m->latent[i].z_col), cb, B, 1);
            hvae_precision_merge_forward(post(m, ws, i - 1, 0), post(m, ws, i - 1, 1),
                                         block_head(ws, &m->enc[i - 1], 0),
                                         block_head(ws, &m->enc[i - 1], 1),
                                         prior(m, ws, i - 1, 0),
                                         prior(m, ws, i - 1, 1), count);
            memcpy(ws_act(ws, m->latent[i - 1].z_col), post(m, ws, i - 1, 0),
                   (size_t)count * sizeof(float));
        }
    }
    for (int32_t i = 0; i < T; i++) {
        int64_t d = m->latent_dims[i], row = a->r0 + lo;
        hvae_latent_call c = latent_call(m, NULL, i, B);
        m->latent[i].family->summary(a->mu && a->mu[i] ? a->mu[i] + row * d : NULL,
                                     a->logvar && a->logvar[i] ? a->logvar[i] + row * d : NULL,
                                     post(m, ws, i, 0), post(m, ws, i, 1), &c);
    }
}

static void encode_rows_part(void *ctx, int part, int n_parts)
{
    const encode_args *a = ctx;
    int64_t lo, hi;
    hvae_split(a->B, part, n_parts, 12, &lo, &hi);
    if (hi <= lo)
        return;
    hvae_workspace slice = row_slice(a->ws, lo, hi);
    encode_rows(a, &slice, lo, hi);
}

/* split: the pool's threads may each take rows in a slice of ws; without,
 * the chunk's posteriors stay in ws's own layout (hvae_responsibilities
 * reads them there). */
static hvae_status encode(hvae_model *m, hvae_workspace *ws, const float *x,
                          const float *cond, int64_t n, float *const *mu,
                          float *const *logvar, int split)
{
    hvae_status st = check_call(m, ws, n, cond);
    if (st != HVAE_OK)
        return st;
    hvae_packed_begin(m, ws, n);
    for (int64_t r0 = 0; r0 < n; r0 += ws->max_rows) {
        int64_t B = n - r0 < ws->max_rows ? n - r0 : ws->max_rows;
        if (ws_stop(ws)) {
            hvae_packed_end(ws);
            return HVAE_ERR_STOPPED;
        }
        encode_args a = {m, ws, x + r0 * m->config.n_features,
                         rows_of(cond, r0, m->config.n_conditions), B, mu, logvar, r0};
        if (split && rows_split(m, ws, B))
            hvae_parallel(encode_rows_part, &a, rows_parts(m, B));
        else
            encode_rows(&a, ws, 0, B);
    }
    hvae_packed_end(ws);
    return HVAE_OK;
}

hvae_status hvae_encode(hvae_model *m, hvae_workspace *ws, const float *x,
                        const float *cond, int64_t n, float *const *mu,
                        float *const *logvar)
{
    return encode(m, ws, x, cond, n, mu, logvar, 1);
}

/* Mean (and log-variance) of p(x | z_1) for the B rows in dec[0]'s heads. */
static void observation_params(const hvae_model *m, const hvae_workspace *ws,
                               int64_t B, float *x_mean, float *x_logvar)
{
    const hvae_block *dec1 = &m->dec[0];
    int64_t n = B * m->config.n_features;
    const float *head = block_head(ws, dec1, 0);
    if (m->config.likelihood == HVAE_LIKELIHOOD_BERNOULLI) {
        for (int64_t k = 0; k < n; k++)
            x_mean[k] = hvae_sigmoidf(head[k]);
    } else {
        memcpy(x_mean, head, (size_t)n * sizeof(float));
    }
    if (x_logvar) {
        const float *lv = block_head(ws, dec1, 1);
        for (int64_t k = 0; k < n; k++)
            x_logvar[k] = lv ? lv[k] : 0.0f;
    }
}

hvae_status hvae_decode(hvae_model *m, hvae_workspace *ws, const float *z1,
                        const float *cond, int64_t n, float *x_mean,
                        float *x_logvar)
{
    hvae_status st = check_call(m, ws, n, cond);
    if (st != HVAE_OK)
        return st;
    int64_t D = m->config.n_features;
    for (int64_t r0 = 0; r0 < n; r0 += ws->max_rows) {
        int64_t B = n - r0 < ws->max_rows ? n - r0 : ws->max_rows;
        if (ws_stop(ws))
            return HVAE_ERR_STOPPED;
        hvae_block_forward(m, ws, &m->dec[0], z1 + r0 * m->latent_dims[0],
                           rows_of(cond, r0, m->config.n_conditions), B, 1);
        observation_params(m, ws, B, x_mean + r0 * D,
                           x_logvar ? x_logvar + r0 * D : NULL);
    }
    return HVAE_OK;
}

/* Ancestral sampling from z_T: drawn from the prior, or z_top's rows. */
static hvae_status sample_rows(hvae_model *m, hvae_workspace *ws, hvae_rng *rng,
                               int64_t n, const float *z_top, const float *cond,
                               int observation_noise, float *x)
{
    hvae_status st = check_call(m, ws, n, cond);
    if (st != HVAE_OK || !rng)
        return st != HVAE_OK ? st : HVAE_ERR_INVALID_ARGUMENT;
    int32_t T = m->config.n_layers;
    int64_t D = m->config.n_features, d_top = m->latent_dims[T - 1];
    for (int64_t r0 = 0; r0 < n; r0 += ws->max_rows) {
        int64_t B = n - r0 < ws->max_rows ? n - r0 : ws->max_rows;
        if (ws_stop(ws))
            return HVAE_ERR_STOPPED;
        const float *cb = rows_of(cond, r0, m->config.n_conditions);
        float *z = ws_act(ws, m->latent[T - 1].z_col);
        hvae_latent_call c = latent_call(m, NULL, T - 1, B);
        if (z_top) {
            memcpy(z, z_top + r0 * d_top, (size_t)(B * d_top) * sizeof(float));
        } else if (m->latent[T - 1].family->top_prior_table) {
            hvae_prior_args top = top_prior_args(m, ws, NULL, B, 0, NULL);
            m->prior->sample(z, &top, rng);
        } else {
            m->latent[T - 1].family->prior_sample(z, NULL, NULL, rng, &c);
        }
        for (int32_t i = T - 1; i >= 1; i--) {
            const hvae_block *dec = &m->dec[i];
            hvae_block_forward(m, ws, dec, ws_act(ws, m->latent[i].z_col), cb, B, 1);
            c = latent_call(m, NULL, i - 1, B);
            m->latent[i - 1].family->prior_sample(ws_act(ws, m->latent[i - 1].z_col),
                                                  block_head(ws, dec, 0),
                                                  block_head(ws, dec, 1), rng, &c);
        }
        hvae_block_forward(m, ws, &m->dec[0], ws_act(ws, m->latent[0].z_col), cb, B, 1);
        float *xb = x + r0 * D;
        if (!observation_noise) {
            observation_params(m, ws, B, xb, NULL);
        } else if (m->config.likelihood == HVAE_LIKELIHOOD_BERNOULLI) {
            observation_params(m, ws, B, xb, NULL);
            for (int64_t k = 0; k < B * D; k++)
                xb[k] = hvae_rng_uniform_float(rng) < xb[k] ? 1.0f : 0.0f;
        } else {
            const hvae_block *dec1 = &m->dec[0];
            const float *mu = block_head(ws, dec1, 0), *lv = block_head(ws, dec1, 1);
            hvae_rng_normal(rng, xb, B * D);
            for (int64_t k = 0; k < B * D; k++)
                xb[k] = mu[k] + (lv ? hvae_expf(0.5f * lv[k]) : 1.0f) * xb[k];
        }
    }
    return HVAE_OK;
}

hvae_status hvae_sample(hvae_model *m, hvae_workspace *ws, hvae_rng *rng,
                        int64_t n, const float *cond, int observation_noise,
                        float *x)
{
    return sample_rows(m, ws, rng, n, NULL, cond, observation_noise, x);
}

hvae_status hvae_sample_top(hvae_model *m, hvae_workspace *ws, hvae_rng *rng,
                            int64_t n, const float *z_top, const float *cond,
                            int observation_noise, float *x)
{
    if (!z_top)
        return HVAE_ERR_INVALID_ARGUMENT;
    return sample_rows(m, ws, rng, n, z_top, cond, observation_noise, x);
}

hvae_status hvae_responsibilities(hvae_model *m, hvae_workspace *ws, const float *x,
                                  const float *cond, int64_t n, double *gamma)
{
    hvae_status st = check_call(m, ws, n, cond);
    if (st != HVAE_OK || !gamma || !m->prior->responsibilities)
        return st != HVAE_OK ? st : HVAE_ERR_INVALID_ARGUMENT;
    int32_t top = m->config.n_layers - 1;
    int64_t K = hvae_model_n_components(m);
    for (int64_t r0 = 0; r0 < n; r0 += ws->max_rows) {
        int64_t B = n - r0 < ws->max_rows ? n - r0 : ws->max_rows;
        /* The top layer's posterior mean stays in the workspace. */
        st = encode(m, ws, x + r0 * m->config.n_features,
                    rows_of(cond, r0, m->config.n_conditions), B, NULL, NULL, 0);
        if (st != HVAE_OK)
            return st;
        hvae_prior_args a = top_prior_args(m, ws, NULL, B, 0, NULL);
        a.z = post(m, ws, top, 0);
        m->prior->responsibilities(gamma + r0 * K, &a);
    }
    return HVAE_OK;
}

/* Rows per call of the prior's log_density: the VampPrior's pass over its
 * pseudo-inputs runs once per chunk, and the caller's poll between them. */
#define PRIOR_DENSITY_ROWS 65536

hvae_status hvae_prior_log_density(hvae_model *m, hvae_workspace *ws, const float *z,
                                   int64_t n, double *out)
{
    /* The prior takes no condition: check_call's would refuse a conditional
     * model's NULL one. */
    int32_t top = m ? m->config.n_layers - 1 : 0;
    if (!m || !ws || ws->model != m || n < 0 || (n > 0 && (!z || !out)) ||
        !m->latent[top].family->top_prior_table || !m->prior->log_density)
        return HVAE_ERR_INVALID_ARGUMENT;
    int64_t d = m->latent_dims[top];
    for (int64_t r0 = 0; r0 < n; r0 += PRIOR_DENSITY_ROWS) {
        if (ws_stop(ws))
            return HVAE_ERR_STOPPED;
        int64_t B = n - r0 < PRIOR_DENSITY_ROWS ? n - r0 : PRIOR_DENSITY_ROWS;
        hvae_prior_args a = top_prior_args(m, NULL, NULL, B, 0, NULL);
        a.ws = ws;
        a.z = z + r0 * d;
        m->prior->log_density(out + r0, &a);
    }
    return HVAE_OK;
}
