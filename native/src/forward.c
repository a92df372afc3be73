/* forward.c: the transformer forward pass over a batch of T tokens: each layer's attention by its kind (grouped-query,
 * or multi-head latent in the absorbed form) and its FFN by its kind (dense SwiGLU, or BlockFFN experts).
 *
 * Shape legend: T = tokens in the batch, H = n_embd, D = head_dim, NH = heads, NKV = kv heads, QD = NH*D,
 * KVD = NKV*D, F = n_ff, V = vocabulary, C = KV cache slots, P = n_past (slots cached before this batch).
 *
 * All pool threads run sp_forward_worker() at once; each step splits its work by thread (rows of a weight matrix,
 * tokens, or (token, head) pairs) and threads meet at a barrier before a step reads what another wrote.
 * Nothing here allocates: every buffer lives in the session (model.h).
 *
 * The kinds share everything else: embeddings, norms, the output projection, residuals, and three MiniCPM scales that are 1 for llama: embeddings x embed_scale, each residual branch x residual_scale,
 * the final normalised hidden state x logit_scale. */
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

/* Quantize rows t of x[T, K] to xq for this thread's tokens. */
void sp_fwd_quant_rows(const fwd_ctx *c, const float *x, int64_t T, int64_t K, int ith, int nth) {
    if (!c->q8) return;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) c->k->quantize_q8a((sp_block_q8a *)c->ses->s.xq + t * (K / SP_QK), x + t * K, K);
}

/* y[t, r] (row stride ldy) = W[r] . x[t] for this thread's rows of W. x_f: float input [T, K]; the quantized copy of
 * it sits in scratch xq when the weight type takes quantized activations. */
void sp_fwd_matmul_rows(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, const float *x_f, int64_t T,
                        int ith, int nth) {
    const int64_t per = ((W->n + nth - 1) / nth + 15) & ~(int64_t)15; /* multiples of 16 rows per thread */
    const int64_t r0 = SP_MIN(W->n, per * ith), r1 = SP_MIN(W->n, r0 + per);
    if (r0 >= r1) return;
    const void *x = sp_type_traits_of(W->type).act_q8 ? c->ses->s.xq : (const void *)x_f;
    if (W->packed) c->k->matmul_packed[W->type](y, ldy, W->packed, x, W->k, r0, r1, T); /* packed at load */
    else c->k->matmul[W->type](y, ldy, W->data, x, W->k, r0, r1, T);
}

/* RoPE as GGUF's llama architecture defines it: adjacent pairs (x[2i], x[2i+1]) rotate by pos * base^(-2i/n_rot), for
 * 2i < n_rot. cs[t] holds (cos, sin) per pair. Applied in place, for this thread's tokens, to the n_rot values at
 * x + t*ldx + h*head_stride + offset of each head h < n_heads (GQA: the head's first n_rot dims; MLA: its rope part). */
static void rope_rows(const fwd_ctx *c, float *x, int64_t ldx, int64_t T, int n_heads, int64_t head_stride,
                      int64_t offset, int ith, int nth) {
    const sp_hparams *hp = &c->ses->model->hp;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const float *cs = c->ses->s.rope_cs + t * hp->n_rot;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + t * ldx + (int64_t)h * head_stride + offset;
            for (int i = 0; i < hp->n_rot; i += 2) {
                const float x0 = v[i], x1 = v[i + 1], co = cs[i], si = cs[i + 1];
                v[i] = x0 * co - x1 * si;
                v[i + 1] = x0 * si + x1 * co;
            }
        }
    }
}

/* Attention for this thread's (token, head) pairs: token t sees cache slots [0, P) and batch slots P+j allowed by
 * the mask (causal when none). Keys and values of the batch are already in the (F16) cache. */
