/* forward.h: what the forward pass's parts share: the per-call context and the step helpers that every pool thread
 * runs on its share of the work (see forward.c). */
#ifndef SP_FORWARD_H
#define SP_FORWARD_H

#include "model.h"

typedef struct fwd_ctx {
    sp_session *ses;
    const sp_batch *b;
    const sp_kernels *k;
    bool q8; /* some weights take quantized activations: keep scratch xq filled */
} fwd_ctx;

/* out[t] = x[t] / rms(x[t]) * w * post for this thread's tokens; quantize each row into scratch xq when `quant`. */
void sp_fwd_rmsnorm_quant_rows(const fwd_ctx *c, float *out, const float *x, const float *w, float post, int64_t T,
                               int64_t H, bool quant, int ith, int nth);
/* This thread's share [r0, r1) of N rows in whole groups of g (the last share may end with a partial group). */
static inline void sp_fwd_share(int64_t N, int64_t g, int ith, int nth, int64_t *r0, int64_t *r1) {
    const int64_t per = ((N + nth - 1) / nth + g - 1) / g * g;
    *r0 = SP_MIN(N, per * ith);
    *r1 = SP_MIN(N, *r0 + per);
}
/* This thread's share [r0, r1) of a matmul's N weight rows: multiples of 16 rows (the packed layouts' row groups). */
static inline void sp_fwd_row_share(int64_t N, int ith, int nth, int64_t *r0, int64_t *r1) {
    sp_fwd_share(N, 16, ith, nth, r0, r1);
}
/* y[t, r] (row stride ldy) = W[r] . x[t] for this thread's share of W's rows; reads scratch xq for q8 weight types. */
void sp_fwd_matmul_rows(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, const float *x_f, int64_t T,
                        int ith, int nth);

/* Quantize rows [0, n_rows) of x[n_rows, K] into scratch xq (this thread's share) when W takes q8 activations;
 * returns whether it did (all threads get the same answer: a barrier after it is needed only then). */
bool sp_fwd_quant_rows_for(const fwd_ctx *c, const sp_tensor *W, const float *x, int64_t n_rows, int64_t K, int ith,
                           int nth);
/* RoPE (adjacent pairs, GGUF's llama convention) in place on this thread's tokens: the n_rot values at
 * x + t*ldx + h*head_stride + offset of each head h < n_heads. */
void sp_fwd_rope_rows(const fwd_ctx *c, float *x, int64_t ldx, int64_t T, int n_heads, int64_t head_stride,
                      int64_t offset, int ith, int nth);

/* The multi-head latent attention block of layer il (attn_mla.c): reads scratch xn [T, H] (and xq), writes scratch
 * attn [T, NH*DV] and the batch's latent rows in the cache; ends with all threads past a barrier. */
void sp_attn_mla(const fwd_ctx *c, int il, int ith, int nth);

/* The BlockFFN FFN block of layer il: reads scratch xn [T, H] (and xq), writes scratch tmp [T, H]; ends with this
 * thread's tokens of tmp (sp_split(T)) complete, not at a barrier: the caller's next step must read only those rows
 * or meet a barrier first. See ffn_blockffn.c. */
void sp_ffn_blockffn(const fwd_ctx *c, int il, int ith, int nth);
/* Add layer il's batch of T tokens to the session's sparsity counters: router scores r [T, E] (active: != 0), and
 * the expert bytes the pass read (also the GPU pass's, vulkan/vk_forward.c). */
void sp_ffn_count_sparsity(sp_session *ses, int il, const float *r, int64_t T, uint64_t bytes);
/* Testing/benchmark hook: run layer il's FFN block alone on xn [T, H] (NULL: reuse what scratch holds) with router
 * scores r [T, r_cols] used as given (NULL: computed from xn; r_cols must be E) in `mode`; out [T, H] (may be
 * NULL). Updates the sparsity counters like a forward pass. */
sp_status sp_ffn_blockffn_run(sp_session *ses, int il, const float *xn, const float *r, int64_t r_cols, int32_t T,
                              sp_ffn_mode mode, float *out);

/* Synthetic routing (routing_synth.c; for benchmarks and tests, not the stable API). With it on, every BlockFFN layer
 * of every pass (sp_eval, and sp_ffn_blockffn_run without r) still runs its router matmul, then replaces the scores
 * with a deterministic pattern keyed by (layer, position): each position uses A = round((1 - tls) E) experts and any
 * k consecutive positions use U = round((1 - cls) E) together (so TLS and CLS-k are exactly 1 - A/E and 1 - U/E).
 * The same position gets the same experts alone, in a chunk, or as a tree node (position n_past + depth). */
typedef struct sp_synth_routing_params {
    double tls;    /* token-level sparsity in [0, 1] */
    double cls;    /* chunk-level sparsity over k positions in [0, tls] */
    int32_t k;     /* chunk length, 2..65536 */
    uint64_t seed;
} sp_synth_routing_params;
/* p NULL: off (the router's own scores again). Bad arguments: a status and message, the setting unchanged. */
sp_status sp_session_set_synthetic_routing(sp_session *ses, const sp_synth_routing_params *p);
/* r[E] = the synthetic scores of layer il at position pos (synthetic routing must be on). */
void sp_synth_routing_scores(const sp_session *ses, int il, int64_t pos, float *r);

#endif
