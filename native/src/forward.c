/* forward.c: the transformer forward pass over a batch of T tokens: each layer's attention by its kind (grouped-query
 * here, multi-head latent in attn_mla.c) and its FFN by its kind (dense SwiGLU here, BlockFFN experts in
 * ffn_blockffn.c).
 *
 * Shape legend: T = tokens in the batch, H = n_embd, D = head_dim, NH = heads, NKV = kv heads, QD = NH*D,
 * KVD = NKV*D, F = n_ff, V = vocabulary, C = KV cache slots per sequence, P = n_past (a sequence's slots cached before this batch).
 *
 * All pool threads run sp_forward_worker() at once; each step splits its work by thread (rows of a weight matrix,
 * tokens, or (token, head) pairs) and threads meet at a barrier before a step reads what another wrote.
 * Nothing here allocates: every buffer lives in the session (model.h).
 *
 * The kinds share everything else: embeddings, norms, the output projection, residuals, and three MiniCPM scales
 * that are 1 for llama: embeddings x embed_scale, each residual branch x residual_scale, the final normalised hidden
 * state x logit_scale. */
#include "forward.h"

#include <math.h>
#include <string.h>

/* ---- steps, each run by every thread on its share ---- */

/* out[t] = x[t] / rms(x[t]) * w * post for this thread's tokens; then quantize out[t] to xq[t] when `quant`. */
void sp_fwd_rmsnorm_quant_rows(const fwd_ctx *c, float *out, const float *x, const float *w, float post, int64_t T,
                               int64_t H, bool quant, int ith, int nth) {
    const float eps = c->ses->model->hp.norm_eps;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const float *xr = x + t * H;
        float *o = out + t * H;
        double ss = 0;
        for (int64_t i = 0; i < H; i++) ss += (double)xr[i] * xr[i];
        const float scale = post / sqrtf((float)(ss / (double)H) + eps);
        for (int64_t i = 0; i < H; i++) o[i] = xr[i] * scale * w[i];
        if (quant) c->k->quantize_q8a((sp_block_q8a *)c->ses->s.xq + t * (H / SP_QK), o, H);
    }
}

/* Quantize rows [0, n_rows) of x[n_rows, K] into scratch xq (this thread's share) when W takes q8 activations. */
bool sp_fwd_quant_rows_for(const fwd_ctx *c, const sp_tensor *W, const float *x, int64_t n_rows, int64_t K, int ith,
                           int nth) {
    if (!sp_type_traits_of(W->type).act_q8) return false;
    int64_t r0, r1;
    sp_split(n_rows, ith, nth, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) c->k->quantize_q8a((sp_block_q8a *)c->ses->s.xq + r * (K / SP_QK), x + r * K, K);
    return true;
}

/* y[t, r] = W[r] . x[t] for rows [r0, r1) of W (r0 a multiple of the tier's pack_rows when W is packed); x_f: float
 * input [T, K], xq: its sp_block_q8a rows, read instead when W's type takes quantized activations. */
static void matmul_range(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, const float *x_f, const void *xq,
                         int64_t r0, int64_t r1, int64_t T) {
    if (r0 >= r1) return;
    const void *x = sp_type_traits_of(W->type).act_q8 ? xq : (const void *)x_f;
    if (W->packed) c->k->matmul_packed[W->type](y, ldy, W->packed, x, W->k, r0, r1, T); /* packed at load */
    else c->k->matmul[W->type](y, ldy, W->data, x, W->k, r0, r1, T);
}

/* This thread's share of W's rows: packed row groups of 16 rows, or any even split (e.g. BlockFFN's 40-row router:
 * 20 + 20, not 32 + 8). */
static void row_share(const sp_tensor *W, int ith, int nth, int64_t *r0, int64_t *r1) {
    if (W->packed) sp_fwd_row_share(W->n, ith, nth, r0, r1);
    else sp_split(W->n, ith, nth, r0, r1);
}

/* y[t, r] (row stride ldy) = W[r] . x[t] for this thread's rows of W. x_f: float input [T, K]; the quantized copy of
 * it sits in scratch xq when the weight type takes quantized activations. */