static void attention(const fwd_ctx *c, int il, int ith, int nth) {
    const sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    const int64_t T = c->b->n_tokens, P = ses->n_past, C = ses->params.n_ctx, D = hp->head_dim;
    const int64_t QD = (int64_t)hp->n_head * D, KVD = (int64_t)hp->n_head_kv * D;
    const int group = hp->n_head / hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float)D);
    const sp_f16 *kc = ses->k_cache + (int64_t)il * C * KVD; /* [C, KVD] */
    const sp_f16 *vc = ses->v_cache + (int64_t)il * C * KVD;
    float *scores = ses->s.scores + (int64_t)ith * (C + ses->params.n_batch); /* [P + T] */
    int64_t w0, w1;
    sp_split(T * hp->n_head, ith, nth, &w0, &w1);
    for (int64_t w = w0; w < w1; w++) {
        const int64_t t = w / hp->n_head, h = w % hp->n_head, kvh = h / group;
        const float *q = ses->s.q + t * QD + h * D;
        float *out = ses->s.attn + t * QD + h * D;
        /* scores: every cached slot (one kernel call), then the batch slots the mask lets t see; -inf elsewhere */
        c->k->attn_scores_f16(q, kc + kvh * D, KVD, P, D, scale, scores);
        for (int64_t j = P; j < P + T; j++) {
            const bool visible = c->b->mask ? c->b->mask[t * T + (j - P)] != 0 : j - P <= t;
            scores[j] = visible ? c->k->dot_f16(q, kc + j * KVD + kvh * D, D) * scale : -INFINITY;
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < P + T; j++) mx = scores[j] > mx ? scores[j] : mx;
        /* softmax, then out = sum_j p_j v_j */
        const float sum = c->k->exp_sum(scores, P + T, mx);
        const float inv = sum > 0 ? 1.0f / sum : 0.0f;
        for (int64_t j = 0; j < P + T; j++) scores[j] *= inv;
        memset(out, 0, (size_t)D * sizeof *out);
        c->k->attn_sum_f16(out, scores, vc + kvh * D, KVD, P + T, D);
    }
}

/* Grouped-query attention block of layer il: xn (and xq) -> attn [T, NH*D], the batch's keys and values in the
 * cache. Ends with all threads past a barrier. */
static void attention_gqa(const fwd_ctx *c, const sp_layer *l, int il, int ith, int nth) {
    sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    sp_scratch *s = &ses->s;
    const int64_t T = c->b->n_tokens, P = ses->n_past, C = ses->params.n_ctx, KVD = hp->kv_k_dim;
    sp_f16 *k_slots = ses->k_cache + ((int64_t)il * C + P) * KVD; /* [T, KVD] this batch's cache slots */
    sp_f16 *v_slots = ses->v_cache + ((int64_t)il * C + P) * KVD;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    sp_fwd_matmul_rows(c, s->q, l->wq.n, &l->wq, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->k, KVD, &l->wk, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->v, KVD, &l->wv, s->xn, T, ith, nth);
    sp_pool_barrier(ses->pool);
    /* rotate q and k by position; store k and v in the F16 cache, and keep q at F16 precision too (scores are
     * products of F16 values, as in llama.cpp) */
    rope_rows(c, s->q, l->wq.n, T, hp->n_head, hp->head_dim, 0, ith, nth);
    rope_rows(c, s->k, KVD, T, hp->n_head_kv, hp->head_dim, 0, ith, nth);
    for (int64_t t = t0; t < t1; t++) { /* the same tokens rope_rows gave this thread */
        for (int64_t i = 0; i < l->wq.n; i++) s->q[t * l->wq.n + i] = sp_f16_round(s->q[t * l->wq.n + i]);
        c->k->f32_to_f16(k_slots + t * KVD, s->k + t * KVD, KVD);
        c->k->f32_to_f16(v_slots + t * KVD, s->v + t * KVD, KVD);
    }
    sp_pool_barrier(ses->pool);
    attention(c, il, ith, nth); /* softmax(q k^T / sqrt(D) + mask) v over cached and batch slots */
    sp_pool_barrier(ses->pool);
}

/* x[0..n) = x / rms(x) * w, in place. */
static void rmsnorm_inplace(float *x, const float *w, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * scale * w[i];
}

/* Quantize rows [0, n_rows) of x[n_rows, K] into scratch xq (this thread's share) when W takes q8 activations. */
static void quant_rows_for(const fwd_ctx *c, const sp_tensor *W, const float *x, int64_t n_rows, int64_t K, int ith,
                           int nth) {
    if (!sp_type_traits_of(W->type).act_q8) return;
    int64_t r0, r1;
    sp_split(n_rows, ith, nth, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) c->k->quantize_q8a((sp_block_q8a *)c->ses->s.xq + r * (K / SP_QK), x + r * K, K);
}

