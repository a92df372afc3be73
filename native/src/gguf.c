/* gguf.c: a validating, zero-copy reader of GGUF v2/v3 files (see gguf.h and DESIGN.md, "Bad input").
 *
 * File layout (little-endian; v2 and v3 are identical on little-endian files, v1 used 32-bit counts and is refused):
 *   magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
 *   n_kv x      { string key | u32 vtype | value }          string = u64 len + len bytes (no NUL)
 *                                                           array  = u32 elem vtype + u64 n + n elements
 *   n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset }
 *   padding to general.alignment (default 32), then the data section; offsets are relative to its start.
 *
 * Every read goes through a cursor (pos/size) that checks the bytes exist first; every count is bounded by the bytes
 * left divided by its element's smallest encoding before anything is allocated for it. All failures go through
 * sp_fail() and the single cleanup in sp_gguf_open_memory(); nothing here aborts on input.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#  define _POSIX_C_SOURCE 200809L /* open/fstat/mmap/O_CLOEXEC under -std=c11 */
#endif
#include "gguf.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#  include <fcntl.h>
#  include <sys/mman.h>
#  include <sys/stat.h>
#  include <unistd.h>
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#  error "the GGUF reader assumes a little-endian host"
#endif

#define GGUF_MAGIC 0x46554747u         /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_NAME 64               /* tensor names must be shorter than this, as ggml's GGML_MAX_NAME (incl. NUL) */
#define GGUF_MIN_KV_BYTES 14u          /* key len 8 + key >= 1 byte + vtype 4 + smallest value 1 */
#define GGUF_MIN_TENSOR_BYTES 33u      /* name len 8 + name >= 1 byte + n_dims 4 + one dim 8 + type 4 + offset 8 */

/* ---- ggml tensor types: (block size, bytes per block), checked against gguf-py's GGML_QUANT_SIZES ----
 * Every type ggml defines is known here so that valid files parse even when this runtime cannot compute with a
 * type; the model loader rejects those later. Ids 4, 5 (Q4_2, Q4_3), 31-33 and 36-38 were removed from ggml.
 * Q8_1 is 36 bytes as in ggml's block_q8_1 (gguf-py 0.19 still says 40: the old float layout). */
typedef struct ggml_type_info { const char *name; uint16_t block_size, type_size; } ggml_type_info;
static const ggml_type_info k_types[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},          [2] = {"Q4_0", 32, 18},     [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},     [7] = {"Q5_1", 32, 24},       [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 36},
    [10] = {"Q2_K", 256, 84},   [11] = {"Q3_K", 256, 110},    [12] = {"Q4_K", 256, 144},  [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},  [15] = {"Q8_K", 256, 292},    [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},   [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110},
    [22] = {"IQ2_S", 256, 82},  [23] = {"IQ4_XS", 256, 136},  [24] = {"I8", 1, 1},        [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},       [27] = {"I64", 1, 8},         [28] = {"F64", 1, 8},       [29] = {"IQ1_M", 256, 56},
    [30] = {"BF16", 1, 2},      [34] = {"TQ1_0", 256, 54},    [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},
    /* Newer than sp_type's table (ids >= SP_TYPE_COUNT): recognised only to say "unsupported" rather than "bad". */
    [40] = {"NVFP4", 64, 36},   [41] = {"Q1_0", 128, 18},
};
#define N_TYPES (sizeof k_types / sizeof k_types[0])

