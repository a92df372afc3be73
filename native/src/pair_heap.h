/* pair_heap.h: a binary heap of merge candidates, shared by the BPE and SentencePiece tokenizers.
 *
 * SP_DEFINE_PAIR_HEAP(T, before) defines, for a work struct W with fields `T *heap; size_t n_heap, heap_cap;`:
 *   static bool heap_push(W *w, T p)  -- false when out of memory (nothing changed)
 *   static T heap_pop(W *w)           -- the element e for which no other x has before(&x, &e); n_heap must be > 0
 * `before(a, b)` orders the heap: the top is the element no other comes before. */
#ifndef SP_PAIR_HEAP_H
#define SP_PAIR_HEAP_H

#include <stdbool.h>
#include <stdlib.h>

#define SP_DEFINE_PAIR_HEAP(W, T, before)                                                                        \
    static bool heap_push(W *w, T p) {                                                                           \
        if (w->n_heap == w->heap_cap) {                                                                          \
            size_t cap = w->heap_cap ? w->heap_cap * 2 : 64;                                                     \
            T *h = realloc(w->heap, cap * sizeof *h);                                                            \
            if (!h) return false;                                                                                \
            w->heap = h;                                                                                         \
            w->heap_cap = cap;                                                                                   \
        }                                                                                                        \
        size_t i = w->n_heap++;                                                                                  \
        while (i > 0) { /* sift up */                                                                            \
            size_t parent = (i - 1) / 2;                                                                         \
            if (!before(&p, &w->heap[parent])) break;                                                            \
            w->heap[i] = w->heap[parent];                                                                        \
            i = parent;                                                                                          \
        }                                                                                                        \
        w->heap[i] = p;                                                                                          \
        return true;                                                                                             \
    }                                                                                                            \
    static T heap_pop(W *w) {                                                                                    \
        T top = w->heap[0], last = w->heap[--w->n_heap];                                                         \
        size_t i = 0, n = w->n_heap;                                                                             \
        for (;;) { /* sift the last element down from the root */                                               \
            size_t c = 2 * i + 1;                                                                                \
            if (c >= n) break;                                                                                   \
            if (c + 1 < n && before(&w->heap[c + 1], &w->heap[c])) c++;                                          \
            if (!before(&w->heap[c], &last)) break;                                                              \
            w->heap[i] = w->heap[c];                                                                             \
            i = c;                                                                                               \
        }                                                                                                        \
        if (n) w->heap[i] = last;                                                                                \
        return top;                                                                                              \
    }

#endif
