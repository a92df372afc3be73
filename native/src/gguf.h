/* gguf.h: a validating, zero-copy reader of GGUF v2/v3 files.
 *
 * sp_gguf_open() maps the file (or reads it when use_mmap is false), checks every field against the file's size and
 * the format's rules (see DESIGN.md, "Bad input") before any allocation that depends on it, and builds small index
 * tables. Every pointer handed out points into the mapping and lives until sp_gguf_close().
 */
#ifndef SP_GGUF_H
#define SP_GGUF_H

#include "common.h"
#include "kernels/kernels.h"

/* KV value types, numbered as in the GGUF specification. */
typedef enum sp_gguf_vtype {
    SP_GGUF_U8 = 0, SP_GGUF_I8 = 1, SP_GGUF_U16 = 2, SP_GGUF_I16 = 3, SP_GGUF_U32 = 4, SP_GGUF_I32 = 5,
    SP_GGUF_F32 = 6, SP_GGUF_BOOL = 7, SP_GGUF_STRING = 8, SP_GGUF_ARRAY = 9, SP_GGUF_U64 = 10, SP_GGUF_I64 = 11,
    SP_GGUF_F64 = 12, SP_GGUF_VTYPE_COUNT = 13
} sp_gguf_vtype;

typedef struct sp_gguf_str {
    const char *data; /* NOT NUL-terminated: use len */
    uint64_t len;
} sp_gguf_str;

typedef struct sp_gguf_kv {
    sp_gguf_str key;
    sp_gguf_vtype type;
    /* scalars: pointer to the (unaligned, little-endian) value in the file; strings: to the length prefix */
    const uint8_t *value;
    /* arrays only */
    sp_gguf_vtype arr_type;
    uint64_t arr_n;
    const uint8_t *arr_data;    /* first element (for string arrays: the first length prefix) */
    const uint64_t *str_offsets; /* string arrays only: [arr_n] offsets of each element's length prefix from arr_data */
} sp_gguf_kv;

typedef struct sp_gguf_tensor {
    sp_gguf_str name;
    sp_type type;
    int32_t n_dims;
    int64_t ne[4];       /* ne[0] is the contiguous (row) dimension; unused dims are 1 */
    uint64_t offset;     /* from the start of the data section */
    uint64_t nbytes;
    const void *data;    /* into the mapping */
} sp_gguf_tensor;

typedef struct sp_gguf {
    uint32_t version;
    uint64_t n_kv;
    sp_gguf_kv *kv;           /* [n_kv] */
    uint64_t n_tensors;
    sp_gguf_tensor *tensors;  /* [n_tensors] */
    uint32_t alignment;
    uint64_t data_offset;     /* file offset of the tensor data section */
    const uint8_t *base;      /* the whole file */
    uint64_t size;
    bool mapped;
} sp_gguf;

/* Open and validate. On failure returns an error status (message via sp_last_error) and *out is NULL; everything
 * partly built is freed. */
sp_status sp_gguf_open(const char *path, bool use_mmap, sp_gguf **out);
/* Validate a GGUF image already in memory (not copied, not freed by close; must outlive the sp_gguf). */
sp_status sp_gguf_open_memory(const void *data, uint64_t size, sp_gguf **out);
void sp_gguf_close(sp_gguf *g);

const sp_gguf_kv *sp_gguf_find(const sp_gguf *g, const char *key);
const sp_gguf_tensor *sp_gguf_find_tensor(const sp_gguf *g, const char *name);

/* Typed getters. Return SP_OK, or SP_ERR_BAD_FORMAT (with a message naming the key) when the key is missing or its
 * value has a type that cannot represent the request (integers of any width convert when the value fits). */
sp_status sp_gguf_get_u32(const sp_gguf *g, const char *key, uint32_t *out);
sp_status sp_gguf_get_i32(const sp_gguf *g, const char *key, int32_t *out);
sp_status sp_gguf_get_f32(const sp_gguf *g, const char *key, float *out);   /* from F32 or F64 */
sp_status sp_gguf_get_bool(const sp_gguf *g, const char *key, bool *out);
sp_status sp_gguf_get_str(const sp_gguf *g, const char *key, sp_gguf_str *out);
/* Array access: element i of a string array / of a numeric array converted to float or int64. */
sp_gguf_str sp_gguf_arr_str(const sp_gguf_kv *kv, uint64_t i);
float sp_gguf_arr_f32(const sp_gguf_kv *kv, uint64_t i);
int64_t sp_gguf_arr_i64(const sp_gguf_kv *kv, uint64_t i);

/* Compare a sp_gguf_str with a C string. */
bool sp_gguf_str_eq(sp_gguf_str s, const char *c);

#endif