static const char *const k_vtype_names[SP_GGUF_VTYPE_COUNT] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
/* Encoded size of a scalar value type; 0 for string and array. */
static const uint8_t k_vtype_size[SP_GGUF_VTYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* The public struct plus private lookup tables. */
typedef struct gguf_impl {
    sp_gguf g;                      /* must be first: sp_gguf* and gguf_impl* convert */
    const sp_gguf_str **kv_by_key;  /* [n_kv] pointers to kv[i].key, sorted by key */
    const sp_gguf_str **t_by_name;  /* [n_tensors] pointers to tensors[i].name, sorted by name */
    bool owned;                     /* base was malloc'd by sp_gguf_open (read path) */
} gguf_impl;

/* ---- cursor with checked reads ---- */
typedef struct cursor {
    const uint8_t *base;
    uint64_t pos, size;
    char where[112]; /* what is being read, for messages: "header", "KV 3", "key 'general.name'", "tensor 'x'" */
} cursor;

static uint64_t left(const cursor *c) { return c->size - c->pos; }

/* Copy at most 60 bytes of a name into dst for a message, printable ASCII only (others become '?'). */
static void quote(char *dst, size_t cap, const char *s, uint64_t len) {
    size_t n = 0;
    for (uint64_t i = 0; i < len && n + 4 < cap && i < 60; i++) dst[n++] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
    if (len > 60 && n + 4 < cap) { memcpy(dst + n, "...", 3); n += 3; }
    dst[n] = '\0';
}

static sp_status truncated(const cursor *c, const char *what, uint64_t need) {
    return sp_fail(SP_ERR_BAD_FORMAT, "%s: truncated file: %s needs %llu bytes at offset %llu but only %llu remain",
                   c->where, what, (unsigned long long)need, (unsigned long long)c->pos, (unsigned long long)left(c));
}

static sp_status rd_bytes(cursor *c, uint64_t n, const char *what, const uint8_t **out) {
    if (left(c) < n) return truncated(c, what, n);
    *out = c->base + c->pos;
    c->pos += n;
    return SP_OK;
}

static sp_status rd_u32(cursor *c, const char *what, uint32_t *out) {
    const uint8_t *p = NULL;
    sp_status s = rd_bytes(c, 4, what, &p);
    if (s == SP_OK) memcpy(out, p, 4);
    return s;
}

static sp_status rd_u64(cursor *c, const char *what, uint64_t *out) {
    const uint8_t *p = NULL;
    sp_status s = rd_bytes(c, 8, what, &p);
    if (s == SP_OK) memcpy(out, p, 8);
    return s;
}

static sp_status rd_str(cursor *c, const char *what, sp_gguf_str *out) {
    uint64_t len;
    sp_status s = rd_u64(c, what, &len);
    if (s != SP_OK) return s;
    if (len > left(c))
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: %s length %llu exceeds the %llu bytes left in the file", c->where, what,
                       (unsigned long long)len, (unsigned long long)left(c));
    out->data = (const char *)c->base + c->pos;
    out->len = len;
    c->pos += len;
    return SP_OK;
}

#define TRY(expr) do { sp_status s_ = (expr); if (s_ != SP_OK) return s_; } while (0)

/* Keys and tensor names: non-empty, no NUL bytes (lookups compare them with C strings). */
static sp_status check_name(const cursor *c, sp_gguf_str s, const char *what) {
    if (s.len == 0) return sp_fail(SP_ERR_BAD_FORMAT, "%s: empty %s", c->where, what);
    if (memchr(s.data, 0, s.len)) return sp_fail(SP_ERR_BAD_FORMAT, "%s: %s contains a NUL byte", c->where, what);
    return SP_OK;
}

static uint64_t rd_le(const uint8_t *p, unsigned n) { uint64_t v = 0; memcpy(&v, p, n); return v; }

/* ---- KV section ---- */
static sp_status parse_array(cursor *c, sp_gguf_kv *kv) {
    uint32_t et;
    uint64_t n;
    TRY(rd_u32(c, "array element type", &et));
    if (et == SP_GGUF_ARRAY)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: nested arrays (array of arrays) are not supported", c->where);
    if (et >= SP_GGUF_VTYPE_COUNT) return sp_fail(SP_ERR_BAD_FORMAT, "%s: unknown array element type %u", c->where, et);
    TRY(rd_u64(c, "array length", &n));
    kv->arr_type = (sp_gguf_vtype)et;
    kv->arr_n = n;
    kv->arr_data = c->base + c->pos;
    if (et != SP_GGUF_STRING) {
        const uint64_t es = k_vtype_size[et];
        if (n > left(c) / es)
            return sp_fail(SP_ERR_BAD_FORMAT, "%s: array of %llu %s values (%llu bytes each) runs past the end of "
                           "the file (%llu bytes left)", c->where, (unsigned long long)n, k_vtype_names[et],
                           (unsigned long long)es, (unsigned long long)left(c));
        if (et == SP_GGUF_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (kv->arr_data[i] > 1)
                    return sp_fail(SP_ERR_BAD_FORMAT, "%s: bool element %llu is %u, expected 0 or 1", c->where,
                                   (unsigned long long)i, kv->arr_data[i]);
        c->pos += n * es;
        return SP_OK;
    }
    /* Strings: each takes at least its 8-byte length, which bounds n before the offset table is allocated. */
    if (n > left(c) / 8)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: array of %llu strings cannot fit in the %llu bytes left (each takes at "
                       "least 8)", c->where, (unsigned long long)n, (unsigned long long)left(c));
    uint64_t *offs = malloc(n ? n * sizeof *offs : 1);
    if (!offs)
        return sp_fail(SP_ERR_NO_MEMORY, "%s: no memory for %llu string offsets", c->where, (unsigned long long)n);
    kv->str_offsets = offs;
    const uint64_t start = c->pos;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len;
        if (left(c) < 8) return truncated(c, "string length in array", 8);
        len = rd_le(c->base + c->pos, 8);
        if (len > left(c) - 8)
            return sp_fail(SP_ERR_BAD_FORMAT, "%s: string %llu of %llu has length %llu but only %llu bytes are left",
                           c->where, (unsigned long long)i, (unsigned long long)n, (unsigned long long)len,
                           (unsigned long long)(left(c) - 8));
        offs[i] = c->pos - start;
        c->pos += 8 + len;
    }
    return SP_OK;
}

