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
/* Quantize rows of x[T, K] into scratch xq for this thread's tokens (no-op when the model needs no q8 activations). */
void sp_fwd_quant_rows(const fwd_ctx *c, const float *x, int64_t T, int64_t K, int ith, int nth);
/* y[t, r] (row stride ldy) = W[r] . x[t] for this thread's share of W's rows; reads scratch xq for q8 weight types. */
void sp_fwd_matmul_rows(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, const float *x_f, int64_t T,
                        int ith, int nth);

/* The BlockFFN FFN block of layer il: reads scratch xn [T, H] (and xq), writes scratch tmp [T, H]; ends with all
 * threads past a barrier. See ffn_blockffn.c. */
void sp_ffn_blockffn(const fwd_ctx *c, int il, int ith, int nth);
/* Testing/benchmark hook: run layer il's FFN block alone on xn [T, H] (NULL: reuse what scratch holds) with router
 * scores r [T, r_cols] used as given (NULL: computed from xn; r_cols must be E) in `mode`; out [T, H] (may be
 * NULL). Updates the sparsity counters like a forward pass. */
sp_status sp_ffn_blockffn_run(sp_session *ses, int il, const float *xn, const float *r, int64_t r_cols, int32_t T,
                              sp_ffn_mode mode, float *out);

#endif
