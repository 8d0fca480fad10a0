/*
 * test_core.c -- C-only tests of hvae's core through its public header,
 * without Python. Built with the plain-C GEMM (-DHVAE_NO_BLAS) so that it
 * runs cleanly under valgrind (tools/valgrind.sh) and under AddressSanitizer
 * and UndefinedBehaviorSanitizer (tools/sanitize.sh):
 *
 *   cc -std=c11 -O1 -g -DHVAE_NO_BLAS -Icsrc tests/c/test_core.c \
 *      <every csrc .c file but hvaemodule.c> -lm -o test_core && ./test_core
 *
 * Covers every constructor and its destructor, every status a caller can
 * provoke (invalid configurations, impossible sizes, bad data, a batch
 * larger than the workspace, a stopping hook, a diverging step), and checks
 * results: finite outputs, a loss that decreases, bit-identical reruns,
 * chunking invariance, a gradient against finite differences, the thread
 * pool (regions, nesting, many resizes, parts claimed by whichever thread
 * is free, late workers) and equal results on one and several threads. The last line
 * is "N passed, M failed"; the exit status is 1 when a check failed.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep, for the thread pool's tests */
#include "hvae.h"
#include "internal.h" /* the thread pool's entry points, for test_pool */
#include "fastmath.h" /* hvae_softplusf, the scalar reference of the likelihood */

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int n_passed, n_failed;
static const char *current_test = "";

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (cond) {                                                          \
            n_passed++;                                                      \
        } else {                                                             \
            n_failed++;                                                      \
            printf("FAIL %s (%s:%d): %s\n", current_test, __FILE__,          \
                   __LINE__, #cond);                                         \
        }                                                                    \
    } while (0)

#define CHECK_STATUS(call, expected)                                         \
    do {                                                                     \
        hvae_status st_ = (call);                                            \
        if (st_ == (expected)) {                                             \
            n_passed++;                                                      \
        } else {                                                             \
            n_failed++;                                                      \
            printf("FAIL %s (%s:%d): %s returned %d (%s), expected %s\n",    \
                   current_test, __FILE__, __LINE__, #call, (int)st_,        \
                   hvae_status_to_string(st_), #expected);                   \
        }                                                                    \
    } while (0)

static int all_finite_f(const float *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return 0;
    return 1;
}

static int all_finite_d(const double *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return 0;
    return 1;
}

/* Synthetic data in [0, 1]: two prototypes with noise, so there is
 * structure to learn. */
static float *make_data(int64_t n, int64_t D, uint64_t seed)
{
    float *x = malloc((size_t)(n * D) * sizeof(float));
    hvae_rng rng;
    hvae_rng_seed(&rng, seed);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < D; j++) {
            float base = ((i % 2) ? (j < D / 2) : (j >= D / 2)) ? 0.9f : 0.1f;
            float u = (float)(hvae_rng_next(&rng) >> 40) * 0x1.0p-24f;
            x[i * D + j] = base * 0.8f + 0.2f * u;
        }
    return x;
}

typedef struct {
    hvae_model *model;
    hvae_workspace *ws;
} fixture;

static hvae_status make_model(fixture *f, int64_t D, int32_t T,
                              const int64_t *latent, int32_t H,
                              const int64_t *hidden, hvae_likelihood lik,
                              hvae_activation act, int64_t max_rows,
                              uint64_t seed)
{
    hvae_config cfg = hvae_config_default(D, T, latent, H, hidden);
    cfg.likelihood = lik;
    cfg.activation = act;
    f->model = NULL;
    f->ws = NULL;
    hvae_status st = hvae_model_create(&cfg, &f->model);
    if (st != HVAE_OK)
        return st;
    hvae_model_init(f->model, seed);
    st = hvae_workspace_create(f->model, max_rows, &f->ws);
    if (st != HVAE_OK) {
        hvae_model_free(f->model);
        f->model = NULL;
    }
    return st;
}

static void free_model(fixture *f)
{
    hvae_workspace_free(f->ws);
    hvae_model_free(f->model);
    f->ws = NULL;
    f->model = NULL;
}

/* ---- tests --------------------------------------------------------------- */

static void test_status_strings(void)
{
    current_test = "status_strings";
    for (int s = HVAE_OK; s <= HVAE_ERR_BATCH_TOO_LARGE; s++) {
        const char *text = hvae_status_to_string((hvae_status)s);
        CHECK(text != NULL && strlen(text) > 0 && strcmp(text, "unknown status") != 0);
    }
    CHECK(strcmp(hvae_status_to_string((hvae_status)999), "unknown status") == 0);
    CHECK(hvae_blas_info() != NULL);
    hvae_set_num_threads(1);
    CHECK(hvae_get_num_threads() >= 1);
}

static void test_invalid_configs(void)
{
    current_test = "invalid_configs";
    int64_t latent[2] = {4, 2}, hidden[2] = {8, 8}, zero[1] = {0}, neg[1] = {-3};
    int64_t big[1] = {(int64_t)INT_MAX + 1};
    hvae_model *m = (hvae_model *)&m; /* must be reset to NULL on failure */
    hvae_config ok = hvae_config_default(5, 2, latent, 2, hidden);
    hvae_config c;

    CHECK_STATUS(hvae_model_create(NULL, &m), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_model_create(&ok, NULL), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_features = 0;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
    c = ok; c.n_features = -1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_features = (int64_t)INT_MAX + 1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_layers = 0;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_layers = HVAE_MAX_LAYERS + 1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.latent_dims = NULL;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_layers = 1; c.latent_dims = zero;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_layers = 1; c.latent_dims = big;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_hidden = 1; c.hidden_dims = neg;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_hidden = -1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.n_hidden = HVAE_MAX_HIDDEN + 1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.hidden_dims = NULL;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.likelihood = (hvae_likelihood)7;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.activation = (hvae_activation)-1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.activation = (hvae_activation)99;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.decoder_variance = (hvae_decoder_variance)5;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
    c = ok; c.prior = HVAE_PRIOR_GMM; c.n_components = 0;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.prior = HVAE_PRIOR_GMM; c.n_components = HVAE_MAX_COMPONENTS + 1;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.prior = HVAE_PRIOR_COUNT;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
    /* Full covariances: the mixture prior's only, a known kind, a top layer
     * within HVAE_MAX_FULL_COVARIANCE_DIM. */
    c = ok; c.prior_covariance = HVAE_COVARIANCE_FULL;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c = ok; c.prior = HVAE_PRIOR_GMM; c.prior_covariance = HVAE_COVARIANCE_COUNT;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    {
        int64_t wide[2] = {3, HVAE_MAX_FULL_COVARIANCE_DIM + 1};
        c = ok; c.latent_dims = wide; c.prior = HVAE_PRIOR_GMM;
        c.prior_covariance = HVAE_COVARIANCE_FULL;
        CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    }
    CHECK(m == NULL);
    CHECK(strcmp(hvae_covariance_type_name(HVAE_COVARIANCE_FULL), "full") == 0);
    CHECK(hvae_covariance_type_name(HVAE_COVARIANCE_COUNT) == NULL);

    /* Destructors accept NULL. */
    hvae_model_free(NULL);
    hvae_workspace_free(NULL);
    hvae_optimizer_free(NULL);
    CHECK(1);
}

static void test_impossible_sizes(void)
{
    current_test = "impossible_sizes";
    /* Sizes whose products overflow int64 or size_t: a status, no crash. */
    int64_t latent[1] = {INT_MAX}, hidden[HVAE_MAX_HIDDEN];
    for (int j = 0; j < HVAE_MAX_HIDDEN; j++)
        hidden[j] = INT_MAX;
    hvae_config c = hvae_config_default(INT_MAX, 1, latent, HVAE_MAX_HIDDEN, hidden);
    hvae_model *m = NULL;
    hvae_status st = hvae_model_create(&c, &m);
    CHECK(st == HVAE_ERR_SIZE_OVERFLOW || st == HVAE_ERR_OUT_OF_MEMORY);
    CHECK(m == NULL);

    /* Large but representable: 4e10 parameters (160 GB per buffer) is
     * refused by the allocator. */
    int64_t wide[2] = {200000, 200000}, small[1] = {2};
    c = hvae_config_default(4, 1, small, 2, wide);
    st = hvae_model_create(&c, &m);
    CHECK(st == HVAE_ERR_OUT_OF_MEMORY || st == HVAE_ERR_SIZE_OVERFLOW);
    CHECK(m == NULL);

    /* A workspace for an absurd number of rows. */
    fixture f;
    int64_t l2[1] = {2}, h2[1] = {4};
    CHECK_STATUS(make_model(&f, 3, 1, l2, 1, h2, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_RELU, 4, 0), HVAE_OK);
    hvae_workspace *ws = (hvae_workspace *)&ws;
    CHECK(hvae_workspace_bytes(f.model, 0) == 0);
    CHECK(hvae_workspace_bytes(f.model, -5) == 0);
    CHECK(hvae_workspace_bytes(f.model, INT64_MAX) == 0);
    CHECK(hvae_workspace_bytes(f.model, 10) > 0);
    CHECK_STATUS(hvae_workspace_create(f.model, 0, &ws), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_workspace_create(NULL, 4, &ws), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_workspace_create(f.model, 4, NULL), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_workspace_create(f.model, INT64_MAX, &ws), HVAE_ERR_SIZE_OVERFLOW);
    CHECK(ws == NULL);
    free_model(&f);
}

/* The workspace's poll hook: a nonzero return stops every long call with
 * HVAE_ERR_STOPPED (sticky, as hvae.h asks), training applies no step after
 * it, and without it (NULL) the same calls succeed. */
static int polls_left;
static int poll_countdown(void *ctx)
{
    (void)ctx;
    if (polls_left > 0)
        polls_left--;
    return polls_left == 0;
}

static void test_poll_stops_long_calls(void)
{
    fixture f;
    int64_t latent[2] = {3, 2}, hidden[1] = {8};
    enum { N = 40, D = 5 };
    CHECK_STATUS(make_model(&f, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_TANH, 16, 1), HVAE_OK);
    float x[N * D], mu0[N * 3], lv0[N * 3], mu1[N * 2], lv1[N * 2], xm[N * D];
    for (int i = 0; i < N * D; i++)
        x[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
    double elbo[N];
    float *mu[2] = {mu0, mu1}, *lv[2] = {lv0, lv1};
    hvae_objective_options o = hvae_objective_options_default();
    hvae_epoch_stats stats;
    for (int after = 1; after <= 3; after++) {
        hvae_workspace_set_poll(f.ws, poll_countdown, NULL);
        polls_left = after;
        CHECK_STATUS(hvae_elbo(f.model, f.ws, x, NULL, N, NULL, 0, elbo, NULL, NULL),
                     HVAE_ERR_STOPPED);
        polls_left = after;
        CHECK_STATUS(hvae_loss_and_grad(f.model, f.ws, x, NULL, N, NULL, 0, &o, &stats),
                     HVAE_ERR_STOPPED);
        polls_left = after;
        CHECK_STATUS(hvae_encode(f.model, f.ws, x, NULL, N, mu, lv), HVAE_ERR_STOPPED);
        polls_left = after;
        CHECK_STATUS(hvae_decode(f.model, f.ws, mu0, NULL, N, xm, NULL), HVAE_ERR_STOPPED);
    }
    /* Training: a poll that stops applies no step; the parameters stay. */
    int64_t P = hvae_model_n_params(f.model);
    float *before = malloc((size_t)P * sizeof(float));
    memcpy(before, hvae_model_params(f.model), (size_t)P * sizeof(float));
    hvae_optimizer *opt = NULL;
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_OK);
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 16;
    to.shuffle = 0;
    hvae_rng rng;
    hvae_rng_seed(&rng, 3);
    polls_left = 2;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, N, NULL, &to, &stats),
                 HVAE_ERR_STOPPED);
    CHECK(stats.n_batches == 0);
    CHECK(memcmp(before, hvae_model_params(f.model), (size_t)P * sizeof(float)) == 0);
    /* Without the hook every call runs. */
    hvae_workspace_set_poll(f.ws, NULL, NULL);
    CHECK_STATUS(hvae_elbo(f.model, f.ws, x, NULL, N, NULL, 0, elbo, NULL, NULL), HVAE_OK);
    CHECK_STATUS(hvae_loss_and_grad(f.model, f.ws, x, NULL, N, NULL, 0, &o, &stats),
                 HVAE_OK);
    CHECK_STATUS(hvae_encode(f.model, f.ws, x, NULL, N, mu, lv), HVAE_OK);
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, N, NULL, &to, &stats),
                 HVAE_OK);
    CHECK(stats.n_batches == 3);
    hvae_optimizer_free(opt);
    free(before);
    free_model(&f);
}

static void test_layout_and_init(void)
{
    current_test = "layout_and_init";
    int64_t latent[2] = {3, 2}, hidden[2] = {7, 5};
    hvae_config c = hvae_config_default(6, 2, latent, 2, hidden);
    hvae_model *a = NULL, *b = NULL;
    CHECK_STATUS(hvae_model_create(&c, &a), HVAE_OK);
    CHECK_STATUS(hvae_model_create(&c, &b), HVAE_OK);
    if (!a || !b) {
        hvae_model_free(a);
        hvae_model_free(b);
        return;
    }
    /* The config was copied: changing the caller's arrays changes nothing. */
    latent[0] = 99;
    CHECK(hvae_model_config(a)->latent_dims[0] == 3);

    int64_t P = hvae_model_n_params(a), next = 0;
    int32_t nt = hvae_model_n_tensors(a);
    CHECK(P > 0 && nt > 0);
    int tiled = 1;
    for (int32_t t = 0; t < nt; t++) {
        hvae_tensor_info info;
        if (hvae_model_tensor(a, t, &info) != HVAE_OK || info.offset != next ||
            info.name[0] == '\0') {
            tiled = 0;
            break;
        }
        next += info.cols > 0 ? info.rows * info.cols : info.rows;
    }
    CHECK(tiled && next == P);
    hvae_tensor_info info;
    CHECK_STATUS(hvae_model_tensor(a, nt, &info), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_model_tensor(a, -1, &info), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_model_tensor(a, 0, NULL), HVAE_ERR_INVALID_ARGUMENT);

    /* Same seed, same parameters; another seed, others; all within the
     * PyTorch bound 1/sqrt(fan_in) <= 1. */
    hvae_model_init(a, 123);
    hvae_model_init(b, 123);
    CHECK(memcmp(hvae_model_params(a), hvae_model_params(b), (size_t)P * sizeof(float)) == 0);
    hvae_model_init(b, 124);
    CHECK(memcmp(hvae_model_params(a), hvae_model_params(b), (size_t)P * sizeof(float)) != 0);
    int bounded = 1;
    for (int64_t i = 0; i < P; i++)
        if (!(fabsf(hvae_model_params(a)[i]) <= 1.0f))
            bounded = 0;
    CHECK(bounded);
    hvae_model_free(a);
    hvae_model_free(b);
}

