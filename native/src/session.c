/* session.c: a conversation's state (KV cache, scratch, threads) and the public eval / rollback calls.
 *
 * Shape legend: L = layers, C = n_ctx (cache slots), KVD = kv heads x head_dim, B = n_batch. */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct sp_ffn_task { int32_t e, n, tok; }; /* see ffn_blockffn.c; only its size matters here */

sp_session_params sp_session_default_params(void) {
    sp_session_params p = {.n_ctx = 2048, .n_batch = 64, .n_threads = sp_physical_cores(), .ffn_mode = SP_FFN_AUTO};
    return p;
}

static void *alloc_floats(uint64_t n, bool *ok) {
    uint64_t bytes;
    if (!sp_mul_ok(n, sizeof(float), &bytes) || bytes > (uint64_t)SIZE_MAX) {
        *ok = false;
        return NULL;
    }
    void *p = calloc(1, (size_t)(bytes ? bytes : 1));
    if (!p) *ok = false;
    return p;
}

void sp_session_free(sp_session *ses) {
    if (!ses) return;
    sp_pool_free(ses->pool);
    free(ses->k_cache);
    free(ses->v_cache);
    sp_scratch *s = &ses->s;
    free(s->x);
    free(s->xn);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->attn);
    free(s->tmp);
    free(s->gate);
    free(s->up);
    free(s->xq);
    free(s->scores);
    free(s->rope_cs);
    free(s->router);
    free(s->tasks);
    free(s->task_tok);
    free(s->xg);
    free(s->hbuf);
    free(s->ypart);
    sp_sparsity_acc *a = &ses->sparsity;
    free(a->ring);
    free(a->n_seen);
    free(a->n_active);
    free(a->cls_inactive);
    free(a->cls_chunks);
    free(a->bytes);
    free(ses->synth.ring);
    free(ses);
}

sp_status sp_session_new(const sp_model *m, sp_session_params params, sp_session **out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_new: out is NULL");
    *out = NULL;
    if (!m) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_new: model is NULL");
    if (!m->has_weights) return sp_fail(SP_ERR_INVALID_ARG, "the model was loaded with vocab_only: no weights to run");
    const sp_hparams *hp = &m->hp;
    if (params.n_ctx == 0) params.n_ctx = hp->n_ctx_train;
    if (params.n_ctx < 1 || params.n_ctx > (1 << 24))
        return sp_fail(SP_ERR_INVALID_ARG, "n_ctx must be 1..16777216 (or 0 for the model's), got %d", params.n_ctx);
    if (params.n_batch < 1 || params.n_batch > 4096)
        return sp_fail(SP_ERR_INVALID_ARG, "n_batch must be 1..4096, got %d", params.n_batch);
    if (params.n_threads < 1 || params.n_threads > 512)
        return sp_fail(SP_ERR_INVALID_ARG, "n_threads must be 1..512, got %d", params.n_threads);
    if (params.ffn_mode < SP_FFN_AUTO || params.ffn_mode > SP_FFN_SPARSE_CHUNK)
        return sp_fail(SP_ERR_INVALID_ARG, "ffn_mode must be one of SP_FFN_AUTO/DENSE/SPARSE_TOKEN/SPARSE_CHUNK, got %d",
                       (int)params.ffn_mode);

    sp_session *ses = calloc(1, sizeof *ses);
    if (!ses) return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    ses->model = m;
    ses->params = params;
    const uint64_t L = (uint64_t)hp->n_layer, C = (uint64_t)params.n_ctx, B = (uint64_t)params.n_batch;
    const uint64_t H = (uint64_t)hp->n_embd, F = (uint64_t)hp->n_ff;
    const uint64_t QD = (uint64_t)hp->n_head * hp->head_dim, KVD = (uint64_t)hp->n_head_kv * hp->head_dim;
    const uint64_t K_MAX = SP_MAX(SP_MAX(H, F), QD);
    bool ok = true;
    ses->k_cache = alloc_floats((L * C * KVD + 1) / 2, &ok); /* F16: two per float */
    ses->v_cache = alloc_floats((L * C * KVD + 1) / 2, &ok);
    sp_scratch *s = &ses->s;
    s->x = alloc_floats(B * H, &ok);
    s->xn = alloc_floats(B * H, &ok);
    s->q = alloc_floats(B * QD, &ok);
    s->k = alloc_floats(B * KVD, &ok);
    s->v = alloc_floats(B * KVD, &ok);
    s->attn = alloc_floats(B * QD, &ok);
    s->tmp = alloc_floats(B * H, &ok);
    s->gate = alloc_floats(B * F, &ok);
    s->up = alloc_floats(B * F, &ok);
    /* q8a rows: K/32 blocks of 40 bytes = 1.25 floats per element */
    s->xq = alloc_floats(B * (K_MAX / SP_QK + 1) * (sizeof(sp_block_q8a) / sizeof(float)), &ok);
    s->scores = alloc_floats((uint64_t)params.n_threads * (C + B), &ok);
    s->rope_cs = alloc_floats(B * (uint64_t)hp->n_rot, &ok);
    if (m->arch == SP_ARCH_BLOCKFFN) {
        const uint64_t E = (uint64_t)hp->n_expert, FE = (uint64_t)hp->expert_width, NT = (uint64_t)params.n_threads;
        const uint64_t xrow = SP_MAX(H, H / SP_QK * (sizeof(sp_block_q8a) / sizeof(float))); /* in floats */
        s->router = alloc_floats(B * E, &ok);
        s->tasks = alloc_floats(B * E * (sizeof(struct sp_ffn_task) / sizeof(float)), &ok);
        s->task_tok = alloc_floats(B * E, &ok); /* int32 */
        s->xg = alloc_floats(NT * B * xrow, &ok);
        s->hbuf = alloc_floats(NT * B * FE, &ok);
        s->ypart = alloc_floats((NT - 1) * B * H, &ok);
        sp_sparsity_acc *a = &ses->sparsity;
        a->words = (int32_t)((E + 63) / 64);
        a->ring = alloc_floats(L * SP_CLS_RING * (uint64_t)a->words * 2, &ok); /* uint64 */
        a->n_seen = alloc_floats(L * 2, &ok);
        a->n_active = alloc_floats(L * 2, &ok);
        a->cls_inactive = alloc_floats(L * (SP_CLS_RING + 1) * 2, &ok);
        a->cls_chunks = alloc_floats(L * (SP_CLS_RING + 1) * 2, &ok);
        a->bytes = alloc_floats(L * 2, &ok);
    }
    if (!ok) {
        sp_session_free(ses);
        return sp_fail(SP_ERR_NO_MEMORY, "out of memory for a session with n_ctx=%d (KV cache %.1f MiB)", params.n_ctx,
                       2.0 * (double)(L * C * KVD) * 2 / (1 << 20));
    }
    sp_status st = sp_pool_new(params.n_threads, &ses->pool);
    if (st != SP_OK) {
        sp_session_free(ses);
        return st;
    }
    *out = ses;
    return SP_OK;
}

