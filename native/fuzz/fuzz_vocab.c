/* fuzz_vocab.c: libFuzzer target for loading a vocabulary (tokenizer.ggml.*) from a GGUF image and using it: the
 * input is a GGUF file in memory. A vocabulary that loads is exercised by fz_exercise_vocab: tokenization of texts
 * made of its own tokens (special parsing on and off) and detokenization of every token, with the piece-size bound.
 * Seeds: vocabulary-only files (BPE and SentencePiece) and the negative GGUF corpus. */
#include "fuzz.h"

#include "vocab.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sp_gguf *g = NULL;
    if (sp_gguf_open_memory(data, size, &g) != SP_OK) return 0;
    sp_vocab *v = NULL;
    if (sp_vocab_load(g, &v) == SP_OK) fz_exercise_vocab(v, 1 << 16);
    else FZ_CHECK(v == NULL && sp_last_error()[0] != '\0');
    sp_vocab_free(v);
    sp_gguf_close(g);
    return 0;
}