static void test_check_data(void)
{
    current_test = "check_data";
    fixture g, bern;
    int64_t latent[1] = {2}, hidden[1] = {4};
    CHECK_STATUS(make_model(&g, 3, 1, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_TANH, 4, 1), HVAE_OK);
    CHECK_STATUS(make_model(&bern, 3, 1, latent, 1, hidden, HVAE_LIKELIHOOD_BERNOULLI,
                            HVAE_ACT_TANH, 4, 1), HVAE_OK);
    float x[6] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
    int64_t bad = -1;
    CHECK_STATUS(hvae_model_check_data(g.model, x, 2, &bad), HVAE_OK);
    CHECK_STATUS(hvae_model_check_data(bern.model, x, 2, &bad), HVAE_OK);
    CHECK_STATUS(hvae_model_check_data(g.model, x, 0, &bad), HVAE_OK);
    x[4] = NAN;
    CHECK_STATUS(hvae_model_check_data(g.model, x, 2, &bad), HVAE_ERR_NONFINITE_INPUT);
    CHECK(bad == 4);
    x[4] = -INFINITY;
    CHECK_STATUS(hvae_model_check_data(bern.model, x, 2, NULL), HVAE_ERR_NONFINITE_INPUT);
    x[4] = 0.5f;
    x[2] = 1.5f;
    CHECK_STATUS(hvae_model_check_data(g.model, x, 2, &bad), HVAE_OK);
    CHECK_STATUS(hvae_model_check_data(bern.model, x, 2, &bad), HVAE_ERR_INPUT_RANGE);
    CHECK(bad == 2);
    free_model(&g);
    free_model(&bern);
}

static void test_evaluation(void)
{
    current_test = "evaluation";
    const int64_t n = 11, D = 6;
    int64_t latent[2] = {3, 2}, hidden[1] = {8};
    fixture whole, chunked;
    CHECK_STATUS(make_model(&whole, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_ELU, n, 7), HVAE_OK);
    /* A 3-row workspace: every call runs in chunks, with a ragged last one. */
    CHECK_STATUS(make_model(&chunked, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_ELU, 3, 7), HVAE_OK);
    float *x = make_data(n, D, 3);
    double elbo[11], elbo2[11], rec[11], kl[22];
    CHECK_STATUS(hvae_elbo(whole.model, whole.ws, x, NULL, n, NULL, 5, elbo, rec, kl), HVAE_OK);
    CHECK(all_finite_d(elbo, n) && all_finite_d(rec, n) && all_finite_d(kl, 2 * n));
    int sums = 1;
    for (int64_t i = 0; i < n; i++)
        if (fabs(elbo[i] - (rec[i] - kl[2 * i] - kl[2 * i + 1])) > 1e-9 * (1 + fabs(elbo[i])))
            sums = 0;
    CHECK(sums);
    /* Rows are evaluated independently: chunking changes no bit. */
    CHECK_STATUS(hvae_elbo(chunked.model, chunked.ws, x, NULL, n, NULL, 5, elbo2, NULL, NULL),
                 HVAE_OK);
    CHECK(memcmp(elbo, elbo2, sizeof elbo) == 0);
    /* ... and the same noise seed gives the same value; another seed not. */
    CHECK_STATUS(hvae_elbo(whole.model, whole.ws, x, NULL, n, NULL, 6, elbo2, NULL, NULL), HVAE_OK);
    CHECK(memcmp(elbo, elbo2, sizeof elbo) != 0);
    /* Zero rows is a no-op; a workspace of another model is refused. */
    CHECK_STATUS(hvae_elbo(whole.model, whole.ws, x, NULL, 0, NULL, 5, elbo2, NULL, NULL), HVAE_OK);
    CHECK_STATUS(hvae_elbo(whole.model, chunked.ws, x, NULL, n, NULL, 5, elbo2, NULL, NULL),
                 HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_elbo(whole.model, whole.ws, x, NULL, -1, NULL, 5, elbo2, NULL, NULL),
                 HVAE_ERR_INVALID_ARGUMENT);

    /* Caller-provided noise: zeros give the same ELBO twice. */
    float *eps0 = calloc((size_t)(n * 3), sizeof(float)), *eps1 = calloc((size_t)(n * 2), sizeof(float));
    const float *eps[2] = {eps0, eps1};
    CHECK_STATUS(hvae_elbo(whole.model, whole.ws, x, NULL, n, eps, 0, elbo, NULL, NULL), HVAE_OK);
    CHECK_STATUS(hvae_elbo(chunked.model, chunked.ws, x, NULL, n, eps, 0, elbo2, NULL, NULL), HVAE_OK);
    CHECK(all_finite_d(elbo, n) && memcmp(elbo, elbo2, sizeof elbo) == 0);

    /* encode: finite, chunking-invariant; log-variances clipped. */
    float mu_a[2][33], lv_a[2][33], mu_b[2][33], lv_b[2][33];
    float *mu_pa[2] = {mu_a[0], mu_a[1]}, *lv_pa[2] = {lv_a[0], lv_a[1]};
    float *mu_pb[2] = {mu_b[0], mu_b[1]}, *lv_pb[2] = {lv_b[0], lv_b[1]};
    CHECK_STATUS(hvae_encode(whole.model, whole.ws, x, NULL, n, mu_pa, lv_pa), HVAE_OK);
    CHECK_STATUS(hvae_encode(chunked.model, chunked.ws, x, NULL, n, mu_pb, lv_pb), HVAE_OK);
    CHECK(all_finite_f(mu_a[0], n * 3) && all_finite_f(lv_a[1], n * 2));
    CHECK(memcmp(mu_a[0], mu_b[0], (size_t)(n * 3) * sizeof(float)) == 0);
    CHECK(memcmp(lv_a[1], lv_b[1], (size_t)(n * 2) * sizeof(float)) == 0);
    CHECK_STATUS(hvae_encode(whole.model, whole.ws, x, NULL, n, NULL, NULL), HVAE_OK);

    /* decode: shapes (n, D), finite, log-variance within the clip. */
    float xm[66], xl[66];
    CHECK_STATUS(hvae_decode(chunked.model, chunked.ws, mu_a[0], NULL, n, xm, xl), HVAE_OK);
    CHECK(all_finite_f(xm, n * D));
    int clipped = 1;
    for (int64_t k = 0; k < n * D; k++)
        if (!(fabsf(xl[k]) <= HVAE_LOGVAR_BOUND))
            clipped = 0;
    CHECK(clipped);

    /* sample: deterministic in the rng, finite, chunking-invariant. */
    float s1[66], s2[66];
    hvae_rng r1, r2;
    hvae_rng_seed(&r1, 42);
    hvae_rng_seed(&r2, 42);
    CHECK_STATUS(hvae_sample(whole.model, whole.ws, &r1, n, NULL, 0, s1), HVAE_OK);
    CHECK_STATUS(hvae_sample(whole.model, whole.ws, &r2, n, NULL, 0, s2), HVAE_OK);
    CHECK(all_finite_f(s1, n * D) && memcmp(s1, s2, sizeof s1) == 0);
    CHECK_STATUS(hvae_sample(whole.model, whole.ws, &r1, n, NULL, 1, s1), HVAE_OK);
    CHECK(all_finite_f(s1, n * D));
    CHECK_STATUS(hvae_sample(whole.model, whole.ws, NULL, n, NULL, 0, s1), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_sample(whole.model, whole.ws, &r1, 0, NULL, 0, s1), HVAE_OK);

    free(eps0);
    free(eps1);
    free(x);
    free_model(&whole);
    free_model(&chunked);
}

static void test_bernoulli_sampling(void)
{
    current_test = "bernoulli_sampling";
    const int64_t n = 9, D = 5;
    int64_t latent[1] = {2};
    fixture f;
    CHECK_STATUS(make_model(&f, D, 1, latent, 0, NULL, HVAE_LIKELIHOOD_BERNOULLI,
                            HVAE_ACT_RELU, 4, 2), HVAE_OK);
    float s[45];
    hvae_rng rng;
    hvae_rng_seed(&rng, 1);
    CHECK_STATUS(hvae_sample(f.model, f.ws, &rng, n, NULL, 0, s), HVAE_OK);
    int in_range = 1, binary = 1;
    for (int64_t k = 0; k < n * D; k++)
        if (!(s[k] >= 0.0f && s[k] <= 1.0f))
            in_range = 0;
    CHECK(in_range);
    CHECK_STATUS(hvae_sample(f.model, f.ws, &rng, n, NULL, 1, s), HVAE_OK);
    for (int64_t k = 0; k < n * D; k++)
        if (s[k] != 0.0f && s[k] != 1.0f)
            binary = 0;
    CHECK(binary);
    free_model(&f);
}

/* Loss at the current parameters with fixed noise. */
static double loss_at(fixture *f, const float *x, int64_t n, const float *const *eps)
{
    hvae_epoch_stats stats;
    hvae_objective_options obj = hvae_objective_options_default();
    hvae_status st = hvae_loss_and_grad(f->model, f->ws, x, NULL, n, eps, 0, &obj, &stats);
    return st == HVAE_OK ? stats.loss : NAN;
}

static void test_gradient(void)
{
    current_test = "gradient";
    const int64_t n = 6, D = 4;
    int64_t latent[2] = {3, 2}, hidden[1] = {5};
    fixture f;
    CHECK_STATUS(make_model(&f, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_TANH, n, 11), HVAE_OK);
    float *x = make_data(n, D, 5);
    float eps0[18], eps1[12];
    hvae_rng rng;
    hvae_rng_seed(&rng, 9);
    hvae_rng_normal(&rng, eps0, 18);
    hvae_rng_normal(&rng, eps1, 12);
    const float *eps[2] = {eps0, eps1};
    int64_t P = hvae_model_n_params(f.model);
    float *p = hvae_model_params(f.model);
    double loss = loss_at(&f, x, n, eps);
    CHECK(isfinite(loss));
    float *grad = malloc((size_t)P * sizeof(float));
    memcpy(grad, hvae_model_grads(f.model), (size_t)P * sizeof(float));
    CHECK(all_finite_f(grad, P));

    /* Directional derivative along a random direction vs a central
     * difference. tanh keeps the loss smooth; float32 limits the agreement. */
    float *dir = malloc((size_t)P * sizeof(float)), *p0 = malloc((size_t)P * sizeof(float));
    hvae_rng_normal(&rng, dir, P);
    memcpy(p0, p, (size_t)P * sizeof(float));
    double analytic = 0.0;
    for (int64_t i = 0; i < P; i++)
        analytic += (double)grad[i] * dir[i];
    const float h = 1e-3f;
    for (int64_t i = 0; i < P; i++)
        p[i] = p0[i] + h * dir[i];
    double up = loss_at(&f, x, n, eps);
    for (int64_t i = 0; i < P; i++)
        p[i] = p0[i] - h * dir[i];
    double down = loss_at(&f, x, n, eps);
    memcpy(p, p0, (size_t)P * sizeof(float));
    double numeric = (up - down) / (2.0 * h);
    double rel = fabs(numeric - analytic) / (fabs(analytic) + 1e-3);
    printf("gradient: directional derivative %.6g, central difference %.6g, relative difference %.2g\n",
           analytic, numeric, rel);
    CHECK(rel < 2e-2);

    /* A zero-row call and a foreign workspace are refused. */
    hvae_epoch_stats stats;
    hvae_objective_options obj = hvae_objective_options_default();
    CHECK_STATUS(hvae_loss_and_grad(f.model, f.ws, x, NULL, 0, NULL, 0, &obj, &stats),
                 HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_loss_and_grad(f.model, NULL, x, NULL, n, NULL, 0, &obj, &stats),
                 HVAE_ERR_INVALID_ARGUMENT);
    free(grad);
    free(dir);
    free(p0);
    free(x);
    free_model(&f);
}

typedef struct {
    int64_t stop_after;
    int64_t calls;
} hook_state;

static int stopping_hook(void *ctx, int64_t batch_index, const hvae_epoch_stats *batch)
{
    hook_state *h = ctx;
    (void)batch_index;
    h->calls++;
    return isfinite(batch->loss) && h->calls >= h->stop_after;
}

/* Trains a fresh model for n_epochs with the options `to` (batch 16 when
 * NULL) on the rows shard_start .. shard_start + n - 1 of 64 data rows;
 * returns its parameters (malloc'd), the first and last epochs' ELBO and
 * the last epoch's stats. */
static float *train_rows(hvae_optimizer_kind kind, float lr, int n_epochs,
                         const hvae_train_options *to, int64_t shard_start, int64_t n,
                         double *first, double *last, hvae_epoch_stats *stats,
                         hvae_status *status)
{
    const int64_t D = 8;
    int64_t latent[2] = {4, 2}, hidden[1] = {16};
    fixture f;
    *status = make_model(&f, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_BERNOULLI,
                         HVAE_ACT_RELU, 16, 3);
    if (*status != HVAE_OK)
        return NULL;
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    oc.kind = kind;
    oc.learning_rate = lr;
    hvae_optimizer *opt = NULL;
    *status = hvae_optimizer_create(f.model, &oc, &opt);
    float *x = make_data(64, D, 1);
    int64_t order[64];
    hvae_rng rng;
    hvae_rng_seed(&rng, 77);
    hvae_train_options batch16 = hvae_train_options_default();
    batch16.batch_size = 16;
    for (int e = 0; e < n_epochs && *status == HVAE_OK; e++) {
        *status = hvae_train_epoch(f.model, f.ws, opt, &rng, x + shard_start * D, NULL, n,
                                   order, to ? to : &batch16, stats);
        if (e == 0)
            *first = stats->elbo;
        *last = stats->elbo;
    }
    int64_t P = hvae_model_n_params(f.model);
    float *params = malloc((size_t)P * sizeof(float));
    memcpy(params, hvae_model_params(f.model), (size_t)P * sizeof(float));
    hvae_optimizer_free(opt);
    free(x);
    free_model(&f);
    return params;
}

static float *train(hvae_optimizer_kind kind, float lr, int n_epochs, double *first,
                    double *last, hvae_status *status)
{
    hvae_epoch_stats stats;
    return train_rows(kind, lr, n_epochs, NULL, 0, 64, first, last, &stats, status);
}

static void test_training(void)
{
    current_test = "training";
    double first = NAN, last = NAN, first2, last2;
    hvae_status st, st2;
    float *a = train(HVAE_OPTIMIZER_ADAM, 1e-2f, 30, &first, &last, &st);
    float *b = train(HVAE_OPTIMIZER_ADAM, 1e-2f, 30, &first2, &last2, &st2);
    CHECK(st == HVAE_OK && st2 == HVAE_OK);
    printf("training: ELBO %.3f after one epoch, %.3f after 30\n", first, last);
    CHECK(isfinite(first) && isfinite(last) && last > first + 0.2);
    /* Bit-identical reruns. */
    int64_t latent[2] = {4, 2}, hidden[1] = {16};
    hvae_config c = hvae_config_default(8, 2, latent, 1, hidden);
    c.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
    hvae_model *probe = NULL;
    CHECK_STATUS(hvae_model_create(&c, &probe), HVAE_OK);
    int64_t P = probe ? hvae_model_n_params(probe) : 0;
    hvae_model_free(probe);
    CHECK(a && b && memcmp(a, b, (size_t)P * sizeof(float)) == 0);
    CHECK(a && all_finite_f(a, P));
    free(a);
    free(b);

    float *s = train(HVAE_OPTIMIZER_SGD, 0.05f, 30, &first, &last, &st);
    CHECK(st == HVAE_OK && isfinite(last) && last > first);
    free(s);
}