static sp_status parse_kv(cursor *c, uint64_t i, sp_gguf_kv *kv) {
    char q[72];
    uint32_t t;
    snprintf(c->where, sizeof c->where, "KV %llu", (unsigned long long)i);
    TRY(rd_str(c, "key", &kv->key));
    TRY(check_name(c, kv->key, "key"));
    quote(q, sizeof q, kv->key.data, kv->key.len);
    snprintf(c->where, sizeof c->where, "key '%s'", q);
    TRY(rd_u32(c, "value type", &t));
    if (t >= SP_GGUF_VTYPE_COUNT) return sp_fail(SP_ERR_BAD_FORMAT, "%s: unknown value type %u", c->where, t);
    kv->type = (sp_gguf_vtype)t;
    kv->value = c->base + c->pos;
    if (t == SP_GGUF_ARRAY) return parse_array(c, kv);
    if (t == SP_GGUF_STRING) {
        sp_gguf_str s;
        return rd_str(c, "string value", &s);
    }
    const uint8_t *p = NULL;
    TRY(rd_bytes(c, k_vtype_size[t], "value", &p));
    if (t == SP_GGUF_BOOL && *p > 1)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: bool value is %u, expected 0 or 1", c->where, *p);
    return SP_OK;
}

/* ---- tensor infos ---- */
static sp_status parse_tensor_info(cursor *c, uint64_t i, sp_gguf_tensor *t) {
    char q[72];
    uint32_t n_dims, type;
    snprintf(c->where, sizeof c->where, "tensor %llu", (unsigned long long)i);
    TRY(rd_str(c, "name", &t->name));
    TRY(check_name(c, t->name, "name"));
    quote(q, sizeof q, t->name.data, t->name.len);
    if (t->name.len >= GGUF_MAX_NAME)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: name '%s' is %llu bytes long; the limit is %d", c->where, q,
                       (unsigned long long)t->name.len, GGUF_MAX_NAME - 1);
    snprintf(c->where, sizeof c->where, "tensor '%s'", q);
    TRY(rd_u32(c, "n_dims", &n_dims));
    if (n_dims < 1 || n_dims > 4)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: n_dims is %u, expected 1 to 4", c->where, n_dims);
    t->n_dims = (int32_t)n_dims;
    uint64_t n_el = 1;
    for (int d = 0; d < 4; d++) {
        uint64_t ne = 1;
        if (d < (int)n_dims) TRY(rd_u64(c, "dimension", &ne));
        if ((int64_t)ne <= 0)
            return sp_fail(SP_ERR_BAD_FORMAT, "%s: dimension %d is %lld, expected a positive size", c->where, d,
                           (long long)(int64_t)ne);
        if (!sp_mul_ok(n_el, ne, &n_el) || n_el > (uint64_t)INT64_MAX)
            return sp_fail(SP_ERR_BAD_FORMAT, "%s: the number of elements overflows at dimension %d", c->where, d);
        t->ne[d] = (int64_t)ne;
    }
    TRY(rd_u32(c, "type", &type));
    if (type >= N_TYPES || k_types[type].block_size == 0)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: unknown or removed tensor type %u", c->where, type);
    const ggml_type_info *ti = &k_types[type];
    if (type >= SP_TYPE_COUNT)
        return sp_fail(SP_ERR_UNSUPPORTED, "%s: tensor type %s (%u) is newer than this runtime", c->where, ti->name,
                       type);
    t->type = (sp_type)type;
    if (t->ne[0] % ti->block_size)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s: ne[0] = %lld is not a multiple of the block size %u of type %s",
                       c->where, (long long)t->ne[0], ti->block_size, ti->name);
    uint64_t nb = ti->type_size;
    for (int d = 0; d < 4; d++)
        if (!sp_mul_ok(nb, (uint64_t)(d ? t->ne[d] : t->ne[0] / ti->block_size), &nb))
            return sp_fail(SP_ERR_BAD_FORMAT, "%s: the size in bytes overflows", c->where);
    t->nbytes = nb;
    return rd_u64(c, "offset", &t->offset);
}