/* One matmul per head: head h's R rows of W[NH*R, K] times its own inputs x[h] [T, K] (rows h*T .. h*T+T-1 of x_f, or
 * of scratch xq for q8 weight types) into y + h*y_head (row stride ldy). Each thread takes its share of every head's
 * rows. W is read unpacked (model.c does not pack per-head weights). */
static void matmul_heads(const fwd_ctx *c, float *y, int64_t ldy, int64_t y_head, const sp_tensor *W, int64_t R,
                         const float *x_f, int64_t T, int ith, int nth) {
    const int64_t K = W->k, NH = W->n / R;
    const int64_t per = ((R + nth - 1) / nth + 15) & ~(int64_t)15;
    const int64_t r0 = SP_MIN(R, per * ith), r1 = SP_MIN(R, r0 + per);
    if (r0 >= r1) return;
    const bool q8 = sp_type_traits_of(W->type).act_q8;
    for (int64_t h = 0; h < NH; h++) {
        const void *x = q8 ? (const void *)((const sp_block_q8a *)c->ses->s.xq + h * T * (K / SP_QK))
                           : (const void *)(x_f + h * T * K);
        const uint8_t *w = (const uint8_t *)W->data + (size_t)(h * R) * W->row_size;
        c->k->matmul[W->type](y + h * y_head, ldy, w, x, K, r0, r1, T);
    }
}

/* Absorbed latent attention, token by token: with the query [q_lat; q_pe] (W_UK^T q_nope, KL values; the rotated
 * rope query, DR) of each head and the cache rows c (KL, k_cache) and k_pe (DR, v_cache), score = (q_lat . c + q_pe .
 * k_pe) / sqrt(DK) over the cached slots and the batch slots the mask shows; o_lat = sum_j p_j c_j into olat[h, t].
 * Every head reads the same rows, so each phase is one F16 matmul or accumulation over all heads (kernels.h): a
 * cache row is converted once for the tile of heads it serves, not once per head. Threads split the rows for the
 * scores, the heads for the softmax and the weighted sum. */
static void attention_mla(const fwd_ctx *c, int il, int ith, int nth) {
    const sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    const int64_t T = c->b->n_tokens, P = ses->n_past, C = ses->params.n_ctx, NH = hp->n_head;
    const int64_t KL = hp->kv_lora, DR = hp->n_rot, S = C + ses->params.n_batch;
    const float scale = 1.0f / sqrtf((float)(hp->qk_nope + DR));
    const sp_f16 *lat = ses->k_cache + (int64_t)il * C * KL; /* [C, KL] */
    const sp_f16 *kpe = ses->v_cache + (int64_t)il * C * DR; /* [C, DR] */
    float *sc = ses->s.scores, *spe = ses->s.scores + NH * S; /* [NH, S] each: one token's scores, rope parts */
    int64_t h0, h1, j0, j1;
    sp_split(NH, ith, nth, &h0, &h1);
    for (int64_t t = 0; t < T; t++) {
        const int64_t n = P + t + 1; /* slots a causal token sees; a mask may show fewer, never more */
        const int64_t nv = c->b->mask ? P + T : n;
        sp_split(nv, ith, nth, &j0, &j1);
        if (j0 < j1) {
            c->k->matmul[SP_TYPE_F16](sc, S, lat, ses->s.qlat + t * NH * KL, KL, j0, j1, NH);
            c->k->matmul[SP_TYPE_F16](spe, S, kpe, ses->s.qpe + t * NH * DR, DR, j0, j1, NH);
        }
        sp_pool_barrier(ses->pool);
        for (int64_t h = h0; h < h1; h++) {
            float *row = sc + h * S;
            const float *pe = spe + h * S;
            float mx = -INFINITY;
            for (int64_t j = 0; j < nv; j++) {
                const bool visible = j < P || (c->b->mask ? c->b->mask[t * T + (j - P)] != 0 : j - P <= t);
                row[j] = visible ? (row[j] + pe[j]) * scale : -INFINITY;
                mx = row[j] > mx ? row[j] : mx;
            }
            const float sum = c->k->exp_sum(row, nv, mx);
            const float inv = sum > 0 ? 1.0f / sum : 0.0f;
            for (int64_t j = 0; j < nv; j++) row[j] *= inv;
            memset(ses->s.olat + (h * T + t) * KL, 0, (size_t)KL * sizeof(float));
        }
        if (h0 < h1) /* olat[h, t] += sum_j p[h, j] c_j for this thread's heads */
            c->k->accum[SP_TYPE_F16](ses->s.olat + (h0 * T + t) * KL, T * KL, NULL, sc + h0 * S, S, lat, nv, KL,
                                     h1 - h0);
        sp_pool_barrier(ses->pool); /* the next token's scores overwrite sc */
    }
}

