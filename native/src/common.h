/* common.h: internal helpers shared by every part of libsparrow: error reporting and small utilities. */
#ifndef SP_COMMON_H
#define SP_COMMON_H

#include "sparrow.h"
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#  define SP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#  define SP_PRINTF(a, b)
#endif

/* Record a failure for sp_last_error() on this thread and return the status (so: `return sp_fail(...)`). */
sp_status sp_fail(sp_status status, const char *fmt, ...) SP_PRINTF(2, 3);
/* Clear the thread's last error (at the start of each public call). */
void sp_clear_error(void);

/* Overflow-checked size arithmetic: return false on overflow. */
static inline bool sp_mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool sp_add_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* One call at a time on an object (a session, a generator): sp_claim takes its busy flag for this call, refusing
 * with a clear error ("WHAT: the OBJECT is in use by another thread (one call at a time per OBJECT: ADVICE)") while
 * another thread holds it; sp_release gives it back and passes the call's status through. */
static inline sp_status sp_claim(_Atomic int *busy, const char *what, const char *object, const char *advice) {
    if (atomic_exchange_explicit(busy, 1, memory_order_acquire))
        return sp_fail(SP_ERR_INVALID_ARG, "%s: the %s is in use by another thread (one call at a time per %s: %s)",
                       what, object, object, advice);
    return SP_OK;
}
static inline sp_status sp_release(_Atomic int *busy, sp_status st) {
    atomic_store_explicit(busy, 0, memory_order_release);
    return st;
}

/* Monotonic wall clock in seconds (clock.c). */
double sp_now_s(void);

#define SP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define SP_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