/* ---- indexes: sort pointers to the names (kv.key and tensor.name are the first members of their structs) ---- */
static int cmp_str(sp_gguf_str a, sp_gguf_str b) {
    int r = memcmp(a.data, b.data, SP_MIN(a.len, b.len));
    return r ? r : (a.len > b.len) - (a.len < b.len);
}
static int cmp_str_ptr(const void *a, const void *b) {
    return cmp_str(**(const sp_gguf_str *const *)a, **(const sp_gguf_str *const *)b);
}
static int cmp_tensor_offset(const void *a, const void *b) {
    const sp_gguf_tensor *x = *(const sp_gguf_tensor *const *)a, *y = *(const sp_gguf_tensor *const *)b;
    return (x->offset > y->offset) - (x->offset < y->offset);
}

/* Sort n names (at base + i*stride) into a new pointer array and reject duplicates. */
static sp_status build_index(const void *items, size_t stride, uint64_t n, const char *what, const sp_gguf_str ***out) {
    const sp_gguf_str **idx = malloc(n ? n * sizeof *idx : 1);
    if (!idx) return sp_fail(SP_ERR_NO_MEMORY, "no memory for the %s index", what);
    *out = idx;
    for (uint64_t i = 0; i < n; i++) idx[i] = (const sp_gguf_str *)((const char *)items + i * stride);
    qsort(idx, n, sizeof *idx, cmp_str_ptr);
    for (uint64_t i = 1; i < n; i++)
        if (cmp_str(*idx[i - 1], *idx[i]) == 0) {
            char q[72];
            quote(q, sizeof q, idx[i]->data, idx[i]->len);
            return sp_fail(SP_ERR_BAD_FORMAT, "duplicate %s '%s'", what, q);
        }
    return SP_OK;
}

static sp_status read_alignment(gguf_impl *m) {
    const sp_gguf_kv *kv = sp_gguf_find(&m->g, "general.alignment");
    m->g.alignment = GGUF_DEFAULT_ALIGNMENT;
    if (!kv) return SP_OK;
    if (kv->type != SP_GGUF_U32)
        return sp_fail(SP_ERR_BAD_FORMAT, "key 'general.alignment' has type %s, expected u32", k_vtype_names[kv->type]);
    uint32_t a = (uint32_t)rd_le(kv->value, 4);
    if (a == 0 || (a & (a - 1)))
        return sp_fail(SP_ERR_BAD_FORMAT, "key 'general.alignment' is %u, expected a power of two", a);
    m->g.alignment = a;
    return SP_OK;
}

/* Offsets: aligned, inside the file, and packed in offset order (each tensor starts at the previous one's end
 * rounded up to the alignment, the first at 0) as ggml and gguf-py write them: no overlap and no unexplained gaps.
 * The info table may list tensors in any order. Bytes after the last tensor are allowed. */
