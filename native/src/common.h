/* common.h: internal helpers shared by every part of libsparrow: error reporting and small utilities. */
#ifndef SP_COMMON_H
#define SP_COMMON_H

#include "sparrow.h"
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

/* Monotonic wall clock in seconds (clock.c). */
double sp_now_s(void);

#define SP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define SP_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