void sp_fwd_matmul_rows(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, const float *x_f, int64_t T,
                        int ith, int nth) {
    int64_t r0, r1;
    row_share(W, ith, nth, &r0, &r1);
    matmul_range(c, y, ldy, W, x_f, c->ses->s.xq, r0, r1, T);
}

/* RoPE as GGUF's llama architecture defines it: adjacent pairs (x[2i], x[2i+1]) rotate by pos * base^(-2i/n_rot), for
 * 2i < n_rot. cs[t] holds (cos, sin) per pair. Applied in place, for this thread's tokens, to the n_rot values at
 * x + t*ldx + h*head_stride + offset of each head h < n_heads (GQA: the head's first n_rot dims; MLA: its rope part). */
/* The rotation itself: pairs (v[i], v[i+1]) for even i in [i0, i1) by (cs[i], cs[i+1]) = (cos, sin). */
static inline void rope_pairs(float *v, const float *cs, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += 2) {
        const float x0 = v[i], x1 = v[i + 1], co = cs[i], si = cs[i + 1];
        v[i] = x0 * co - x1 * si;
        v[i + 1] = x0 * si + x1 * co;
    }
}

void sp_fwd_rope_rows(const fwd_ctx *c, float *x, int64_t ldx, int64_t T, int n_heads, int64_t head_stride,
                      int64_t offset, int ith, int nth) {
    const sp_hparams *hp = &c->ses->model->hp;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++)
        for (int h = 0; h < n_heads; h++)
            rope_pairs(x + t * ldx + (int64_t)h * head_stride + offset, c->ses->s.rope_cs + t * hp->n_rot, 0,
                       hp->n_rot);
}

/* The slots token t's scores cover in the chunk of tokens ending before te: its sequence's cached slots and the batch
 * slots of its run up to the chunk's end (all of the run with a mask). */
static inline int64_t run_keys(const fwd_ctx *c, const sp_run *r, int64_t te) {
    return c->b->mask ? r->P + r->n : r->P + SP_MIN(te, r->t0 + r->n) - r->t0;
}

/* Softmax of a query row of token t (of run r) over the n slots the chunk's scores cover: batch slots t may not see
 * (the mask, or causal order) set to -inf, then row[j] = exp(row[j] - max) unnormalised, and inv = 1 / sum (0 when
 * nothing is visible). */
static void softmax_row(const fwd_ctx *c, float *row, float *inv, const sp_run *r, int64_t t, int64_t n) {
    const int64_t T = c->b->n_tokens, P = r->P;
    if (c->b->mask) {
        const uint8_t *m = c->b->mask + t * T + r->t0; /* token t's row from its run's first token */
        for (int64_t j = P; j < n; j++)
            if (!m[j - P]) row[j] = -INFINITY;
    } else {
        for (int64_t j = P + (t - r->t0) + 1; j < n; j++) row[j] = -INFINITY;
    }
    bool bad = false;
    float mx = c->k->max_f32(row, n, &bad);
    if (bad) { /* NaN or +inf somewhere: the largest ordered value, as a plain loop gives it */
        mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
    }
    const float sum = c->k->exp_sum(row, n, mx);
    *inv = sum > 0 ? 1.0f / sum : 0.0f;
}

/* Grouped-query attention of the batch, in chunks of TQ = attn_tq tokens (the scores scratch holds one chunk). Each
 * run of the batch (one sequence: scratch runs) meets its own sequence's cache. For kv head g a run's queries in the
 * chunk (its tokens x the group's heads, rows of qg) meet the cache in three steps, each split over the threads:
 *   1. scores, by (run, kv head, key block) units: each thread's share of a head's key blocks is one kernel call, so
 *      every key is read once for all the run's queries (token t sees its sequence's cached slots [0, P) and the
 *      batch slots of its run that the mask, or causal order, allows);
 *   2. each query row's softmax, unnormalised (softmax_row);
 *   3. out = inv * sum_j e_j v_j by (kv head, token, slice of D) units, the group's G heads together.
 * When step 3 gives each (kv head, token) a thread of its own, that thread also runs step 2 for its rows (no
 * barrier between). Each element of a score or an output is computed alike whatever T, the chunk, the split or the
 * other sequences in the batch (kernels.h), so a token's attention is the same in a draft tree or a batch of
 * sequences as decoded alone. */
