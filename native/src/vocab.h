/* vocab.h: the tokenizer stored in a GGUF file (tokenizer.ggml.*): GPT-2 byte-level BPE ("gpt2", with the
 * pre-tokenizer named by tokenizer.ggml.pre) and SentencePiece-style ("llama") vocabularies, with special tokens.
 * Ids match llama.cpp's tokenizer on the same file. */
#ifndef SP_VOCAB_H
#define SP_VOCAB_H

#include "gguf.h"

typedef struct sp_vocab sp_vocab;

/* Build from the GGUF metadata (strings point into g, which must outlive the vocab). */
sp_status sp_vocab_load(const sp_gguf *g, sp_vocab **out);
void sp_vocab_free(sp_vocab *v);

int32_t sp_vocab_n_tokens(const sp_vocab *v);
int32_t sp_vocab_bos(const sp_vocab *v);  /* -1 if none */
int32_t sp_vocab_eos(const sp_vocab *v);
int32_t sp_vocab_eot(const sp_vocab *v);
bool sp_vocab_add_bos(const sp_vocab *v);
bool sp_vocab_is_eog(const sp_vocab *v, int32_t token);

/* Same contracts as sp_tokenize / sp_token_to_piece in sparrow.h. */
sp_status sp_vocab_tokenize(const sp_vocab *v, const char *text, size_t len, bool add_special, bool parse_special,
                            int32_t *tokens, size_t capacity, size_t *n_out);
sp_status sp_vocab_token_to_piece(const sp_vocab *v, int32_t token, bool render_special, char *buf, size_t capacity,
                                  size_t *len);

#endif