static void test_training_errors(void)
{
    current_test = "training_errors";
    const int64_t n = 20, D = 5;
    int64_t latent[1] = {2}, hidden[1] = {6};
    fixture f;
    CHECK_STATUS(make_model(&f, D, 1, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_RELU, 4, 0), HVAE_OK);
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    hvae_optimizer *opt = (hvae_optimizer *)&opt;
    oc.learning_rate = 0.0f;
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(opt == NULL);
    oc.learning_rate = NAN;
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_ERR_INVALID_ARGUMENT);
    oc = hvae_optimizer_config_default();
    oc.beta1 = 1.0f;
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_ERR_INVALID_ARGUMENT);
    oc = hvae_optimizer_config_default();
    oc.kind = (hvae_optimizer_kind)3;
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_optimizer_create(NULL, &oc, &opt), HVAE_ERR_INVALID_ARGUMENT);
    oc = hvae_optimizer_config_default();
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_OK);
    hvae_optimizer_config bad = oc;
    bad.weight_decay = -1.0f;
    CHECK_STATUS(hvae_optimizer_configure(opt, &bad), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(hvae_optimizer_get_config(opt)->weight_decay == 0.0f);

    float *x = make_data(n, D, 2);
    int64_t order[20];
    hvae_rng rng;
    hvae_rng_seed(&rng, 5);
    hvae_train_options to = hvae_train_options_default();
    hvae_epoch_stats stats;

    /* More rows per batch than the workspace holds. */
    to.batch_size = 5;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_ERR_BATCH_TOO_LARGE);
    to.batch_size = 0;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_ERR_INVALID_ARGUMENT);
    to.batch_size = 4;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, NULL, &to, &stats),
                 HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, 0, order, &to, &stats),
                 HVAE_ERR_INVALID_ARGUMENT);
    CHECK(*hvae_optimizer_step_count(opt) == 0);

    /* A hook that stops after two minibatches: two steps were applied. */
    hook_state hs = {2, 0};
    to.hook = stopping_hook;
    to.hook_ctx = &hs;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_ERR_STOPPED);
    CHECK(stats.n_batches == 2 && hs.calls == 2);
    CHECK(*hvae_optimizer_step_count(opt) == 2);
    CHECK(isfinite(stats.elbo));
    to.hook = NULL;

    /* Switching the optimizer kind resets its state. */
    hvae_optimizer_config sgd = oc;
    sgd.kind = HVAE_OPTIMIZER_SGD;
    CHECK_STATUS(hvae_optimizer_configure(opt, &sgd), HVAE_OK);
    CHECK(*hvae_optimizer_step_count(opt) == 0);
    CHECK(hvae_optimizer_state(opt, 1) == NULL && hvae_optimizer_state(opt, 0) != NULL);
    CHECK_STATUS(hvae_optimizer_configure(opt, &oc), HVAE_OK);

    /* Divergence: a huge step makes a later loss non-finite. That step is
     * not applied, so the parameters stay finite. */
    for (int64_t i = 0; i < n * D; i++)
        x[i] *= 1e4f;
    hvae_optimizer_config huge = oc;
    huge.learning_rate = 1e6f;
    CHECK_STATUS(hvae_optimizer_configure(opt, &huge), HVAE_OK);
    hvae_status st = HVAE_OK;
    for (int e = 0; e < 50 && st == HVAE_OK; e++)
        st = hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats);
    CHECK(st == HVAE_ERR_NONFINITE_LOSS);
    CHECK(all_finite_f(hvae_model_params(f.model), hvae_model_n_params(f.model)));

    hvae_optimizer_free(opt);
    free(x);
    free_model(&f);
}

typedef struct {
    int calls, stop_at;
    int64_t n_values[2]; /* values per call: free bits' layer means, sums */
} reduce_state;

/* One process: summing over itself leaves everything as it is. */
static int identity_reduce(void *ctx, float *grads, int64_t n_grads, double *values,
                           int64_t n_values)
{
    reduce_state *r = ctx;
    r->calls++;
    r->n_values[grads != NULL] = n_values;
    (void)n_grads;
    (void)values;
    return r->stop_at > 0 && r->calls >= r->stop_at;
}

/* One epoch of Adam (lr 1e-3, batch 16) from a fresh model, data-parallel
 * (over rows shard_start .. of n_global, reduced by identity_reduce into r)
 * or not. */
static float *train_epoch_once(int parallel, int64_t n_global, int64_t shard_start,
                               int64_t n, float free_bits, reduce_state *r,
                               hvae_status *status, hvae_epoch_stats *stats)
{
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 16;
    to.objective.free_bits = free_bits;
    if (parallel) {
        to.n_global = n_global;
        to.shard_start = shard_start;
        to.reduce = identity_reduce;
        to.reduce_ctx = r;
    }
    double first, last;
    return train_rows(HVAE_OPTIMIZER_ADAM, 1e-3f, 1, &to, shard_start, n, &first, &last,
                      stats, status);
}

static void test_data_parallel(void)
{
    current_test = "data_parallel";
    int64_t latent[2] = {4, 2}, hidden[1] = {16};
    hvae_config c = hvae_config_default(8, 2, latent, 1, hidden);
    c.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
    hvae_model *probe = NULL;
    CHECK_STATUS(hvae_model_create(&c, &probe), HVAE_OK);
    int64_t P = probe ? hvae_model_n_params(probe) : 0;
    hvae_model_free(probe);

    /* One process holding every row trains exactly as without parallelism:
     * the same rows, noise and sums, one reduction per step. */
    hvae_status st_a, st_b;
    hvae_epoch_stats sa, sb;
    reduce_state r = {0, 0, {0, 0}};
    float *a = train_epoch_once(0, 0, 0, 64, 0.0f, NULL, &st_a, &sa);
    float *b = train_epoch_once(1, 64, 0, 64, 0.0f, &r, &st_b, &sb);
    CHECK(st_a == HVAE_OK && st_b == HVAE_OK);
    CHECK(a && b && memcmp(a, b, (size_t)P * sizeof(float)) == 0);
    CHECK(sa.elbo == sb.elbo && sa.n_rows == 64 && sb.n_rows == 64 && sb.n_batches == 4);
    CHECK(r.calls == 4 && r.n_values[1] == 5 + 2 && r.n_values[0] == 0);
    free(a);
    free(b);

    /* Free bits add one reduction of the layers' KL sums per step. */
    reduce_state rf = {0, 0, {0, 0}};
    a = train_epoch_once(0, 0, 0, 64, 0.5f, NULL, &st_a, &sa);
    b = train_epoch_once(1, 64, 0, 64, 0.5f, &rf, &st_b, &sb);
    CHECK(st_a == HVAE_OK && st_b == HVAE_OK);
    CHECK(a && b && memcmp(a, b, (size_t)P * sizeof(float)) == 0);
    CHECK(rf.calls == 8 && rf.n_values[0] == 2 + 1);
    free(a);
    free(b);

    /* A process holding rows 10..29 of 64 only computes those rows; with
     * nobody to sum with, its epoch covers 20 rows in 4 steps. */
    reduce_state rs = {0, 0, {0, 0}};
    a = train_epoch_once(1, 64, 10, 20, 0.0f, &rs, &st_a, &sa);
    CHECK(st_a == HVAE_OK && sa.n_rows == 20 && sa.n_batches == 4 && rs.calls == 4);
    CHECK(a && all_finite_f(a, P));
    free(a);
    /* A process may hold no row at all. */
    reduce_state r0 = {0, 0, {0, 0}};
    a = train_epoch_once(1, 64, 5, 0, 0.0f, &r0, &st_a, &sa);
    CHECK(st_a == HVAE_OK && sa.n_rows == 0 && r0.calls == 4);
    free(a);

    /* A reduction that fails stops the epoch after the steps before it. */
    reduce_state stop = {0, 3, {0, 0}};
    a = train_epoch_once(1, 64, 0, 64, 0.0f, &stop, &st_a, &sa);
    CHECK(st_a == HVAE_ERR_STOPPED && sa.n_batches == 2 && stop.calls == 3);
    free(a);

    /* Invalid: no reduction, rows beyond n_global, a negative start. */
    reduce_state unused = {0, 0, {0, 0}};
    struct { int64_t n_global, start, n; int with_reduce; } bad[] = {
        {64, 0, 64, 0}, {64, 60, 10, 1}, {64, -1, 10, 1}, {10, 0, 64, 1}};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        const int64_t D = 8;
        fixture f;
        CHECK_STATUS(make_model(&f, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_BERNOULLI,
                                HVAE_ACT_RELU, 16, 3), HVAE_OK);
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        hvae_optimizer *opt = NULL;
        CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_OK);
        float *x = make_data(64, D, 1);
        int64_t order[64];
        hvae_rng rng;
        hvae_rng_seed(&rng, 1);
        hvae_train_options to = hvae_train_options_default();
        to.batch_size = 16;
        to.n_global = bad[k].n_global;
        to.shard_start = bad[k].start;
        to.reduce = bad[k].with_reduce ? identity_reduce : NULL;
        to.reduce_ctx = &unused;
        hvae_epoch_stats stats;
        CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, bad[k].n, order,
                                      &to, &stats), HVAE_ERR_INVALID_ARGUMENT);
        CHECK(*hvae_optimizer_step_count(opt) == 0);
        hvae_optimizer_free(opt);
        free(x);
        free_model(&f);
    }
    CHECK(unused.calls == 0);
}

static void test_optimizer_formulas(void)
{
    current_test = "optimizer_formulas";
    /* One Adam step from zero moments moves each parameter by about lr
     * against the sign of its gradient (m_hat / sqrt(v_hat) = sign(g)). */
    float p[4] = {1.0f, -1.0f, 0.5f, 0.0f}, g[4] = {0.3f, -2.0f, 1e-3f, 5.0f};
    float m[4] = {0}, v[4] = {0};
    hvae_adam_update(p, g, m, v, 4, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 1);
    CHECK(fabsf(p[0] - 0.99f) < 1e-5f && fabsf(p[1] + 0.99f) < 1e-5f);
    CHECK(fabsf(p[2] - 0.49f) < 1e-4f && fabsf(p[3] + 0.01f) < 1e-5f);
    /* SGD with momentum, PyTorch's form. */
    float q[2] = {1.0f, 2.0f}, gq[2] = {0.5f, -1.0f}, buf[2] = {0.1f, 0.2f};
    hvae_sgd_update(q, gq, buf, 2, 0.1f, 0.9f, 0.0f);
    CHECK(fabsf(buf[0] - 0.59f) < 1e-6f && fabsf(q[0] - (1.0f - 0.059f)) < 1e-6f);
    CHECK(fabsf(buf[1] + 0.82f) < 1e-6f && fabsf(q[1] - (2.0f + 0.082f)) < 1e-6f);
}

static void test_rng(void)
{
    current_test = "rng";
    hvae_rng a, b;
    hvae_rng_seed(&a, 2024);
    hvae_rng_seed(&b, 2024);
    CHECK(hvae_rng_next(&a) == hvae_rng_next(&b));
    int64_t perm[1000];
    char seen[1000] = {0};
    hvae_rng_permutation(&a, perm, 1000);
    int ok = 1;
    for (int i = 0; i < 1000; i++) {
        if (perm[i] < 0 || perm[i] >= 1000 || seen[perm[i]])
            ok = 0;
        else
            seen[perm[i]] = 1;
    }
    CHECK(ok);
    hvae_rng_permutation(&a, perm, 0);
    hvae_rng_permutation(&a, perm, 1);
    CHECK(perm[0] == 0);
    /* Normal draws: mean ~ 0, variance ~ 1 (odd n exercises the tail). */
    enum { N = 20001 };
    float *z = malloc(N * sizeof(float));
    hvae_rng_normal(&a, z, N);
    double s = 0, s2 = 0;
    for (int i = 0; i < N; i++) {
        s += z[i];
        s2 += (double)z[i] * z[i];
    }
    double mean = s / N, var = s2 / N - mean * mean;
    CHECK(all_finite_f(z, N) && fabs(mean) < 0.05 && fabs(var - 1.0) < 0.05);
    free(z);
}

static void test_kernels(void)
{
    current_test = "kernels";
    /* Dense forward against a naive loop, with a ragged shape. */
    enum { B = 3, I = 5, O = 7 };
    float inp[B * I], w[I * O], bias[O], out[B * O];
    hvae_rng rng;
    hvae_rng_seed(&rng, 8);
    hvae_rng_normal(&rng, inp, B * I);
    hvae_rng_normal(&rng, w, I * O);
    hvae_rng_normal(&rng, bias, O);
    hvae_dense_forward(out, inp, w, bias, HVAE_ACT_IDENTITY, B, I, O);
    double worst = 0;
    for (int b = 0; b < B; b++)
        for (int o = 0; o < O; o++) {
            double ref = bias[o];
            for (int i = 0; i < I; i++)
                ref += (double)inp[b * I + i] * w[i * O + o];
            worst = fmax(worst, fabs(ref - out[b * O + o]));
        }
    CHECK(worst < 1e-5);
    hvae_dense_forward(out, inp, w, bias, HVAE_ACT_RELU, B, I, O);
    int relu = 1;
    for (int k = 0; k < B * O; k++)
        if (out[k] < 0.0f)
            relu = 0;
    CHECK(relu);
    /* KL of a distribution with itself is 0; with the standard normal
     * prior, KL(N(0,1) || N(0,1)) is 0 as well. */
    float mu[4] = {0.3f, -1.0f, 0.0f, 2.0f}, lv[4] = {0.1f, -0.5f, 0.0f, 1.0f};
    float zero[4] = {0};
    double kl[2];
    hvae_gaussian_kl_forward(kl, mu, lv, mu, lv, 2, 2);
    CHECK(fabs(kl[0]) < 1e-6 && fabs(kl[1]) < 1e-6);
    hvae_gaussian_kl_forward(kl, zero, zero, NULL, NULL, 2, 2);
    CHECK(fabs(kl[0]) < 1e-6 && fabs(kl[1]) < 1e-6);
    /* Bernoulli log-likelihood at logits 0 is D log(1/2). */
    float xb[3] = {0.0f, 1.0f, 0.5f}, logits[3] = {0};
    double ll;
    hvae_bernoulli_loglik_forward(&ll, xb, logits, 1, 3);
    CHECK(fabs(ll - 3.0 * log(0.5)) < 1e-5);
}

/* The elements of an evaluation product (rowwise) that differ, bit for bit,
 * from the chain acc = fmaf(x[k], w[k][j], acc) over k in order, the
 * condition block after, then + bias (and ReLU when relu). */
static int64_t rowwise_differences(const float *out, const float *inp, const float *cond,
                                   const float *w, const float *bias, int64_t B, int64_t I,
                                   int64_t C, int64_t O, int relu)
{
    int64_t differ = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < O; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < I; k++)
                acc = fmaf(inp[b * I + k], w[k * O + j], acc);
            for (int64_t k = 0; k < C; k++)
                acc = fmaf(cond[b * C + k], w[(I + k) * O + j], acc);
            acc += bias[j];
            if (relu)
                acc = acc > 0.0f ? acc : 0.0f;
            differ += memcmp(&acc, &out[b * O + j], sizeof acc) != 0;
        }
    return differ;
}