static sp_status check_layout(gguf_impl *m) {
    sp_gguf *g = &m->g;
    const uint64_t data_size = g->size - g->data_offset, a = g->alignment;
    char q[72], q2[72];
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        sp_gguf_tensor *t = &g->tensors[i];
        uint64_t end;
        quote(q, sizeof q, t->name.data, t->name.len);
        if (t->offset % a)
            return sp_fail(SP_ERR_BAD_FORMAT, "tensor '%s': offset %llu is not a multiple of the alignment %llu", q,
                           (unsigned long long)t->offset, (unsigned long long)a);
        if (!sp_add_ok(t->offset, t->nbytes, &end) || end > data_size)
            return sp_fail(SP_ERR_BAD_FORMAT, "tensor '%s': %llu bytes at offset %llu run past the end of the file "
                           "(the data section holds %llu bytes)", q, (unsigned long long)t->nbytes,
                           (unsigned long long)t->offset, (unsigned long long)data_size);
        t->data = g->base + g->data_offset + t->offset;
    }
    /* Reuse the name index's storage to sort by offset; it is rebuilt by name afterwards. */
    const sp_gguf_tensor **by_off = (const sp_gguf_tensor **)m->t_by_name;
    for (uint64_t i = 0; i < g->n_tensors; i++) by_off[i] = &g->tensors[i];
    qsort(by_off, g->n_tensors, sizeof *by_off, cmp_tensor_offset);
    uint64_t expect = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const sp_gguf_tensor *t = by_off[i];
        quote(q, sizeof q, t->name.data, t->name.len);
        if (t->offset < expect) {
            const sp_gguf_tensor *p = by_off[i - 1];
            quote(q2, sizeof q2, p->name.data, p->name.len);
            return sp_fail(SP_ERR_BAD_FORMAT, "tensor '%s': offset %llu overlaps tensor '%s' (bytes %llu to %llu)", q,
                           (unsigned long long)t->offset, q2, (unsigned long long)p->offset,
                           (unsigned long long)(p->offset + p->nbytes));
        }
        if (t->offset > expect)
            return sp_fail(SP_ERR_BAD_FORMAT, "tensor '%s': offset %llu leaves a gap: expected %llu (tensors are "
                           "packed, each padded to the alignment %llu)", q, (unsigned long long)t->offset,
                           (unsigned long long)expect, (unsigned long long)a);
        expect = t->offset + t->nbytes; /* <= data_size, so rounding up cannot overflow */
        expect = (expect + a - 1) / a * a;
    }
    return SP_OK;
}

static sp_status parse(gguf_impl *m) {
    sp_gguf *g = &m->g;
    cursor c = {.base = g->base, .pos = 0, .size = g->size, .where = "header"};
    uint32_t magic = 0, version;
    if (g->size < 4) return truncated(&c, "magic", 4);
    magic = (uint32_t)rd_le(g->base, 4);
    if (magic != GGUF_MAGIC)
        return sp_fail(SP_ERR_BAD_FORMAT, "not a GGUF file: the magic is 0x%08x, expected 0x%08x (\"GGUF\")", magic,
                       GGUF_MAGIC);
    c.pos = 4;
    TRY(rd_u32(&c, "version", &version));
    if (version != 2 && version != 3)
    {
        const uint32_t swapped = __builtin_bswap32(version);
        return sp_fail(SP_ERR_BAD_FORMAT, "unsupported GGUF version %u (expected 2 or 3%s)", version,
                       swapped == 2 || swapped == 3 ? "; this looks like a big-endian file" : "");
    }
    g->version = version;
    TRY(rd_u64(&c, "tensor count", &g->n_tensors));
    TRY(rd_u64(&c, "KV count", &g->n_kv));
    if ((int64_t)g->n_tensors < 0 || (int64_t)g->n_kv < 0)
        return sp_fail(SP_ERR_BAD_FORMAT, "header: negative count (tensors %lld, KVs %lld)",
                       (long long)(int64_t)g->n_tensors, (long long)(int64_t)g->n_kv);
    /* Each count is <= left, so the sum below cannot overflow. */
    if (g->n_kv > left(&c) / GGUF_MIN_KV_BYTES || g->n_tensors > left(&c) / GGUF_MIN_TENSOR_BYTES ||
        g->n_kv * GGUF_MIN_KV_BYTES + g->n_tensors * GGUF_MIN_TENSOR_BYTES > left(&c))
        return sp_fail(SP_ERR_BAD_FORMAT, "header: %llu KVs and %llu tensors cannot fit in the %llu bytes after the "
                       "header (a KV takes at least %u bytes, a tensor info %u)", (unsigned long long)g->n_kv,
                       (unsigned long long)g->n_tensors, (unsigned long long)left(&c), GGUF_MIN_KV_BYTES,
                       GGUF_MIN_TENSOR_BYTES);

    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors) return sp_fail(SP_ERR_NO_MEMORY, "no memory for %llu KVs and %llu tensor infos",
                                              (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors);
    for (uint64_t i = 0; i < g->n_kv; i++) TRY(parse_kv(&c, i, &g->kv[i]));
    TRY(build_index(g->kv, sizeof *g->kv, g->n_kv, "key", &m->kv_by_key));
    TRY(read_alignment(m));

    for (uint64_t i = 0; i < g->n_tensors; i++) TRY(parse_tensor_info(&c, i, &g->tensors[i]));
    TRY(build_index(g->tensors, sizeof *g->tensors, g->n_tensors, "tensor name", &m->t_by_name));

    /* The data section starts at the next multiple of the alignment (a file without tensors may end before it). */
    g->data_offset = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    if (g->n_tensors == 0) return SP_OK;
    if (g->data_offset > g->size)
        return sp_fail(SP_ERR_BAD_FORMAT, "truncated file: the tensor data section should start at offset %llu but the "
                       "file has %llu bytes", (unsigned long long)g->data_offset, (unsigned long long)g->size);
    TRY(check_layout(m));
    qsort(m->t_by_name, g->n_tensors, sizeof *m->t_by_name, cmp_str_ptr); /* back to name order for lookups */
    return SP_OK;
}