static bool attention(const fwd_ctx *c, int il, bool quant, int ith, int nth) {
    const sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    const sp_scratch *s = &ses->s;
    const int64_t T = c->b->n_tokens, C = ses->params.n_ctx, D = hp->head_dim;
    const int64_t NH = hp->n_head, NKV = hp->n_head_kv, G = NH / NKV, QD = NH * D, KVD = NKV * D;
    const int64_t S = C + ses->params.n_batch, TQ = ses->attn_tq, CB = sp_kcache_blocks(ses);
    const int64_t CBT = ses->params.n_seq * CB; /* key blocks per kv head, all sequences */
    const float scale = 1.0f / sqrtf((float)D);
    const sp_f16 *kc = (const sp_f16 *)ses->k_cache + sp_kcache_at(ses, il, 0, 0, 0, 0); /* [NKV, CBT, D, 16] */
    const sp_f16 *vc = (const sp_f16 *)ses->v_cache + sp_vcache_row(ses, il, 0, 0) * KVD; /* [n_seq * C, KVD] */
    float *sc = s->scores, *inv = s->scores + NH * TQ * S; /* [NKV, TQ*G, S], [NKV, TQ*G] */
    for (int64_t tc0 = 0; tc0 < T; tc0 += TQ) {
        const int64_t nt = SP_MIN(TQ, T - tc0), M = nt * G, te = tc0 + nt;
        /* 1. scores: the units of each run overlapping the chunk, in order */
        const int32_t r_first = s->trun[tc0], r_last = s->trun[te - 1];
        int64_t n_units = 0;
        for (int32_t ri = r_first; ri <= r_last; ri++) n_units += NKV * ((run_keys(c, &s->runs[ri], te) + 15) / 16);
        int64_t u0, u1, base = 0;
        sp_split(n_units, ith, nth, &u0, &u1);
        for (int32_t ri = r_first; ri <= r_last && base < u1; ri++) {
            const sp_run *r = &s->runs[ri];
            const int64_t n = run_keys(c, r, te), nblk = (n + SP_KBLK - 1) / SP_KBLK;
            const int64_t ts = SP_MAX(tc0, r->t0), mr = (SP_MIN(te, r->t0 + r->n) - ts) * G; /* the run's rows */
            for (int64_t u = SP_MAX(u0, base) - base, ue = SP_MIN(u1, base + NKV * nblk) - base; u < ue;) {
                const int64_t g = u / nblk, b0 = u % nblk, b1 = SP_MIN(nblk, b0 + (ue - u));
                const int64_t j0 = b0 * SP_KBLK, j1 = SP_MIN(n, b1 * SP_KBLK);
                c->k->attn_scores_f16(s->qg + (g * T * G + ts * G) * D, D, mr,
                                      kc + (g * CBT + r->seq * CB + b0) * SP_KBLK * D, j1 - j0, D, scale,
                                      sc + (g * TQ * G + (ts - tc0) * G) * S + j0, S);
                u += b1 - b0;
            }
            base += NKV * nblk;
        }
        sp_pool_barrier(ses->pool);
        /* 2. and 3. */
        const int64_t pairs = NKV * nt;
        int64_t nsplit = 1;
        while (pairs * nsplit < 2 * nth && 16 * nsplit * 2 <= D) nsplit *= 2;
        const int64_t w = (D / nsplit + 15) / 16 * 16; /* D's slice per unit: whole vectors */
        quant = quant && D % SP_QK == 0 && w % SP_QK == 0; /* each unit's slices are whole activation blocks */
        if (nsplit > 1) {
            int64_t r0, r1;
            sp_split(NKV * M, ith, nth, &r0, &r1);
            for (int64_t q = r0; q < r1; q++) {
                const int64_t t = tc0 + q % M / G;
                const sp_run *r = &s->runs[s->trun[t]];
                softmax_row(c, sc + (q / M * TQ * G + q % M) * S, inv + q / M * TQ * G + q % M, r, t,
                            run_keys(c, r, te));
            }
            sp_pool_barrier(ses->pool);
        }
        sp_split(pairs * nsplit, ith, nth, &u0, &u1);
        for (int64_t u = u0; u < u1; u++) {
            const int64_t g = u / (nt * nsplit), tl = u / nsplit % nt, t = tc0 + tl, d0 = u % nsplit * w;
            if (d0 >= D) continue;
            const sp_run *r = &s->runs[s->trun[t]];
            const int64_t d1 = SP_MIN(D, d0 + w), nv = c->b->mask ? r->P + r->n : r->P + (t - r->t0) + 1;
            float *rows = sc + (g * TQ * G + tl * G) * S, *ri = inv + g * TQ * G + tl * G;
            if (nsplit == 1)
                for (int64_t h = 0; h < G; h++) softmax_row(c, rows + h * S, ri + h, r, t, run_keys(c, r, te));
            float *out = s->attn + t * QD + g * G * D + d0; /* the G heads' rows, D apart */
            for (int64_t h = 0; h < G; h++) memset(out + h * D, 0, (size_t)(d1 - d0) * sizeof *out);
            c->k->attn_sum_f16(out, D, rows, S, G, vc + (int64_t)r->seq * C * KVD + g * D + d0, KVD, nv, d1 - d0);
            for (int64_t h = 0; h < G; h++)
                for (int64_t i = 0; i < d1 - d0; i++) out[h * D + i] *= ri[h];
            if (quant) /* the output projection's input blocks of these slices (sp_fwd_quant_rows_for's blocks) */
                for (int64_t h = 0; h < G; h++)
                    c->k->quantize_q8a((sp_block_q8a *)s->xq + (t * QD + g * G * D + h * D + d0) / SP_QK,
                                       out + h * D, d1 - d0);
        }
        if (tc0 + TQ < T) sp_pool_barrier(ses->pool); /* the next chunk's scores overwrite these */
    }
    return quant;
}

