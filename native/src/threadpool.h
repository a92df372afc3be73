/* threadpool.h: a persistent pool of worker threads for the forward pass.
 *
 * sp_pool_run(pool, fn, ctx) runs fn(ctx, ith, nth) on all nth threads at once (the caller is thread 0) and returns
 * when all are done. Inside fn, threads split work by ith and meet at sp_pool_barrier(). Workers spin briefly then
 * sleep between runs, so decode steps pay no thread creation and little wake-up latency. */
#ifndef SP_THREADPOOL_H
#define SP_THREADPOOL_H

#include "common.h"

typedef struct sp_pool sp_pool;
typedef void (*sp_pool_fn)(void *ctx, int ith, int nth);

sp_status sp_pool_new(int n_threads, sp_pool **out);
void sp_pool_free(sp_pool *pool);
int sp_pool_size(const sp_pool *pool);
void sp_pool_run(sp_pool *pool, sp_pool_fn fn, void *ctx);
void sp_pool_barrier(sp_pool *pool);
/* Split [0, n) into nth near-equal parts; part ith is [*lo, *hi). */
static inline void sp_split(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi) {
    int64_t per = (n + nth - 1) / nth;
    *lo = SP_MIN(n, per * ith);
    *hi = SP_MIN(n, *lo + per);
}
/* Number of physical cores (falls back to online CPUs). */
int sp_physical_cores(void);

#endif
