/* attn_mla.c: multi-head latent attention (docs/gguf-blockffn.md, MLA), the released BlockFFN checkpoints' attention,
 * in the absorbed form with a latent KV cache.
 *
 * Shape legend: T = tokens in the batch, H = n_embd, NH = heads, QL / KL = q / kv latent ranks, DN / DR = nope / rope
 * dims of a head, DK = DN + DR, KR = KL + DR, DV = value dim, C = KV cache slots per sequence, P = a sequence's
 * n_past, S = C + n_batch.
 *
 * Per token and layer the cache holds only the normalised latent c (KL values, k_cache) and the rotated rope key k_pe
 * (DR values, v_cache), F16 (or F32: sp_session_params.kv_type). The key expansion W_UK is folded into the query
 * (q_lat = W_UK^T q_nope, one matmul per head), scores are q_lat . c + q_pe . k_pe, and the value expansion W_UV is
 * applied after the weighted sum of latents. All pool threads run sp_attn_mla at once (forward.c's worker); nothing
 * here allocates. */
#include "forward.h"

#include <math.h>
#include <string.h>

/* x[0..n) = x / rms(x) * w, in place. */
static void rmsnorm_inplace(float *x, const float *w, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * scale * w[i];
}

/* y[t, r] (row stride ldy) = W_h[r] . x[t] for the head_rows rows r of head h of a per-head weight W and T input rows
 * x (float, or sp_block_q8a rows when W takes quantized activations): the head's own packed block when packed. */
static void matmul_head(const fwd_ctx *c, float *y, int64_t ldy, const sp_tensor *W, int64_t h, const void *x,
                        int64_t T) {
    const int64_t R = W->head_rows;
    if (W->packed)
        c->k->matmul_packed[W->type](y, ldy, (const uint8_t *)W->packed + (size_t)h * W->packed_head, x, W->k, 0, R, T);
    else
        c->k->matmul[W->type](y, ldy, (const uint8_t *)W->data + (size_t)(h * R) * W->row_size, x, W->k, 0, R, T);
}

/* Head h's T input rows x_f [T, K] for W: themselves, or quantized into the head's own rows of scratch xqh when W
 * takes quantized activations (each head's region is as large as the widest per-head input, so heads owned by
 * different threads never share bytes). */
static const void *head_input(const fwd_ctx *c, const sp_tensor *W, int64_t h, const float *x_f, int64_t T) {
    if (!sp_type_traits_of(W->type).act_q8) return x_f;
    const sp_hparams *hp = &c->ses->model->hp;
    const int64_t K = W->k, per_row = SP_MAX(hp->qk_nope, hp->kv_lora) / SP_QK;
    sp_block_q8a *xq = (sp_block_q8a *)c->ses->s.xqh + h * T * per_row;
    for (int64_t t = 0; t < T; t++) c->k->quantize_q8a(xq + t * (K / SP_QK), x_f + t * K, K);
    return xq;
}

/* Absorbed latent attention of heads [h0, h1) over the batch, token by token: with the query [q_lat; q_pe]
 * (W_UK^T q_nope, KL values; the rotated rope query, DR) of each head and the cache rows c (KL, k_cache) and k_pe (DR,
 * v_cache), score = (q_lat . c + q_pe . k_pe) / sqrt(DK) over the cached slots and the batch slots the mask shows;
 * o_lat = sum_j p_j c_j into olat[h, t]. The heads read the same rows, so each phase is one F16 matmul or
 * accumulation over the thread's heads (kernels.h): a cache row is converted once for them, not once per head. */