/* ---- open / close ---- */
static sp_status open_impl(const void *data, uint64_t size, bool mapped, bool owned, sp_gguf **out) {
    gguf_impl *m = calloc(1, sizeof *m);
    if (!m) return sp_fail(SP_ERR_NO_MEMORY, "no memory for the GGUF reader");
    m->g.base = data;
    m->g.size = size;
    m->g.mapped = mapped;
    m->owned = owned;
    sp_status s = parse(m);
    if (s != SP_OK) {
        m->g.mapped = false; /* the caller releases the image on failure */
        m->owned = false;
        sp_gguf_close(&m->g);
        return s;
    }
    *out = &m->g;
    return SP_OK;
}

sp_status sp_gguf_open_memory(const void *data, uint64_t size, sp_gguf **out) {
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_gguf_open_memory: out is NULL");
    *out = NULL;
    if (!data && size) return sp_fail(SP_ERR_INVALID_ARG, "sp_gguf_open_memory: data is NULL");
    return open_impl(data ? data : "", size, false, false, out);
}

sp_status sp_gguf_open(const char *path, bool use_mmap, sp_gguf **out) {
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_gguf_open: out is NULL");
    *out = NULL;
    if (!path) return sp_fail(SP_ERR_INVALID_ARG, "sp_gguf_open: path is NULL");
#if defined(_WIN32)
    (void)use_mmap;
    return sp_fail(SP_ERR_UNSUPPORTED, "%s: the GGUF reader has no Windows file support yet", path);
#else
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. Only regular files are read
     * (a FIFO, a device such as /dev/zero or a directory is refused before any read); for them the flag changes
     * nothing. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return sp_fail(SP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return sp_fail(SP_ERR_IO, "%s: not a regular file (a model must be a regular file, not a pipe, device or "
                       "directory)", path);
    }
    const uint64_t size = (uint64_t)st.st_size;
    if (size == 0 || size > SIZE_MAX) {
        close(fd);
        return size ? sp_fail(SP_ERR_IO, "%s: too large for this address space", path)
                    : sp_fail(SP_ERR_BAD_FORMAT, "%s: the file is empty, not a GGUF file", path);
    }
    void *base;
    if (use_mmap) {
        base = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (base == MAP_FAILED) {
            int e = errno;
            close(fd);
            return sp_fail(SP_ERR_IO, "%s: cannot map %llu bytes: %s", path, (unsigned long long)size, strerror(e));
        }
    } else {
        base = malloc((size_t)size);
        if (!base) {
            close(fd);
            return sp_fail(SP_ERR_NO_MEMORY, "%s: no memory to read %llu bytes", path, (unsigned long long)size);
        }
        for (uint64_t got = 0; got < size;) {
            ssize_t r = read(fd, (char *)base + got, (size_t)SP_MIN(size - got, (uint64_t)1 << 30));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                int e = errno;
                free(base);
                close(fd);
                return sp_fail(SP_ERR_IO, "%s: read failed at byte %llu: %s", path, (unsigned long long)got,
                               r < 0 ? strerror(e) : "unexpected end of file");
            }
            got += (uint64_t)r;
        }
    }
    close(fd);
    sp_status s = open_impl(base, size, use_mmap, !use_mmap, out);
    if (s != SP_OK) {
        char msg[400];
        snprintf(msg, sizeof msg, "%s", sp_last_error());
        if (use_mmap) munmap(base, (size_t)size);
        else free(base);
        return sp_fail(s, "%s: %s", path, msg);
    }
    return SP_OK;
#endif
}