sp_status sp_eval(sp_session *ses, const sp_batch *b) {
    sp_clear_error();
    if (!ses || !b) return sp_fail(SP_ERR_INVALID_ARG, "sp_eval: NULL argument");
    const sp_hparams *hp = &ses->model->hp;
    const int32_t T = b->n_tokens;
    if (T < 1 || T > ses->params.n_batch)
        return sp_fail(SP_ERR_INVALID_ARG, "n_tokens must be 1..n_batch (%d), got %d", ses->params.n_batch, T);
    if (!b->tokens) return sp_fail(SP_ERR_INVALID_ARG, "sp_eval: tokens is NULL");
    if (ses->n_past + T > ses->params.n_ctx)
        return sp_fail(SP_ERR_CONTEXT_FULL, "the context is full: %d cached + %d new tokens > n_ctx %d", ses->n_past, T,
                       ses->params.n_ctx);
    for (int32_t t = 0; t < T; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= hp->n_vocab)
            return sp_fail(SP_ERR_INVALID_ARG, "token %d at index %d is outside the vocabulary [0, %d)", b->tokens[t],
                           t, hp->n_vocab);
        if (b->pos && (b->pos[t] < 0 || b->pos[t] > (1 << 24)))
            return sp_fail(SP_ERR_INVALID_ARG, "position %d at index %d is out of range", b->pos[t], t);
    }
    sp_forward(ses, b);
    ses->n_past += T;
    return SP_OK;
}

int32_t sp_session_n_past(const sp_session *ses) { return ses ? ses->n_past : 0; }
int32_t sp_session_n_ctx(const sp_session *ses) { return ses ? ses->params.n_ctx : 0; }

sp_status sp_session_truncate(sp_session *ses, int32_t n) {
    sp_clear_error();
    if (!ses) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_truncate: session is NULL");
    if (n < 0 || n > ses->n_past)
        return sp_fail(SP_ERR_INVALID_ARG, "truncate to %d tokens: must be 0..n_past (%d)", n, ses->n_past);
    ses->n_past = n;
    return SP_OK;
}

