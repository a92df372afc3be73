/* bandwidth.c: the memory read-bandwidth probe behind sp_bench_read_bandwidth(), the roofline of decoding.
 *
 * Shape legend: N = threads, W = 64-bit words per thread buffer, R = timed passes.
 *
 * Each of the N threads pins itself to a CPU of its own (where the OS allows; more threads than the CPUs this process
 * may use is refused, as two threads on one CPU would take turns and read half as fast), allocates its own buffer and
 * writes it (so the pages exist and sit next to that thread), then waits. For every pass the main thread bumps a
 * generation number; the workers wake, meet at a spinning start line (so no thread starts its stream while another
 * is still waking up), read their whole buffer once and record their start and end times. A pass's bandwidth is
 * N x buffer bytes / (latest end - earliest start). Pass 0 is the untimed warm-up.
 *
 * The read kernel sums the buffer as 16-byte vectors of uint64 with eight independent accumulators. The buffer holds
 * word j = j + 1, so every pass's sum must equal W (W + 1) / 2 (mod 2^64): a pass that skipped or misread data is an
 * error, not a number. 16 bytes is the widest vector the base flags have (SSE2 on x86-64 without -m flags, NEON on
 * arm64): a wider GCC vector is split into several registers and, with four accumulators, spilled to the stack on
 * every add, which capped the loop near 29 GB/s per core on Zen 4, the speed of a one-thread DRAM stream and far
 * below a cache's. Eight register accumulators let the loads run at the core's load rate (two or three 16-byte loads
 * per cycle): above DRAM and the last-level cache, so a buffer the size of a model's weights measures the bandwidth
 * of the cache that holds them (`sparrow bench` probes one where the weights fit in the last-level cache). The L1 and
 * L2 caches of wide-vector cores can deliver more than 16-byte loads take; no ISA-specific version reads them.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#  define _GNU_SOURCE /* cpu_set_t, sched_getaffinity, pthread_setaffinity_np */
#endif
#include "common.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <unistd.h>
#if defined(__linux__)
#  include <sys/mman.h>
#endif

enum { SP_BW_MAX_THREADS = 256, SP_BW_ALIGN = 256, SP_BW_HUGE = 2 << 20 };

typedef uint64_t sp_u64x8 __attribute__((vector_size(64)));  /* a buffer's unit: one cache line */
typedef uint64_t sp_u64x2 __attribute__((vector_size(16)));  /* what the read kernel loads: one register */

typedef struct bw_shared {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int generation;          /* pass being run: 1 = warm-up, 2.. = timed; workers wait for it to change */
    int stop;
    int ready;               /* workers that finished setup (or failed it) */
    int done;                /* workers that finished the current pass */
    int n;                   /* N */
    _Atomic int arrived;     /* spinning start line: N per pass */
} bw_shared;

typedef struct bw_thread {
    bw_shared *sh;
    pthread_t tid;
    int ith;
    int cpu;                 /* CPU to pin to, -1: do not pin */
    int pinned;
    int pin_errno;
    sp_u64x8 *buf;           /* [W / 8], written by this thread */
    size_t n_vec;            /* W / 8 */
    int alloc_ok;
    double t0[SP_BANDWIDTH_MAX_REPEATS + 1];   /* [R + 1] start of each pass (seconds, monotonic) */
    double t1[SP_BANDWIDTH_MAX_REPEATS + 1];   /* [R + 1] end of each pass */
    uint64_t sum[SP_BANDWIDTH_MAX_REPEATS + 1];
} bw_thread;

/* Sum of n cache lines (n a multiple of 4) as 16-byte vectors: 16 loads per 256 bytes into eight accumulators held
 * in registers, so the loads do not wait on one add chain (nor on the stack, see the top of the file). */
static uint64_t read_sum(const sp_u64x8 *p, size_t n) {
    const sp_u64x2 *q = (const sp_u64x2 *)p; /* [4 n] */
    sp_u64x2 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    for (size_t i = 0; i < 4 * n; i += 16) {
        a0 += q[i];
        a1 += q[i + 1];
        a2 += q[i + 2];
        a3 += q[i + 3];
        a4 += q[i + 4];
        a5 += q[i + 5];
        a6 += q[i + 6];
        a7 += q[i + 7];
        a0 += q[i + 8];
        a1 += q[i + 9];
        a2 += q[i + 10];
        a3 += q[i + 11];
        a4 += q[i + 12];
        a5 += q[i + 13];
        a6 += q[i + 14];
        a7 += q[i + 15];
    }
    sp_u64x2 a = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    return a[0] + a[1];
}

static int pin_self(int cpu) {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
    (void)cpu;
    return ENOSYS;
#endif
}

