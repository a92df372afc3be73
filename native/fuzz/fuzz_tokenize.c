/* fuzz_tokenize.c: libFuzzer target for both tokenizers on arbitrary bytes.
 *
 * Input: byte 0 picks a vocabulary (the data folder's vocab-*.gguf: byte-level BPE under each pre-tokenizer, and
 * SentencePiece with and without the space prefix), byte 1 the flags (add_special, parse_special), the rest is the
 * text (any bytes: invalid UTF-8 included). Checks: the capacity protocol (a count-only call, an exact call, a call
 * one short), ids in range, every token detokenizes, and for byte-level BPE without special parsing the pieces give
 * back the text exactly when it is valid UTF-8 and every byte has a token (SmolLM2's vocabulary lacks 6 control
 * bytes, which llama.cpp drops too). */
#include "fuzz.h"

#include <glob.h>

#include "unicode.h"
#include "vocab.h"

enum { MAX_VOCABS = 16 };
static sp_gguf *g_gguf[MAX_VOCABS];
static sp_vocab *g_vocab[MAX_VOCABS];
static int g_n;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char pattern[4096];
    glob_t gl;
    FZ_CHECK(glob(fz_data_path(pattern, sizeof pattern, "vocab-*.gguf"), 0, NULL, &gl) == 0);
    for (size_t i = 0; i < gl.gl_pathc && g_n < MAX_VOCABS; i++) {
        if (sp_gguf_open(gl.gl_pathv[i], true, &g_gguf[g_n]) != SP_OK ||
            sp_vocab_load(g_gguf[g_n], &g_vocab[g_n]) != SP_OK) {
            fprintf(stderr, "%s: %s\n", gl.gl_pathv[i], sp_last_error());
            abort();
        }
        g_n++;
    }
    globfree(&gl);
    FZ_CHECK(g_n > 0);
    return 0;
}

static bool valid_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        const uint8_t c = s[i];
        size_t k = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
        if (!k || i + k > n || (k == 2 && c < 0xC2)) return false;
        uint32_t cp = k == 1 ? c : c & (0x7F >> k);
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if ((k == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (k == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return false;
        i += k;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    const sp_vocab *v = g_vocab[fz_u8(&in) % g_n];
    const uint8_t flags = fz_u8(&in);
    const bool add_special = flags & 1, parse_special = flags & 2;
    const char *text = (const char *)in.p;
    const size_t len = in.n;

    size_t need = 0;
    sp_status st = sp_vocab_tokenize(v, text, len, add_special, parse_special, NULL, 0, &need);
    if (st == SP_ERR_NO_MEMORY) return 0;
    FZ_CHECK(st == (need ? SP_ERR_INVALID_ARG : SP_OK));
    int32_t *toks = malloc((need + 1) * sizeof *toks);
    FZ_CHECK(toks);
    size_t got = 0;
    FZ_CHECK(sp_vocab_tokenize(v, text, len, add_special, parse_special, toks, need, &got) == SP_OK);
    FZ_CHECK(got == need);
    if (need) {
        size_t short_n = 0;
        int32_t *one_short = malloc((need - 1 + 1) * sizeof *one_short); /* room for need-1: ASan sees any overrun */
        FZ_CHECK(one_short);
        FZ_CHECK(sp_vocab_tokenize(v, text, len, add_special, parse_special, need > 1 ? one_short : NULL, need - 1,
                                   &short_n) == SP_ERR_INVALID_ARG);
        FZ_CHECK(short_n == need);
        for (size_t i = 0; i + 1 < need; i++) FZ_CHECK(one_short[i] == toks[i]);
        free(one_short);
    }
    if (!add_special && len == 0) FZ_CHECK(need == 0);

    /* detokenize: every id is valid; BPE pieces concatenate back to valid UTF-8 text */
    bool round_trip = v->type == SP_VOCAB_BPE && !parse_special && !add_special && valid_utf8(in.p, len);
    for (size_t i = 0; round_trip && i < len; i++) round_trip = v->byte_tok[in.p[i]] >= 0; /* else dropped, as in
                                                                                              llama.cpp */
    size_t back_n = 0; /* text bytes matched by the pieces so far */
    bool same = true;
    for (size_t i = 0; i < need; i++) {
        FZ_CHECK(toks[i] >= 0 && toks[i] < v->n_tokens);
        char piece[64];
        size_t plen = 0;
        st = sp_vocab_token_to_piece(v, toks[i], parse_special, piece, sizeof piece, &plen);
        FZ_CHECK(st == SP_OK || (st == SP_ERR_INVALID_ARG && plen > sizeof piece));
        if (!round_trip) continue;
        if (st != SP_OK || back_n + plen > len || memcmp(text + back_n, piece, plen) != 0) same = false;
        else back_n += plen;
    }
    if (round_trip) FZ_CHECK(same && back_n == len);
    free(toks);
    return 0;
}