void sp_gguf_close(sp_gguf *g) {
    if (!g) return;
    gguf_impl *m = (gguf_impl *)g;
    for (uint64_t i = 0; g->kv && i < g->n_kv; i++) free((void *)g->kv[i].str_offsets);
    free(g->kv);
    free(g->tensors);
    free(m->kv_by_key);
    free(m->t_by_name);
#if !defined(_WIN32)
    if (g->mapped) munmap((void *)g->base, (size_t)g->size);
#endif
    if (m->owned) free((void *)g->base);
    free(m);
}

/* ---- lookups ---- */
static const sp_gguf_str *lookup(const sp_gguf_str **idx, uint64_t n, const char *name) {
    if (!idx || !name) return NULL;
    const sp_gguf_str key = {name, strlen(name)}, *kp = &key;
    const sp_gguf_str **hit = bsearch(&kp, idx, n, sizeof *idx, cmp_str_ptr);
    return hit ? *hit : NULL;
}

const sp_gguf_kv *sp_gguf_find(const sp_gguf *g, const char *key) {
    return g ? (const sp_gguf_kv *)lookup(((const gguf_impl *)g)->kv_by_key, g->n_kv, key) : NULL;
}

const sp_gguf_tensor *sp_gguf_find_tensor(const sp_gguf *g, const char *name) {
    return g ? (const sp_gguf_tensor *)lookup(((const gguf_impl *)g)->t_by_name, g->n_tensors, name) : NULL;
}

bool sp_gguf_str_eq(sp_gguf_str s, const char *c) {
    return c && strlen(c) == s.len && (s.len == 0 || memcmp(s.data, c, s.len) == 0);
}

/* ---- typed getters ---- */
static bool vtype_is_int(uint32_t t) { return t <= SP_GGUF_I32 || t == SP_GGUF_U64 || t == SP_GGUF_I64; }
static bool vtype_is_signed(uint32_t t) {
    return t == SP_GGUF_I8 || t == SP_GGUF_I16 || t == SP_GGUF_I32 || t == SP_GGUF_I64;
}