/* RoPE (sp_fwd_rope_rows' rotation) on every token of the columns [c0, c1) of x [T, ldx], heads of D columns from
 * column 0; c0 is even, so no pair is cut. */
static void rope_cols(const fwd_ctx *c, float *x, int64_t ldx, int64_t T, int64_t c0, int64_t c1) {
    const int64_t D = c->ses->model->hp.head_dim, n_rot = c->ses->model->hp.n_rot;
    for (int64_t t = 0; t < T; t++) {
        const float *cs = c->ses->s.rope_cs + t * n_rot;
        for (int64_t h = c0 / D; h * D < c1; h++)
            rope_pairs(x + t * ldx + h * D, cs, SP_MAX(c0 - h * D, 0), SP_MIN(SP_MIN(c1 - h * D, D), n_rot));
    }
}

/* Token t's columns [c0, c1) of q (rotated) at F16 precision (scores are products of F16 values, as in llama.cpp),
 * into qg, grouped by kv head. */
static void store_q(const fwd_ctx *c, int64_t t, int64_t c0, int64_t c1) {
    const sp_hparams *hp = &c->ses->model->hp;
    const sp_scratch *s = &c->ses->s;
    const int64_t T = c->b->n_tokens, D = hp->head_dim, G = hp->n_head / hp->n_head_kv;
    for (int64_t h = c0 / D; h * D < c1; h++) {
        const int64_t i0 = SP_MAX(c0 - h * D, 0), i1 = SP_MIN(c1 - h * D, D);
        float *qg = s->qg + ((h / G) * T * G + t * G + h % G) * D + i0;
        memcpy(qg, s->q + t * hp->n_head * D + h * D + i0, (size_t)(i1 - i0) * sizeof *qg);
        c->k->round_f16(qg, i1 - i0);
    }
}

