/* forward.c: the transformer forward pass over a batch of T tokens: each layer's attention by its kind (grouped-query
 * here, multi-head latent in attn_mla.c) and its FFN by its kind (dense SwiGLU here, BlockFFN experts in
 * ffn_blockffn.c).
 *
 * Shape legend: T = tokens in the batch, H = n_embd, D = head_dim, NH = heads, NKV = kv heads, QD = NH*D,
 * KVD = NKV*D, F = n_ff, V = vocabulary, C = KV cache slots, P = n_past (slots cached before this batch).
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

/* y[t, r] (row stride ldy) = W[r] . x[t] for this thread's rows of W. x_f: float input [T, K]; the quantized copy of
 * it sits in scratch xq when the weight type takes quantized activations. */
void sp_fwd_matmul_rows(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, const float *x_f, int64_t T,
                        int ith, int nth) {
    int64_t r0, r1;
    sp_fwd_row_share(W->n, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
    const void *x = sp_type_traits_of(W->type).act_q8 ? c->ses->s.xq : (const void *)x_f;
    if (W->packed) c->k->matmul_packed[W->type](y, ldy, W->packed, x, W->k, r0, r1, T); /* packed at load */
    else c->k->matmul[W->type](y, ldy, W->data, x, W->k, r0, r1, T);
}

/* RoPE as GGUF's llama architecture defines it: adjacent pairs (x[2i], x[2i+1]) rotate by pos * base^(-2i/n_rot), for
 * 2i < n_rot. cs[t] holds (cos, sin) per pair. Applied in place, for this thread's tokens, to the n_rot values at
 * x + t*ldx + h*head_stride + offset of each head h < n_heads (GQA: the head's first n_rot dims; MLA: its rope part). */
void sp_fwd_rope_rows(const fwd_ctx *c, float *x, int64_t ldx, int64_t T, int n_heads, int64_t head_stride,
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
    const sp_f16 *kc = (const sp_f16 *)ses->k_cache + (int64_t)il * C * KVD; /* [C, KVD] */
    const sp_f16 *vc = (const sp_f16 *)ses->v_cache + (int64_t)il * C * KVD;
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
    sp_f16 *k_slots = (sp_f16 *)ses->k_cache + ((int64_t)il * C + P) * KVD; /* [T, KVD] this batch's cache slots */
    sp_f16 *v_slots = (sp_f16 *)ses->v_cache + ((int64_t)il * C + P) * KVD;
    int64_t t0, t1;
    sp_split(T, ith, nth, &t0, &t1);
    sp_fwd_matmul_rows(c, s->q, l->wq.n, &l->wq, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->k, KVD, &l->wk, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->v, KVD, &l->wv, s->xn, T, ith, nth);
    sp_pool_barrier(ses->pool);
    /* rotate q and k by position; store k and v in the F16 cache, and keep q at F16 precision too (scores are
     * products of F16 values, as in llama.cpp) */
    sp_fwd_rope_rows(c, s->q, l->wq.n, T, hp->n_head, hp->head_dim, 0, ith, nth);
    sp_fwd_rope_rows(c, s->k, KVD, T, hp->n_head_kv, hp->head_dim, 0, ith, nth);
    for (int64_t t = t0; t < t1; t++) { /* the same tokens sp_fwd_rope_rows gave this thread */
        c->k->round_f16(s->q + t * l->wq.n, l->wq.n);
        c->k->f32_to_f16(k_slots + t * KVD, s->k + t * KVD, KVD);
        c->k->f32_to_f16(v_slots + t * KVD, s->v + t * KVD, KVD);
    }
    sp_pool_barrier(ses->pool);
    attention(c, il, ith, nth); /* softmax(q k^T / sqrt(D) + mask) v over cached and batch slots */
    sp_pool_barrier(ses->pool);
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
        if (l->attn == SP_ATTN_MLA) sp_attn_mla(c, il, ith, nth);
        else attention_gqa(c, l, il, ith, nth);

        /* 5. output projection; residual add; then the FFN block's rmsnorm */
        if (sp_fwd_quant_rows_for(c, &l->wo, s->attn, T, l->wo.k, ith, nth)) sp_pool_barrier(pool);
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
