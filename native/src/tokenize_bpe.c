/* tokenize_bpe.c: GPT-2 style byte-level BPE, as llama.cpp's llm_tokenizer_bpe_session.
 *
 * Per raw-text fragment:
 *  1. decode UTF-8 to codepoints (invalid bytes become U+FFFD) and split them into pre-tokens (unicode.c);
 *  2. byte-encode each pre-token: every UTF-8 byte becomes its printable GPT-2 character, one symbol per byte;
 *  3. merge adjacent symbols, lowest merge rank first (ties: leftmost), with a binary heap over candidate pairs
 *     and a doubly linked list of live symbols; a popped pair whose symbols changed since it was pushed is stale;
 *  4. emit each final symbol's token id; a symbol that is no token falls back to its single bytes.
 * Legend: S = symbols (bytes) of one pre-token, P = candidate pairs in the heap. */
#include "pair_heap.h"
#include "tokenize_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct bpe_sym {
    uint32_t start, n;   /* bytes of the encoded pre-token; n == 0 once merged into its left neighbour */
    int32_t id;          /* token of this text, -1 if none */
    int32_t prev, next;  /* live neighbours, -1 at the ends */
} bpe_sym;

typedef struct bpe_pair {
    int32_t rank, left, right, result;
    uint32_t n_left, n_right; /* symbol lengths when pushed: a pair is stale when they changed */
} bpe_pair;

typedef struct bpe_work {
    char *enc;          /* the byte-encoded pre-token */
    size_t enc_cap;
    bpe_sym *sym;       /* [S] */
    size_t sym_cap;
    bpe_pair *heap;     /* [P], min-heap on (rank, left) */
    size_t n_heap, heap_cap;
} bpe_work;

static bool grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t cap2 = *cap ? *cap : 64;
    while (cap2 < need) cap2 *= 2;
    void *q = realloc(*p, cap2 * elem);
    if (!q) return false;
    *p = q;
    *cap = cap2;
    return true;
}

static bool pair_before(const bpe_pair *a, const bpe_pair *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

SP_DEFINE_PAIR_HEAP(bpe_work, bpe_pair, pair_before)

static bool try_pair(const sp_vocab *v, bpe_work *w, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return true;
    const bpe_sym *a = &w->sym[l], *b = &w->sym[r];
    if (a->id < 0 || b->id < 0) return true; /* merges only join tokens (checked at load) */
    const sp_merge *m = sp_vocab_find_merge(v, a->id, b->id);
    if (!m) return true;
    bpe_pair p = {m->rank, l, r, m->result, a->n, b->n};
    return heap_push(w, p);
}

/* BPE over one byte-encoded pre-token w->enc[0..n_enc) whose per-byte symbols are set up; appends ids. */
static bool merge_and_emit(const sp_vocab *v, bpe_work *w, size_t n_sym, sp_tokvec *out) {
    w->n_heap = 0;
    for (size_t i = 1; i < n_sym; i++)
        if (!try_pair(v, w, (int32_t)i - 1, (int32_t)i)) return false;
    while (w->n_heap) {
        bpe_pair p = heap_pop(w);
        bpe_sym *a = &w->sym[p.left], *b = &w->sym[p.right];
        if (a->n == 0 || b->n == 0 || a->n != p.n_left || b->n != p.n_right) continue; /* stale */
        a->n += b->n;
        a->id = p.result;
        b->n = 0;
        a->next = b->next;
        if (b->next >= 0) w->sym[b->next].prev = p.left;
        if (!try_pair(v, w, a->prev, p.left) || !try_pair(v, w, p.left, a->next)) return false;
    }
    for (size_t i = 0; i < n_sym; i++) {
        const bpe_sym *s = &w->sym[i];
        if (s->n == 0) continue;
        if (s->id >= 0) {
            if (!sp_tokvec_push(out, s->id)) return false;
            continue;
        }
        for (uint32_t j = 0; j < s->n; j++) { /* not a token: its single bytes, where they are tokens */
            int32_t id = v->single_byte_tok[(uint8_t)w->enc[s->start + j]];
            if (id >= 0 && !sp_tokvec_push(out, id)) return false;
        }
    }
    return true;
}

sp_status sp_tokenize_bpe(const sp_vocab *v, const char *text, size_t len, sp_tokvec *out) {
    /* the GPT-2 character of every byte, UTF-8 encoded (1 or 2 bytes) */
    char enc_str[256][2];
    uint8_t enc_len[256];
    for (int b = 0; b < 256; b++) enc_len[b] = (uint8_t)sp_utf8_encode(sp_gpt2_byte_to_cp((uint8_t)b), enc_str[b]);

    uint32_t *cps = malloc((len ? len : 1) * sizeof *cps);
    if (!cps) return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
    size_t n_cps = sp_utf8_decode(text, len, cps);
    sp_sizes pieces = {0};
    sp_status st = sp_pretokenize(v->pre, cps, n_cps, &pieces);
    bpe_work w = {0};

    size_t start = 0;
    for (size_t pi = 0; st == SP_OK && pi < pieces.n; pi++) {
        const uint32_t *pc = cps + start;
        const size_t n_pc = pieces.v[pi];
        start += n_pc;
        /* byte-encode the pre-token: one symbol per UTF-8 byte */
        if (!grow((void **)&w.enc, &w.enc_cap, n_pc * 8, 1) || !grow((void **)&w.sym, &w.sym_cap, n_pc * 4, sizeof *w.sym)) {
            st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
            break;
        }
        size_t n_enc = 0, n_sym = 0;
        for (size_t i = 0; i < n_pc; i++) {
            char u[4];
            int nu = sp_utf8_encode(pc[i], u);
            for (int k = 0; k < nu; k++) {
                uint8_t b = (uint8_t)u[k];
                bpe_sym *s = &w.sym[n_sym];
                s->start = (uint32_t)n_enc;
                s->n = enc_len[b];
                s->id = v->byte_tok[b];
                s->prev = (int32_t)n_sym - 1;
                s->next = (int32_t)n_sym + 1;
                memcpy(w.enc + n_enc, enc_str[b], enc_len[b]);
                n_enc += enc_len[b];
                n_sym++;
            }
        }
        if (n_sym == 0) continue;
        w.sym[n_sym - 1].next = -1;
        if (v->ignore_merges) {
            int32_t id = sp_vocab_find(v, w.enc, n_enc);
            if (id >= 0) {
                if (!sp_tokvec_push(out, id)) st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
                continue;
            }
        }
        if (!merge_and_emit(v, &w, n_sym, out)) st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
    }
    free(w.enc);
    free(w.sym);
    free(w.heap);
    sp_sizes_free(&pieces);
    free(cps);
    return st;
}
