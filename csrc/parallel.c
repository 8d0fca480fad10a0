/*
 * parallel.c -- hvae's own small thread pool: n_threads - 1 workers, made
 * by hvae_set_num_threads and kept until the count changes, that run the
 * parts of a parallel region (a GEMM split in column or row blocks, an
 * elementwise pass split in ranges) with the calling thread.
 *
 * Why a pool of our own: with OpenBLAS's threads for the products and a
 * second pool for the elementwise work, two sets of threads would take
 * turns on two cores, and a thread that loses its core stalls its partner
 * at every barrier. One pool runs everything, and OpenBLAS runs on one
 * thread inside each part.
 *
 * Parts are claimed, not assigned: the caller runs part 0, then takes any
 * part that no worker has claimed yet, and the region ends when every part
 * is done. On a machine shared with another busy process, a worker that
 * has lost its core when a region starts costs the region nothing (the
 * caller runs its part); only a worker preempted inside a part it already
 * took is waited for. Which thread runs a part changes no result: a part
 * function sees only (ctx, part, n_parts).
 *
 * A region costs about a microsecond: workers spin (with pause) for a
 * short while after each region, so that the next one of a training step
 * finds them awake, then sleep on a condition variable. The caller waits for
 * parts still running by spinning too, yielding its core now and then so
 * that a worker that lost its own core to another process can run.
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

#else

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_WORKERS (HVAE_MAX_THREADS - 1)
/* How long an idle worker spins before it sleeps, and how often a caller
 * waiting for the workers yields its core. The spin is short: on a machine
 * shared with another busy process, a worker spinning while the caller
 * shares the other core with that process holds a core for nothing (W2 on
 * two threads beside one busy process: 12.7 ms a step spinning 200 us,
 * 9.8 ms spinning 20 us, one thread 9.0 ms). On a quiet machine the
 * regions of a step follow each other within microseconds, but a worker
 * now sleeps through the serial start of a step (gathering rows, drawing
 * noise) and begins the first product about 40 us late: about 1.7% of a
 * W2 step of 5 ms (200 us here keeps the quiet step as it was). */
#define SPIN_NANOSECONDS 20000
#define WAIT_SPINS_BEFORE_YIELD 4096

/* The claim word: a region's generation (bits 32..63), its part count
 * (16..31) and the next part to claim (0..15), in one atomic, so that a
 * claim (fetch_add 1) names the region it belongs to: a worker that wakes
 * late claims in whatever region is current when it claims, never in the
 * one it woke for. The next-part field cannot overflow: in one region it
 * grows by at most n_parts successful claims plus one failed claim per
 * thread (a thread stops claiming in a region at its first failure), at
 * most 2 HVAE_MAX_THREADS in all. */
#define CLAIM_WORD(gen, n_parts, next) \
    (((uint64_t)(gen) << 32) | ((uint64_t)(n_parts) << 16) | (uint64_t)(next))
#define CLAIM_GEN(w) ((unsigned)((w) >> 32))
#define CLAIM_PARTS(w) ((int)(((w) >> 16) & 0xffff))
#define CLAIM_NEXT(w) ((int)((w) & 0xffff))