/* Multi-head latent attention block of layer il (docs/gguf-blockffn.md, absorbed form): xn (and xq) -> attn
 * [T, NH*DV]; the batch's latent rows c and rope keys k_pe in the cache. QL, KL = latent ranks, DN, DR = nope and rope dims,
 * DK = DN + DR, KR = KL + DR. Ends with all threads past a barrier. */
static void attention_mla_block(const fwd_ctx *c, const sp_layer *l, int il, int ith, int nth) {
    sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    sp_scratch *s = &ses->s;
    sp_pool *pool = ses->pool;
    const int64_t T = c->b->n_tokens, P = ses->n_past, C = ses->params.n_ctx, NH = hp->n_head;
    const int64_t QL = hp->q_lora, KL = hp->kv_lora, DN = hp->qk_nope, DR = hp->n_rot, DK = DN + DR, KR = KL + DR;
    const int64_t DV = hp->v_dim;
    sp_f16 *lat_slots = ses->k_cache + ((int64_t)il * C + P) * KL; /* [T, KL] this batch's latent rows */
    sp_f16 *pe_slots = ses->v_cache + ((int64_t)il * C + P) * DR;  /* [T, DR] and rope keys */
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);

    /* query latent cq = xn W_qa^T, and kv = xn W_kva^T = [c; k_pe] */
    sp_fwd_matmul_rows(c, s->cq, QL, &l->wq_a, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->k, KR, &l->wkv_a, s->xn, T, ith, nth);
    sp_pool_barrier(pool);
    /* normalise both latents, rotate the shared rope key, and cache c and k_pe at F16 */
    rope_rows(c, s->k, KR, T, 1, 0, KL, ith, nth);
    for (int64_t t = t0; t < t1; t++) {
        rmsnorm_inplace(s->cq + t * QL, l->q_a_norm, QL, hp->lora_eps);
        rmsnorm_inplace(s->k + t * KR, l->kv_a_norm, KL, hp->lora_eps);
        c->k->f32_to_f16(lat_slots + t * KL, s->k + t * KR, KL);
        c->k->f32_to_f16(pe_slots + t * DR, s->k + t * KR + KL, DR);
    }
    sp_pool_barrier(pool); /* xq (holding xn) is free again: cq's quantized rows go there */
    quant_rows_for(c, &l->wq_b, s->cq, T, QL, ith, nth);
    sp_pool_barrier(pool);
    /* q = cq W_qb^T [T, NH, DK]: rotate each head's rope part; the nope parts go head-major for the absorption */
    sp_fwd_matmul_rows(c, s->q, NH * DK, &l->wq_b, s->cq, T, ith, nth);
    sp_pool_barrier(pool);
    rope_rows(c, s->q, NH * DK, T, (int)NH, DK, DN, ith, nth);
    for (int64_t t = t0; t < t1; t++)
        for (int64_t h = 0; h < NH; h++) {
            const float *qh = s->q + t * NH * DK + h * DK;
            memcpy(s->qnope + (h * T + t) * DN, qh, (size_t)DN * sizeof *qh);
            memcpy(s->qpe + (t * NH + h) * DR, qh + DN, (size_t)DR * sizeof *qh);
        }
    sp_pool_barrier(pool);
    quant_rows_for(c, &l->wk_b, s->qnope, NH * T, DN, ith, nth);
    sp_pool_barrier(pool);
    /* absorb W_UK: q_lat[t, h, :KL] = k_b[h] q_nope[h, t] */
    matmul_heads(c, s->qlat, NH * KL, KL, &l->wk_b, KL, s->qnope, T, ith, nth);
    sp_pool_barrier(pool);
    attention_mla(c, il, ith, nth);
    sp_pool_barrier(pool);
    /* apply W_UV after the weighted sum: attn[t, h] = v_b[h] o_lat[h, t] */
    quant_rows_for(c, &l->wv_b, s->olat, NH * T, KL, ith, nth);
    sp_pool_barrier(pool);
    matmul_heads(c, s->attn, NH * DV, DV, &l->wv_b, DV, s->olat, T, ith, nth);
    sp_pool_barrier(pool);
}

