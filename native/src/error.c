/* error.c: the thread-local last-error message behind sp_last_error(). */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char g_error[512];

sp_status sp_fail(sp_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return status;
}

void sp_clear_error(void) { g_error[0] = '\0'; }

const char *sp_last_error(void) { return g_error; }

const char *sp_status_string(sp_status s) {
    switch (s) {
    case SP_OK: return "SP_OK";
    case SP_ERR_INVALID_ARG: return "SP_ERR_INVALID_ARG";
    case SP_ERR_IO: return "SP_ERR_IO";
    case SP_ERR_BAD_FORMAT: return "SP_ERR_BAD_FORMAT";
    case SP_ERR_UNSUPPORTED: return "SP_ERR_UNSUPPORTED";
    case SP_ERR_NO_MEMORY: return "SP_ERR_NO_MEMORY";
    case SP_ERR_CONTEXT_FULL: return "SP_ERR_CONTEXT_FULL";
    case SP_ERR_INTERNAL: return "SP_ERR_INTERNAL";
    }
    return "SP_ERR_UNKNOWN";
}
