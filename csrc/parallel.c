/*
 * parallel.c -- hvae's own small thread pool: n_threads - 1 workers, made
 * by hvae_set_num_threads and kept until the count changes, that run the
 * parts of a parallel region (a GEMM split in column or row blocks, an
 * elementwise pass split in ranges) with the calling thread taking part 0.
 *
 * Why a pool of our own: with OpenBLAS's threads for the products and a
 * second pool for the elementwise work, two sets of threads would take
 * turns on two cores, and a thread that loses its core stalls its partner
 * at every barrier. One pool runs everything, and OpenBLAS runs on one
 * thread inside each part.
 *
 * A region costs about a microsecond: workers spin (with pause) for a
 * while after each region, so that the next one of a training step finds
 * them awake, then sleep on a condition variable. The caller waits for the
 * workers by spinning too, yielding its core now and then so that a worker
 * that lost its own core to another process can run.
 *
 * The pool is process-wide. A region is run by one caller at a time: a
 * second caller (another model used from another thread), or a region
 * started inside a region, runs all its parts itself. Every split in hvae
 * computes each output element by the same operations whatever the number
 * of parts, so results do not depend on which of these happened.
 *
 * Nothing here allocates: the pool's state is static. Across fork() the
 * child starts with no workers (pthread_atfork) and makes them again at its
 * next hvae_set_num_threads.
 */
#define _GNU_SOURCE
#include "hvae.h"
#include "internal.h"

double hvae_parallel_min_scale = 1.0;

#if defined(_WIN32) || defined(HVAE_NO_THREADS)

int hvae_pool_resize(int n_threads) { return n_threads >= 1 ? 1 : 0; }
int hvae_pool_threads(void) { return 1; }
void hvae_parallel(hvae_task_fn fn, void *ctx, int n_parts)
{
    (void)n_parts;
    fn(ctx, 0, 1);
}
void hvae_barrier(int n_parts) { (void)n_parts; }

#else

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_WORKERS (HVAE_MAX_THREADS - 1)
/* How long an idle worker spins before it sleeps, and how often a caller
 * waiting for the workers yields its core. */
#define SPIN_NANOSECONDS 200000
#define WAIT_SPINS_BEFORE_YIELD 4096