sp_status sp_session_keep(sp_session *ses, const int32_t *idx, int32_t n) {
    sp_clear_error();
    if (!ses || (!idx && n)) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_keep: NULL argument");
    if (n < 0 || n > ses->n_past) return sp_fail(SP_ERR_INVALID_ARG, "keep %d slots: must be 0..n_past (%d)", n, ses->n_past);
    for (int32_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= ses->n_past || (i > 0 && idx[i] <= idx[i - 1]))
            return sp_fail(SP_ERR_INVALID_ARG, "keep: slot indices must be strictly increasing and < n_past (%d)",
                           ses->n_past);
    const sp_hparams *hp = &ses->model->hp;
    const int64_t KVD = (int64_t)hp->n_head_kv * hp->head_dim, C = ses->params.n_ctx;
    /* idx[i] >= i, so copying forward in order never overwrites a slot still to be read */
    for (int il = 0; il < hp->n_layer; il++)
        for (int32_t i = 0; i < n; i++) {
            if (idx[i] == i) continue;
            memcpy(ses->k_cache + (il * C + i) * KVD, ses->k_cache + (il * C + idx[i]) * KVD, (size_t)KVD * sizeof(sp_f16));
            memcpy(ses->v_cache + (il * C + i) * KVD, ses->v_cache + (il * C + idx[i]) * KVD, (size_t)KVD * sizeof(sp_f16));
        }
    ses->n_past = n;
    return SP_OK;
}

/* ---- phase timings ---- */

sp_status sp_session_get_timings(const sp_session *ses, sp_timings *out) {
    sp_clear_error();
    if (!ses || !out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_get_timings: NULL argument");
    *out = ses->times;
    return SP_OK;
}

void sp_session_reset_timings(sp_session *ses) {
    if (ses) memset(&ses->times, 0, sizeof ses->times);
}

/* ---- sparsity statistics ---- */

void sp_session_reset_sparsity(sp_session *ses) {
    if (!ses || ses->model->arch != SP_ARCH_BLOCKFFN) return;
    sp_sparsity_acc *a = &ses->sparsity;
    const size_t L = (size_t)ses->model->hp.n_layer;
    memset(a->ring, 0, L * SP_CLS_RING * (size_t)a->words * sizeof *a->ring);
    memset(a->n_seen, 0, L * sizeof *a->n_seen);
    memset(a->n_active, 0, L * sizeof *a->n_active);
    memset(a->cls_inactive, 0, L * (SP_CLS_RING + 1) * sizeof *a->cls_inactive);
    memset(a->cls_chunks, 0, L * (SP_CLS_RING + 1) * sizeof *a->cls_chunks);
    memset(a->bytes, 0, L * sizeof *a->bytes);
}

sp_status sp_session_get_sparsity(const sp_session *ses, int32_t layer, sp_sparsity_stats *out) {
    sp_clear_error();
    if (!ses || !out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_get_sparsity: NULL argument");
    memset(out, 0, sizeof *out);
    const sp_model *m = ses->model;
    if (m->arch != SP_ARCH_BLOCKFFN) return SP_OK; /* n_expert = 0: no sparse experts */
    const sp_hparams *hp = &m->hp;
    if (layer < -1 || layer >= hp->n_layer)
        return sp_fail(SP_ERR_INVALID_ARG, "layer %d is out of range [-1, %d)", layer, hp->n_layer);
    const sp_sparsity_acc *a = &ses->sparsity;
    const int32_t l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? hp->n_layer : layer + 1;
    const double E = hp->n_expert;
    double active = 0, bytes = 0, dense = 0, inactive[SP_CLS_MAX + 1] = {0}, chunks[SP_CLS_MAX + 1] = {0};
    for (int32_t il = l0; il < l1; il++) {
        active += (double)a->n_active[il];
        bytes += (double)a->bytes[il];
        dense += E * 2.0 * (double)hp->expert_width * (double)m->layers[il].experts.row_size;
        for (int k = 2; k <= SP_CLS_MAX; k++) {
            inactive[k] += (double)a->cls_inactive[il * (SP_CLS_RING + 1) + k];
            chunks[k] += (double)a->cls_chunks[il * (SP_CLS_RING + 1) + k];
        }
    }
    const double n = (double)a->n_seen[l0], pairs = n * E * (l1 - l0);
    out->n_expert = hp->n_expert;
    out->n_tokens = a->n_seen[l0];
    out->tls = pairs > 0 ? 1.0 - active / pairs : NAN;
    out->cls[1] = out->tls;
    for (int k = 2; k <= SP_CLS_MAX; k++) out->cls[k] = chunks[k] > 0 ? inactive[k] / (chunks[k] * E) : NAN;
    out->expert_bytes_per_token = n > 0 ? bytes / n : NAN;
    out->dense_bytes_per_token = dense;
    return SP_OK;
}