static void attention_mla(const fwd_ctx *c, int il, int64_t h0, int64_t h1) {
    const sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    const int64_t T = c->b->n_tokens, C = ses->params.n_ctx, NH = hp->n_head;
    const int64_t KL = hp->kv_lora, DR = hp->n_rot, S = C + ses->params.n_batch;
    const float scale = 1.0f / sqrtf((float)(hp->qk_nope + DR));
    const size_t es = ses->kv_elem;
    const sp_type ct = es == 4 ? SP_TYPE_F32 : SP_TYPE_F16; /* the cache rows are weights of this type to the kernels */
    float *sc = ses->s.scores, *spe = ses->s.scores + NH * S; /* [NH, S] each: a head's scores, rope parts */
    for (int64_t t = 0; t < T; t++) {
        const sp_run *r = &ses->s.runs[ses->s.trun[t]]; /* the token's sequence: its cache rows, P of them before */
        const int64_t P = r->P, tl = t - r->t0;
        const uint8_t *lat = (const uint8_t *)ses->k_cache + sp_vcache_row(ses, il, r->seq, 0) * (size_t)KL * es;
        const uint8_t *kpe = (const uint8_t *)ses->v_cache + sp_vcache_row(ses, il, r->seq, 0) * (size_t)DR * es;
        const int64_t n = P + tl + 1; /* slots a causal token sees; a mask may show fewer, never more */
        const int64_t nv = c->b->mask ? P + r->n : n;
        c->k->matmul[ct](sc + h0 * S, S, lat, ses->s.qlat + (t * NH + h0) * KL, KL, 0, nv, h1 - h0);
        c->k->matmul[ct](spe + h0 * S, S, kpe, ses->s.qpe + (t * NH + h0) * DR, DR, 0, nv, h1 - h0);
        for (int64_t h = h0; h < h1; h++) {
            float *row = sc + h * S;
            const float *pe = spe + h * S;
            float mx = -INFINITY;
            for (int64_t j = 0; j < nv; j++) {
                const bool visible = j < P || (c->b->mask ? c->b->mask[t * T + r->t0 + (j - P)] != 0 : j - P <= tl);
                row[j] = visible ? (row[j] + pe[j]) * scale : -INFINITY;
                mx = row[j] > mx ? row[j] : mx;
            }
            const float sum = c->k->exp_sum(row, nv, mx);
            const float inv = sum > 0 ? 1.0f / sum : 0.0f;
            for (int64_t j = 0; j < nv; j++) row[j] *= inv;
            memset(ses->s.olat + (h * T + t) * KL, 0, (size_t)KL * sizeof(float));
        }
        /* olat[h, t] += sum_j p[h, j] c_j for the thread's heads */
        c->k->accum[ct](ses->s.olat + (h0 * T + t) * KL, T * KL, NULL, sc + h0 * S, S, lat, nv, KL, h1 - h0);
    }
}

/* The MLA block of layer il: xn (and xq) -> attn [T, NH*DV]; the batch's latent rows c and rope keys k_pe into the
 * cache. Three phases, each ending at a barrier: the two latent projections (split by rows); per token the norms,
 * the rope key and the cache rows (split by tokens); then everything per head (split by heads: a thread owns whole
 * heads, from the query to the head's slice of attn, so nothing in between waits for another thread). */
