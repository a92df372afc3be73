/* fuzz.h: what the libFuzzer targets of native/fuzz share: a reader that turns the fuzzer's bytes into typed values,
 * a check that aborts (so libFuzzer records the input), and the data files that tools/fuzz.sh generates.
 *
 * The targets are built by tools/fuzz.sh (CMake option SPARROW_FUZZ=ON, clang, -fsanitize=fuzzer,address,undefined)
 * and include the library's internal headers: they check internal invariants a public caller cannot see. */
#ifndef SP_FUZZ_H
#define SP_FUZZ_H

#define _GNU_SOURCE /* memfd_create */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A failed invariant: print it and abort, which libFuzzer reports as a crash with the input saved. */
#define FZ_CHECK(cond)                                                                   \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "fuzz check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            abort();                                                                     \
        }                                                                                \
    } while (0)

/* The fuzzer's bytes read front to back; past the end every read gives 0. */
typedef struct fz_in {
    const uint8_t *p;
    size_t n;
} fz_in;

static inline uint8_t fz_u8(fz_in *in) {
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}

static inline uint16_t fz_u16(fz_in *in) { return (uint16_t)(fz_u8(in) | (uint16_t)fz_u8(in) << 8); }

static inline uint32_t fz_u32(fz_in *in) { return (uint32_t)fz_u16(in) | (uint32_t)fz_u16(in) << 16; }

static inline uint64_t fz_u64(fz_in *in) { return (uint64_t)fz_u32(in) | (uint64_t)fz_u32(in) << 32; }

/* Any float bit pattern: NaNs, infinities and denormals included. */
static inline float fz_f32_bits(fz_in *in) {
    uint32_t u = fz_u32(in);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The folder of generated data (vocabularies, tiny models): $SPARROW_FUZZ_DATA, set by tools/fuzz.sh. */
static inline const char *fz_data_dir(void) {
    const char *d = getenv("SPARROW_FUZZ_DATA");
    if (!d || !*d) {
        fprintf(stderr, "set SPARROW_FUZZ_DATA to the data folder tools/fuzz.sh writes (build/fuzz/data)\n");
        abort();
    }
    return d;
}

/* "<data dir>/<name>" into buf. */
static inline const char *fz_data_path(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", fz_data_dir(), name);
    return buf;
}

#include "tokenize_internal.h" /* sp_vocab, sp_vtoken: the piece-size bound needs each token's text length */

/* Everything a host does with a vocabulary it did not make: tokenize texts built from its own tokens (special-token
 * text included) and a fixed sample, with every flag combination and the capacity contract, and detokenize tokens
 * (all of them when there are at most max_tokens) with render_special on and off.
 * Invariants: ids in range; the two-call capacity protocol agrees; a piece is at most 22x its token's text (+1 for
 * byte tokens), whatever the vocabulary (issue 13.8: a 90 KB token once gave 2.7 GB). */
static inline void fz_exercise_vocab(const sp_vocab *v, int32_t max_tokens) {
    const int32_t n = sp_vocab_n_tokens(v);
    FZ_CHECK(n > 0);
    /* text: a fixed sample, then the texts of up to 64 tokens spread over the vocabulary (specials come first in
     * most files, so ids 0..7 are always in) */
    char text[4096];
    size_t len = 0;
    static const char sample[] = "Hello, world! 123 4567 <|im_start|>user\n  don't\t\xc3\xa9t\xc3\xa9 \xe4\xb8\xad\xff ";
    memcpy(text, sample, sizeof sample - 1);
    len = sizeof sample - 1;
    for (int32_t k = 0; k < 64; k++) {
        const int32_t id = k < 8 ? k : (int32_t)((int64_t)n * k / 64);
        if (id >= n) break;
        const sp_vtoken *t = &v->tok[id];
        if (t->len > sizeof text - len) break;
        memcpy(text + len, t->text, t->len);
        len += t->len;
    }
    int32_t toks[1024];
    for (int flags = 0; flags < 4; flags++) {
        const bool add_special = flags & 1, parse_special = flags & 2;
        size_t need = 0;
        sp_status st = sp_vocab_tokenize(v, text, len, add_special, parse_special, NULL, 0, &need);
        if (st == SP_ERR_NO_MEMORY) continue;
        FZ_CHECK(st == SP_OK || (st == SP_ERR_INVALID_ARG && need > 0));
        size_t got = 0;
        const size_t cap = need < 1024 ? need : 1024;
        st = sp_vocab_tokenize(v, text, len, add_special, parse_special, toks, cap, &got);
        FZ_CHECK(got == need);
        FZ_CHECK(st == (need <= cap ? SP_OK : SP_ERR_INVALID_ARG));
        for (size_t i = 0; i < cap; i++) FZ_CHECK(toks[i] >= 0 && toks[i] < n);
    }
    char piece[256];
    const int32_t step = n <= max_tokens ? 1 : n / max_tokens + 1;
    for (int32_t id = 0; id < n; id += step) {
        for (int render = 0; render < 2; render++) {
            size_t plen = 0;
            sp_status st = sp_vocab_token_to_piece(v, id, render, piece, sizeof piece, &plen);
            FZ_CHECK(st == SP_OK || (st == SP_ERR_INVALID_ARG && plen > sizeof piece));
            FZ_CHECK(plen <= 22 * (size_t)v->tok[id].len + 1);
        }
    }
    size_t plen = 0;
    FZ_CHECK(sp_vocab_token_to_piece(v, n, false, piece, sizeof piece, &plen) == SP_ERR_INVALID_ARG);
    FZ_CHECK(sp_vocab_token_to_piece(v, -1, false, piece, sizeof piece, &plen) == SP_ERR_INVALID_ARG);
}

#endif