/* The evaluation product (rowwise) is, for every element, the chain
 * acc = fmaf(x[k], w[k][j], acc) over k in order, then + bias: checked bit
 * for bit on shapes with column tails (n_out % 16 != 0, n_out < 16), row
 * tails, several k blocks (n_in > 256) and a condition block. */
static void test_rowwise_bits(void)
{
    current_test = "rowwise_bits";
    static const int64_t shapes[][4] = {/* B, n_in, n_cond, n_out */
        {13, 5, 0, 1}, {7, 9, 0, 8}, {1, 3, 0, 15}, {6, 20, 0, 16}, {11, 300, 3, 21},
        {100, 33, 2, 40}, {9, 257, 0, 47}, {4, 0, 2, 5}};
    hvae_rng rng;
    hvae_rng_seed(&rng, 11);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t B = shapes[s][0], I = shapes[s][1], C = shapes[s][2], O = shapes[s][3];
        float *inp = malloc((size_t)(B * I + 1) * sizeof(float));
        float *cond = malloc((size_t)(B * C + 1) * sizeof(float));
        float *w = malloc((size_t)((I + C) * O) * sizeof(float));
        float *bias = malloc((size_t)O * sizeof(float));
        float *out = malloc((size_t)(B * O) * sizeof(float));
        hvae_rng_normal(&rng, inp, B * I + 1);
        hvae_rng_normal(&rng, cond, B * C + 1);
        hvae_rng_normal(&rng, w, (I + C) * O);
        hvae_rng_normal(&rng, bias, O);
        hvae_dense_cond_forward(out, inp, C ? cond : NULL, w, bias, HVAE_ACT_IDENTITY, B, I,
                                C, O, 1);
        CHECK(rowwise_differences(out, inp, cond, w, bias, B, I, C, O, 0) == 0);
        free(inp);
        free(cond);
        free(w);
        free(bias);
        free(out);
    }
}

/* The row-wise kernel reading weights packed once (hvae_rowwise_pack) gives
 * the same bits as copying panels per call, and as the scalar chain of
 * fmaf over k; shapes with every kind of column tail and uneven k blocks. */
static void test_packed_kernel(void)
{
    current_test = "packed_kernel";
    static const int64_t shapes[][4] = {/* B, n_in, n_cond, n_out */
        {13, 5, 0, 1}, {7, 9, 0, 8}, {1, 3, 0, 15}, {6, 20, 0, 16}, {11, 300, 3, 21},
        {100, 33, 2, 40}, {9, 257, 0, 47}, {4, 0, 2, 5}, {30, 784, 0, 40}, {25, 513, 1, 9},
        {19, 600, 0, 33}, {14, 70, 0, 24}, {98, 50, 2, 16}};
    hvae_rng rng;
    hvae_rng_seed(&rng, 12);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t B = shapes[s][0], I = shapes[s][1], C = shapes[s][2], O = shapes[s][3];
        int64_t nw = hvae_rowwise_packed_floats(I, O), nc = hvae_rowwise_packed_floats(C, O);
        float *inp = malloc((size_t)(B * I + 1) * sizeof(float));
        float *cond = malloc((size_t)(B * C + 1) * sizeof(float));
        float *w = malloc((size_t)((I + C) * O) * sizeof(float));
        float *bias = malloc((size_t)O * sizeof(float));
        float *copied = malloc((size_t)(B * O) * sizeof(float));
        float *packed_out = malloc((size_t)(B * O) * sizeof(float));
        float *pw = aligned_alloc(64, (size_t)((nw + 16) / 16 * 64));
        float *pc = aligned_alloc(64, (size_t)((nc + 16) / 16 * 64));
        hvae_rng_normal(&rng, inp, B * I + 1);
        hvae_rng_normal(&rng, cond, B * C + 1);
        hvae_rng_normal(&rng, w, (I + C) * O);
        hvae_rng_normal(&rng, bias, O);
        /* Packed sizes: every column padded to the kernel's panel width. */
        CHECK(nw == 0 || nw == I * (O - O % 16 + (O % 16 == 0 ? 0 : O % 16 <= 8 ? 8 : 16)));
        hvae_rowwise_pack(pw, w, I, O);
        hvae_rowwise_pack(pc, w + I * O, C, O);
        hvae_dense_cond_forward(copied, inp, C ? cond : NULL, w, bias, HVAE_ACT_RELU, B, I, C,
                                O, 1);
        hvae_dense_packed_forward(packed_out, inp, C ? cond : NULL, w, nw ? pw : NULL,
                                  nc ? pc : NULL, bias, HVAE_ACT_RELU, B, I, C, O, 1);
        CHECK(memcmp(copied, packed_out, (size_t)(B * O) * sizeof(float)) == 0);
        CHECK(rowwise_differences(packed_out, inp, cond, w, bias, B, I, C, O, 1) == 0);
        free(inp), free(cond), free(w), free(bias), free(copied), free(packed_out);
        free(pw), free(pc);
    }
}

/* The evaluation calls' packed weights follow the parameters: after a
 * direct write into the parameter buffer (as through Python's views) and
 * after a training step, results equal those of a fresh workspace (which
 * has packed nothing yet); calls below the packing threshold (copying
 * panels) agree bit for bit with the rows of a large call; one and two
 * threads agree. */
static void test_packed_cache(void)
{
    current_test = "packed_cache";
    const int64_t n = 2100, D = 24, small = 37; /* packed from 2048 rows on */
    int64_t latent[2] = {5, 3}, hidden[2] = {40, 20};
    hvae_config cfg = hvae_config_default(D, 2, latent, 2, hidden);
    cfg.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
    hvae_model *m = NULL;
    hvae_workspace *ws = NULL, *fresh = NULL;
    CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_OK);
    if (!m)
        return;
    hvae_model_init(m, 4);
    CHECK_STATUS(hvae_workspace_create(m, 128, &ws), HVAE_OK);
    float *x = make_data(n, D, 9);
    double *e0 = malloc((size_t)n * sizeof(double)), *e1 = malloc((size_t)n * sizeof(double));
    double *ref = malloc((size_t)n * sizeof(double));
    float *mu = malloc((size_t)(n * 5) * sizeof(float)), *mu_ref = malloc((size_t)(n * 5) * sizeof(float));
    float *mus[2] = {mu, NULL}, *mus_ref[2] = {mu_ref, NULL};
    for (int threads = 1; threads <= 2; threads++) {
        hvae_set_num_threads(threads);
        CHECK_STATUS(hvae_elbo(m, ws, x, NULL, n, NULL, 5, e0, NULL, NULL), HVAE_OK);
        /* A small call copies panels: the same bits as the packed rows. */
        CHECK_STATUS(hvae_elbo(m, ws, x + 100 * D, NULL, small, NULL, 5, ref, NULL, NULL),
                     HVAE_OK);
        CHECK(memcmp(ref, e0 + 100, (size_t)small * sizeof(double)) == 0);
        /* A direct write into one weight of the first layer. */
        float *params = hvae_model_params(m);
        float saved = params[3];
        params[3] += 0.25f;
        CHECK_STATUS(hvae_elbo(m, ws, x, NULL, n, NULL, 5, e1, NULL, NULL), HVAE_OK);
        CHECK_STATUS(hvae_workspace_create(m, 128, &fresh), HVAE_OK);
        CHECK_STATUS(hvae_elbo(m, fresh, x, NULL, n, NULL, 5, ref, NULL, NULL), HVAE_OK);
        CHECK(memcmp(e1, ref, (size_t)n * sizeof(double)) == 0);
        CHECK(memcmp(e1, e0, (size_t)n * sizeof(double)) != 0);
        CHECK_STATUS(hvae_encode(m, ws, x, NULL, n, mus, NULL), HVAE_OK);
        CHECK_STATUS(hvae_encode(m, fresh, x, NULL, n, mus_ref, NULL), HVAE_OK);
        CHECK(memcmp(mu, mu_ref, (size_t)(n * 5) * sizeof(float)) == 0);
        hvae_workspace_free(fresh);
        fresh = NULL;
        params[3] = saved;
        /* Back to the first parameters: the first results again. */
        CHECK_STATUS(hvae_elbo(m, ws, x, NULL, n, NULL, 5, e1, NULL, NULL), HVAE_OK);
        CHECK(memcmp(e1, e0, (size_t)n * sizeof(double)) == 0);
    }
    /* A training epoch (in the same workspace) changes every weight. */
    hvae_optimizer *opt = NULL;
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    CHECK_STATUS(hvae_optimizer_create(m, &oc, &opt), HVAE_OK);
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 64;
    to.shuffle = 0; /* in order: no permutation to pass */
    hvae_rng rng;
    hvae_rng_seed(&rng, 3);
    hvae_epoch_stats stats;
    CHECK_STATUS(hvae_encode(m, ws, x, NULL, n, mus, NULL), HVAE_OK);
    CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, NULL, &to, &stats), HVAE_OK);
    CHECK_STATUS(hvae_encode(m, ws, x, NULL, n, mus, NULL), HVAE_OK);
    CHECK_STATUS(hvae_workspace_create(m, 128, &fresh), HVAE_OK);
    CHECK_STATUS(hvae_encode(m, fresh, x, NULL, n, mus_ref, NULL), HVAE_OK);
    CHECK(memcmp(mu, mu_ref, (size_t)(n * 5) * sizeof(float)) == 0);
    hvae_set_num_threads(1);
    hvae_optimizer_free(opt);
    hvae_workspace_free(fresh);
    hvae_workspace_free(ws);
    hvae_model_free(m);
    free(x), free(e0), free(e1), free(ref), free(mu), free(mu_ref);
}

/* The Bernoulli log-likelihood (vectorised four vectors at a time where
 * the CPU has AVX-512) equals the scalar formula x l - softplus(l) summed
 * as hvae_sum_chunk sums, bit for bit, over logits of every magnitude and
 * the special values (the selects at exp's overflow and underflow bounds,
 * log1p's reduction point, signed zeros, infinities, NaN). */
static void test_bernoulli_terms(void)
{
    current_test = "bernoulli_terms";
    const int64_t D = 2 * HVAE_CHUNK + 64 + 37, B = 24; /* vector blocks and scalar tails */
    static const float special[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-45f, -1e-45f,
                                    0.41421356f, -0.41421356f, 0.3466f, -0.3466f, 0.8813736f,
                                    -0.8813736f, 88.0f, 88.7f, 88.73f, 89.0f, -87.0f, -87.3f,
                                    -87.34f, -88.0f, -104.0f, 104.0f, 1e30f, -1e30f, INFINITY,
                                    -INFINITY, NAN};
    const int64_t n_special = (int64_t)(sizeof special / sizeof special[0]);
    float *x = malloc((size_t)(B * D) * sizeof(float)), *l = malloc((size_t)(B * D) * sizeof(float));
    double *ll = malloc((size_t)B * sizeof(double));
    hvae_rng rng;
    hvae_rng_seed(&rng, 21);
    hvae_rng_normal(&rng, l, B * D);
    for (int64_t i = 0; i < B * D; i++) {
        static const float scales[] = {0.01f, 1.0f, 5.0f, 30.0f, 100.0f};
        l[i] *= scales[(i / 97) % 5];
        x[i] = hvae_rng_uniform_float(&rng);
        if (i % 3 == 0)
            x[i] = x[i] > 0.5f ? 1.0f : 0.0f;
    }
    for (int64_t i = 0; i < n_special; i++)
        for (int64_t b = 0; b < B; b += 5)
            l[b * D + (i * 37 + b) % D] = special[i];
    hvae_bernoulli_loglik_forward(ll, x, l, B, D);
    int64_t differ = 0;
    float terms[HVAE_CHUNK];
    for (int64_t b = 0; b < B; b++) {
        double sum = 0.0;
        for (int64_t j0 = 0; j0 < D; j0 += HVAE_CHUNK) {
            int64_t len = D - j0 < HVAE_CHUNK ? D - j0 : HVAE_CHUNK;
            for (int64_t j = 0; j < len; j++)
                terms[j] = x[b * D + j0 + j] * l[b * D + j0 + j] -
                           hvae_softplusf(l[b * D + j0 + j]);
            sum += hvae_sum_chunk(terms, len);
        }
        differ += memcmp(&sum, &ll[b], sizeof sum) != 0;
    }
    CHECK(differ == 0);
    free(x), free(l), free(ll);
}