void sp_attn_mla(const fwd_ctx *c, int il, int ith, int nth) {
    const sp_layer *l = &c->ses->model->layers[il];
    sp_session *ses = c->ses;
    const sp_hparams *hp = &ses->model->hp;
    sp_scratch *s = &ses->s;
    sp_pool *pool = ses->pool;
    const int64_t T = c->b->n_tokens, NH = hp->n_head;
    const int64_t QL = hp->q_lora, KL = hp->kv_lora, DN = hp->qk_nope, DR = hp->n_rot, DK = DN + DR, KR = KL + DR;
    const int64_t DV = hp->v_dim;
    const size_t es = ses->kv_elem;
    uint8_t *lat_cache = ses->k_cache, *pe_cache = ses->v_cache; /* rows sp_vcache_row: [L, n_seq, C] x KL, x DR */
    int64_t t0, t1, h0, h1;
    sp_split(T, ith, nth, &t0, &t1);
    sp_split(NH, ith, nth, &h0, &h1);

    /* 1. query latent cq = xn W_qa^T, and kv = xn W_kva^T = [c; k_pe] */
    sp_fwd_matmul_rows(c, s->cq, QL, &l->wq_a, s->xn, T, ith, nth);
    sp_fwd_matmul_rows(c, s->k, KR, &l->wkv_a, s->xn, T, ith, nth);
    sp_pool_barrier(pool); /* xq (holding xn) is free again: cq's quantized rows go there */
    /* 2. by token: normalise both latents, rotate the shared rope key, cache c and k_pe (F16, or F32), and quantize
     * cq for W_qb when it takes quantized activations */
    const bool q8_qb = sp_type_traits_of(l->wq_b.type).act_q8;
    sp_fwd_rope_rows(c, s->k, KR, T, 1, 0, KL, ith, nth);
    for (int64_t t = t0; t < t1; t++) {
        rmsnorm_inplace(s->cq + t * QL, l->q_a_norm, QL, hp->lora_eps);
        if (q8_qb) c->k->quantize_q8a((sp_block_q8a *)s->xq + t * (QL / SP_QK), s->cq + t * QL, QL);
        rmsnorm_inplace(s->k + t * KR, l->kv_a_norm, KL, hp->lora_eps);
        const sp_run *r = &s->runs[s->trun[t]];
        const size_t row = sp_vcache_row(ses, il, r->seq, r->P + (t - r->t0)); /* the token's slot in its sequence */
        uint8_t *lat_slot = lat_cache + row * (size_t)KL * es, *pe_slot = pe_cache + row * (size_t)DR * es;
        if (es == 2) {
            c->k->f32_to_f16((sp_f16 *)lat_slot, s->k + t * KR, KL);
            c->k->f32_to_f16((sp_f16 *)pe_slot, s->k + t * KR + KL, DR);
        } else {
            memcpy(lat_slot, s->k + t * KR, (size_t)KL * sizeof(float));
            memcpy(pe_slot, s->k + t * KR + KL, (size_t)DR * sizeof(float));
        }
    }
    sp_pool_barrier(pool); /* cq and the cache rows of the batch are complete */
    if (h0 < h1) { /* (more threads than heads: the rest wait) */
        /* 3. by head. q = cq W_qb^T [T, NH, DK] for the thread's heads; rotate their rope parts; the nope parts go
         * head-major for the absorption */
        for (int64_t h = h0; h < h1; h++)
            matmul_head(c, s->q + h * DK, NH * DK, &l->wq_b, h, q8_qb ? s->xq : (const void *)s->cq, T);
        sp_fwd_rope_rows(c, s->q + h0 * DK, NH * DK, T, (int)(h1 - h0), DK, DN, 0, 1); /* all T tokens, these heads */
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = h0; h < h1; h++) {
                const float *qh = s->q + t * NH * DK + h * DK;
                memcpy(s->qnope + (h * T + t) * DN, qh, (size_t)DN * sizeof *qh);
                memcpy(s->qpe + (t * NH + h) * DR, qh + DN, (size_t)DR * sizeof *qh);
            }
        /* absorb W_UK: q_lat[t, h, :KL] = k_b[h] q_nope[h, t] */
        for (int64_t h = h0; h < h1; h++)
            matmul_head(c, s->qlat + h * KL, NH * KL, &l->wk_b, h,
                        head_input(c, &l->wk_b, h, s->qnope + h * T * DN, T), T);
        attention_mla(c, il, h0, h1);
        /* apply W_UV after the weighted sum: attn[t, h] = v_b[h] o_lat[h, t] */
        for (int64_t h = h0; h < h1; h++)
            matmul_head(c, s->attn + h * DV, NH * DV, &l->wv_b, h,
                        head_input(c, &l->wv_b, h, s->olat + h * T * KL, T), T);
    }
    sp_pool_barrier(pool);
}