/* Token t's columns [k0, k1) of k (rotated) and [v0, v1) of v as F16 in layer il's cache. */
static void store_kv(const fwd_ctx *c, int il, int64_t t, int64_t k0, int64_t k1, int64_t v0, int64_t v1) {
    sp_session *ses = c->ses;
    const sp_scratch *s = &ses->s;
    const int64_t D = ses->model->hp.head_dim, KVD = ses->model->hp.kv_k_dim;
    const sp_run *r = &s->runs[s->trun[t]];
    const int64_t slot = r->P + (t - r->t0); /* the token's cache slot in its sequence */
    sp_f16 *kc = ses->k_cache, *vc = (sp_f16 *)ses->v_cache + sp_vcache_row(ses, il, r->seq, slot) * KVD;
    sp_f16 h[64];
    for (int64_t i0 = k0; i0 < k1; i0 += 64) {
        const int64_t ni = SP_MIN(64, k1 - i0);
        c->k->f32_to_f16(h, s->k + t * KVD + i0, ni);
        for (int64_t i = 0; i < ni; i++) kc[sp_kcache_at(ses, il, (i0 + i) / D, r->seq, slot, (i0 + i) % D)] = h[i];
    }
    if (v1 > v0) c->k->f32_to_f16(vc + v0, s->v + t * KVD + v0, v1 - v0);
}

/* Grouped-query attention block of layer il: xn (and xq) -> attn [T, NH*D], the batch's keys and values in the
 * cache. Ends with all threads past a barrier; returns whether it also left attn quantized for the output projection
 * in scratch xq (then the caller needs no quantization step of its own).
 *
 * q, k and v: the rows of wq | wk | wv, taken as one matrix of QD + 2 KVD rows, are split evenly over the threads in
 * groups of 16 (a multiple of every tier's packed row group, and even: RoPE's pairs stay whole), and the thread that
 * computes rows for every token also rotates them and stores them (qg, or the cache): no barrier between the
 * projections and the cache. Where QD or KVD is no multiple of 16 the projections are split by rows, a barrier, and
 * the rest by tokens. */
static bool attention_gqa(const fwd_ctx *c, const sp_layer *l, int il, int ith, int nth) {
    sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    sp_scratch *s = &ses->s;
    const int64_t T = c->b->n_tokens, KVD = hp->kv_k_dim, D = hp->head_dim, QD = hp->n_head * D;
    if (QD % 16 == 0 && KVD % 16 == 0 && D % 2 == 0) {
        int64_t u0, u1; /* rows of wq | wk | wv */
        sp_fwd_row_share(QD + 2 * KVD, ith, nth, &u0, &u1);
        const int64_t q0 = SP_MIN(u0, QD), q1 = SP_MIN(u1, QD);
        const int64_t k0 = SP_MIN(SP_MAX(u0 - QD, 0), KVD), k1 = SP_MIN(SP_MAX(u1 - QD, 0), KVD);
        const int64_t v0 = SP_MIN(SP_MAX(u0 - QD - KVD, 0), KVD), v1 = SP_MIN(SP_MAX(u1 - QD - KVD, 0), KVD);
        matmul_range(c, s->q, QD, &l->wq, s->xn, s->xq, q0, q1, T);
        matmul_range(c, s->k, KVD, &l->wk, s->xn, s->xq, k0, k1, T);
        matmul_range(c, s->v, KVD, &l->wv, s->xn, s->xq, v0, v1, T);
        rope_cols(c, s->q, QD, T, q0, q1);
        rope_cols(c, s->k, KVD, T, k0, k1);
        for (int64_t t = 0; t < T; t++) {
            store_q(c, t, q0, q1);
            store_kv(c, il, t, k0, k1, v0, v1);
        }
    } else {
        int64_t t0, t1;
        sp_split(T, ith, nth, &t0, &t1);
        sp_fwd_matmul_rows(c, s->q, QD, &l->wq, s->xn, T, ith, nth);
        sp_fwd_matmul_rows(c, s->k, KVD, &l->wk, s->xn, T, ith, nth);
        sp_fwd_matmul_rows(c, s->v, KVD, &l->wv, s->xn, T, ith, nth);
        sp_pool_barrier(ses->pool);
        sp_fwd_rope_rows(c, s->q, QD, T, hp->n_head, D, 0, ith, nth);
        sp_fwd_rope_rows(c, s->k, KVD, T, hp->n_head_kv, D, 0, ith, nth);
        for (int64_t t = t0; t < t1; t++) { /* the same tokens sp_fwd_rope_rows gave this thread */
            store_q(c, t, 0, QD);
            store_kv(c, il, t, 0, KVD, 0, KVD);
        }
    }
    sp_pool_barrier(ses->pool);
    const bool quant = sp_type_traits_of(l->wo.type).act_q8 && l->wo.k == QD;
    const bool quantized = attention(c, il, quant, ith, nth); /* softmax(q k^T / sqrt(D) + mask) v */
    sp_pool_barrier(ses->pool);
    return quantized;
}

