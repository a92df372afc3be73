/* PLACEHOLDER: being written (tokenizer). */
#include "vocab.h"
sp_status sp_vocab_load(const sp_gguf *g, sp_vocab **out) { *out = NULL; return sp_fail(SP_ERR_UNSUPPORTED, "tokenizer not built yet"); }
void sp_vocab_free(sp_vocab *v) {}
int32_t sp_vocab_n_tokens(const sp_vocab *v) { return 0; }
int32_t sp_vocab_bos(const sp_vocab *v) { return -1; }
int32_t sp_vocab_eos(const sp_vocab *v) { return -1; }
int32_t sp_vocab_eot(const sp_vocab *v) { return -1; }
bool sp_vocab_add_bos(const sp_vocab *v) { return false; }
bool sp_vocab_is_eog(const sp_vocab *v, int32_t token) { return false; }
sp_status sp_vocab_tokenize(const sp_vocab *v, const char *text, size_t len, bool add_special, bool parse_special,
                            int32_t *tokens, size_t capacity, size_t *n_out) { return SP_ERR_UNSUPPORTED; }
sp_status sp_vocab_token_to_piece(const sp_vocab *v, int32_t token, bool render_special, char *buf, size_t capacity,
                                  size_t *len) { return SP_ERR_UNSUPPORTED; }