static void test_variants(void)
{
    current_test = "variants";
    /* Ladder inference, a conditional model, the IWAE objective and the
     * mixture prior (variants 4, 5; with full covariances 6, 7): every
     * entry point once, results finite, training runs. */
    const int64_t n = 10, D = 5, C = 2;
    int64_t latent[2] = {3, 2}, hidden[1] = {6};
    for (int variant = 0; variant < 8; variant++) {
        hvae_config cfg = hvae_config_default(D, 2, latent, 1, hidden);
        cfg.inference = variant & 1 ? HVAE_INFERENCE_LADDER : HVAE_INFERENCE_MARKOV;
        cfg.n_conditions = variant & 2 ? C : 0;
        cfg.prior = variant >= 4 ? HVAE_PRIOR_GMM : HVAE_PRIOR_NORMAL;
        cfg.n_components = 3;
        cfg.prior_covariance = variant >= 6 ? HVAE_COVARIANCE_FULL : HVAE_COVARIANCE_DIAG;
        hvae_model *m = NULL;
        hvae_workspace *ws = NULL;
        hvae_optimizer *opt = NULL;
        CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_OK);
        if (!m)
            continue;
        hvae_model_init(m, (uint64_t)variant);
        CHECK_STATUS(hvae_workspace_create(m, 8, &ws), HVAE_OK);
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        CHECK_STATUS(hvae_optimizer_create(m, &oc, &opt), HVAE_OK);
        if (!ws || !opt) {
            hvae_optimizer_free(opt);
            hvae_workspace_free(ws);
            hvae_model_free(m);
            continue;
        }
        float *x = make_data(n, D, 4);
        float *cond = NULL;
        if (cfg.n_conditions) {
            cond = malloc((size_t)(n * C) * sizeof(float));
            for (int64_t k = 0; k < n * C; k++)
                cond[k] = (float)(k % 3) - 1.0f;
        }
        double elbo[10], ll[10];
        CHECK_STATUS(hvae_elbo(m, ws, x, cond, n, NULL, 1, elbo, NULL, NULL), HVAE_OK);
        CHECK(all_finite_d(elbo, n));
        CHECK_STATUS(hvae_log_likelihood(m, ws, x, cond, n, 5, 1, ll, NULL, NULL), HVAE_OK);
        CHECK(all_finite_d(ll, n));
        CHECK_STATUS(hvae_log_likelihood(m, ws, x, cond, n, 0, 1, ll, NULL, NULL), HVAE_ERR_INVALID_ARGUMENT);
        if (cfg.n_conditions)
            CHECK_STATUS(hvae_elbo(m, ws, x, NULL, n, NULL, 1, elbo, NULL, NULL),
                         HVAE_ERR_INVALID_ARGUMENT);

        hvae_epoch_stats stats;
        hvae_objective_options obj = hvae_objective_options_default();
        obj.objective = HVAE_OBJECTIVE_IWAE;
        obj.n_samples = 3;
        CHECK_STATUS(hvae_loss_and_grad(m, ws, x, cond, n, NULL, 2, &obj, &stats), HVAE_OK);
        CHECK(isfinite(stats.loss) && all_finite_f(hvae_model_grads(m), hvae_model_n_params(m)));
        obj.n_samples = 0;
        CHECK_STATUS(hvae_loss_and_grad(m, ws, x, cond, n, NULL, 2, &obj, &stats),
                     HVAE_ERR_INVALID_ARGUMENT);

        int64_t order[10];
        hvae_rng rng;
        hvae_rng_seed(&rng, 3);
        hvae_train_options to = hvae_train_options_default();
        to.batch_size = 2;
        to.objective.objective = variant & 1 && variant >= 3 ? HVAE_OBJECTIVE_IWAE
                                                            : HVAE_OBJECTIVE_ELBO;
        if (variant >= 4)
            CHECK_STATUS(hvae_optimizer_set_lr_scale(opt, hvae_model_prior_offset(m),
                                                     hvae_model_n_params(m), 0.1f), HVAE_OK);
        to.objective.n_samples = 4;
        to.objective.free_bits = variant == 2 ? 0.5f : 0.0f;
        hvae_status st = HVAE_OK;
        for (int e = 0; e < 3 && st == HVAE_OK; e++)
            st = hvae_train_epoch(m, ws, opt, &rng, x, cond, n, order, &to, &stats);
        CHECK(st == HVAE_OK && isfinite(stats.loss) && stats.n_rows == n);
        /* batch_size * n_samples above the workspace's rows is refused. */
        to.batch_size = 3;
        CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, cond, n, order, &to, &stats),
                     HVAE_ERR_BATCH_TOO_LARGE);

        float mu0[30], mu1[20], lv0[30], lv1[20], xm[50], s[50];
        float *mu[2] = {mu0, mu1}, *lv[2] = {lv0, lv1};
        CHECK_STATUS(hvae_encode(m, ws, x, cond, n, mu, lv), HVAE_OK);
        CHECK(all_finite_f(mu0, 30) && all_finite_f(lv1, 20));
        CHECK_STATUS(hvae_decode(m, ws, mu0, cond, n, xm, NULL), HVAE_OK);
        CHECK(all_finite_f(xm, n * D));
        CHECK_STATUS(hvae_sample(m, ws, &rng, n, cond, 1, s), HVAE_OK);
        CHECK(all_finite_f(s, n * D));
        CHECK_STATUS(hvae_sample_top(m, ws, &rng, n, mu1, cond, 0, s), HVAE_OK);
        CHECK(all_finite_f(s, n * D));
        double gamma[30];
        if (variant >= 4) {
            CHECK(hvae_model_n_components(m) == 3);
            CHECK_STATUS(hvae_responsibilities(m, ws, x, cond, n, gamma), HVAE_OK);
            for (int64_t r = 0; r < n; r++)
                CHECK(fabs(gamma[3 * r] + gamma[3 * r + 1] + gamma[3 * r + 2] - 1.0) < 1e-9);
        } else {
            CHECK(hvae_model_n_components(m) == 0);
            CHECK_STATUS(hvae_responsibilities(m, ws, x, cond, n, gamma),
                         HVAE_ERR_INVALID_ARGUMENT);
        }
        free(cond);
        free(x);
        hvae_optimizer_free(opt);
        hvae_workspace_free(ws);
        hvae_model_free(m);
    }
}

static void test_categorical(void)
{
    current_test = "categorical";
    /* Mixed hierarchies of categorical and Gaussian layers: every entry
     * point and estimator once, results finite; one-hot samples; invalid
     * configurations refused. */
    const int64_t n = 10, D = 5;
    int64_t latent[2] = {3, 2}, hidden[1] = {6}, K[2] = {4, 3};
    hvae_latent_family mixes[3][2] = {
        {HVAE_LATENT_CATEGORICAL, HVAE_LATENT_CATEGORICAL},
        {HVAE_LATENT_CATEGORICAL, HVAE_LATENT_GAUSSIAN},
        {HVAE_LATENT_GAUSSIAN, HVAE_LATENT_CATEGORICAL}};
    for (int mix = 0; mix < 3; mix++) {
        hvae_config cfg = hvae_config_default(D, 2, latent, 1, hidden);
        cfg.latent_families = mixes[mix];
        cfg.n_categories = K;
        hvae_model *m = NULL;
        hvae_workspace *ws = NULL;
        hvae_optimizer *opt = NULL;
        CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_OK);
        if (!m)
            continue;
        int64_t w0 = hvae_model_latent_width(m, 0), w1 = hvae_model_latent_width(m, 1);
        CHECK(w0 == (mix < 2 ? 12 : 3) && w1 == (mix == 1 ? 2 : 6));
        CHECK(hvae_model_latent_width(m, 2) == 0);
        hvae_model_init(m, (uint64_t)mix);
        CHECK_STATUS(hvae_workspace_create(m, 8, &ws), HVAE_OK);
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        CHECK_STATUS(hvae_optimizer_create(m, &oc, &opt), HVAE_OK);
        float *x = make_data(n, D, 7);
        double elbo[10], ll[10];
        CHECK_STATUS(hvae_elbo(m, ws, x, NULL, n, NULL, 1, elbo, NULL, NULL), HVAE_OK);
        CHECK(all_finite_d(elbo, n));
        CHECK_STATUS(hvae_log_likelihood(m, ws, x, NULL, n, 5, 1, ll, NULL, NULL), HVAE_OK);
        CHECK(all_finite_d(ll, n));
        hvae_epoch_stats stats;
        hvae_objective_options obj = hvae_objective_options_default();
        for (int est = 0; est < HVAE_GRADIENT_ESTIMATOR_COUNT; est++) {
            obj.gradient_estimator = (hvae_gradient_estimator)est;
            obj.n_samples = est == HVAE_GRADIENT_SCORE_FUNCTION ? 2 : 1;
            obj.straight_through = est == HVAE_GRADIENT_GUMBEL_SOFTMAX;
            CHECK_STATUS(hvae_loss_and_grad(m, ws, x, NULL, n, NULL, 2, &obj, &stats),
                         est == HVAE_GRADIENT_REPARAMETERIZATION ? HVAE_ERR_INVALID_ARGUMENT
                                                                 : HVAE_OK);
            CHECK(est == HVAE_GRADIENT_REPARAMETERIZATION ||
                  (isfinite(stats.loss) &&
                   all_finite_f(hvae_model_grads(m), hvae_model_n_params(m))));
        }
        obj = hvae_objective_options_default();
        obj.temperature = 0.0f;
        CHECK_STATUS(hvae_loss_and_grad(m, ws, x, NULL, n, NULL, 2, &obj, &stats),
                     HVAE_ERR_INVALID_ARGUMENT);
        obj = hvae_objective_options_default();
        obj.gradient_estimator = HVAE_GRADIENT_SCORE_FUNCTION;
        obj.objective = HVAE_OBJECTIVE_IWAE;
        obj.n_samples = 2;
        CHECK_STATUS(hvae_loss_and_grad(m, ws, x, NULL, n, NULL, 2, &obj, &stats),
                     HVAE_ERR_INVALID_ARGUMENT);

        int64_t order[10];
        hvae_rng rng;
        hvae_rng_seed(&rng, 3);
        hvae_train_options to = hvae_train_options_default();
        to.batch_size = 4;
        to.objective.temperature_decay = 0.1f;
        to.objective.gradient_estimator =
            mix == 2 ? HVAE_GRADIENT_SCORE_FUNCTION : HVAE_GRADIENT_AUTO;
        hvae_status st = HVAE_OK;
        for (int e = 0; e < 3 && st == HVAE_OK; e++)
            st = hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, order, &to, &stats);
        CHECK(st == HVAE_OK && isfinite(stats.loss) && stats.n_rows == n);

        float mu0[120], mu1[60], lv0[120], lv1[60], xm[50], s[50];
        float *mu[2] = {mu0, mu1}, *lv[2] = {lv0, lv1};
        CHECK_STATUS(hvae_encode(m, ws, x, NULL, n, mu, lv), HVAE_OK);
        CHECK(all_finite_f(mu0, n * w0) && all_finite_f(lv1, n * w1));
        if (mix < 2) { /* class probabilities: each variable's sum to 1 */
            double total = 0.0;
            for (int64_t k = 0; k < n * w0; k++)
                total += mu0[k];
            CHECK(fabs(total - (double)(n * latent[0])) < 1e-3);
        }
        CHECK_STATUS(hvae_decode(m, ws, mu0, NULL, n, xm, NULL), HVAE_OK);
        CHECK(all_finite_f(xm, n * D));
        CHECK_STATUS(hvae_sample(m, ws, &rng, n, NULL, 1, s), HVAE_OK);
        CHECK(all_finite_f(s, n * D));
        free(x);
        hvae_optimizer_free(opt);
        hvae_workspace_free(ws);
        hvae_model_free(m);
    }
    /* Refused: K < 2, a ladder with a categorical layer, and no classes. */
    hvae_config cfg = hvae_config_default(D, 2, latent, 1, hidden);
    hvae_model *m = NULL;
    int64_t bad_K[2] = {1, 3};
    cfg.latent_families = mixes[0];
    cfg.n_categories = bad_K;
    CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_ERR_INVALID_ARGUMENT);
    cfg.n_categories = K;
    cfg.inference = HVAE_INFERENCE_LADDER;
    CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_ERR_INVALID_ARGUMENT);
    cfg.inference = HVAE_INFERENCE_MARKOV;
    cfg.n_categories = NULL;
    CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
}

static void test_many_models(void)
{
    current_test = "many_models";
    /* Create, use and free many models and workspaces: leaks show up under
     * valgrind and AddressSanitizer's leak checker. */
    int64_t latent[2] = {3, 2}, hidden[2] = {8, 4};
    float *x = make_data(4, 6, 0);
    double elbo[4];
    int ok = 1;
    for (int k = 0; k < 200; k++) {
        fixture f;
        hvae_likelihood lik = k % 2 ? HVAE_LIKELIHOOD_BERNOULLI : HVAE_LIKELIHOOD_GAUSSIAN;
        if (make_model(&f, 6, 1 + k % 2, latent, k % 3, hidden, lik,
                       (hvae_activation)(k % 5), 1 + k % 4, (uint64_t)k) != HVAE_OK) {
            ok = 0;
            break;
        }
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        hvae_optimizer *opt = NULL;
        if (hvae_optimizer_create(f.model, &oc, &opt) != HVAE_OK ||
            hvae_elbo(f.model, f.ws, x, NULL, 4, NULL, 0, elbo, NULL, NULL) != HVAE_OK ||
            !all_finite_d(elbo, 4))
            ok = 0;
        hvae_optimizer_free(opt);
        free_model(&f);
    }
    CHECK(ok);
    free(x);
}

/* ---- threads --------------------------------------------------------------- */

typedef struct {
    int runs[HVAE_MAX_THREADS];
    int n_parts_seen[HVAE_MAX_THREADS];
    int nested_parts[HVAE_MAX_THREADS];
    int before[HVAE_MAX_THREADS], after[HVAE_MAX_THREADS];
} region_log;

static void nested_part(void *ctx, int part, int n_parts)
{
    if (part == 0)
        *(int *)ctx = n_parts;
}

static void logging_part(void *ctx, int part, int n_parts)
{
    region_log *log = ctx;
    log->runs[part]++;
    log->n_parts_seen[part] = n_parts;
    hvae_parallel(nested_part, &log->nested_parts[part], HVAE_MAX_THREADS);
    log->before[part] = part + 1;
}

/* The region after logging_part's: every part of a region sees every
 * part's writes of the region before (what hvae_optimizer_step_if_finite's
 * check, then update, relies on). */
static void summing_part(void *ctx, int part, int n_parts)
{
    region_log *log = ctx;
    int sum = 0;
    for (int k = 0; k < n_parts; k++)
        sum += log->before[k];
    log->after[part] = sum;
}

static void test_pool(void)
{
    current_test = "pool";
    int ok = 1;
    /* Many resizes, each followed by regions asking for 1..4 parts. A
     * region started inside a region of several parts runs on one thread;
     * inside a region of one part (run by the caller alone) it may split. */
    for (int k = 0; k < 300 && ok; k++) {
        int threads = 1 + k % 4;
        hvae_set_num_threads(threads);
        ok &= hvae_get_num_threads() == threads && hvae_pool_threads() == threads;
        for (int want = 1; want <= 4; want++) {
            region_log log;
            memset(&log, 0, sizeof log);
            hvae_parallel(logging_part, &log, want);
            hvae_parallel(summing_part, &log, want);
            int n = want < threads ? want : threads;
            for (int p = 0; p < HVAE_MAX_THREADS; p++) {
                int expected = p < n;
                ok &= log.runs[p] == expected;
                if (expected)
                    ok &= log.n_parts_seen[p] == n &&
                          log.nested_parts[p] == (n > 1 ? 1 : threads) &&
                          log.after[p] == n * (n + 1) / 2;
            }
        }
    }
    CHECK(ok);
    /* Back to one thread: the workers are joined (valgrind sees no leak). */
    hvae_set_num_threads(1);
    CHECK(hvae_pool_threads() == 1);
}

/* ---- parts claimed by whichever thread is free ---------------------------- */

static _Thread_local char thread_tag; /* its address names the thread */
static const char *caller_tag;        /* the main thread's */

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

typedef struct {
    const char *ran_by[HVAE_MAX_THREADS];
    int runs[HVAE_MAX_THREADS];
    double sums[HVAE_MAX_THREADS];
    const double *data;
    int64_t n;
    _Atomic int delay_us; /* the first worker part to take it sleeps so long */
} claim_log;

static void claim_part(void *ctx, int part, int n_parts)
{
    claim_log *log = ctx;
    log->ran_by[part] = &thread_tag;
    log->runs[part]++;
    if (&thread_tag != caller_tag) {
        int delay = atomic_exchange(&log->delay_us, 0);
        if (delay)
            sleep_us(delay);
    }
    int64_t lo, hi;
    hvae_split(log->n, part, n_parts, 1, &lo, &hi);
    double sum = 0.0;
    for (int64_t i = lo; i < hi; i++)
        sum += log->data[i] * log->data[i];
    log->sums[part] = sum;
}

/* Part p of n's sum, computed here on one thread. */
static double claim_sum(const double *data, int64_t n, int part, int n_parts)
{
    int64_t lo, hi;
    hvae_split(n, part, n_parts, 1, &lo, &hi);
    double sum = 0.0;
    for (int64_t i = lo; i < hi; i++)
        sum += data[i] * data[i];
    return sum;
}

static int claim_log_is_right(const claim_log *log, int n_parts)
{
    int ok = log->ran_by[0] == caller_tag; /* part 0 is always the caller's */
    for (int p = 0; p < HVAE_MAX_THREADS; p++) {
        ok &= log->runs[p] == (p < n_parts);
        if (p < n_parts)
            ok &= log->sums[p] == claim_sum(log->data, log->n, p, n_parts);
    }
    return ok;
}