/* An integer at p of type t (vtype_is_int): *neg tells whether it is negative, then *s holds it, else *u. */
static void load_int(const uint8_t *p, uint32_t t, bool *neg, int64_t *s, uint64_t *u) {
    const unsigned n = k_vtype_size[t];
    uint64_t v = rd_le(p, n);
    if (vtype_is_signed(t) && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~(uint64_t)0 << (8 * n); /* sign-extend */
    *neg = vtype_is_signed(t) && (int64_t)v < 0;
    *s = (int64_t)v;
    *u = v;
}

static sp_status find_typed(const sp_gguf *g, const char *key, const sp_gguf_kv **kv) {
    *kv = sp_gguf_find(g, key);
    return *kv ? SP_OK : sp_fail(SP_ERR_BAD_FORMAT, "missing key '%s'", key ? key : "(null)");
}

static sp_status wrong_type(const char *key, const sp_gguf_kv *kv, const char *want) {
    return sp_fail(SP_ERR_BAD_FORMAT, "key '%s' has type %s, expected %s", key, k_vtype_names[kv->type], want);
}

static sp_status get_int(const sp_gguf *g, const char *key, int64_t lo, uint64_t hi, const char *want, int64_t *out) {
    const sp_gguf_kv *kv;
    bool neg;
    int64_t s;
    uint64_t u;
    TRY(find_typed(g, key, &kv));
    if (!vtype_is_int(kv->type)) return wrong_type(key, kv, want);
    load_int(kv->value, kv->type, &neg, &s, &u);
    if (neg ? s < lo : u > hi) {
        if (neg) return sp_fail(SP_ERR_BAD_FORMAT, "key '%s' is %lld, which does not fit in %s", key, (long long)s,
                                want);
        return sp_fail(SP_ERR_BAD_FORMAT, "key '%s' is %llu, which does not fit in %s", key, (unsigned long long)u,
                       want);
    }
    *out = s;
    return SP_OK;
}

sp_status sp_gguf_get_u32(const sp_gguf *g, const char *key, uint32_t *out) {
    int64_t v;
    TRY(get_int(g, key, 0, UINT32_MAX, "a u32", &v));
    *out = (uint32_t)v;
    return SP_OK;
}

sp_status sp_gguf_get_i32(const sp_gguf *g, const char *key, int32_t *out) {
    int64_t v;
    TRY(get_int(g, key, INT32_MIN, INT32_MAX, "an i32", &v));
    *out = (int32_t)v;
    return SP_OK;
}

sp_status sp_gguf_get_f32(const sp_gguf *g, const char *key, float *out) {
    const sp_gguf_kv *kv;
    TRY(find_typed(g, key, &kv));
    if (kv->type == SP_GGUF_F32) {
        memcpy(out, kv->value, 4);
        return SP_OK;
    }
    if (kv->type != SP_GGUF_F64) return wrong_type(key, kv, "f32 or f64");
    double d;
    memcpy(&d, kv->value, 8);
    if (isfinite(d) && fabs(d) > FLT_MAX) /* NaN and infinities convert as they are */
        return sp_fail(SP_ERR_BAD_FORMAT, "key '%s' is %g, which does not fit in a float", key, d);
    *out = (float)d;
    return SP_OK;
}

sp_status sp_gguf_get_bool(const sp_gguf *g, const char *key, bool *out) {
    const sp_gguf_kv *kv;
    TRY(find_typed(g, key, &kv));
    if (kv->type != SP_GGUF_BOOL) return wrong_type(key, kv, "bool");
    *out = kv->value[0] != 0;
    return SP_OK;
}

sp_status sp_gguf_get_str(const sp_gguf *g, const char *key, sp_gguf_str *out) {
    const sp_gguf_kv *kv;
    TRY(find_typed(g, key, &kv));
    if (kv->type != SP_GGUF_STRING) return wrong_type(key, kv, "string");
    out->len = rd_le(kv->value, 8);
    out->data = (const char *)kv->value + 8;
    return SP_OK;
}

/* ---- array elements (out of range or wrong type: an empty string / 0) ---- */
sp_gguf_str sp_gguf_arr_str(const sp_gguf_kv *kv, uint64_t i) {
    sp_gguf_str s = {"", 0};
    if (!kv || kv->type != SP_GGUF_ARRAY || kv->arr_type != SP_GGUF_STRING || i >= kv->arr_n) return s;
    const uint8_t *p = kv->arr_data + kv->str_offsets[i];
    s.len = rd_le(p, 8);
    s.data = (const char *)p + 8;
    return s;
}

static const uint8_t *arr_elem(const sp_gguf_kv *kv, uint64_t i) {
    if (!kv || kv->type != SP_GGUF_ARRAY || i >= kv->arr_n || kv->arr_type == SP_GGUF_STRING) return NULL;
    return kv->arr_data + i * k_vtype_size[kv->arr_type];
}

/* Numeric arrays to float: integers and bools convert, f64 is rounded to float (saturating at +-FLT_MAX). */
float sp_gguf_arr_f32(const sp_gguf_kv *kv, uint64_t i) {
    const uint8_t *p = arr_elem(kv, i);
    if (!p) return 0.0f;
    if (kv->arr_type == SP_GGUF_F32) { float f; memcpy(&f, p, 4); return f; }
    if (kv->arr_type == SP_GGUF_BOOL) return p[0] ? 1.0f : 0.0f;
    if (kv->arr_type == SP_GGUF_F64) {
        double d;
        memcpy(&d, p, 8);
        return d > FLT_MAX ? FLT_MAX : d < -FLT_MAX ? -FLT_MAX : (float)d;
    }
    bool neg; int64_t s; uint64_t u;
    load_int(p, kv->arr_type, &neg, &s, &u);
    return neg ? (float)s : (float)u;
}

/* Numeric arrays to int64: u64 above INT64_MAX saturates; floats truncate toward zero (NaN gives 0, saturating). */
int64_t sp_gguf_arr_i64(const sp_gguf_kv *kv, uint64_t i) {
    const uint8_t *p = arr_elem(kv, i);
    if (!p) return 0;
    double d;
    if (kv->arr_type == SP_GGUF_F32 || kv->arr_type == SP_GGUF_F64) {
        if (kv->arr_type == SP_GGUF_F32) { float f; memcpy(&f, p, 4); d = f; }
        else memcpy(&d, p, 8);
        if (d != d) return 0;
        return d >= 9.2233720368547758e18 ? INT64_MAX : d <= -9.2233720368547758e18 ? INT64_MIN : (int64_t)d;
    }
    if (kv->arr_type == SP_GGUF_BOOL) return p[0] != 0;
    bool neg; int64_t s; uint64_t u;
    load_int(p, kv->arr_type, &neg, &s, &u);
    return neg ? s : u > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)u;
}
