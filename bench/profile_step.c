/*
 * profile_step.c -- where a training step's time goes (bench/profile_step.sh
 * builds and runs it).
 *
 * Runs W2-shaped training steps (Fashion-MNIST-sized data, latent (32,),
 * hidden (512, 256), batch 128, Bernoulli, Adam; other shapes by argument)
 * through the core's own phases, as hvae_train_epoch runs them, timing each
 * phase with clock_gettime: row gathering, noise, gradient zeroing, forward,
 * backward, the finite check, the optimizer. Every hvae_sgemm call is timed
 * too (an interposer: common.c is compiled with hvae_sgemm renamed), so the
 * forward and backward phases split into GEMM and the rest. Then the very
 * GEMM calls of one step, recorded with their arguments and buffers, run
 * back to back: "GEMMs alone", to compare with the GEMMs inside the step.
 *
 *   bench/profile_step.sh [threads] [steps] [latent...] [-- hidden...]
 *
 * Prints the median over steps of each phase, in ms (HVAE_PROFILE_CPU=1:
 * in CPU time, for one thread on a busy machine). Data: random pixels in
 * [0, 1] with Fashion-MNIST's share of zeros (timing does not depend on the
 * values beyond the ReLU pattern).
 */
#define _POSIX_C_SOURCE 200809L
#include "hvae.h"
#include "internal.h"
#include "blas.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <unistd.h>

#ifdef HVAE_HAVE_POOL
extern int hvae_gemm_use_openblas_threads;
extern double hvae_gemm_split_min;
extern long hvae_pool_regions;
extern double hvae_pool_wait_seconds;
#else
static long hvae_pool_regions;
static double hvae_pool_wait_seconds;
static int hvae_gemm_use_openblas_threads;
static double hvae_gemm_split_min;
#endif
void hvae_sgemm_blas(int trans_a, int trans_b, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta,
                     float *C, int ldc);

/* HVAE_PROFILE_CPU=1: this process's CPU time instead of the wall clock,
 * which on one thread leaves out the time other processes held the core
 * (on several threads it counts the workers' spinning too). */
static clockid_t profile_clock = CLOCK_MONOTONIC;