/* x[t] += a * y[t] for this thread's tokens. */
static void add_rows(float *x, float a, const float *y, int64_t T, int64_t H, int ith, int nth) {
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t i = t0 * H; i < t1 * H; i++) x[i] += a * y[i];
}

/* SwiGLU: tmp = down(silu(gate xn) * up xn). The thread that computes rows [f0, f1) of gate and up (a share of whole
 * activation blocks) also applies silu and the product to them and quantizes those blocks for the down projection,
 * for every token: one barrier, before the down projection reads every row. */
static void ffn_dense(const fwd_ctx *c, const sp_layer *l, int ith, int nth) {
    sp_scratch *s = &c->ses->s;
    const int64_t T = c->b->n_tokens, H = c->ses->model->hp.n_embd, F = c->ses->model->hp.n_ff;
    int64_t f0, f1; /* whole activation blocks: a multiple of every tier's pack_rows too */
    sp_fwd_share(F, SP_QK, ith, nth, &f0, &f1);
    matmul_range(c, s->gate, F, &l->w_gate, s->xn, s->xq, f0, f1, T);
    matmul_range(c, s->up, F, &l->w_up, s->xn, s->xq, f0, f1, T);
    /* into their own rows xqf: other threads may still read xq (xn's) */
    const bool quant = sp_type_traits_of(l->w_down.type).act_q8; /* then F % SP_QK == 0 (model.c) */
    for (int64_t t = 0; t < T && f1 > f0; t++) {
        float *g = s->gate + t * F + f0;
        c->k->silu_mul(g, s->up + t * F + f0, 1.0f, f1 - f0);
        if (quant) c->k->quantize_q8a((sp_block_q8a *)s->xqf + (t * F + f0) / SP_QK, g, f1 - f0);
    }
    sp_pool_barrier(c->ses->pool);
    int64_t r0, r1;
    row_share(&l->w_down, ith, nth, &r0, &r1);
    matmul_range(c, s->tmp, H, &l->w_down, s->gate, s->xqf, r0, r1, T);
    sp_pool_barrier(c->ses->pool);
}

/* Add the time since *clk to *acc and restart the clock. */
static inline void lap(double *clk, double *acc) {
    const double now = sp_now_s();
    *acc += now - *clk;
    *clk = now;
}