static void test_pool_claims(void)
{
    current_test = "pool_claims";
    caller_tag = &thread_tag;
    enum { N = 4096, TRIALS = 60 };
    static double data[N];
    for (int i = 0; i < N; i++)
        data[i] = 1.0 / (1.0 + i);
    /* A worker asleep when a region starts (it sleeps after spinning
     * 20 us) takes some microseconds to wake: meanwhile the caller, done
     * with its short part 0, takes part 1. Parts run once each, whoever
     * runs them, with the same results. (With parts assigned, part 1 was
     * always the worker's.) */
    hvae_set_num_threads(2);
    int ok = 1, caller_took = 0;
    for (int trial = 0; trial < TRIALS; trial++) {
        if (trial % 2)
            sleep_us(2000);
        claim_log log;
        memset(&log, 0, sizeof log);
        log.data = data;
        log.n = N;
        hvae_parallel(claim_part, &log, 2);
        ok &= claim_log_is_right(&log, 2);
        caller_took += log.ran_by[1] == caller_tag;
    }
    printf("pool claims: the caller ran part 1 in %d of %d regions\n", caller_took, TRIALS);
    CHECK(ok);
    CHECK(caller_took > 0);
    /* A worker that stalls inside the part it claimed: the region ends only
     * when that part is done, the other parts run by the caller and the
     * other worker. */
    hvae_set_num_threads(3);
    for (int trial = 0; trial < 4; trial++) {
        claim_log log;
        memset(&log, 0, sizeof log);
        log.data = data;
        log.n = N;
        atomic_store(&log.delay_us, 20000);
        hvae_parallel(claim_part, &log, 3);
        ok &= claim_log_is_right(&log, 3);
    }
    CHECK(ok);
    hvae_set_num_threads(1);
}

/* Many short regions back to back with resizes, workers late (asleep, or
 * held up in a part): every region's ctx is new and dies when it returns,
 * so a worker that ran a part of a region other than the one it claimed,
 * or read a newer region's fn/ctx with an older part count, is caught. */
typedef struct {
    int id, alive, n_expected;
    int runs[HVAE_MAX_THREADS];
} stale_ctx;

static _Atomic int current_region, stale_errors;

static void stale_part(void *ctx, int part, int n_parts)
{
    stale_ctx *c = ctx;
    if (!c->alive || c->id != atomic_load(&current_region) || n_parts != c->n_expected ||
        part < 0 || part >= n_parts) {
        atomic_fetch_add(&stale_errors, 1);
        return;
    }
    c->runs[part]++;
    if (&thread_tag != caller_tag && c->id % 7 == part && c->id % 3 == 0)
        sleep_us(50);
}

static void test_pool_late_workers(void)
{
    current_test = "pool_late_workers";
    caller_tag = &thread_tag;
    enum { REGIONS = 4000, PER_SIZE = 400, RING = 3 };
    static stale_ctx ring[RING];
    int ok = 1, threads = 1;
    atomic_store(&stale_errors, 0);
    for (int r = 0; r < REGIONS && ok; r++) {
        if (r % PER_SIZE == 0)
            threads = hvae_pool_resize(1 + (r / PER_SIZE) % 4);
        if (r % 97 == 0)
            sleep_us(400); /* the workers fall asleep */
        int want = 1 + r % 5;
        stale_ctx *c = &ring[r % RING];
        memset(c, 0, sizeof *c);
        c->id = r;
        c->alive = 1;
        c->n_expected = want < threads ? want : threads;
        atomic_store(&current_region, r);
        hvae_parallel(stale_part, c, want);
        c->alive = 0;
        for (int p = 0; p < HVAE_MAX_THREADS; p++)
            ok &= c->runs[p] == (p < c->n_expected);
    }
    CHECK(ok);
    CHECK(atomic_load(&stale_errors) == 0);
    hvae_set_num_threads(1);
}

/* On `threads` threads with every split forced: evaluates and
 * differentiates a model at its initial parameters, then trains it; results
 * go to the out arrays. */
static void run_on_threads(int threads, float *params, double *elbo, float *mu,
                           float *grad)
{
    const int64_t n = 96, D = 12;
    int64_t latent[2] = {5, 3}, hidden[2] = {20, 9};
    hvae_set_num_threads(threads);
    fixture f;
    if (make_model(&f, D, 2, latent, 2, hidden, HVAE_LIKELIHOOD_BERNOULLI, HVAE_ACT_TANH,
                   32, 11) != HVAE_OK)
        return;
    float *x = make_data(n, D, 4);
    int64_t P = hvae_model_n_params(f.model);
    hvae_elbo(f.model, f.ws, x, NULL, n, NULL, 9, elbo, NULL, NULL);
    float *mus[2] = {mu, NULL};
    hvae_encode(f.model, f.ws, x, NULL, n, mus, NULL);
    hvae_objective_options obj = hvae_objective_options_default();
    hvae_epoch_stats stats;
    hvae_loss_and_grad(f.model, f.ws, x, NULL, n, NULL, 9, &obj, &stats);
    memcpy(grad, hvae_model_grads(f.model), (size_t)P * sizeof(float));

    hvae_optimizer_config oc = hvae_optimizer_config_default();
    oc.learning_rate = 1e-2f;
    hvae_optimizer *opt = NULL;
    hvae_optimizer_create(f.model, &oc, &opt);
    int64_t order[96];
    hvae_rng rng;
    hvae_rng_seed(&rng, 5);
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 32;
    for (int e = 0; e < 3; e++)
        hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats);
    memcpy(params, hvae_model_params(f.model), (size_t)P * sizeof(float));
    hvae_optimizer_free(opt);
    free(x);
    free_model(&f);
}

/* Two runs of run_on_threads, side by side. */
enum { RUNS_P_MAX = 4096, RUNS_N = 96 };
typedef struct {
    float params[2][RUNS_P_MAX], grad[2][RUNS_P_MAX], mu[2][RUNS_N * 5];
    double elbo[2][RUNS_N];
} thread_runs;

static void run_into(thread_runs *r, int k, int n_threads)
{
    run_on_threads(n_threads, r->params[k], r->elbo[k], r->mu[k], r->grad[k]);
}

static void test_thread_counts(void)
{
    current_test = "thread_counts";
    static thread_runs r;
    hvae_parallel_min_scale = 0.0; /* split even these small products */
    for (int t = 0; t < 2; t++)
        run_into(&r, t, 1 + t);
    /* Evaluation is bitwise the same on any number of threads. Training
     * splits products in column blocks; the plain-C GEMM computes each
     * element alone, so it too is bitwise the same (OpenBLAS's kernels can
     * differ in the last bit between block widths). */
    CHECK(memcmp(r.mu[0], r.mu[1], sizeof r.mu[0]) == 0);
    CHECK(memcmp(r.elbo[0], r.elbo[1], sizeof r.elbo[0]) == 0);
#ifdef HVAE_NO_BLAS
    CHECK(memcmp(r.params[0], r.params[1], sizeof r.params[0]) == 0);
    CHECK(memcmp(r.grad[0], r.grad[1], sizeof r.grad[0]) == 0);
#else
    double worst = 0.0, worst_grad = 0.0;
    for (int i = 0; i < RUNS_P_MAX; i++) {
        worst = fmax(worst, fabs((double)r.params[0][i] - r.params[1][i]));
        worst_grad = fmax(worst_grad, fabs((double)r.grad[0][i] - r.grad[1][i]));
    }
    printf("thread counts: largest difference 1 vs 2 threads, gradient %.2e, "
           "parameters after 9 steps %.2e\n", worst_grad, worst);
    CHECK(worst_grad < 1e-5 && worst < 1e-4);
#endif
    CHECK(all_finite_f(r.params[1], RUNS_P_MAX) && all_finite_d(r.elbo[1], RUNS_N));

    /* The checked optimizer step on two threads: a NaN in the second half
     * of the gradient stops the whole update; a finite gradient is applied
     * as hvae_optimizer_step applies it, and zeroed. */
    hvae_set_num_threads(2);
    int64_t latent[1] = {4}, hidden[1] = {300};
    fixture f;
    CHECK_STATUS(make_model(&f, 40, 1, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_RELU, 4, 2), HVAE_OK);
    int64_t P = hvae_model_n_params(f.model);
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    hvae_optimizer *a = NULL, *b = NULL;
    hvae_optimizer_create(f.model, &oc, &a);
    hvae_optimizer_create(f.model, &oc, &b);
    float *g = hvae_model_grads(f.model), *p = hvae_model_params(f.model);
    float *p0 = malloc((size_t)P * sizeof(float)), *g0 = malloc((size_t)P * sizeof(float));
    for (int64_t i = 0; i < P; i++)
        g[i] = 0.01f * (float)((i * 37) % 11 - 5);
    memcpy(p0, p, (size_t)P * sizeof(float));
    memcpy(g0, g, (size_t)P * sizeof(float));
    g[P - 3] = NAN;
    CHECK(hvae_optimizer_step_if_finite(a, f.model) == 0);
    CHECK(*hvae_optimizer_step_count(a) == 0 && isnan(g[P - 3]));
    CHECK(memcmp(p, p0, (size_t)P * sizeof(float)) == 0);
    g[P - 3] = g0[P - 3];
    hvae_optimizer_step(b, f.model); /* the reference, on the same gradient */
    float *p1 = malloc((size_t)P * sizeof(float));
    memcpy(p1, p, (size_t)P * sizeof(float));
    memcpy(p, p0, (size_t)P * sizeof(float));
    CHECK(hvae_optimizer_step_if_finite(a, f.model) == 1);
    CHECK(*hvae_optimizer_step_count(a) == 1);
    CHECK(memcmp(p, p1, (size_t)P * sizeof(float)) == 0);
    CHECK(memcmp(hvae_optimizer_state(a, 1), hvae_optimizer_state(b, 1),
                 (size_t)P * sizeof(float)) == 0);
    int zeroed = 1;
    for (int64_t i = 0; i < P; i++)
        zeroed &= g[i] == 0.0f;
    CHECK(zeroed);
    free(p0);
    free(g0);
    free(p1);
    hvae_optimizer_free(a);
    hvae_optimizer_free(b);
    free_model(&f);
    hvae_parallel_min_scale = 1.0;
    hvae_set_num_threads(1);
}

/* Two threads while a third, busy thread competes for the two cores (the
 * caller now and then runs a part a worker could not claim in time): the
 * same bits as two threads alone. */
static _Atomic int competitor_stop;

static void *competitor_main(void *arg)
{
    (void)arg;
    volatile double x = 0.0;
    while (!atomic_load_explicit(&competitor_stop, memory_order_relaxed))
        x += 1.0;
    return NULL;
}

static void test_threads_with_competitor(void)
{
    current_test = "threads_with_competitor";
    static thread_runs r;
    hvae_parallel_min_scale = 0.0; /* split even these small products */
    run_into(&r, 0, 2);
    pthread_t competitor;
    atomic_store(&competitor_stop, 0);
    int started = pthread_create(&competitor, NULL, competitor_main, NULL) == 0;
    run_into(&r, 1, 2);
    if (started) {
        atomic_store(&competitor_stop, 1);
        pthread_join(competitor, NULL);
    }
    CHECK(started);
    CHECK(memcmp(r.mu[0], r.mu[1], sizeof r.mu[0]) == 0);
    CHECK(memcmp(r.elbo[0], r.elbo[1], sizeof r.elbo[0]) == 0);
    CHECK(memcmp(r.grad[0], r.grad[1], sizeof r.grad[0]) == 0);
    CHECK(memcmp(r.params[0], r.params[1], sizeof r.params[0]) == 0);
    CHECK(all_finite_f(r.params[1], RUNS_P_MAX));
    hvae_parallel_min_scale = 1.0;
    hvae_set_num_threads(1);
}

/* A hook that poisons one parameter after the last minibatch: the per-step
 * check cannot see it, the end-of-epoch check must. */
typedef struct {
    hvae_model *model;
    int64_t last_batch;
} poison_state;

static int poisoning_hook(void *ctx, int64_t batch_index, const hvae_epoch_stats *batch)
{
    poison_state *p = ctx;
    (void)batch;
    if (batch_index == p->last_batch)
        hvae_model_params(p->model)[0] = NAN;
    return 0;
}

/* Divergence handling in C: a diverging epoch returns the parameters, the
 * optimizer's moments and step count and the generator to their state at
 * the start of the call, bit for bit. */
static void test_rollback(void)
{
    current_test = "rollback";
    int64_t latent[] = {3, 2}, hidden[] = {6};
    int64_t D = 5, n = 16;
    fixture f;
    CHECK_STATUS(make_model(&f, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_RELU, 8, 4), HVAE_OK);
    if (!f.model)
        return;
    hvae_optimizer *opt;
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_OK);
    float *x = make_data(n, D, 9);
    int64_t order[16];
    hvae_rng rng;
    hvae_rng_seed(&rng, 11);
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 4;
    hvae_epoch_stats stats;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_OK);

    int64_t P = hvae_model_n_params(f.model);
    float *saved = malloc(3 * (size_t)P * sizeof(float));
    for (int round = 0; round < 2 && saved; round++) {
        memcpy(saved, hvae_model_params(f.model), (size_t)P * sizeof(float));
        memcpy(saved + P, hvae_optimizer_state(opt, 0), (size_t)P * sizeof(float));
        memcpy(saved + 2 * P, hvae_optimizer_state(opt, 1), (size_t)P * sizeof(float));
        int64_t step = *hvae_optimizer_step_count(opt);
        hvae_rng rng_before = rng;
        poison_state ps = {f.model, n / to.batch_size - 1};
        hvae_status st;
        if (round == 0) {
            /* A NaN loss in the third minibatch: two steps were applied. */
            x[2 * to.batch_size * D] = NAN;
            to.shuffle = 0;
            st = hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats);
            x[2 * to.batch_size * D] = 0.5f;
            CHECK(stats.n_batches == 2);
        } else {
            /* Finite steps, then nonfinite parameters after the last one. */
            to.hook = poisoning_hook;
            to.hook_ctx = &ps;
            st = hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats);
            to.hook = NULL;
        }
        CHECK(st == HVAE_ERR_NONFINITE_LOSS);
        CHECK(memcmp(saved, hvae_model_params(f.model), (size_t)P * sizeof(float)) == 0);
        CHECK(memcmp(saved + P, hvae_optimizer_state(opt, 0), (size_t)P * sizeof(float)) == 0);
        CHECK(memcmp(saved + 2 * P, hvae_optimizer_state(opt, 1),
                     (size_t)P * sizeof(float)) == 0);
        CHECK(*hvae_optimizer_step_count(opt) == step);
        CHECK(memcmp(&rng, &rng_before, sizeof rng) == 0);
    }
    /* Training goes on from the restored state. */
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_OK);
    /* An optimizer made for another block is refused. */
    hvae_optimizer *other;
    CHECK_STATUS(hvae_optimizer_create_for(P + 1, &oc, &other), HVAE_OK);
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, other, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_ERR_INVALID_ARGUMENT);
    hvae_optimizer_free(other);
    free(saved);
    hvae_optimizer_free(opt);
    free(x);
    free_model(&f);
}