static double now(void)
{
    struct timespec ts;
    clock_gettime(profile_clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU seconds all processes spent busy (/proc/stat), and this process's. */
static double system_busy(void)
{
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long v[8] = {0};
    if (!f)
        return -1.0;
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
                     &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (got < 5)
        return -1.0;
    unsigned long long busy = 0;
    for (int k = 0; k < 8; k++)
        busy += k == 3 || k == 4 ? 0 : v[k];
    return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

static double own_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
}

typedef struct {
    int ta, tb, M, N, K;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int lda, ldb, ldc;
} gemm_call;

#define MAX_CALLS 512
static gemm_call recorded[MAX_CALLS];
static int n_recorded, recording;
static double gemm_seconds;
static double gemm_flops;

/* Only the main thread's calls are timed (with threads, the main thread's
 * share of each split product: the workers' shares run at the same time). */
static _Thread_local int is_main;

void hvae_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                const float *A, int lda, const float *B, int ldb, float beta,
                float *C, int ldc)
{
    if (!is_main) {
        hvae_sgemm_blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (recording && n_recorded < MAX_CALLS)
        recorded[n_recorded++] = (gemm_call){trans_a, trans_b, M, N, K, alpha, beta,
                                             A, B, C, lda, ldb, ldc};
    double t0 = now();
    hvae_sgemm_blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    gemm_seconds += now() - t0;
    gemm_flops += 2.0 * M * N * K;
}

enum { P_STAGE, P_NOISE, P_ZERO, P_FWD_GEMM, P_FWD_OTHER, P_BWD_GEMM, P_BWD_OTHER,
       P_FINITE, P_OPTIM, P_TOTAL, P_FWD_WAIT, P_BWD_WAIT, P_REGIONS, N_PHASES };
static const char *phase_names[N_PHASES] = {
    "gather rows", "noise", "zero grads", "forward GEMM", "forward other",
    "backward GEMM", "backward other", "finite check", "optimizer", "step total",
    "forward waits", "backward waits", "regions"};

int main(int argc, char **argv);

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_of(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#ifdef HVAE_POOL_TRACE
/* HVAE_PROFILE_TRACE=1: the pool's regions of a step, in order, medians
 * over the last steps that the trace holds (us): the caller's part, how
 * late the first worker started, its part, the caller's wait at the end,
 * and the time since the previous region ended (serial work on the caller,
 * the step's gap before its first region). Each region's function is
 * printed as fn=+offset from main; profile_step.sh names them. Where parts
 * are claimed (HVAE_POOL_CLAIMS), "caller" is every part the caller ran,
 * "worker" is part 1 whoever ran it, and the last column the share of the
 * steps in which the caller ran part 1 itself (no worker had claimed it). */
static void print_trace(long regions_before, long regions_after, int steps)
{
    long per = (regions_after - regions_before) / steps;
    if (per <= 0 || (regions_after - regions_before) % steps != 0) {
        printf("trace: %ld regions over %d steps, not a fixed number per step\n",
               regions_after - regions_before, steps);
        return;
    }
    long n = HVAE_POOL_TRACE / per - 1 < steps ? HVAE_POOL_TRACE / per - 1 : steps;
    double *v[5];
    for (int c = 0; c < 5; c++)
        v[c] = calloc((size_t)n, sizeof(double));
    static const char *names[5] = {"caller", "worker late", "worker", "wait", "gap before"};
    printf("regions per step %ld (medians over %ld steps, us):", per, n);
    for (int c = 0; c < 5; c++)
        printf(" %s%s", names[c], c < 4 ? "," : "");
#ifdef HVAE_POOL_CLAIMS
    printf(", part 1 by the caller");
#endif
    printf("\n");
    for (long k = 0; k < per; k++) {
        for (long s = 0; s < n; s++) {
            long r = regions_after - (n - s) * per + k;
            const hvae_pool_trace_entry *e = &hvae_pool_trace[r % HVAE_POOL_TRACE];
            const hvae_pool_trace_entry *prev = &hvae_pool_trace[(r - 1) % HVAE_POOL_TRACE];
            v[0][s] = 1e-3 * (double)(e->caller_end - e->start);
            v[1][s] = 1e-3 * (double)(e->worker_start - e->start);
            v[2][s] = 1e-3 * (double)(e->worker_end - e->worker_start);
            v[3][s] = 1e-3 * (double)(e->end - e->caller_end);
            v[4][s] = 1e-3 * (double)(e->start - prev->end);
        }
        const hvae_pool_trace_entry *last =
            &hvae_pool_trace[(regions_after - per + k) % HVAE_POOL_TRACE];
        printf("  %3ld fn=%+ld", k, (long)((const char *)(void *)last->fn -
                                           (const char *)(void *)main));
        for (int c = 0; c < 5; c++)
            printf(" %8.1f", median_of(v[c], (int)n));
#ifdef HVAE_POOL_CLAIMS
        long by_caller = 0;
        for (long s = 0; s < n; s++)
            by_caller += hvae_pool_trace[(regions_after - (n - s) * per + k) %
                                         HVAE_POOL_TRACE].part1_by_caller;
        printf(" %7.1f%%", 100.0 * (double)by_caller / (double)n);
#endif
        printf("\n");
    }
    for (int c = 0; c < 5; c++)
        free(v[c]);
}
#endif

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    int steps = argc > 2 ? atoi(argv[2]) : 200;
    int64_t latent[HVAE_MAX_LAYERS] = {32}, hidden[HVAE_MAX_HIDDEN] = {512, 256};
    int32_t T = 1, H = 2;
    if (argc > 3) {
        T = 0;
        H = 0;
        int a = 3;
        for (; a < argc && strcmp(argv[a], "--") != 0; a++)
            latent[T++] = atoll(argv[a]);
        for (a++; a < argc; a++)
            hidden[H++] = atoll(argv[a]);
    }
    const int64_t D = 784, n = 60000, batch = 128;
    /* HVAE_OPENBLAS_THREADS=1: the former policy (OpenBLAS's threads for
     * the products); HVAE_SPLIT_MIN: the pool's cut-off in multiply-adds. */
    if (getenv("HVAE_OPENBLAS_THREADS"))
        hvae_gemm_use_openblas_threads = atoi(getenv("HVAE_OPENBLAS_THREADS"));
    if (getenv("HVAE_SPLIT_MIN"))
        hvae_gemm_split_min = atof(getenv("HVAE_SPLIT_MIN"));
    is_main = 1;
    if (getenv("HVAE_PROFILE_CPU") && atoi(getenv("HVAE_PROFILE_CPU")))
        profile_clock = CLOCK_PROCESS_CPUTIME_ID;
    /* One thread for the first warm-up step, which records the step's
     * products whole (with threads they are split in column blocks). */
    hvae_set_num_threads(1);

    float *x = malloc((size_t)(n * D) * sizeof(float));
    int64_t *order = malloc((size_t)n * sizeof(int64_t));
    hvae_rng rng;
    hvae_rng_seed(&rng, 1);
    for (int64_t i = 0; i < n * D; i++) {
        uint64_t r = hvae_rng_next(&rng);
        x[i] = (r & 1) ? 0.0f : (float)(r >> 40) * 0x1.0p-24f;
    }

    hvae_config cfg = hvae_config_default(D, T, latent, H, hidden);
    cfg.likelihood = HVAE_LIKELIHOOD_BERNOULLI;
    hvae_model *m;
    hvae_workspace *ws;
    hvae_optimizer *opt;
    if (hvae_model_create(&cfg, &m) != HVAE_OK ||
        hvae_workspace_create(m, batch, &ws) != HVAE_OK)
        return 1;
    hvae_model_init(m, 0);
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    hvae_optimizer_create(m, &oc, &opt);
#ifdef HVAE_FUSED_STEP
    memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
#endif
    hvae_rng_permutation(&rng, order, n);
    const float *noise[HVAE_MAX_LAYERS];
    for (int32_t i = 0; i < T; i++)
        noise[i] = ws_eps(ws, i);
    float kl_weight[HVAE_MAX_LAYERS];
    for (int32_t i = 0; i < T; i++)
        kl_weight[i] = 1.0f;

    double *times[N_PHASES];
    for (int p = 0; p < N_PHASES; p++)
        times[p] = calloc((size_t)steps, sizeof(double));
    int warm = 20;
    long regions_timed = 0;
    double wall0 = wall_now(), busy0 = system_busy(), own0 = own_cpu();
    for (int s = -warm; s < steps; s++) {
        if (s == 0)
            regions_timed = hvae_pool_regions;
        double t[N_PHASES] = {0};
        int64_t start = ((int64_t)(s + warm) * batch) % (n - batch);
        double t0 = now(), step0 = t0;
        /* gather rows, as stage_rows in train.c */
        for (int64_t b = 0; b < batch; b++)
            memcpy(ws->x + b * D, x + order[start + b] * D, (size_t)D * sizeof(float));
        double t1 = now();
        t[P_STAGE] = t1 - t0;
        for (int32_t i = 0; i < T; i++)
            hvae_rng_normal(&rng, ws_eps(ws, i), batch * latent[i]);
        t0 = now();
        t[P_NOISE] = t0 - t1;
#ifndef HVAE_FUSED_STEP
        memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
#endif
        t1 = now();
        t[P_ZERO] = t1 - t0;
        gemm_seconds = 0.0;
        hvae_pool_wait_seconds = 0.0;
        long regions0 = hvae_pool_regions;
        recording = s == -warm;
        hvae_forward(m, ws, ws->x, NULL, noise, batch, 0, 0);
        double loss = 0.0;
        for (int64_t r = 0; r < batch; r++)
            loss += ws->reconstruction[r];
        t0 = now();
        t[P_FWD_GEMM] = gemm_seconds;
        t[P_FWD_OTHER] = t0 - t1 - gemm_seconds;
        t[P_FWD_WAIT] = hvae_pool_wait_seconds;
        hvae_pool_wait_seconds = 0.0;
        gemm_seconds = 0.0;
        hvae_backward(m, ws, ws->x, NULL, noise, batch, 1.0f / (float)batch, NULL,
                      kl_weight, 0, NULL);
        if (recording)
            hvae_set_num_threads(threads);
        recording = 0;
        t1 = now();
        t[P_BWD_GEMM] = gemm_seconds;
        t[P_BWD_OTHER] = t1 - t0 - gemm_seconds;
        t[P_BWD_WAIT] = hvae_pool_wait_seconds;
        t[P_REGIONS] = 1e-3 * (double)(hvae_pool_regions - regions0);
#ifdef HVAE_FUSED_STEP
        /* The check and the update (with the zeroing) in one call. */
        t0 = now();
        t[P_FINITE] = t0 - t1;
        int ok = hvae_optimizer_step_if_finite(opt, m);
#else
        int ok = hvae_all_finite(m->grads, m->n_params);
        t0 = now();
        t[P_FINITE] = t0 - t1;
        hvae_optimizer_step(opt, m);
#endif
        t1 = now();
        t[P_OPTIM] = t1 - t0;
        t[P_TOTAL] = t1 - step0;
        if (!ok || loss != loss)
            return 2;
        if (s >= 0)
            for (int p = 0; p < N_PHASES; p++)
                times[p][s] = t[p];
    }
#ifdef HVAE_POOL_TRACE
    if (getenv("HVAE_PROFILE_TRACE"))
        print_trace(regions_timed, hvae_pool_regions, steps);
#endif
    (void)regions_timed;
    double gemm_flops_step = 0.0;
    for (int c = 0; c < n_recorded; c++)
        gemm_flops_step += 2.0 * recorded[c].M * recorded[c].N * recorded[c].K;

    /* The step's GEMMs alone, back to back, same buffers and arguments. */
    double *alone = calloc((size_t)steps, sizeof(double));
    for (int s = -warm; s < steps; s++) {
        double t0 = now();
        for (int c = 0; c < n_recorded; c++) {
            gemm_call *g = &recorded[c];
            hvae_sgemm_blas(g->ta, g->tb, g->M, g->N, g->K, g->alpha, g->A, g->lda, g->B,
                            g->ldb, g->beta, g->C, g->ldc);
        }
        if (s >= 0)
            alone[s] = now() - t0;
    }

    double foreign = (system_busy() - busy0) - (own_cpu() - own0);
    foreign /= (wall_now() - wall0) * (double)sysconf(_SC_NPROCESSORS_ONLN);
    if (getenv("HVAE_PER_CALL")) {
        /* Each recorded call on one thread, split on the pool, and on
         * OpenBLAS's threads: interleaved, best of 50 blocks of 5 calls. */
        printf("per call (us, best of 50): M N K trans  1-thread  pool-split  openblas-%d\n",
               threads);
        double sums[3] = {0};
        for (int c = 0; c < n_recorded; c++) {
            gemm_call *g = &recorded[c];
            double best[3] = {1e9, 1e9, 1e9};
            for (int rep = 0; rep < 50; rep++)
                for (int mode = 0; mode < 3; mode++) {
                    hvae_gemm_use_openblas_threads = mode == 2;
                    double saved = hvae_gemm_split_min;
                    if (mode == 0)
                        hvae_gemm_split_min = 1e30;
                    if (mode == 1)
                        hvae_gemm_split_min = 0;
                    double t0 = now();
                    for (int k = 0; k < 5; k++)
                        hvae_sgemm_blas(g->ta, g->tb, g->M, g->N, g->K, g->alpha, g->A,
                                        g->lda, g->B, g->ldb, g->beta, g->C, g->ldc);
                    double t = (now() - t0) / 5;
                    hvae_gemm_split_min = saved;
                    best[mode] = t < best[mode] ? t : best[mode];
                }
            printf("  %4d %4d %4d %c%c %9.1f %9.1f %9.1f\n", g->M, g->N, g->K,
                   g->ta == HVAE_CBLAS_TRANS ? 'T' : 'N', g->tb == HVAE_CBLAS_TRANS ? 'T' : 'N',
                   1e6 * best[0], 1e6 * best[1], 1e6 * best[2]);
            for (int mode = 0; mode < 3; mode++)
                sums[mode] += best[mode];
        }
        printf("  sum             %9.1f %9.1f %9.1f\n", 1e6 * sums[0], 1e6 * sums[1],
               1e6 * sums[2]);
        hvae_gemm_use_openblas_threads = 0;
    }
    printf("threads %d, %d steps, batch %lld, latent", threads, steps, (long long)batch);
    for (int32_t i = 0; i < T; i++)
        printf(" %lld", (long long)latent[i]);
    printf(", hidden");
    for (int32_t j = 0; j < H; j++)
        printf(" %lld", (long long)hidden[j]);
    printf(", %lld parameters, %d GEMM calls, %.1f MFLOP/step; other processes %.0f%% CPU\n",
           (long long)m->n_params, n_recorded, gemm_flops_step / 1e6,
           100.0 * (foreign > 0 ? foreign : 0));
    double sum_parts = 0.0;
    for (int p = 0; p < N_PHASES; p++) {
        double med = median_of(times[p], steps);
        if (p < P_TOTAL)
            sum_parts += med;
        printf("  %-16s %8.3f ms\n", phase_names[p], 1e3 * med);
    }
    double gemm_in = median_of(times[P_FWD_GEMM], steps) + median_of(times[P_BWD_GEMM], steps);
    double total = median_of(times[P_TOTAL], steps);
    double gemm_alone = median_of(alone, steps);
    printf("  %-16s %8.3f ms\n", "GEMMs alone", 1e3 * gemm_alone);
    printf("  GEMMs in step (main thread) %.3f ms (%.1f GFLOP/s), alone %.3f ms (%.1f GFLOP/s); "
           "step %.1f GFLOP/s = %.0f%% of GEMMs alone; non-GEMM %.3f ms\n",
           1e3 * gemm_in, gemm_flops_step / gemm_in / 1e9, 1e3 * gemm_alone,
           gemm_flops_step / gemm_alone / 1e9, gemm_flops_step / total / 1e9,
           100.0 * gemm_alone / total, 1e3 * (total - gemm_in));
    hvae_optimizer_free(opt);
    hvae_workspace_free(ws);
    hvae_model_free(m);
    free(x);
    free(order);
    free(alone);
    for (int p = 0; p < N_PHASES; p++)
        free(times[p]);
    (void)gemm_flops;
    hvae_set_num_threads(1);
    return 0;
}
