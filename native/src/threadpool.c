/* threadpool.c: persistent workers that run one function on all threads at once, with a spinning barrier.
 *
 * A run is announced by bumping `generation`; workers spin on it for a while (decode steps follow each other in
 * microseconds) and then sleep on a condition variable until the next run. The barrier is a counter with a phase
 * bit: the last thread to arrive resets the counter and flips the phase, the others spin until it flips. */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#  include <immintrin.h>
#  define SP_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#  define SP_CPU_RELAX() __asm__ __volatile__("yield")
#else
#  define SP_CPU_RELAX() ((void)0)
#endif

/* Idle workers spin ~0.1-0.2 ms (enough to cover the host's work between decode steps) before sleeping, so that a
 * second session (a draft model) sharing the cores is not starved by this pool's spinning. */
enum { SP_SPIN_BEFORE_SLEEP = 1 << 13, SP_SPIN_BEFORE_YIELD = 1 << 10 };

struct sp_pool {
    int n;                        /* threads including the caller */
    pthread_t *threads;           /* [n-1] */
    sp_pool_fn fn;
    void *ctx;
    _Atomic uint64_t generation;  /* bumped for each run */
    _Atomic int done;             /* workers finished with the current run */
    _Atomic int stop;
    _Atomic int barrier_count;
    _Atomic int barrier_phase;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;                  /* workers successfully created */
};

typedef struct {
    sp_pool *pool;
    int ith;
} sp_worker_arg;

static void *worker_main(void *arg_) {
    sp_worker_arg arg = *(sp_worker_arg *)arg_;
    free(arg_);
    sp_pool *p = arg.pool;
    uint64_t seen = 0;
    for (;;) {
        /* wait for a new generation: spin, then sleep */
        uint64_t gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&p->stop, memory_order_acquire)) {
            if (++spins < SP_SPIN_BEFORE_SLEEP) {
                SP_CPU_RELAX();
                continue;
            }
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) return NULL;
        seen = gen;
        p->fn(p->ctx, arg.ith, p->n);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel);
    }
}

sp_status sp_pool_new(int n_threads, sp_pool **out) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 512) return sp_fail(SP_ERR_INVALID_ARG, "n_threads must be 1..512, got %d", n_threads);
    sp_pool *p = calloc(1, sizeof *p);
    if (!p) return sp_fail(SP_ERR_NO_MEMORY, "out of memory creating the thread pool");
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
        if (!p->threads) {
            sp_pool_free(p);
            return sp_fail(SP_ERR_NO_MEMORY, "out of memory creating the thread pool");
        }
    }
    for (int i = 1; i < n_threads; i++) {
        sp_worker_arg *arg = malloc(sizeof *arg);
        if (!arg) {
            sp_pool_free(p);
            return sp_fail(SP_ERR_NO_MEMORY, "out of memory creating the thread pool");
        }
        arg->pool = p;
        arg->ith = i;
        if (pthread_create(&p->threads[i - 1], NULL, worker_main, arg) != 0) {
            free(arg);
            sp_pool_free(p);
            return sp_fail(SP_ERR_INTERNAL, "could not start worker thread %d of %d", i, n_threads);
        }
        p->started++;
    }
    *out = p;
    return SP_OK;
}

void sp_pool_free(sp_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->started; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

int sp_pool_size(const sp_pool *p) { return p->n; }

void sp_pool_run(sp_pool *p, sp_pool_fn fn, void *ctx) {
    if (p->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n);
    int spins = 0;
    while (atomic_load_explicit(&p->done, memory_order_acquire) != p->n - 1) {
        if (++spins < SP_SPIN_BEFORE_YIELD) SP_CPU_RELAX();
        else sched_yield();
    }
}

void sp_pool_barrier(sp_pool *p) {
    if (p->n == 1) return;
    int phase = atomic_load_explicit(&p->barrier_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->barrier_count, 1, memory_order_acq_rel) == p->n - 1) {
        atomic_store_explicit(&p->barrier_count, 0, memory_order_relaxed);
        atomic_store_explicit(&p->barrier_phase, phase ^ 1, memory_order_release);
        return;
    }
    int spins = 0;
    while (atomic_load_explicit(&p->barrier_phase, memory_order_acquire) == phase) {
        if (++spins < SP_SPIN_BEFORE_YIELD) SP_CPU_RELAX();
        else sched_yield();
    }
}

int sp_physical_cores(void) {
    /* Count distinct (physical id, core id) pairs in /proc/cpuinfo; fall back to online CPUs. */
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int fallback = online > 0 ? (int)online : 1;
#if defined(__linux__)
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return fallback;
    char line[256];
    int phys = -1, pairs[1024][2], n_pairs = 0;
    while (fgets(line, sizeof line, f)) {
        int v;
        if (sscanf(line, "physical id : %d", &v) == 1) phys = v;
        else if (sscanf(line, "core id : %d", &v) == 1) {
            int seen = 0;
            for (int i = 0; i < n_pairs; i++)
                if (pairs[i][0] == phys && pairs[i][1] == v) seen = 1;
            if (!seen && n_pairs < 1024) {
                pairs[n_pairs][0] = phys;
                pairs[n_pairs][1] = v;
                n_pairs++;
            }
        }
    }
    fclose(f);
    return n_pairs > 0 ? n_pairs : fallback;
#else
    return fallback;
#endif
}