static struct {
    pthread_mutex_t owner;   /* held by the thread running a region */
    pthread_mutex_t resize;  /* serialises hvae_pool_resize */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    pthread_t threads[MAX_WORKERS];
    _Atomic int n_workers;   /* running workers */
    _Atomic int sleepers;
    _Atomic int stop;
    /* The current region: written by the owner before it publishes the
     * claim word, read by a worker only after it won a claim of that
     * region (which cannot end, so these cannot change, before the part is
     * done). */
    hvae_task_fn fn;
    void *ctx;
    unsigned generation;     /* the owner's: regions started */
    /* The claim word, which idle workers spin on, and the parts of the
     * current region that workers have finished, which the caller spins on,
     * on lines of their own. */
    _Alignas(64) _Atomic uint64_t claim;
    _Alignas(64) _Atomic int done;
} pool = {.owner = PTHREAD_MUTEX_INITIALIZER, .resize = PTHREAD_MUTEX_INITIALIZER,
          .sleep_lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

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

/* Part `part` of the region whose claim this thread has won (the trace
 * records part 1, whoever runs it). */
static void run_part(int part, int n_parts, int by_caller)
{
#ifdef HVAE_POOL_STATS
    /* hvae_pool_regions changes only after every part is done */
    hvae_pool_trace_entry *trace = trace_entry();
    if (part == 1)
        trace->worker_start = monotonic_ns();
#else
    (void)by_caller;
#endif
    pool.fn(pool.ctx, part, n_parts);
#ifdef HVAE_POOL_STATS
    if (part == 1) {
        trace->worker_end = monotonic_ns();
        trace->part1_by_caller = by_caller;
    }
#endif
}

/* Claims and runs parts of the current region until none is left; returns
 * the claim word of its failed claim. The fetch_add is acq_rel: acquire
 * for fn and ctx (published before the word), and each claim continues the
 * release sequence of the owner's store of the word. */
static uint64_t run_parts(int by_caller, int *ran)
{
    for (;;) {
        uint64_t w = atomic_fetch_add_explicit(&pool.claim, 1, memory_order_acq_rel);
        if (CLAIM_NEXT(w) >= CLAIM_PARTS(w))
            return w;
        run_part(CLAIM_NEXT(w), CLAIM_PARTS(w), by_caller);
        if (by_caller)
            (*ran)++;
        else
            atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg)
{
    unsigned seen = (unsigned)(uintptr_t)arg; /* generation at its making */
    in_region = 1;
    for (;;) {
        int64_t spin_until = 0;
        int spins = 0;
        while (CLAIM_GEN(atomic_load(&pool.claim)) == seen) {
            if (++spins % 64 != 0) {
                cpu_relax();
                continue;
            }
            int64_t t = monotonic_ns();
            if (spin_until == 0)
                spin_until = t + SPIN_NANOSECONDS;
            if (t < spin_until)
                continue;
            /* Sleep. sleepers is raised before the claim word is read again
             * and the owner stores the word before reading sleepers (both
             * sequentially consistent), so one of them sees the other. */
            pthread_mutex_lock(&pool.sleep_lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while (CLAIM_GEN(atomic_load(&pool.claim)) == seen)
                pthread_cond_wait(&pool.wake, &pool.sleep_lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.sleep_lock);
            spin_until = 0;
        }
        /* The region this worker fails to claim in is the one it has seen,
         * whichever it woke for. stop is set before stop_workers publishes
         * its empty region, so a worker that failed in that one sees it. */
        seen = CLAIM_GEN(run_parts(0, NULL));
        if (atomic_load(&pool.stop))
            break;
    }
    return NULL;
}

/* Starts region pool.generation + 1 of n_parts parts, part 0 taken by the
 * caller (pool.fn and ctx already set; n_parts 0 for stop_workers). done
 * is reset before the word is published: every worker increment of the
 * previous region came before the owner saw it end, and every one of this
 * region comes after a claim of the word. */
static void start_region(int n_parts)
{
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pool.generation++;
    atomic_store(&pool.claim, CLAIM_WORD(pool.generation, n_parts, n_parts > 0));
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
}

/* Until the workers have finished `parts` parts (acquire: their writes are
 * the caller's after it). */
static void wait_parts(int parts)
{
    int spins = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < parts) {
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
    start_region(0);
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
    atomic_store(&pool.done, 0);
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
        for (; made < want; made++)
            if (pthread_create(&pool.threads[made], NULL, worker_main,
                               (void *)(uintptr_t)pool.generation) != 0)
                break;
        /* A partial pool (pthread_create failed) simply has fewer parts. */
        atomic_store(&pool.n_workers, made);
    }
    int threads = atomic_load(&pool.n_workers) + 1;
    pthread_mutex_unlock(&pool.owner);
    pthread_mutex_unlock(&pool.resize);
    return threads;
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
    n_parts = n_parts < workers + 1 ? n_parts : workers + 1;
    in_region = 1;
#ifdef HVAE_POOL_STATS
    hvae_pool_trace_entry *trace = trace_entry();
    trace->fn = fn;
    trace->start = monotonic_ns();
#endif
    start_region(n_parts);
    fn(ctx, 0, n_parts);
    /* Then any part no worker has claimed yet; the region ends when the
     * workers have finished the rest. */
    int ran = 1;
    run_parts(1, &ran);
#ifdef HVAE_POOL_STATS
    trace->caller_end = monotonic_ns();
#endif
    wait_parts(n_parts - ran);
#ifdef HVAE_POOL_STATS
    trace->end = monotonic_ns();
    hvae_pool_wait_seconds += 1e-9 * (double)(trace->end - trace->caller_end);
    hvae_pool_regions++;
#endif
    in_region = 0;
    pthread_mutex_unlock(&pool.owner);
}

#endif
