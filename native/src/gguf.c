/* PLACEHOLDER: being written (GGUF reader). */
#include "gguf.h"
sp_status sp_gguf_open(const char *path, bool use_mmap, sp_gguf **out) { *out = NULL; return sp_fail(SP_ERR_UNSUPPORTED, "gguf reader not built yet"); }
sp_status sp_gguf_open_memory(const void *data, uint64_t size, sp_gguf **out) { *out = NULL; return sp_fail(SP_ERR_UNSUPPORTED, "gguf reader not built yet"); }
void sp_gguf_close(sp_gguf *g) {}
const sp_gguf_kv *sp_gguf_find(const sp_gguf *g, const char *key) { return NULL; }
const sp_gguf_tensor *sp_gguf_find_tensor(const sp_gguf *g, const char *name) { return NULL; }
sp_status sp_gguf_get_u32(const sp_gguf *g, const char *key, uint32_t *out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_gguf_get_i32(const sp_gguf *g, const char *key, int32_t *out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_gguf_get_f32(const sp_gguf *g, const char *key, float *out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_gguf_get_bool(const sp_gguf *g, const char *key, bool *out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_gguf_get_str(const sp_gguf *g, const char *key, sp_gguf_str *out) { return SP_ERR_UNSUPPORTED; }
sp_gguf_str sp_gguf_arr_str(const sp_gguf_kv *kv, uint64_t i) { sp_gguf_str s = {0}; return s; }
float sp_gguf_arr_f32(const sp_gguf_kv *kv, uint64_t i) { return 0; }
int64_t sp_gguf_arr_i64(const sp_gguf_kv *kv, uint64_t i) { return 0; }
bool sp_gguf_str_eq(sp_gguf_str s, const char *c) { return false; }