/* x[t] += a * y[t] for this thread's tokens. */
static void add_rows(float *x, float a, const float *y, int64_t T, int64_t H, int ith, int nth) {
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t i = t0 * H; i < t1 * H; i++) x[i] += a * y[i];
}

/* gate[t] = silu(gate[t]) * up[t] for this thread's tokens, then quantize the row for the down projection. */
static void swiglu_quant_rows(const fwd_ctx *c, int64_t T, int64_t F, bool quant, int ith, int nth) {
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        float *g = c->ses->s.gate + t * F;
        const float *u = c->ses->s.up + t * F;
        for (int64_t i = 0; i < F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        if (quant) c->k->quantize_q8a((sp_block_q8a *)c->ses->s.xq + t * (F / SP_QK), g, F);
    }
}

/* SwiGLU: tmp = down(silu(gate xn) * up xn). */
static void ffn_dense(const fwd_ctx *c, const sp_layer *l, int ith, int nth) {
    sp_scratch *s = &c->ses->s;
    const int64_t T = c->b->n_tokens, H = c->ses->model->hp.n_embd, F = c->ses->model->hp.n_ff;
    sp_fwd_matmul_rows(c, s->gate, F, &l->w_gate, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->up, F, &l->w_up, s->xn, T, ith, nth);
    sp_pool_barrier(c->ses->pool);
    swiglu_quant_rows(c, T, F, c->q8, ith, nth);
    sp_pool_barrier(c->ses->pool);
    sp_fwd_matmul_rows(c, s->tmp, H, &l->w_down, s->gate, T, ith, nth);
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
    const int64_t T = b->n_tokens, H = hp->n_embd, P = ses->n_past;
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
        float theta = (float)(b->pos ? b->pos[t] : P + t);
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
        if (l->attn == SP_ATTN_MLA) attention_mla_block(c, l, il, ith, nth);
        else attention_gqa(c, l, il, ith, nth);

        /* 5. output projection; residual add; then the FFN block's rmsnorm */
        quant_rows_for(c, &l->wo, s->attn, T, l->wo.k, ith, nth);
        sp_pool_barrier(pool);
        sp_fwd_matmul_rows(c, s->tmp, H, &l->wo, s->attn, T, ith, nth);
        sp_pool_barrier(pool);
        add_rows(s->x, hp->residual_scale, s->tmp, T, H, ith, nth);
        sp_fwd_rmsnorm_quant_rows(c, s->xn, s->x, l->ffn_norm, 1.0f, T, H, c->q8, ith, nth);
        sp_pool_barrier(pool);
        if (tm) lap(&clk, &tm->attention_s);

        /* 6. FFN block (input: xn, and its quantized copy in xq) -> tmp; residual add */
        if (l->ffn == SP_FFN_KIND_EXPERTS) sp_ffn_blockffn(c, il, ith, nth);
        else ffn_dense(c, l, ith, nth);
        add_rows(s->x, hp->residual_scale, s->tmp, T, H, ith, nth);
        sp_pool_barrier(pool);
        if (tm) lap(&clk, &tm->ffn_s);
    }

    /* 7. final norm and LM head for the rows asked for */
    if (b->logits) {
        const int64_t first = b->logits_last_only ? T - 1 : 0, n_out = T - first;
        sp_fwd_rmsnorm_quant_rows(c, s->xn, s->x + first * H, m->out_norm, hp->logit_scale, n_out, H, c->q8, ith,
                                  nth);
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