static void *bw_worker(void *arg) {
    bw_thread *t = arg;
    bw_shared *sh = t->sh;
    if (t->cpu >= 0) {
        t->pin_errno = pin_self(t->cpu);
        t->pinned = t->pin_errno == 0;
    }
    void *mem = NULL;
    const size_t bytes = t->n_vec * sizeof(sp_u64x8);
    if (posix_memalign(&mem, SP_BW_HUGE, bytes) == 0) {
#if defined(MADV_HUGEPAGE)
        /* transparent huge pages where the kernel offers them, as large weight mappings get: with 4 KiB pages a
         * stream pays a TLB miss every 4 KiB and reads slower than the memory allows. Advice only; may fail. */
        (void)madvise(mem, bytes / SP_BW_HUGE * SP_BW_HUGE, MADV_HUGEPAGE);
#endif
        uint64_t *w = mem;
        size_t n_words = t->n_vec * 8;
        for (size_t j = 0; j < n_words; j++) w[j] = (uint64_t)j + 1;
        t->buf = mem;
        t->alloc_ok = 1;
    }
    pthread_mutex_lock(&sh->mu);
    sh->ready++;
    pthread_cond_broadcast(&sh->cv);
    int seen = 0;
    for (;;) {
        while (sh->generation == seen && !sh->stop) pthread_cond_wait(&sh->cv, &sh->mu);
        if (sh->stop) break;
        seen = sh->generation;
        pthread_mutex_unlock(&sh->mu);

        /* start line: every worker of this pass has woken up */
        atomic_fetch_add(&sh->arrived, 1);
        for (int spins = 0; atomic_load(&sh->arrived) < sh->n * seen;)
            if (++spins > 1000) sched_yield(); /* more threads than CPUs: let the others get there */
        const sp_u64x8 *p = t->buf;
        __asm__ __volatile__("" : "+r"(p) : : "memory"); /* the buffer must be read again on every pass */
        t->t0[seen - 1] = sp_now_s();
        t->sum[seen - 1] = read_sum(p, t->n_vec);
        t->t1[seen - 1] = sp_now_s();

        pthread_mutex_lock(&sh->mu);
        sh->done++;
        pthread_cond_broadcast(&sh->cv);
    }
    pthread_mutex_unlock(&sh->mu);
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The CPUs this process may run on, in order; returns how many (0 where unknown). */
static int allowed_cpus(int *cpus, int cap) {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
    int n = 0;
    for (int c = 0; c < CPU_SETSIZE && n < cap; c++)
        if (CPU_ISSET(c, &set)) cpus[n++] = c;
    return n;
#else
    (void)cpus;
    (void)cap;
    return 0;
#endif
}

sp_bandwidth_params sp_bandwidth_default_params(void) {
    sp_bandwidth_params p;
    memset(&p, 0, sizeof p);
    p.n_threads = 1;
    p.bytes_per_thread = (size_t)256 << 20;
    p.repeats = 5;
    p.pin_threads = true;
    return p;
}

sp_status sp_bench_read_bandwidth(sp_bandwidth_params params, sp_bandwidth_result *out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_bench_read_bandwidth: out is NULL");
    memset(out, 0, sizeof *out);
    const int n = params.n_threads, reps = params.repeats;
    if (n < 1 || n > SP_BW_MAX_THREADS)
        return sp_fail(SP_ERR_INVALID_ARG, "n_threads must be in 1..%d, got %d", SP_BW_MAX_THREADS, n);
    if (reps < 1 || reps > SP_BANDWIDTH_MAX_REPEATS)
        return sp_fail(SP_ERR_INVALID_ARG, "repeats must be in 1..%d, got %d", SP_BANDWIDTH_MAX_REPEATS, reps);
    const size_t bytes = params.bytes_per_thread / SP_BW_ALIGN * SP_BW_ALIGN;
    if (bytes < 4096)
        return sp_fail(SP_ERR_INVALID_ARG, "bytes_per_thread must be at least 4096, got %zu", params.bytes_per_thread);
    uint64_t total = 0;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (!sp_mul_ok(bytes, (uint64_t)n, &total) ||
        (pages > 0 && page > 0 && total > (uint64_t)pages * (uint64_t)page))
        return sp_fail(SP_ERR_INVALID_ARG, "%d threads x %zu bytes is more than the physical memory", n, bytes);

    int cpus[SP_BW_MAX_THREADS];
    int n_cpus = params.pin_threads ? allowed_cpus(cpus, SP_BW_MAX_THREADS) : 0;
    if (n_cpus > 0 && n > n_cpus) /* two threads pinned to one CPU take turns: the probe would read half as fast */
        return sp_fail(SP_ERR_INVALID_ARG, "%d pinned threads, but this process may run on %d CPU%s: they would "
                       "share them; ask for at most %d threads, or pass pin_threads = false", n, n_cpus,
                       n_cpus == 1 ? "" : "s", n_cpus);

    bw_thread *th = calloc((size_t)n, sizeof *th);
    if (!th) return sp_fail(SP_ERR_NO_MEMORY, "sp_bench_read_bandwidth: out of memory for %d threads", n);
    bw_shared sh;
    memset(&sh, 0, sizeof sh);
    pthread_mutex_init(&sh.mu, NULL);
    pthread_cond_init(&sh.cv, NULL);
    sh.n = n;
    atomic_init(&sh.arrived, 0);

    sp_status st = SP_OK;
    int started = 0;
    for (int i = 0; i < n; i++) {
        th[i].sh = &sh;
        th[i].ith = i;
        th[i].n_vec = bytes / sizeof(sp_u64x8);
        th[i].cpu = !params.pin_threads ? -1 : n_cpus > 0 ? cpus[i] : -2;
        if (th[i].cpu == -2) { /* asked to pin, but the OS gives no CPU list (or has no affinity API) */
            th[i].cpu = -1;
            th[i].pin_errno = ENOSYS;
        }
        if (pthread_create(&th[i].tid, NULL, bw_worker, &th[i]) != 0) {
            st = sp_fail(SP_ERR_INTERNAL, "sp_bench_read_bandwidth: could not start thread %d of %d", i + 1, n);
            break;
        }
        started++;
    }

    pthread_mutex_lock(&sh.mu);
    while (sh.ready < started) pthread_cond_wait(&sh.cv, &sh.mu);
    for (int i = 0; i < started && st == SP_OK; i++)
        if (!th[i].alloc_ok)
            st = sp_fail(SP_ERR_NO_MEMORY, "sp_bench_read_bandwidth: could not allocate %zu bytes for thread %d", bytes,
                         i + 1);
    for (int g = 1; st == SP_OK && g <= reps + 1; g++) { /* pass 1 is the warm-up */
        sh.done = 0;
        sh.generation = g;
        pthread_cond_broadcast(&sh.cv);
        while (sh.done < n) pthread_cond_wait(&sh.cv, &sh.mu);
    }
    sh.stop = 1;
    pthread_cond_broadcast(&sh.cv);
    pthread_mutex_unlock(&sh.mu);
    for (int i = 0; i < started; i++) pthread_join(th[i].tid, NULL);

    if (st == SP_OK) {
        const uint64_t w = (uint64_t)(bytes / 8);
        const uint64_t expect = (w % 2 == 0) ? (w / 2) * (w + 1) : w * ((w + 1) / 2); /* sum of 1..W mod 2^64 */
        for (int r = 0; r <= reps && st == SP_OK; r++)
            for (int i = 0; i < n; i++)
                if (th[i].sum[r] != expect) {
                    st = sp_fail(SP_ERR_INTERNAL, "bandwidth probe: thread %d pass %d read a wrong sum", i + 1, r);
                    break;
                }
    }
    if (st == SP_OK) {
        out->n_threads = n;
        out->repeats = reps;
        out->bytes_per_thread = bytes;
        double sorted[SP_BANDWIDTH_MAX_REPEATS];
        for (int r = 0; r < reps; r++) {
            double t0 = th[0].t0[r + 1], t1 = th[0].t1[r + 1];
            for (int i = 1; i < n; i++) {
                t0 = SP_MIN(t0, th[i].t0[r + 1]);
                t1 = SP_MAX(t1, th[i].t1[r + 1]);
            }
            double dt = t1 - t0 > 1e-9 ? t1 - t0 : 1e-9;
            out->gb_s[r] = sorted[r] = (double)n * (double)bytes / dt / 1e9;
        }
        qsort(sorted, (size_t)reps, sizeof sorted[0], cmp_double);
        out->gb_s_min = sorted[0];
        out->gb_s_max = sorted[reps - 1];
        out->gb_s_median = reps % 2 ? sorted[reps / 2] : 0.5 * (sorted[reps / 2 - 1] + sorted[reps / 2]);
        for (int i = 0; i < n; i++) {
            out->n_pinned += th[i].pinned;
            if (!out->pin_errno && th[i].pin_errno) out->pin_errno = th[i].pin_errno;
        }
    }
    for (int i = 0; i < n; i++) free(th[i].buf);
    free(th);
    pthread_cond_destroy(&sh.cv);
    pthread_mutex_destroy(&sh.mu);
    return st;
}
