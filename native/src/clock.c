/* clock.c: the monotonic clock behind sp_now_s() (phase timings, the bandwidth probe). POSIX clock_gettime;
 * kept out of common.h so that files built as strict C11 need no POSIX feature macros. */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <time.h>

double sp_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
