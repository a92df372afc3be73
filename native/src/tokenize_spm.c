/* tokenize_spm.c: SentencePiece-style tokenizer for "llama" vocabularies, as llama.cpp's llm_tokenizer_spm_session.
 *
 * Per raw-text fragment:
 *  1. optionally prepend ' ' (add_space_prefix, at the start and after special tokens), replace every ' ' by
 *     U+2581 ("▁");
 *  2. split into UTF-8 characters (by lead byte), one symbol each;
 *  3. repeatedly merge the adjacent pair whose concatenation is the token with the highest score (ties: leftmost),
 *     with a binary heap of candidate pairs; a popped pair whose symbols changed since it was pushed is stale;
 *  4. emit each final symbol's token; a symbol that is no token (an unknown character) falls back to its bytes as
 *     <0xXX> byte tokens.
 * Legend: S = symbols (characters) of the fragment, P = candidate pairs in the heap. */
#include "pair_heap.h"
#include "tokenize_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct spm_sym {
    uint32_t start, n;  /* bytes of the escaped text; n == 0 once merged into its left neighbour */
    int32_t prev, next; /* live neighbours, -1 at the ends */
} spm_sym;

typedef struct spm_pair {
    float score;
    int32_t left, right;
    uint32_t size; /* bytes of left + right when pushed */
} spm_pair;

typedef struct spm_work {
    const char *text;
    spm_sym *sym;   /* [S] */
    spm_pair *heap; /* [P], max-heap on score, then min on left */
    size_t n_heap, heap_cap;
} spm_work;

static bool pair_before(const spm_pair *a, const spm_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

SP_DEFINE_PAIR_HEAP(spm_work, spm_pair, pair_before)

static bool try_pair(const sp_vocab *v, spm_work *w, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return true;
    /* live neighbours are contiguous in the text */
    const uint32_t size = w->sym[l].n + w->sym[r].n;
    int32_t id = sp_vocab_find(v, w->text + w->sym[l].start, size);
    if (id < 0) return true;
    spm_pair p = {v->tok[id].score, l, r, size};
    return heap_push(w, p);
}

static bool emit_bytes(const sp_vocab *v, const char *s, size_t n, sp_tokvec *out) {
    for (size_t j = 0; j < n; j++) {
        uint8_t b = (uint8_t)s[j];
        int32_t id = v->byte_tok[b] >= 0 ? v->byte_tok[b] : v->single_byte_tok[b];
        if (id < 0) id = v->unk; /* llama.cpp throws here; keep going with <unk> */
        if (id >= 0 && !sp_tokvec_push(out, id)) return false;
    }
    return true;
}

sp_status sp_tokenize_spm(const sp_vocab *v, const char *text, size_t len, bool space_prefix, sp_tokvec *out) {
    /* 1. escape: optional leading space, ' ' -> U+2581 (3 bytes) */
    size_t n_spaces = 0;
    for (size_t i = 0; i < len; i++) n_spaces += text[i] == ' ';
    const size_t n_text = len + 2 * n_spaces + (space_prefix ? 3 : 0);
    char *esc = malloc(n_text ? n_text : 1);
    spm_sym *sym = malloc((n_text ? n_text : 1) * sizeof *sym);
    spm_work w = {esc, sym, NULL, 0, 0};
    sp_status st = SP_OK;
    if (!esc || !sym) {
        st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
        goto done;
    }
    size_t o = 0;
    if (space_prefix) { memcpy(esc, "\xE2\x96\x81", 3); o = 3; }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') { memcpy(esc + o, "\xE2\x96\x81", 3); o += 3; }
        else esc[o++] = text[i];
    }

    /* 2. one symbol per UTF-8 character (a truncated one at the end is cut short) */
    size_t n_sym = 0;
    for (size_t off = 0; off < n_text;) {
        size_t n = SP_MIN(sp_utf8_len((uint8_t)esc[off]), n_text - off);
        sym[n_sym] = (spm_sym){(uint32_t)off, (uint32_t)n, (int32_t)n_sym - 1, (int32_t)n_sym + 1};
        off += n;
        n_sym++;
    }
    if (n_sym == 0) goto done;
    sym[n_sym - 1].next = -1;

    /* 3. merge by score */
    for (size_t i = 1; i < n_sym; i++)
        if (!try_pair(v, &w, (int32_t)i - 1, (int32_t)i)) goto oom;
    while (w.n_heap) {
        spm_pair p = heap_pop(&w);
        spm_sym *a = &sym[p.left], *b = &sym[p.right];
        if (a->n == 0 || b->n == 0 || a->n + b->n != p.size) continue; /* stale */
        a->n += b->n;
        b->n = 0;
        a->next = b->next;
        if (b->next >= 0) sym[b->next].prev = p.left;
        if (!try_pair(v, &w, a->prev, p.left) || !try_pair(v, &w, p.left, a->next)) goto oom;
    }

    /* 4. emit */
    for (int32_t i = 0; i != -1; i = sym[i].next) {
        int32_t id = sp_vocab_find(v, esc + sym[i].start, sym[i].n);
        if (id >= 0) {
            if (!sp_tokvec_push(out, id)) goto oom;
        } else if (!emit_bytes(v, esc + sym[i].start, sym[i].n, out)) {
            goto oom;
        }
    }
    goto done;
oom:
    st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
done:
    free(w.heap);
    free(sym);
    free(esc);
    return st;
}