/* L = sum(out * g) of an MLP in double, at its current parameters. */
static double mlp_loss(hvae_mlp *mlp, const float *x, const float *g, int64_t B, float *out)
{
    hvae_mlp_forward(mlp, x, B, out);
    double L = 0.0;
    for (int64_t k = 0; k < B * hvae_mlp_n_out(mlp); k++)
        L += (double)out[k] * g[k];
    return L;
}

/* The auxiliary MLP: gradients of parameters and inputs against central
 * differences, backward accumulating, its own optimizer over its block. */
static void test_mlp(void)
{
    current_test = "mlp";
    int64_t widths[] = {7, 6, 3}, n_in = 5, B = 4;
    hvae_mlp *mlp = NULL;
    CHECK_STATUS(hvae_mlp_create(n_in, 3, widths, HVAE_ACT_LOGVAR_CLIP, 8, &mlp),
                 HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_mlp_create(0, 3, widths, HVAE_ACT_TANH, 8, &mlp),
                 HVAE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(hvae_mlp_create(n_in, 3, widths, HVAE_ACT_TANH, 8, &mlp), HVAE_OK);
    if (!mlp)
        return;
    CHECK(hvae_mlp_n_params(mlp) == (5 + 1) * 7 + (7 + 1) * 6 + (6 + 1) * 3);
    CHECK(hvae_mlp_n_out(mlp) == 3);
    hvae_mlp_init(mlp, 3);
    float *x = make_data(B, n_in, 21), *g = make_data(B, 3, 22), out[4 * 3];
    float dx[4 * 5] = {0};
    int64_t P = hvae_mlp_n_params(mlp);
    float *p = hvae_mlp_params(mlp), *grads = hvae_mlp_grads(mlp);
    CHECK_STATUS(hvae_mlp_forward(mlp, x, 9, out), HVAE_ERR_BATCH_TOO_LARGE);
    mlp_loss(mlp, x, g, B, out);
    CHECK(memcmp(out, hvae_mlp_output(mlp), sizeof out) == 0);
    CHECK_STATUS(hvae_mlp_backward(mlp, x, g, B, dx), HVAE_OK);
    float *first = malloc((size_t)P * sizeof(float));
    if (first)
        memcpy(first, grads, (size_t)P * sizeof(float));

    double worst = 0.0, scale = 0.0;
    for (int64_t k = 0; k < P; k++)
        scale = fmax(scale, fabs(grads[k]));
    for (int64_t k = 0; k < P + B * n_in; k++) {
        float *v = k < P ? &p[k] : &x[k - P];
        float keep = *v, h = 1e-2f;
        *v = keep + h;
        float up = *v;
        double L1 = mlp_loss(mlp, x, g, B, out);
        *v = keep - h;
        float down = *v;
        double L0 = mlp_loss(mlp, x, g, B, out);
        *v = keep;
        double fd = (L1 - L0) / ((double)up - (double)down);
        double an = k < P ? grads[k] : dx[k - P];
        worst = fmax(worst, fabs(fd - an));
    }
    printf("mlp: largest |gradient - central difference| %.2e of max |gradient| %.2e\n",
           worst, scale);
    CHECK(worst <= 2e-3 * fmax(scale, 1.0));

    /* Backward accumulates. */
    mlp_loss(mlp, x, g, B, out);
    CHECK_STATUS(hvae_mlp_backward(mlp, x, g, B, NULL), HVAE_OK);
    int doubled = first != NULL;
    for (int64_t k = 0; first && k < P; k++)
        doubled &= fabsf(grads[k] - 2.0f * first[k]) <= 1e-6f * (1.0f + fabsf(first[k]));
    CHECK(doubled);

    /* Its own optimizer over its block: descent on L lowers L. */
    hvae_optimizer *opt = NULL;
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    oc.learning_rate = 1e-2f;
    CHECK_STATUS(hvae_optimizer_create_for(P, &oc, &opt), HVAE_OK);
    double before = mlp_loss(mlp, x, g, B, out), after = before;
    for (int step = 0; opt && step < 20; step++) {
        memset(grads, 0, (size_t)P * sizeof(float));
        mlp_loss(mlp, x, g, B, out);
        hvae_mlp_backward(mlp, x, g, B, NULL);
        hvae_optimizer_step_block(opt, p, grads);
    }
    after = mlp_loss(mlp, x, g, B, out);
    CHECK(after < before - 0.1);
    CHECK(opt && *hvae_optimizer_step_count(opt) == 20);
    hvae_optimizer_free(opt);
    free(first);
    free(x);
    free(g);
    hvae_mlp_free(mlp);
}

/* hvae_train_options.aux_step: called once per step with the staged rows and
 * the workspace's samples; here it trains a small MLP on z_1 and can stop. */
typedef struct {
    hvae_mlp *mlp;
    hvae_optimizer *opt;
    int calls, stop_at;
    int64_t rows;
    int saw_samples;
} aux_state;

static int aux_training_step(void *ctx, hvae_model *model, const hvae_workspace *ws,
                             const float *x, const float *cond, int64_t B)
{
    aux_state *a = ctx;
    (void)model;
    (void)x;
    (void)cond;
    const float *z1 = hvae_workspace_samples(ws, 0);
    a->saw_samples += z1 != NULL && hvae_workspace_samples(ws, 2) == NULL;
    a->rows += B;
    memset(hvae_mlp_grads(a->mlp), 0, (size_t)hvae_mlp_n_params(a->mlp) * sizeof(float));
    hvae_mlp_forward(a->mlp, z1, B, NULL);
    hvae_mlp_backward(a->mlp, z1, hvae_mlp_output(a->mlp), B, NULL);
    hvae_optimizer_step_block(a->opt, hvae_mlp_params(a->mlp), hvae_mlp_grads(a->mlp));
    return ++a->calls == a->stop_at;
}

static void test_aux_step(void)
{
    current_test = "aux_step";
    int64_t latent[] = {3, 2}, hidden[] = {6}, widths[] = {4, 1};
    int64_t D = 5, n = 16;
    fixture f;
    CHECK_STATUS(make_model(&f, D, 2, latent, 1, hidden, HVAE_LIKELIHOOD_GAUSSIAN,
                            HVAE_ACT_RELU, 8, 4), HVAE_OK);
    if (!f.model)
        return;
    aux_state a = {NULL, NULL, 0, 0, 0, 0};
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    hvae_optimizer *opt = NULL;
    CHECK_STATUS(hvae_mlp_create(3, 2, widths, HVAE_ACT_RELU, 8, &a.mlp), HVAE_OK);
    CHECK_STATUS(hvae_optimizer_create(f.model, &oc, &opt), HVAE_OK);
    if (a.mlp)
        CHECK_STATUS(hvae_optimizer_create_for(hvae_mlp_n_params(a.mlp), &oc, &a.opt), HVAE_OK);
    if (!a.mlp || !opt || !a.opt)
        return;
    hvae_mlp_init(a.mlp, 1);
    float *x = make_data(n, D, 30);
    int64_t order[16];
    hvae_rng rng;
    hvae_rng_seed(&rng, 2);
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 4;
    to.aux_step = aux_training_step;
    to.aux_ctx = &a;
    hvae_epoch_stats stats;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_OK);
    CHECK(a.calls == 4 && a.rows == n && a.saw_samples == 4);
    CHECK(*hvae_optimizer_step_count(a.opt) == 4 && *hvae_optimizer_step_count(opt) == 4);
    a.stop_at = 6;
    CHECK_STATUS(hvae_train_epoch(f.model, f.ws, opt, &rng, x, NULL, n, order, &to, &stats),
                 HVAE_ERR_STOPPED);
    CHECK(a.calls == 6 && *hvae_optimizer_step_count(opt) == 5);
    hvae_optimizer_free(a.opt);
    hvae_mlp_free(a.mlp);
    hvae_optimizer_free(opt);
    free(x);
    free_model(&f);
}

/* The VampPrior (HVAE_PRIOR_VAMP): its config checks, its tensor, its second
 * workspace, and every call that reaches the prior (training with ELBO and
 * IWAE, evaluation, log-likelihood, sampling) stays finite. Its formulas
 * are held to the float64 reference in tests/test_vamp.py. */
static void test_vampprior(void)
{
    current_test = "vampprior";
    const int64_t n = 40, D = 6, K = 5;
    int64_t latent[2] = {3, 2}, hidden[1] = {4};
    hvae_config c = hvae_config_default(D, 2, latent, 1, hidden);
    hvae_model *m = NULL;
    c.prior = HVAE_PRIOR_VAMP;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT); /* K = 0 */
    c.n_pseudo_inputs = K;
    c.n_conditions = 2;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    c.n_conditions = 0;
    c.prior = HVAE_PRIOR_NORMAL;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
    CHECK(strcmp(hvae_prior_name(HVAE_PRIOR_VAMP), "vamp") == 0);

    c.prior = HVAE_PRIOR_VAMP;
    c.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_OK);
    hvae_tensor_info last;
    CHECK_STATUS(hvae_model_tensor(m, hvae_model_n_tensors(m) - 1, &last), HVAE_OK);
    CHECK(strcmp(last.name, "prior.pseudo_inputs") == 0 && last.rows == K && last.cols == D);
    CHECK(last.offset + K * D == hvae_model_n_params(m));
    hvae_model_init(m, 3);
    const float *P = hvae_model_params(m) + last.offset;
    int in_range = 1;
    for (int64_t k = 0; k < K * D; k++)
        in_range &= P[k] > 0.0f && P[k] < 1.0f;
    CHECK(in_range);
    /* The second workspace of K rows is counted and made with the first. */
    hvae_model *plain = NULL;
    c.prior = HVAE_PRIOR_NORMAL;
    c.n_pseudo_inputs = 0;
    CHECK_STATUS(hvae_model_create(&c, &plain), HVAE_OK);
    CHECK(hvae_workspace_bytes(m, 16) > hvae_workspace_bytes(plain, 16));
    hvae_model_free(plain);

    hvae_workspace *ws = NULL;
    CHECK_STATUS(hvae_workspace_create(m, 16, &ws), HVAE_OK);
    float *x = make_data(n, D, 7);
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    oc.learning_rate = 1e-2f;
    hvae_optimizer *opt = NULL;
    CHECK_STATUS(hvae_optimizer_create(m, &oc, &opt), HVAE_OK);
    hvae_rng rng;
    hvae_rng_seed(&rng, 1);
    int64_t order[40];
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = 8;
    hvae_epoch_stats first, stats;
    float before = P[0];
    CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, order, &to, &first), HVAE_OK);
    for (int e = 0; e < 5; e++)
        CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, order, &to, &stats),
                     HVAE_OK);
    CHECK(isfinite(stats.loss) && stats.loss < first.loss);
    CHECK(P[0] != before);
    to.batch_size = 4;
    to.objective.objective = HVAE_OBJECTIVE_IWAE;
    to.objective.n_samples = 4;
    CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, order, &to, &stats), HVAE_OK);
    CHECK(isfinite(stats.loss));
    CHECK(hvae_all_finite(hvae_model_params(m), hvae_model_n_params(m)));

    double elbo[40], ll[40];
    CHECK_STATUS(hvae_elbo(m, ws, x, NULL, n, NULL, 0, elbo, NULL, NULL), HVAE_OK);
    CHECK_STATUS(hvae_log_likelihood(m, ws, x, NULL, n, 50, 0, ll, NULL, NULL), HVAE_OK);
    CHECK(all_finite_d(elbo, n) && all_finite_d(ll, n));
    double mean_elbo = 0.0, mean_ll = 0.0;
    for (int64_t i = 0; i < n; i++) {
        mean_elbo += elbo[i] / n;
        mean_ll += ll[i] / n;
    }
    CHECK(mean_ll > mean_elbo);
    float samples[20 * 6];
    CHECK_STATUS(hvae_sample(m, ws, &rng, 20, NULL, 0, samples), HVAE_OK);
    CHECK(all_finite_f(samples, 20 * D));
    hvae_optimizer_free(opt);
    hvae_workspace_free(ws);
    hvae_model_free(m);
    free(x);
}

/* The discriminator (FactorVAE, density-ratio prior) and beta-TCVAE through
 * the public API: training with the discriminator's step as the aux step,
 * its stats, the permutation's marginals, SIR sampling and the
 * log-likelihood under the learned prior, beta-TCVAE's terms summing to the
 * sampled KL. Finite results and no leaks (valgrind). */
typedef struct {
    hvae_optimizer *opt;
    hvae_rng rng;
    hvae_discriminator_stats stats;
} disc_ctx;

static int disc_aux(void *ctx, hvae_model *model, const hvae_workspace *ws, const float *x,
                    const float *cond, int64_t B)
{
    (void)x;
    (void)cond;
    disc_ctx *c = ctx;
    int32_t top = hvae_model_config(model)->n_layers - 1;
    return hvae_discriminator_step(model, c->opt, &c->rng, hvae_workspace_samples(ws, top),
                                   NULL, B, &c->stats) != HVAE_OK;
}

/* hvae_discriminator_step_shared by two "processes" run one after the
 * other: A differentiates its rows and its reduction keeps its sums and
 * stops before the step; B's reduction adds them, so B steps on the sum.
 * B must take the one-process step (mine = NULL) on the same rows, and
 * every copy draws the same counterparts (equal generators after). */
typedef struct {
    float grads[64];
    double values[2];
    int keep; /* 1: keep and stop (A); 0: add (B) */
} shared_sums;

static int shared_reduce(void *ctx, float *grads, int64_t n_grads, double *values,
                         int64_t n_values)
{
    shared_sums *s = ctx;
    if (n_grads > 64 || n_values != 2)
        return 1;
    for (int64_t k = 0; k < n_grads; k++)
        if (s->keep)
            s->grads[k] = grads[k];
        else
            grads[k] += s->grads[k];
    for (int k = 0; k < 2; k++)
        if (s->keep)
            s->values[k] = values[k];
        else
            values[k] += s->values[k];
    return s->keep;
}

