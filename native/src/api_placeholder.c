/* PLACEHOLDER: being written (model/session). */
#include "common.h"
const char *sp_version(void) { return SPARROW_VERSION_STRING; }
const char *sp_cpu_features(void) { return ""; }
const char *sp_kernel_tier(void) { return ""; }
sp_model_params sp_model_default_params(void) { sp_model_params p = {true, false}; return p; }
sp_status sp_model_load(const char *path, sp_model_params params, sp_model **out) { *out = NULL; return sp_fail(SP_ERR_UNSUPPORTED, "model loading not built yet"); }
void sp_model_free(sp_model *model) {}
sp_status sp_model_get_info(const sp_model *model, sp_model_info *out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_model_meta_str(const sp_model *model, const char *key, const char **out, size_t *len) { return SP_ERR_UNSUPPORTED; }
sp_status sp_tokenize(const sp_model *model, const char *text, size_t len, bool add_special, bool parse_special,
                      int32_t *tokens, size_t capacity, size_t *n_out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_token_to_piece(const sp_model *model, int32_t token, bool render_special, char *buf, size_t capacity, size_t *len) { return SP_ERR_UNSUPPORTED; }
bool sp_token_is_eog(const sp_model *model, int32_t token) { return false; }
sp_session_params sp_session_default_params(void) { sp_session_params p = {2048, 64, 2}; return p; }
sp_status sp_session_new(const sp_model *model, sp_session_params params, sp_session **out) { *out = NULL; return SP_ERR_UNSUPPORTED; }
void sp_session_free(sp_session *session) {}
sp_status sp_eval(sp_session *session, const sp_batch *batch) { return SP_ERR_UNSUPPORTED; }
int32_t sp_session_n_past(const sp_session *session) { return 0; }
int32_t sp_session_n_ctx(const sp_session *session) { return 0; }
sp_status sp_session_truncate(sp_session *session, int32_t n) { return SP_ERR_UNSUPPORTED; }
sp_status sp_session_keep(sp_session *session, const int32_t *idx, int32_t n) { return SP_ERR_UNSUPPORTED; }