static void forward_worker(void *ctx, int ith, int nth) {
    const fwd_ctx *c = ctx;
    sp_session *ses = c->ses;
    const sp_model *m = ses->model;
    const sp_hparams *hp = &m->hp;
    const sp_batch *b = c->b;
    sp_scratch *s = &ses->s;
    sp_pool *pool = ses->pool;
    const int64_t T = b->n_tokens, H = hp->n_embd;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    sp_timings *tm = ith == 0 ? &ses->times : NULL; /* thread 0 times the phases, each ending at a barrier */
    double clk = tm ? sp_now_s() : 0.0;

    /* 1. embeddings x[t] = tok_embd[token t]; RoPE cos/sin for each token's position */
    const float theta_scale = powf(hp->rope_base, -2.0f / (float)hp->n_rot);
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *row = (const uint8_t *)m->tok_embd.data + (size_t)b->tokens[t] * m->tok_embd.row_size;
        sp_dequantize_row(m->tok_embd.type, row, s->x + t * H, H);
        if (hp->embed_scale != 1.0f)
            for (int64_t i = 0; i < H; i++) s->x[t * H + i] *= hp->embed_scale;
        float theta = (float)s->tpos[t];
        for (int i = 0; i < hp->n_rot; i += 2) {
            s->rope_cs[t * hp->n_rot + i] = cosf(theta);
            s->rope_cs[t * hp->n_rot + i + 1] = sinf(theta);
            theta *= theta_scale;
        }
    }

    if (tm) lap(&clk, &tm->embed_s); /* the first layer's norm reads only this thread's rows: no barrier needed */
    for (int il = 0; il < hp->n_layer; il++) {
        const sp_layer *l = &m->layers[il];

        /* 2-4. attention block: xn = rmsnorm(x) -> attn (the heads' outputs, concatenated) */
        sp_fwd_rmsnorm_quant_rows(c, s->xn, s->x, l->attn_norm, 1.0f, T, H, c->q8, ith, nth);
        sp_pool_barrier(pool);
        bool attn_quantized = false;
        if (l->attn == SP_ATTN_MLA) sp_attn_mla(c, il, ith, nth);
        else attn_quantized = attention_gqa(c, l, il, ith, nth);

        /* 5. output projection; residual add; then the FFN block's rmsnorm */
        if (!attn_quantized && sp_fwd_quant_rows_for(c, &l->wo, s->attn, T, l->wo.k, ith, nth)) sp_pool_barrier(pool);
        sp_fwd_matmul_rows(c, s->tmp, H, &l->wo, s->attn, T, ith, nth);
        sp_pool_barrier(pool);
        add_rows(s->x, hp->residual_scale, s->tmp, T, H, ith, nth);
        sp_fwd_rmsnorm_quant_rows(c, s->xn, s->x, l->ffn_norm, 1.0f, T, H, c->q8, ith, nth);
        sp_pool_barrier(pool);
        if (tm) lap(&clk, &tm->attention_s);

        /* 6. FFN block (input: xn, and its quantized copy in xq) -> tmp, this thread's tokens complete; residual add.
         * The next layer's norm reads only this thread's rows too: a barrier only after the last layer. */
        if (l->ffn == SP_FFN_KIND_EXPERTS) sp_ffn_blockffn(c, il, ith, nth);
        else ffn_dense(c, l, ith, nth);
        add_rows(s->x, hp->residual_scale, s->tmp, T, H, ith, nth);
        if (il + 1 == hp->n_layer) sp_pool_barrier(pool);
        if (tm) lap(&clk, &tm->ffn_s);
    }

    /* 7. final norm and LM head for the rows asked for */
    if (b->logits) {
        /* all rows, or the last token of each run (one run without sequence ids): gathered into tmp when several */
        const int64_t R = s->n_runs, first = b->logits_last_only ? T - 1 : 0;
        const int64_t n_out = b->logits_last_only ? R : T;
        const float *xin = s->x + first * H;
        if (b->logits_last_only && R > 1) {
            int64_t r0, r1;
            sp_split(R, ith, nth, &r0, &r1);
            for (int64_t i = r0; i < r1; i++)
                memcpy(s->tmp + i * H, s->x + (int64_t)(s->runs[i].t0 + s->runs[i].n - 1) * H, (size_t)H * sizeof *s->tmp);
            sp_pool_barrier(pool);
            xin = s->tmp;
        }
        sp_fwd_rmsnorm_quant_rows(c, s->xn, xin, m->out_norm, hp->logit_scale, n_out, H, c->q8, ith, nth);
        sp_pool_barrier(pool);
        sp_fwd_matmul_rows(c, b->logits, hp->n_vocab, &m->output, s->xn, n_out, ith, nth);
        sp_pool_barrier(pool); /* so thread 0's clock sees the whole head; sp_pool_run waits for all threads anyway */
    }
    if (tm) {
        lap(&clk, &tm->head_s);
        tm->n_evals++;
        tm->n_tokens += T;
    }
}

void sp_forward(sp_session *ses, const sp_batch *batch) {
    fwd_ctx c = {.ses = ses, .b = batch, .k = sp_kernels_get(), .q8 = ses->model->act_q8};
    sp_pool_run(ses->pool, forward_worker, &c);
}
