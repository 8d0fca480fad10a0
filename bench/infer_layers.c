/*
 * infer_layers.c -- where an evaluation call's time goes, and the ceiling
 * (bench/infer_layers.sh builds and runs it).
 *
 * On ONE thread, in this thread's CPU time (CLOCK_THREAD_CPUTIME_ID, so a
 * neighbour holding the core is not counted), medians over repeats:
 *   - the square sgemm peak (n = 2048) of OpenBLAS and of hvae's row-wise
 *     kernel (hvae_dense_cond_forward with rowwise = 1);
 *   - every dense layer of W2's encode and ELBO at 1024 rows (the chunk the
 *     binding evaluates), through hvae's kernel (product, bias and
 *     activation) and through OpenBLAS (product only), in GFLOP/s;
 *   - whole hvae_encode and hvae_elbo calls (4096 rows in 1024-row chunks), and the
 *     non-GEMM pieces alone (Bernoulli log-likelihood, hashed noise);
 * then the ceiling: the per-row time if every product ran at its own
 * isolated speed and nothing else took time, as a share of the peak.
 *
 *   bench/infer_layers.sh [repeats]
 */
#define _POSIX_C_SOURCE 200809L
#include "hvae.h"
#include "internal.h"
#include "blas.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>

#define ROWS 1024
/* Whole calls: 4 chunks of ROWS, enough for the packed weights (2048 rows
 * and more, csrc/packed.c), as a transform of a data set would be. */
#define CALL_ROWS (4 * ROWS)

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef void (*bench_fn)(void *ctx);

/* The core's FMA throughput with no memory traffic at all: 12 independent
 * chains of 8-lane FMAs (enough to cover the latency of two pipes), the
 * upper bound for any float32 product code on this core. */
__attribute__((target("avx,fma"), noinline))
static void fma_peak(void *ctx)
{
    float *sink = ctx;
    __m256 a[12], m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; i++)
        a[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < 20000000; it++)
        for (int i = 0; i < 12; i++)
            a[i] = _mm256_fmadd_ps(a[i], m, c);
    for (int i = 1; i < 12; i++)
        a[0] = _mm256_add_ps(a[0], a[i]);
    _mm256_storeu_ps(sink, a[0]);
}

/* Median seconds of one call over `repeats` (after one warm-up call). */
static double median_seconds(bench_fn fn, void *ctx, int repeats)
{
    double t[64];
    if (repeats > 64)
        repeats = 64;
    fn(ctx);
    for (int r = 0; r < repeats; r++) {
        double t0 = cpu_now();
        fn(ctx);
        t[r] = cpu_now() - t0;
    }
    qsort(t, (size_t)repeats, sizeof t[0], cmp_double);
    return t[repeats / 2];
}

typedef struct {
    float *out, *inp, *w, *b;
    int64_t B, n_in, n_out;
    hvae_activation act;
} layer_ctx;

static void run_hvae(void *ctx)
{
    layer_ctx *c = ctx;
    hvae_dense_cond_forward(c->out, c->inp, NULL, c->w, c->b, c->act, c->B, c->n_in, 0,
                            c->n_out, 1);
}

static void run_blas(void *ctx)
{
    layer_ctx *c = ctx;
    hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_NO_TRANS, (int)c->B, (int)c->n_out,
               (int)c->n_in, 1.0f, c->inp, (int)c->n_in, c->w, (int)c->n_out, 0.0f, c->out,
               (int)c->n_out);
}