static struct {
    pthread_mutex_t owner;   /* held by the thread running a region */
    pthread_mutex_t resize;  /* serialises hvae_pool_resize */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    pthread_t threads[MAX_WORKERS];
    _Atomic int n_workers;   /* running workers */
    _Atomic unsigned generation; /* bumped to start a region */
    _Atomic int pending;     /* workers still in the current region */
    _Atomic int sleepers;
    _Atomic int stop;
    _Atomic int barrier_count; /* parts arrived at the current barrier */
    _Atomic unsigned barrier_round;
    hvae_task_fn fn;         /* the current region */
    void *ctx;
    int n_parts;
} pool = {.owner = PTHREAD_MUTEX_INITIALIZER, .resize = PTHREAD_MUTEX_INITIALIZER,
          .sleep_lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

/* Each worker's part number and the generation it starts from (the one
 * current when it was made: a region started before it first runs must
 * still be its next). */
static struct {
    int part;
    unsigned seen;
} worker_start[MAX_WORKERS];

static _Thread_local int in_region;

#ifdef HVAE_POOL_STATS
/* For bench/profile_step.c (internal.h): regions run, the time callers
 * spent waiting for workers at their end, the trace of the last regions. */
long hvae_pool_regions;
double hvae_pool_wait_seconds;
hvae_pool_trace_entry hvae_pool_trace[HVAE_POOL_TRACE];
static hvae_pool_trace_entry *trace_entry(void)
{
    return &hvae_pool_trace[hvae_pool_regions % HVAE_POOL_TRACE];
}
#endif
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *worker_main(void *arg)
{
    int part = worker_start[(intptr_t)arg].part; /* 1..n_workers */
    unsigned seen = worker_start[(intptr_t)arg].seen;
    in_region = 1;
    for (;;) {
        unsigned g;
        int64_t spin_until = 0;
        int spins = 0;
        while ((g = atomic_load(&pool.generation)) == seen) {
            if (++spins % 64 != 0) {
                cpu_relax();
                continue;
            }
            int64_t t = monotonic_ns();
            if (spin_until == 0)
                spin_until = t + SPIN_NANOSECONDS;
            if (t < spin_until)
                continue;
            /* Sleep. sleepers is raised before generation is read again and
             * the dispatcher bumps generation before reading sleepers (both
             * sequentially consistent), so one of them sees the other. */
            pthread_mutex_lock(&pool.sleep_lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.generation) == seen)
                pthread_cond_wait(&pool.wake, &pool.sleep_lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.sleep_lock);
            spin_until = 0;
        }
        seen = g;
        if (atomic_load(&pool.stop))
            break;
#ifdef HVAE_POOL_STATS
        /* hvae_pool_regions changes only after every worker has left */
        if (part == 1)
            trace_entry()->worker_start = monotonic_ns();
#endif
        if (part < pool.n_parts)
            pool.fn(pool.ctx, part, pool.n_parts);
#ifdef HVAE_POOL_STATS
        if (part == 1)
            trace_entry()->worker_end = monotonic_ns();
#endif
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* Starts a region run by the workers (pool.fn etc. already set). */
static void wake_workers(void)
{
    atomic_store(&pool.pending, atomic_load(&pool.n_workers));
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
}

static void wait_workers(void)
{
    int spins = 0;
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) {
        if (++spins % WAIT_SPINS_BEFORE_YIELD == 0)
            sched_yield();
        else
            cpu_relax();
    }
}

/* Joins every worker; the caller holds resize and owner. */
static void stop_workers(void)
{
    int n = atomic_load(&pool.n_workers);
    if (n == 0)
        return;
    atomic_store(&pool.stop, 1);
    wake_workers();
    for (int i = 0; i < n; i++)
        pthread_join(pool.threads[i], NULL);
    atomic_store(&pool.stop, 0);
    atomic_store(&pool.n_workers, 0);
}

/* fork(): no region or resize may be in flight; the child has no workers. */
static void before_fork(void)
{
    pthread_mutex_lock(&pool.resize);
    pthread_mutex_lock(&pool.owner);
}
static void after_fork_parent(void)
{
    pthread_mutex_unlock(&pool.owner);
    pthread_mutex_unlock(&pool.resize);
}
static void after_fork_child(void)
{
    atomic_store(&pool.n_workers, 0);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.stop, 0);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_unlock(&pool.owner);
    pthread_mutex_unlock(&pool.resize);
}
static void register_atfork(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

int hvae_pool_resize(int n_threads)
{
    if (n_threads < 1)
        return 0;
    int want = n_threads - 1 < MAX_WORKERS ? n_threads - 1 : MAX_WORKERS;
    if (atomic_load(&pool.n_workers) == want)
        return want + 1;
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.resize);
    pthread_mutex_lock(&pool.owner);
    if (atomic_load(&pool.n_workers) != want) {
        stop_workers();
        int made = 0;
        for (; made < want; made++) {
            worker_start[made].part = made + 1;
            worker_start[made].seen = atomic_load(&pool.generation);
            if (pthread_create(&pool.threads[made], NULL, worker_main,
                               (void *)(intptr_t)made) != 0)
                break;
        }
        /* Workers read n_workers only through pending; a partial pool
         * (pthread_create failed) simply has fewer parts. */
        atomic_store(&pool.n_workers, made);
    }
    int threads = atomic_load(&pool.n_workers) + 1;
    pthread_mutex_unlock(&pool.owner);
    pthread_mutex_unlock(&pool.resize);
    return threads;
}

void hvae_barrier(int n_parts)
{
    if (n_parts <= 1)
        return;
    unsigned round = atomic_load(&pool.barrier_round);
    if (atomic_fetch_add(&pool.barrier_count, 1) == n_parts - 1) {
        atomic_store(&pool.barrier_count, 0);
        atomic_fetch_add(&pool.barrier_round, 1);
        return;
    }
    int spins = 0;
    while (atomic_load(&pool.barrier_round) == round) {
        if (++spins % WAIT_SPINS_BEFORE_YIELD == 0)
            sched_yield();
        else
            cpu_relax();
    }
}

int hvae_pool_threads(void)
{
    return atomic_load(&pool.n_workers) + 1;
}

void hvae_parallel(hvae_task_fn fn, void *ctx, int n_parts)
{
    int workers = atomic_load_explicit(&pool.n_workers, memory_order_relaxed);
    if (n_parts <= 1 || workers == 0 || in_region ||
        pthread_mutex_trylock(&pool.owner) != 0) {
        fn(ctx, 0, 1);
        return;
    }
    workers = atomic_load(&pool.n_workers); /* stable while owner is held */
    if (workers == 0) {
        pthread_mutex_unlock(&pool.owner);
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_parts = n_parts < workers + 1 ? n_parts : workers + 1;
    in_region = 1;
#ifdef HVAE_POOL_STATS
    hvae_pool_trace_entry *trace = trace_entry();
    trace->fn = fn;
    trace->start = monotonic_ns();
#endif
    wake_workers();
    fn(ctx, 0, pool.n_parts);
#ifdef HVAE_POOL_STATS
    trace->caller_end = monotonic_ns();
#endif
    wait_workers();
#ifdef HVAE_POOL_STATS
    trace->end = monotonic_ns();
    hvae_pool_wait_seconds += 1e-9 * (double)(trace->end - trace->caller_end);
    hvae_pool_regions++;
#endif
    in_region = 0;
    pthread_mutex_unlock(&pool.owner);
}

#endif