static void test_discriminator_shared_step(void)
{
    current_test = "discriminator_shared_step";
    int64_t latent[] = {2}, hidden[] = {4}, B = 9;
    for (int kind = 0; kind < 2; kind++) {
        hvae_config cfg = hvae_config_default(6, 1, latent, 1, hidden);
        cfg.discriminator = 1;
        cfg.discriminator_n_hidden = 1;
        cfg.discriminator_hidden[0] = 5; /* (2*5+5) + (5+1) = 21 parameters */
        cfg.prior = kind ? HVAE_PRIOR_DENSITY_RATIO : HVAE_PRIOR_NORMAL;
        hvae_model *m[3] = {NULL, NULL, NULL};
        hvae_optimizer *opt[3] = {NULL, NULL, NULL};
        hvae_rng rng[3];
        hvae_discriminator_stats st[3] = {{0.0, 0.0, 0}, {0.0, 0.0, 0}, {0.0, 0.0, 0}};
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        for (int k = 0; k < 3; k++) {
            CHECK_STATUS(hvae_model_create(&cfg, &m[k]), HVAE_OK);
            hvae_model_init(m[k], 7);
            CHECK_STATUS(hvae_optimizer_create_for(hvae_discriminator_n_params(m[k]), &oc,
                                                   &opt[k]), HVAE_OK);
            hvae_rng_seed(&rng[k], 11);
        }
        int64_t P = hvae_model_n_params(m[0]), Pd = hvae_discriminator_n_params(m[0]);
        CHECK(Pd == 21);
        float z[9 * 2];
        hvae_rng_normal(&rng[0], z, 18);
        hvae_rng_normal(&rng[1], z, 18);
        hvae_rng_normal(&rng[2], z, 18);
        unsigned char mine_a[9] = {1, 0, 0, 1, 1, 0, 1, 0, 0}, mine_b[9];
        for (int r = 0; r < 9; r++)
            mine_b[r] = !mine_a[r];
        shared_sums sums = {{0}, {0.0, 0.0}, 1};
        CHECK_STATUS(hvae_discriminator_step(m[0], opt[0], &rng[0], z, NULL, B, &st[0]),
                     HVAE_OK);
        CHECK_STATUS(hvae_discriminator_step_shared(m[1], opt[1], &rng[1], z, NULL, B, mine_a,
                                                    shared_reduce, &sums, &st[1]),
                     HVAE_ERR_STOPPED);
        sums.keep = 0;
        CHECK_STATUS(hvae_discriminator_step_shared(m[2], opt[2], &rng[2], z, NULL, B, mine_b,
                                                    shared_reduce, &sums, &st[2]),
                     HVAE_OK);
        double worst = 0.0;
        const float *one = hvae_model_params(m[0]), *two = hvae_model_params(m[2]);
        for (int64_t k = P - Pd; k < P; k++)
            worst = fmax(worst, fabs((double)one[k] - (double)two[k]));
        CHECK(worst < 1e-6 && memcmp(one, hvae_model_params(m[1]), (size_t)P * 4) != 0);
        CHECK(fabs(st[0].log_ratio - st[2].log_ratio) < 1e-6 &&
              st[0].accuracy == st[2].accuracy && st[2].n_steps == 1 && st[1].n_steps == 0);
        CHECK(memcmp(&rng[0], &rng[1], sizeof rng[0]) == 0 &&
              memcmp(&rng[0], &rng[2], sizeof rng[0]) == 0);
        for (int k = 0; k < 3; k++) {
            hvae_optimizer_free(opt[k]);
            hvae_model_free(m[k]);
        }
    }
}

static void test_discriminator(void)
{
    current_test = "discriminator";
    int64_t D = 12, n = 60, latent[] = {3}, hidden[] = {8}, order[60];
    float *x = make_data(n, D, 5);
    for (int kind = 0; kind < 2; kind++) {
        hvae_config cfg = hvae_config_default(D, 1, latent, 1, hidden);
        cfg.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
        cfg.discriminator = 1;
        cfg.discriminator_n_hidden = 2;
        cfg.discriminator_hidden[0] = cfg.discriminator_hidden[1] = 6;
        cfg.prior = kind ? HVAE_PRIOR_DENSITY_RATIO : HVAE_PRIOR_NORMAL;
        hvae_model *m = NULL;
        hvae_workspace *ws = NULL;
        CHECK_STATUS(hvae_model_create(&cfg, &m), HVAE_OK);
        hvae_model_init(m, 1);
        CHECK_STATUS(hvae_workspace_create(m, 20, &ws), HVAE_OK);
        int64_t P = hvae_model_n_params(m), Pd = hvae_discriminator_n_params(m);
        CHECK(Pd == (3 * 6 + 6) + (6 * 6 + 6) + (6 + 1));
        CHECK(hvae_discriminator_offset(m) == P - Pd);
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        hvae_optimizer *opt = NULL;
        disc_ctx dc = {NULL, {{0}}, {0.0, 0.0, 0}};
        hvae_rng rng;
        hvae_rng_seed(&rng, 3);
        hvae_rng_seed(&dc.rng, 4);
        oc.beta1 = 0.5f;
        oc.beta2 = 0.9f;
        CHECK_STATUS(hvae_optimizer_create_for(Pd, &oc, &dc.opt), HVAE_OK);
        hvae_optimizer_config model_oc = hvae_optimizer_config_default();
        CHECK_STATUS(hvae_optimizer_create(m, &model_oc, &opt), HVAE_OK);
        hvae_train_options to = hvae_train_options_default();
        to.batch_size = 20;
        to.objective.tc_weight = kind ? 0.0f : 2.0f;
        to.aux_step = disc_aux;
        to.aux_ctx = &dc;
        hvae_epoch_stats stats;
        float before = hvae_model_params(m)[P - 1];
        for (int e = 0; e < 3; e++)
            CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, order, &to, &stats),
                         HVAE_OK);
        CHECK(isfinite(stats.loss) && dc.stats.n_steps == 9);
        CHECK(dc.stats.accuracy >= 0.0 && dc.stats.accuracy <= 9.0);
        CHECK(hvae_model_params(m)[P - 1] != before); /* the discriminator learned */
        CHECK(all_finite_f(hvae_model_params(m), P));
        /* The density-ratio prior's FactorVAE penalty is refused. */
        to.objective.tc_weight = 1.0f;
        if (kind)
            CHECK_STATUS(hvae_train_epoch(m, ws, opt, &rng, x, NULL, n, order, &to, &stats),
                         HVAE_ERR_INVALID_ARGUMENT);
        float z[3 * 7], t[7];
        hvae_rng_normal(&rng, z, 21);
        CHECK_STATUS(hvae_discriminator_log_ratio(m, z, 7, t), HVAE_OK);
        CHECK(all_finite_f(t, 7));
        float samples[5 * 12];
        CHECK_STATUS(hvae_sample(m, ws, &rng, 5, NULL, 0, samples), HVAE_OK);
        CHECK(all_finite_f(samples, 60));
        double ll[4];
        CHECK_STATUS(hvae_log_likelihood(m, ws, x, NULL, 4, 30, 0, ll, NULL, NULL), HVAE_OK);
        CHECK(all_finite_d(ll, 4));
        hvae_optimizer_free(opt);
        hvae_optimizer_free(dc.opt);
        hvae_workspace_free(ws);
        hvae_model_free(m);
    }
    /* Without a discriminator: none of its calls, no penalty. */
    fixture f;
    CHECK_STATUS(make_model(&f, D, 1, latent, 1, hidden, HVAE_LIKELIHOOD_BERNOULLI,
                            HVAE_ACT_TANH, 20, 2), HVAE_OK);
    CHECK(hvae_discriminator_n_params(f.model) == 0);
    float z1[3], t1[1];
    CHECK_STATUS(hvae_discriminator_log_ratio(f.model, z1, 1, t1), HVAE_ERR_INVALID_ARGUMENT);
    hvae_objective_options o = hvae_objective_options_default();
    hvae_epoch_stats st;
    o.tc_weight = 1.0f;
    CHECK_STATUS(hvae_loss_and_grad(f.model, f.ws, x, NULL, 20, NULL, 0, &o, &st),
                 HVAE_ERR_INVALID_ARGUMENT);
    /* beta-TCVAE: the three terms sum to the sampled KL, and it trains. */
    double mi[20], tc[20], dw[20];
    float eps[20 * 3];
    hvae_rng r2;
    hvae_rng_seed(&r2, 9);
    hvae_rng_normal(&r2, eps, 60);
    const float *noise[1] = {eps};
    CHECK_STATUS(hvae_tcvae_terms(f.model, f.ws, x, NULL, 20, noise, 0, 100.0, mi, tc, dw),
                 HVAE_OK);
    float *mu[1], *lv[1], mub[60], lvb[60];
    mu[0] = mub;
    lv[0] = lvb;
    CHECK_STATUS(hvae_encode(f.model, f.ws, x, NULL, 20, mu, lv), HVAE_OK);
    double worst = 0.0;
    for (int64_t r = 0; r < 20; r++) {
        double kl = 0.0;
        for (int64_t k = 0; k < 3; k++) {
            double e = eps[r * 3 + k], z = mub[r * 3 + k] + exp(0.5 * lvb[r * 3 + k]) * e;
            kl += 0.5 * (z * z - lvb[r * 3 + k] - e * e);
        }
        double diff = fabs(mi[r] + tc[r] + dw[r] - kl);
        worst = diff > worst ? diff : worst;
    }
    CHECK(worst < 1e-3);
    CHECK_STATUS(hvae_tcvae_terms(f.model, f.ws, x, NULL, 21, noise, 0, 100.0, mi, tc, dw),
                 HVAE_ERR_BATCH_TOO_LARGE);
    o.tc_weight = 0.0f;
    o.tcvae = 1;
    o.tcvae_weights[1] = 6.0f;
    CHECK_STATUS(hvae_loss_and_grad(f.model, f.ws, x, NULL, n, NULL, 0, &o, &st), HVAE_OK);
    CHECK(isfinite(st.loss) && all_finite_f(hvae_model_grads(f.model), hvae_model_n_params(f.model)));
    o.free_bits = 0.5f; /* not with beta-TCVAE */
    CHECK_STATUS(hvae_loss_and_grad(f.model, f.ws, x, NULL, n, NULL, 0, &o, &st),
                 HVAE_ERR_INVALID_ARGUMENT);
    free_model(&f);
    /* The permutation keeps each column's values. */
    float zin[50 * 2], zout[50 * 2];
    int64_t perm[50];
    for (int i = 0; i < 100; i++)
        zin[i] = (float)i;
    hvae_permute_dims(zout, zin, 50, 2, &r2, perm);
    int kept = 1;
    for (int j = 0; j < 2; j++) {
        double sum_in = 0.0, sum_out = 0.0;
        for (int i = 0; i < 50; i++) {
            sum_in += zin[i * 2 + j];
            sum_out += zout[i * 2 + j];
            kept &= ((int)zout[i * 2 + j] % 2) == j; /* stays in its column */
        }
        kept &= sum_in == sum_out;
    }
    CHECK(kept);
    free(x);
}

static void test_prior_log_density(void)
{
    current_test = "prior_log_density";
    /* Every prior: log p(z_T) finite, each row alone (a subset of the rows
     * gives the same bits), N(0, I)'s and a one-component mixture's (at
     * identity covariances) by formula, the density ratio's N(0, I) + T(z);
     * bad arguments and a categorical top layer refused. */
    const double log_2pi = 1.8378770664093453;
    const int64_t n = 50, D = 6;
    int64_t latent[2] = {3, 2}, hidden[1] = {4};
    float *zraw = make_data(n, 2, 9), z[100];
    for (int64_t k = 0; k < 2 * n; k++)
        z[k] = 6.0f * (zraw[k] - 0.5f);
    hvae_model *other = NULL;
    hvae_workspace *other_ws = NULL;
    for (int kind = 0; kind < 5; kind++) {
        hvae_config c = hvae_config_default(D, 2, latent, 1, hidden);
        c.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
        c.prior = kind == 0 ? HVAE_PRIOR_NORMAL : kind <= 2 ? HVAE_PRIOR_GMM
                  : kind == 3 ? HVAE_PRIOR_VAMP : HVAE_PRIOR_DENSITY_RATIO;
        c.n_components = 1;
        c.prior_covariance = kind == 2 ? HVAE_COVARIANCE_FULL : HVAE_COVARIANCE_DIAG;
        c.n_pseudo_inputs = kind == 3 ? 4 : 0;
        c.discriminator = kind == 4;
        c.discriminator_n_hidden = 1;
        c.discriminator_hidden[0] = 5;
        hvae_model *m = NULL;
        hvae_workspace *ws = NULL;
        CHECK_STATUS(hvae_model_create(&c, &m), HVAE_OK);
        if (!m)
            continue;
        hvae_model_init(m, 7);
        CHECK_STATUS(hvae_workspace_create(m, 3, &ws), HVAE_OK); /* no rows of its own */
        double out[50], part[50];
        CHECK_STATUS(hvae_prior_log_density(m, ws, z, n, out), HVAE_OK);
        CHECK(all_finite_d(out, n));
        CHECK_STATUS(hvae_prior_log_density(m, ws, z + 2 * 17, n - 17, part), HVAE_OK);
        CHECK(memcmp(part, out + 17, (size_t)(n - 17) * sizeof(double)) == 0);
        const float *mu = hvae_model_params(m) + hvae_model_prior_offset(m) + 1;
        float T[50];
        if (kind == 4)
            CHECK_STATUS(hvae_discriminator_log_ratio(m, z, n, T), HVAE_OK);
        double worst = 0.0;
        for (int64_t r = 0; r < n && kind != 3; r++) {
            double a = (double)z[2 * r] - (kind == 1 || kind == 2 ? mu[0] : 0.0);
            double b = (double)z[2 * r + 1] - (kind == 1 || kind == 2 ? mu[1] : 0.0);
            double want = -log_2pi - 0.5 * (a * a + b * b) + (kind == 4 ? T[r] : 0.0);
            worst = fmax(worst, fabs(out[r] - want));
        }
        CHECK(worst < 1e-5);
        CHECK_STATUS(hvae_prior_log_density(m, ws, z, 0, NULL), HVAE_OK);
        CHECK_STATUS(hvae_prior_log_density(m, ws, z, -1, out), HVAE_ERR_INVALID_ARGUMENT);
        CHECK_STATUS(hvae_prior_log_density(m, NULL, z, n, out), HVAE_ERR_INVALID_ARGUMENT);
        CHECK_STATUS(hvae_prior_log_density(m, ws, NULL, n, out), HVAE_ERR_INVALID_ARGUMENT);
        if (other_ws)
            CHECK_STATUS(hvae_prior_log_density(m, other_ws, z, n, out),
                         HVAE_ERR_INVALID_ARGUMENT);
        hvae_workspace_free(other_ws);
        hvae_model_free(other);
        other = m;
        other_ws = ws;
    }
    hvae_workspace_free(other_ws);
    hvae_model_free(other);

    hvae_latent_family families[2] = {HVAE_LATENT_GAUSSIAN, HVAE_LATENT_CATEGORICAL};
    int64_t K[2] = {0, 3};
    hvae_config c = hvae_config_default(D, 2, latent, 1, hidden);
    c.latent_families = families;
    c.n_categories = K;
    hvae_model *m = NULL;
    hvae_workspace *ws = NULL;
    CHECK_STATUS(hvae_model_create(&c, &m), HVAE_OK);
    if (m && hvae_workspace_create(m, 3, &ws) == HVAE_OK) {
        double out[2];
        float zc[12] = {0};
        CHECK_STATUS(hvae_prior_log_density(m, ws, zc, 2, out), HVAE_ERR_INVALID_ARGUMENT);
    }
    hvae_workspace_free(ws);
    hvae_model_free(m);
    free(zraw);
}

int main(void)
{
    test_status_strings();
    test_invalid_configs();
    test_impossible_sizes();
    test_layout_and_init();
    test_check_data();
    test_evaluation();
    test_bernoulli_sampling();
    test_gradient();
    test_training();
    test_training_errors();
    test_rollback();
    test_mlp();
    test_aux_step();
    test_discriminator();
    test_discriminator_shared_step();
    test_data_parallel();
    test_optimizer_formulas();
    test_rng();
    test_kernels();
    test_rowwise_bits();
    test_packed_kernel();
    test_packed_cache();
    test_bernoulli_terms();
    test_variants();
    test_categorical();
    test_many_models();
    test_pool();
    test_pool_claims();
    test_pool_late_workers();
    test_thread_counts();
    test_threads_with_competitor();
    test_poll_stops_long_calls();
    test_vampprior();
    test_prior_log_density();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
