/* npy.c: 2-D int32 matrices in NumPy's .npy format (version 1.0 written; 1.0 and 2.0 read), for Token Recycling's
 * state (draft.c), so files move between the C generator and runtime/drafters.py.
 *
 * File: "\x93NUMPY", major, minor, header length (uint16 LE in 1.0, uint32 LE in 2.0), then an ASCII Python dict
 * literal {'descr': '<i4', 'fortran_order': False, 'shape': (ROWS, COLS), } padded with spaces to a 64-byte boundary
 * and ended by '\n', then ROWS x COLS little-endian int32 values in row order. The reader takes the keys in any order
 * and the spacing NumPy may use, nothing else: every file it accepts has exactly the expected shape and size. */
#include "draft.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c reads and writes little-endian int32 as it is in memory"
#endif

enum { NPY_MAX_HEADER = 4096 };

sp_status sp_npy_save_i32(const char *path, const int32_t *data, int32_t rows, int32_t cols) {
    if (!path || !*path) return sp_fail(SP_ERR_INVALID_ARG, "save: empty path");
    char head[256];
    int h = snprintf(head, sizeof head, "{'descr': '<i4', 'fortran_order': False, 'shape': (%d, %d), }", (int)rows,
                     (int)cols);
    const int total = ((10 + h + 1 + 63) / 64) * 64; /* magic..length (10 bytes), dict, '\n': 64-byte aligned */
    while (10 + h + 1 < total) head[h++] = ' ';
    head[h++] = '\n';
    const size_t plen = strlen(path), tlen = plen + 32;
    char *tmp = malloc(tlen);
    if (!tmp) return sp_fail(SP_ERR_NO_MEMORY, "save %s: out of memory", path);
    snprintf(tmp, tlen, "%s.%ld.tmp", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        sp_status st = sp_fail(SP_ERR_IO, "save %s: cannot create %s: %s", path, tmp, strerror(errno));
        free(tmp);
        return st;
    }
    const unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(h & 0xff),
                                   (unsigned char)(h >> 8)};
    const size_t n = (size_t)rows * (size_t)cols;
    bool ok = fwrite(pre, 1, sizeof pre, f) == sizeof pre && fwrite(head, 1, (size_t)h, f) == (size_t)h &&
              fwrite(data, sizeof *data, n, f) == n && fflush(f) == 0 && fsync(fileno(f)) == 0;
    const int err = errno;
    ok = fclose(f) == 0 && ok;
    if (ok && rename(tmp, path) != 0) ok = false;
    sp_status st = SP_OK;
    if (!ok) {
        st = sp_fail(SP_ERR_IO, "save %s: %s (the file there, if any, is unchanged)", path, strerror(err ? err : errno));
        remove(tmp);
    }
    free(tmp);
    return st;
}

/* ---- the header's dict, strictly ---- */

typedef struct { const char *s, *end; } cursor;

static void skip_space(cursor *c) {
    while (c->s < c->end && *c->s == ' ') c->s++;
}

static bool take(cursor *c, const char *lit) {
    skip_space(c);
    const size_t n = strlen(lit);
    if ((size_t)(c->end - c->s) < n || memcmp(c->s, lit, n) != 0) return false;
    c->s += n;
    return true;
}

/* A non-negative decimal integer of at most 10 digits. */
static bool take_int(cursor *c, long long *out) {
    skip_space(c);
    long long v = 0;
    int digits = 0;
    while (c->s < c->end && isdigit((unsigned char)*c->s) && digits < 11) v = v * 10 + (*c->s++ - '0'), digits++;
    *out = v;
    return digits >= 1 && digits <= 10;
}

static bool parse_header(const char *h, size_t n, long long *rows, long long *cols, const char **why) {
    cursor c = {h, h + n};
    bool descr = false, order = false, shape = false;
    if (!take(&c, "{")) return *why = "the header is not a dict", false;
    while (!take(&c, "}")) {
        if (take(&c, "'descr'")) {
            if (descr || !take(&c, ":")) return *why = "bad 'descr'", false;
            if (!take(&c, "'<i4'")) return *why = "the values are not little-endian int32 ('<i4')", false;
            descr = true;
        } else if (take(&c, "'fortran_order'")) {
            if (order || !take(&c, ":")) return *why = "bad 'fortran_order'", false;
            if (!take(&c, "False")) return *why = "the matrix is not in row order (fortran_order)", false;
            order = true;
        } else if (take(&c, "'shape'")) {
            if (shape || !take(&c, ":") || !take(&c, "(") || !take_int(&c, rows) || !take(&c, ",") ||
                !take_int(&c, cols))
                return *why = "the shape is not a pair of integers (a 2-D matrix)", false;
            take(&c, ",");
            if (!take(&c, ")")) return *why = "the shape is not a pair of integers (a 2-D matrix)", false;
            shape = true;
        } else {
            return *why = "the header holds an unknown key", false;
        }
        if (!take(&c, ",")) {
            if (!take(&c, "}")) return *why = "the header's dict is malformed", false;
            break;
        }
    }
    if (!descr || !order || !shape) return *why = "the header lacks 'descr', 'fortran_order' or 'shape'", false;
    skip_space(&c);
    if (c.s != c.end) return *why = "bytes after the header's dict", false;
    return true;
}

sp_status sp_npy_load_i32(const char *path, int32_t *out, int32_t rows, int32_t cols) {
    if (!path || !*path) return sp_fail(SP_ERR_INVALID_ARG, "load: empty path");
    struct stat sb;
    if (stat(path, &sb) != 0) return sp_fail(SP_ERR_IO, "load %s: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return sp_fail(SP_ERR_IO, "load %s: not a regular file", path);
    FILE *f = fopen(path, "rb");
    if (!f) return sp_fail(SP_ERR_IO, "load %s: %s", path, strerror(errno));
    sp_status st = SP_OK;
    unsigned char pre[12];
    char head[NPY_MAX_HEADER];
    size_t hlen = 0, off = 0;
    const char *why = NULL;
    long long r = -1, c = -1;
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        why = "not a NumPy .npy file";
    } else if (pre[6] == 1 && pre[7] == 0) {
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
        off = 10;
    } else if (pre[6] == 2 && pre[7] == 0 && fread(pre + 10, 1, 2, f) == 2) {
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
        off = 12;
    } else {
        why = "an .npy version other than 1.0 and 2.0";
    }
    if (!why && (hlen < 2 || hlen > sizeof head)) why = "the header length is out of range";
    if (!why && fread(head, 1, hlen, f) != hlen) why = "the file ends inside the header";
    if (!why && head[hlen - 1] != '\n') why = "the header does not end with a newline";
    if (!why) parse_header(head, hlen - 1, &r, &c, &why);
    const size_t n = (size_t)rows * (size_t)cols;
    if (!why && (r != rows || c != cols)) {
        fclose(f);
        return sp_fail(SP_ERR_BAD_FORMAT, "load %s: it holds a %lld x %lld matrix, this drafter needs %d x %d (another "
                       "model, or other recycling_k)", path, r, c, (int)rows, (int)cols);
    }
    if (!why && (long long)sb.st_size != (long long)(off + hlen + n * sizeof *out))
        why = "its size does not match its shape (truncated or extended)";
    if (!why && fread(out, sizeof *out, n, f) != n) why = "the file ends inside the data";
    if (why) st = sp_fail(SP_ERR_BAD_FORMAT, "load %s: %s", path, why);
    fclose(f);
    return st;
}