static float *random_floats(int64_t n, unsigned seed)
{
    float *p = malloc((size_t)n * sizeof(float));
    srand(seed);
    for (int64_t i = 0; i < n; i++)
        p[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    return p;
}

typedef struct {
    hvae_model *m;
    hvae_workspace *ws;
    const float *x;
    double *elbo;
    float *mu, *lv;
} call_ctx;

static void run_encode(void *ctx)
{
    call_ctx *c = ctx;
    float *mu[1] = {c->mu}, *lv[1] = {c->lv};
    hvae_encode(c->m, c->ws, c->x, NULL, CALL_ROWS, mu, lv);
}

static void run_elbo(void *ctx)
{
    call_ctx *c = ctx;
    hvae_elbo(c->m, c->ws, c->x, NULL, CALL_ROWS, NULL, 7, c->elbo, NULL, NULL);
}

static void run_bernoulli(void *ctx)
{
    call_ctx *c = ctx;
    hvae_bernoulli_loglik_forward(c->elbo, c->x, c->mu, ROWS, 784);
}

static void run_noise(void *ctx)
{
    call_ctx *c = ctx;
    hvae_hashed_noise(c->m, c->ws, c->x, ROWS, 1, 7);
}

int main(int argc, char **argv)
{
    int repeats = argc > 1 ? atoi(argv[1]) : 9;
    hvae_set_num_threads(1);

    float sink[8];
    double reg_peak = 20000000.0 * 12 * 16 / median_seconds(fma_peak, sink, 3) / 1e9;
    printf("register-only FMA peak (no memory): %.1f GFLOP/s\n", reg_peak);
    /* The square peak. */
    int64_t n = 2048;
    layer_ctx sq = {random_floats(n * n, 1), random_floats(n * n, 2), random_floats(n * n, 3),
                    calloc((size_t)n, sizeof(float)), n, n, n, HVAE_ACT_IDENTITY};
    double peak_blas = 2.0 * n * n * n / median_seconds(run_blas, &sq, 3) / 1e9;
    double peak_hvae = 2.0 * n * n * n / median_seconds(run_hvae, &sq, 3) / 1e9;
    printf("square n=%d: OpenBLAS %.1f GFLOP/s, hvae kernel %.1f GFLOP/s\n", (int)n,
           peak_blas, peak_hvae);

    /* W2's layers: encoder 784-512-256-(32, 32), decoder 32-256-512-784. */
    struct { const char *name; int64_t n_in, n_out; hvae_activation act; int enc; } L[] = {
        {"enc.hidden1", 784, 512, HVAE_ACT_RELU, 1}, {"enc.hidden2", 512, 256, HVAE_ACT_RELU, 1},
        {"enc.mu", 256, 32, HVAE_ACT_IDENTITY, 1}, {"enc.logvar", 256, 32, HVAE_ACT_LOGVAR_CLIP, 1},
        {"dec.hidden1", 32, 256, HVAE_ACT_RELU, 0}, {"dec.hidden2", 256, 512, HVAE_ACT_RELU, 0},
        {"dec.logits", 512, 784, HVAE_ACT_IDENTITY, 0}};
    double t_enc[2] = {0, 0}, t_all[2] = {0, 0}, f_enc = 0, f_all = 0;
    printf("%-12s %9s %9s %9s   (1024 rows, 1 thread, GFLOP/s)\n", "layer", "shape", "hvae",
           "OpenBLAS");
    for (size_t l = 0; l < sizeof L / sizeof L[0]; l++) {
        layer_ctx c = {random_floats(ROWS * L[l].n_out, 4), random_floats(ROWS * L[l].n_in, 5),
                       random_floats(L[l].n_in * L[l].n_out, 6),
                       random_floats(L[l].n_out, 7), ROWS, L[l].n_in, L[l].n_out, L[l].act};
        double flops = 2.0 * ROWS * L[l].n_in * L[l].n_out;
        double th = median_seconds(run_hvae, &c, repeats);
        double tb = median_seconds(run_blas, &c, repeats);
        printf("%-12s %4d-%-4d %9.1f %9.1f\n", L[l].name, (int)L[l].n_in, (int)L[l].n_out,
               flops / th / 1e9, flops / tb / 1e9);
        if (L[l].enc) {
            t_enc[0] += th, t_enc[1] += tb, f_enc += flops;
        }
        t_all[0] += th, t_all[1] += tb, f_all += flops;
        free(c.out), free(c.inp), free(c.w), free(c.b);
    }
    printf("products alone: transform %.1f (OpenBLAS %.1f), score %.1f (OpenBLAS %.1f) GFLOP/s\n",
           f_enc / t_enc[0] / 1e9, f_enc / t_enc[1] / 1e9, f_all / t_all[0] / 1e9,
           f_all / t_all[1] / 1e9);

    int64_t latent[1] = {32}, hidden[2] = {512, 256};
    hvae_config cfg = hvae_config_default(784, 1, latent, 2, hidden);
    cfg.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
    hvae_model *m;
    hvae_workspace *ws;
    if (hvae_model_create(&cfg, &m) != HVAE_OK || hvae_workspace_create(m, ROWS, &ws) != HVAE_OK)
        return 1;
    hvae_model_init(m, 0);
    float *x = random_floats(CALL_ROWS * 784, 8);
    for (int64_t i = 0; i < CALL_ROWS * 784; i++)
        x[i] += 0.5f; /* pixels in [0, 1] */
    call_ctx cc = {m, ws, x, malloc(CALL_ROWS * sizeof(double)),
                   random_floats(CALL_ROWS * 784, 9), random_floats(CALL_ROWS * 784, 10)};
    double te = median_seconds(run_encode, &cc, repeats);
    double ts = median_seconds(run_elbo, &cc, repeats);
    te /= CALL_ROWS / ROWS, ts /= CALL_ROWS / ROWS; /* per chunk of ROWS */
    double tl = median_seconds(run_bernoulli, &cc, repeats);
    double tn = median_seconds(run_noise, &cc, repeats);
    double peak = peak_blas > peak_hvae ? peak_blas : peak_hvae;
    printf("hvae_encode: %.1f GFLOP/s = %.1f%% of peak; products %.1f%% of its time\n",
           f_enc / te / 1e9, 100.0 * f_enc / te / 1e9 / peak, 100.0 * t_enc[0] / te);
    printf("hvae_elbo:   %.1f GFLOP/s = %.1f%% of peak; products %.1f%% of its time\n",
           f_all / ts / 1e9, 100.0 * f_all / ts / 1e9 / peak, 100.0 * t_all[0] / ts);
    printf("per row (us): encode %.3f, elbo %.3f, products enc %.3f all %.3f; "
           "bernoulli %.3f, hashed noise %.3f\n",
           1e6 * te / ROWS, 1e6 * ts / ROWS, 1e6 * t_enc[0] / ROWS, 1e6 * t_all[0] / ROWS,
           1e6 * tl / ROWS, 1e6 * tn / ROWS);
    /* The ceiling: each product at the faster of its two isolated speeds
     * would still leave the likelihood and the noise. */
    printf("ceiling (products at hvae's isolated speed, + bernoulli + noise): score %.1f%% of "
           "peak; products alone %.1f%%\n",
           100.0 * f_all / (t_all[0] + tl + tn) / 1e9 / peak, 100.0 * f_all / t_all[0] / 1e9 / peak);
    hvae_workspace_free(ws);
    hvae_model_free(m);
    return 0;
}
