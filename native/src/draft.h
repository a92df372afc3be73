/* draft.h: the generator's drafters (draft.c): each proposes a token tree below the context's last token.
 *
 * Shape legend: V = vocabulary size, R = recycling_k (candidates kept per token), N = draft nodes proposed, T = N + 1
 * verified tokens (the root first), C = the draft session's n_ctx.
 *
 * A draft is tok[0..N) and par[0..N): node i (batch index i + 1) holds tok[i], its parent is batch index par[i] < i + 1
 * (0 = the root). A chain has par[i] == i. */
#ifndef SP_DRAFT_H
#define SP_DRAFT_H

#include "model.h"

typedef struct sp_drafter {
    sp_drafter_kind kind;
    int32_t V;
    int32_t ngram, min_ngram, chain_k;    /* prompt lookup; chain_k: the lookup's / the draft model's chain length */
    int32_t R;                            /* recycling: candidates per token */
    int32_t branching[SP_GEN_MAX_DEPTH], n_branching, tree_nodes;
    int32_t *adj;                         /* [V, R] token -> its last verified top-R successors, -1 = none yet */
    int32_t *rtok, *rpar, *rmap;          /* hybrid: the recycling tree [tree_nodes], its batch index -> merged one */
    sp_session *ds;                       /* draft model: its session, */
    int32_t *dtok;                        /* [C] the tokens its KV cache holds, */
    uint64_t dchanges;                    /* as long as its n_changes is this (else: unknown), */
    float *dlogits;                       /* [V] its logits */
    double draft_eval_s;                  /* time in the draft session's sp_eval (since creation) */
} sp_drafter;

/* The drafter for params p over the target session (params checked by the caller, except the draft session's fit,
 * checked here). Nothing is allocated on failure. */
sp_status sp_drafter_init(sp_drafter *d, const sp_generator_params *p, const sp_session *target);
void sp_drafter_free(sp_drafter *d);

/* Up to budget nodes below ctx[L - 1] into tok/par; *n the count. Fails only for the draft model (its sp_eval). */
sp_status sp_drafter_propose(sp_drafter *d, const int32_t *ctx, int32_t L, int32_t budget, int32_t *tok, int32_t *par,
                             int32_t *n);

/* The verification's results: batch [T] (the root, then the nodes), logits [T, V] (every row). Token Recycling takes
 * each row's top-R tokens as the candidates after that row's token. */
void sp_drafter_observe(sp_drafter *d, const int32_t *batch, int32_t T, const float *logits);

bool sp_drafter_has_state(const sp_drafter *d);  /* Token Recycling's matrix (recycling, hybrid) */
sp_status sp_drafter_save(const sp_drafter *d, const char *path);
sp_status sp_drafter_load(sp_drafter *d, const char *path);

/* .npy files of a 2-D int32 matrix (npy.c): the format NumPy's np.save writes for a C-ordered '<i4' array.
 * Load fills out [rows, cols] only when the file is a regular file in that exact format and shape; the caller
 * validates the values. */
sp_status sp_npy_save_i32(const char *path, const int32_t *data, int32_t rows, int32_t cols);
sp_status sp_npy_load_i32(const char *path, int32_t *out, int32_t rows, int32_t cols);

#endif
