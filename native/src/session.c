/* session.c: a conversation's state (KV cache, scratch, threads) and the public eval / rollback calls.
 *
 * Shape legend: L = layers, C = n_ctx (cache slots), KVD = kv heads x head_dim, B = n_batch; the KV cache holds
 * kv_k_dim keys and kv_v_dim values per token and layer (model.h: GQA NKV*D each; MLA the latent and the rope key). */
#include "model.h"
#include "vulkan/vk.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct sp_ffn_task { int32_t e, n, tok; }; /* see ffn_blockffn.c; only its size matters here */

sp_session_params sp_session_default_params(void) {
    sp_session_params p = {.n_ctx = 2048, .n_batch = 64, .n_threads = sp_physical_cores(), .ffn_mode = SP_FFN_AUTO,
                           .kv_type = SP_KV_F16, .n_seq = 1, .device = 0};
    return p;
}

void sp_session_free(sp_session *ses) {
    if (!ses) return;
    sp_vk_session_free(ses->gpu);
    sp_pool_free(ses->pool);
    free(ses->past);
    free(ses->k_cache);
    free(ses->v_cache);
    sp_scratch *s = &ses->s;
    free(s->runs);
    free(s->trun);
    free(s->tpos);
    free(s->x);
    free(s->xn);
    free(s->q);
    free(s->qg);
    free(s->k);
    free(s->v);
    free(s->attn);
    free(s->tmp);
    free(s->gate);
    free(s->up);
    free(s->xq);
    free(s->xqf);
    free(s->scores);
    free(s->rope_cs);
    free(s->cq);
    free(s->qnope);
    free(s->qlat);
    free(s->qpe);
    free(s->olat);
    free(s->xqh);
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

/* ---- sizing: one walk over a session's buffers ----
 * session_buffers() names every buffer a session owns, with its size, in one place. sp_session_new runs it
 * allocating and sp_session_memory_estimate runs it counting only, so the estimate is what a session allocates. */

typedef struct sp_sizer {
    bool alloc;          /* calloc each buffer (sp_session_new), or only count it (the estimate) */
    bool ok;             /* no size overflow and no failed allocation so far */
    uint64_t bytes;      /* bytes requested so far */
    uint64_t kv_bytes;   /* of which the KV cache */
} sp_sizer;

/* A zeroed buffer of n floats (or, counting only, NULL), its bytes added to the total. */
static void *take(sp_sizer *z, uint64_t n) {
    uint64_t bytes;
    if (!sp_mul_ok(n, sizeof(float), &bytes) || bytes > (uint64_t)SIZE_MAX || !sp_add_ok(z->bytes, bytes, &z->bytes)) {
        z->ok = false;
        return NULL;
    }
    if (!z->alloc) return NULL;
    void *p = calloc(1, (size_t)(bytes ? bytes : 1));
    if (!p) z->ok = false;
    return p;
}

/* Every buffer of a session over model m with checked params p, into ses (all NULL when counting only).
 * Not counted: the thread pool's bookkeeping (a few hundred bytes) and its workers' stacks (reserved by the OS). */
static void session_buffers(sp_sizer *z, sp_session *ses, const sp_model *m, const sp_session_params *p) {
    const sp_hparams *hp = &m->hp;
    const uint64_t L = (uint64_t)hp->n_layer, C = (uint64_t)p->n_ctx, B = (uint64_t)p->n_batch, NS = (uint64_t)p->n_seq;
    const uint64_t H = (uint64_t)hp->n_embd, F = (uint64_t)hp->n_ff;
    const bool mla = m->attn == SP_ATTN_MLA;
    const uint64_t NH = (uint64_t)hp->n_head, KVD = (uint64_t)hp->n_head_kv * hp->head_dim;
    /* MLA: QL, KL latent ranks, DK = nope + rope per head, DV value dim; 0 for GQA */
    const uint64_t QL = mla ? (uint64_t)hp->q_lora : 0, KL = mla ? (uint64_t)hp->kv_lora : 0;
    const uint64_t DN = mla ? (uint64_t)hp->qk_nope : 0, DR = (uint64_t)hp->n_rot;
    const uint64_t QD = mla ? NH * (DN + DR) : NH * hp->head_dim, OD = mla ? NH * (uint64_t)hp->v_dim : QD;
    /* q8a activation rows: the widest matmul input (MLA's per-head inputs have their own rows, xqh) */
    const uint64_t K_MAX = SP_MAX(SP_MAX(SP_MAX(H, F), SP_MAX(QD, OD)), QL);
    z->bytes += sizeof *ses; /* the session record itself */
    ses->past = take(z, NS); /* int32 */
    const uint64_t before_kv = z->bytes;
    const uint64_t per_float = p->kv_type == SP_KV_F32 ? 1 : 2; /* cache values per float of take() */
    ses->kv_elem = sizeof(float) / per_float;
    const uint64_t CK = mla ? C : (C + SP_KBLK - 1) / SP_KBLK * SP_KBLK; /* GQA keys: whole blocks (sp_kcache_at) */
    if (p->device > 0) { /* the cache lives on the GPU (vulkan/vk_forward.c: F16 keys and values): counted, not here */
        z->kv_bytes = 2 * L * C * KVD * 2;
    } else {
        ses->k_cache = take(z, (L * NS * CK * (uint64_t)hp->kv_k_dim + per_float - 1) / per_float);
        ses->v_cache = hp->kv_v_dim ? take(z, (L * NS * C * (uint64_t)hp->kv_v_dim + per_float - 1) / per_float) : NULL;
        z->kv_bytes = z->bytes - before_kv;
    }
    sp_scratch *s = &ses->s;
    s->runs = take(z, B * (sizeof(sp_run) / sizeof(float)));
    s->trun = take(z, B); /* int32 */
    s->tpos = take(z, B); /* int32 */
    s->x = take(z, B * H);
    s->xn = take(z, B * H);
    s->q = take(z, B * QD);
    s->qg = mla ? NULL : take(z, B * QD);
    s->k = take(z, B * (mla ? KL + DR : KVD)); /* MLA: the kv_a projection (latent + rope key) */
    s->v = mla ? NULL : take(z, B * KVD);
    s->attn = take(z, B * OD);
    if (mla) {
        s->cq = take(z, B * QL);
        s->qnope = take(z, NH * B * DN);
        s->qlat = take(z, B * NH * KL);
        s->qpe = take(z, B * NH * DR);
        s->olat = take(z, NH * B * KL);
        s->xqh = take(z, NH * B * (SP_MAX(DN, KL) / SP_QK) * (sizeof(sp_block_q8a) / sizeof(float)));
    }
    s->tmp = take(z, B * H);
    s->gate = take(z, B * F);
    s->up = take(z, B * F);
    /* q8a rows: K/32 blocks of 40 bytes = 1.25 floats per element */
    s->xq = take(z, B * (K_MAX / SP_QK + 1) * (sizeof(sp_block_q8a) / sizeof(float)));
    s->xqf = hp->n_expert > 0 ? NULL : take(z, B * (F / SP_QK + 1) * (sizeof(sp_block_q8a) / sizeof(float)));
    /* GQA: the scores of a chunk of TQ tokens, [NH * TQ] rows of C + B, and their 1/sums; TQ as many tokens as fit
     * in 4 MiB (at least 1, at most B). MLA: one token's [NH, C + B] scores and rope parts. */
    const uint64_t tq = SP_MIN(B, SP_MAX(1, ((uint64_t)4 << 20) / (sizeof(float) * NH * (C + B))));
    ses->attn_tq = (int32_t)tq;
    s->scores = take(z, mla ? 2 * NH * (C + B) : NH * tq * (C + B + 1));
    s->rope_cs = take(z, B * (uint64_t)hp->n_rot);
    if (hp->n_expert > 0) {
        const uint64_t E = (uint64_t)hp->n_expert, FE = (uint64_t)hp->expert_width, NT = (uint64_t)p->n_threads;
        const uint64_t xrow = SP_MAX(H, H / SP_QK * (sizeof(sp_block_q8a) / sizeof(float))); /* in floats */
        s->router = take(z, B * E);
        s->tasks = take(z, B * E * (sizeof(struct sp_ffn_task) / sizeof(float)));
        s->task_tok = take(z, B * E); /* int32 */
        s->xg = take(z, NT * B * xrow);
        s->hbuf = take(z, NT * B * FE);
        s->ypart = take(z, (NT - 1) * B * H);
        sp_sparsity_acc *a = &ses->sparsity;
        a->words = (int32_t)((E + 63) / 64);
        a->ring = take(z, L * SP_CLS_RING * (uint64_t)a->words * 2); /* uint64 */
        a->n_seen = take(z, L * 2);
        a->n_active = take(z, L * 2);
        a->cls_inactive = take(z, L * (SP_CLS_RING + 1) * 2);
        a->cls_chunks = take(z, L * (SP_CLS_RING + 1) * 2);
        a->bytes = take(z, L * 2);
    }
}

/* Check the params for a session over m, resolving n_ctx 0 to the model's training context. */
static sp_status check_params(const sp_model *m, sp_session_params *p) {
    if (!m) return sp_fail(SP_ERR_INVALID_ARG, "model is NULL");
    if (!m->has_weights) return sp_fail(SP_ERR_INVALID_ARG, "the model was loaded with vocab_only: no weights to run");
    if (p->n_ctx == 0) p->n_ctx = m->hp.n_ctx_train;
    if (p->n_ctx < 1 || p->n_ctx > (1 << 24))
        return sp_fail(SP_ERR_INVALID_ARG, "n_ctx must be 1..16777216 (or 0 for the model's), got %d", p->n_ctx);
    if (p->n_batch < 1 || p->n_batch > 4096)
        return sp_fail(SP_ERR_INVALID_ARG, "n_batch must be 1..4096, got %d", p->n_batch);
    if (p->n_threads < 1 || p->n_threads > 512)
        return sp_fail(SP_ERR_INVALID_ARG, "n_threads must be 1..512, got %d", p->n_threads);
    if (p->kv_type != SP_KV_F16 && p->kv_type != SP_KV_F32)
        return sp_fail(SP_ERR_INVALID_ARG, "kv_type must be SP_KV_F16 or SP_KV_F32, got %d", (int)p->kv_type);
    if (p->kv_type == SP_KV_F32 && m->attn != SP_ATTN_MLA)
        return sp_fail(SP_ERR_UNSUPPORTED, "an F32 KV cache is implemented for multi-head latent attention only; this "
                       "model's attention is grouped-query (use the default F16 cache)");
    if (p->n_seq < 1 || p->n_seq > 256)
        return sp_fail(SP_ERR_INVALID_ARG, "n_seq must be 1..256, got %d", p->n_seq);
    if (p->ffn_mode < SP_FFN_AUTO || p->ffn_mode > SP_FFN_SPARSE_CHUNK)
        return sp_fail(SP_ERR_INVALID_ARG,
                       "ffn_mode must be one of SP_FFN_AUTO/DENSE/SPARSE_TOKEN/SPARSE_CHUNK, got %d", (int)p->ffn_mode);
    if (p->device < 0) return sp_fail(SP_ERR_INVALID_ARG, "device must be 0 (the CPU) or a GPU device 1.., got %d", p->device);
    if (p->device > 0) return sp_vk_session_check(m, p);
    return SP_OK;
}

sp_status sp_session_memory_estimate(const sp_model *m, sp_session_params params, sp_session_memory *out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_memory_estimate: out is NULL");
    memset(out, 0, sizeof *out);
    sp_status st = check_params(m, &params);
    if (st != SP_OK) return st;
    sp_session shadow = {0}; /* receives only NULLs: the walk counts */
    sp_sizer z = {.alloc = false, .ok = true};
    session_buffers(&z, &shadow, m, &params);
    if (!z.ok || z.bytes > (uint64_t)SIZE_MAX)
        return sp_fail(SP_ERR_INVALID_ARG, "a session with n_ctx=%d would need more memory than can be addressed",
                       params.n_ctx);
    *out = (sp_session_memory){.n_ctx = params.n_ctx, .kv_cache_bytes = (size_t)z.kv_bytes,
                               .total_bytes = (size_t)z.bytes};
    return SP_OK;
}

sp_status sp_session_new(const sp_model *m, sp_session_params params, sp_session **out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_new: out is NULL");
    *out = NULL;
    sp_status st = check_params(m, &params);
    if (st != SP_OK) return st;
    sp_session *ses = calloc(1, sizeof *ses);
    if (!ses) return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    ses->model = m;
    ses->params = params;
    sp_sizer z = {.alloc = true, .ok = true};
    session_buffers(&z, ses, m, &params);
    if (!z.ok) {
        sp_session_free(ses);
        return sp_fail(SP_ERR_NO_MEMORY, "out of memory for a session with n_ctx=%d (KV cache %.1f MiB)", params.n_ctx,
                       (double)z.kv_bytes / (1 << 20));
    }
    ses->memory = (sp_session_memory){.n_ctx = params.n_ctx, .kv_cache_bytes = (size_t)z.kv_bytes,
                                      .total_bytes = (size_t)z.bytes};
    st = sp_pool_new(params.n_threads, &ses->pool);
    if (st == SP_OK && params.device > 0) st = sp_vk_session_new(ses, &ses->gpu);
    if (st != SP_OK) {
        sp_session_free(ses);
        return st;
    }
    *out = ses;
    return SP_OK;
}

sp_status sp_session_get_memory(const sp_session *ses, sp_session_memory *out) {
    sp_clear_error();
    if (!ses || !out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_get_memory: NULL argument");
    *out = ses->memory;
    return SP_OK;
}

/* A session runs one call at a time: two threads in sp_eval would drive one thread pool at once and deadlock it.
 * enter() claims the session for this call (refusing it, with a clear error, while another thread holds it);
 * leave() gives it back. */
static sp_status enter(sp_session *ses, const char *what) {
    return sp_claim(&ses->busy, what, "session", "give each thread its own session");
}

/* Every call that may change the cache counts as a change (the generator's draft model drafter trusts its record of
 * the draft session's cache only while this count is what it left). */
static sp_status leave(sp_session *ses, sp_status st) {
    ses->n_changes++;
    return sp_release(&ses->busy, st);
}

/* sp_eval with the session claimed by this thread. */
static sp_status eval_checked(sp_session *ses, const sp_batch *b) {
    const sp_hparams *hp = &ses->model->hp;
    const int32_t T = b->n_tokens;
    if (T < 1 || T > ses->params.n_batch)
        return sp_fail(SP_ERR_INVALID_ARG, "n_tokens must be 1..n_batch (%d), got %d", ses->params.n_batch, T);
    if (!b->tokens) return sp_fail(SP_ERR_INVALID_ARG, "sp_eval: tokens is NULL");
    sp_status st = sp_session_plan_runs(ses, b);
    if (st != SP_OK) return st;
    for (int32_t t = 0; t < T; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= hp->n_vocab)
            return sp_fail(SP_ERR_INVALID_ARG, "token %d at index %d is outside the vocabulary [0, %d)", b->tokens[t],
                           t, hp->n_vocab);
        if (b->pos && (b->pos[t] < 0 || b->pos[t] > (1 << 24)))
            return sp_fail(SP_ERR_INVALID_ARG, "position %d at index %d is out of range", b->pos[t], t);
    }
    const sp_scratch *s = &ses->s;
    for (int32_t t = 0; t < T; t++) {
        const sp_run *r = &s->runs[s->trun[t]];
        s->tpos[t] = b->pos ? b->pos[t] : r->P + (t - r->t0);
    }
    if (ses->gpu) {
        st = sp_vk_forward(ses, b);
        if (st != SP_OK) return st;
    } else {
        sp_forward(ses, b);
    }
    for (int32_t i = 0; i < s->n_runs; i++) ses->past[s->runs[i].seq] += s->runs[i].n;
    return SP_OK;
}

sp_status sp_session_plan_runs(sp_session *ses, const sp_batch *b) {
    sp_scratch *s = &ses->s;
    const int32_t T = b->n_tokens, NS = ses->params.n_seq;
    s->n_runs = 0;
    for (int32_t t = 0; t < T; t++) {
        const int32_t seq = b->seq ? b->seq[t] : 0;
        if (seq < 0 || seq >= NS)
            return sp_fail(SP_ERR_INVALID_ARG, "sequence id %d at index %d is outside [0, n_seq %d)", seq, t, NS);
        if (t == 0 || seq != s->runs[s->n_runs - 1].seq) {
            for (int32_t i = 0; i < s->n_runs; i++)
                if (s->runs[i].seq == seq)
                    return sp_fail(SP_ERR_INVALID_ARG, "sequence %d appears in two runs of the batch (index %d): a "
                                   "sequence's tokens must be contiguous", seq, t);
            s->runs[s->n_runs++] = (sp_run){.t0 = t, .n = 0, .seq = seq, .P = ses->past[seq]};
        }
        s->runs[s->n_runs - 1].n++;
        s->trun[t] = s->n_runs - 1;
    }
    for (int32_t i = 0; i < s->n_runs; i++) {
        const sp_run *r = &s->runs[i];
        if (r->P + r->n > ses->params.n_ctx) {
            if (NS == 1)
                return sp_fail(SP_ERR_CONTEXT_FULL, "the context is full: %d cached + %d new tokens > n_ctx %d", r->P,
                               r->n, ses->params.n_ctx);
            return sp_fail(SP_ERR_CONTEXT_FULL, "sequence %d's context is full: %d cached + %d new tokens > n_ctx %d",
                           r->seq, r->P, r->n, ses->params.n_ctx);
        }
    }
    return SP_OK;
}

sp_status sp_eval(sp_session *ses, const sp_batch *b) {
    sp_clear_error();
    if (!ses || !b) return sp_fail(SP_ERR_INVALID_ARG, "sp_eval: NULL argument");
    sp_status st = enter(ses, "sp_eval");
    return st != SP_OK ? st : leave(ses, eval_checked(ses, b));
}

int32_t sp_session_n_past(const sp_session *ses) { return ses ? ses->past[0] : 0; }
int32_t sp_session_seq_n_past(const sp_session *ses, int32_t seq) {
    return ses && seq >= 0 && seq < ses->params.n_seq ? ses->past[seq] : -1;
}
int32_t sp_session_n_ctx(const sp_session *ses) { return ses ? ses->params.n_ctx : 0; }

static sp_status check_seq(const sp_session *ses, int32_t seq, const char *what) {
    if (seq < 0 || seq >= ses->params.n_seq)
        return sp_fail(SP_ERR_INVALID_ARG, "%s: sequence %d is outside [0, n_seq %d)", what, seq, ses->params.n_seq);
    return SP_OK;
}

sp_status sp_session_seq_truncate(sp_session *ses, int32_t seq, int32_t n) {
    sp_clear_error();
    if (!ses) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_truncate: session is NULL");
    sp_status st = check_seq(ses, seq, "sp_session_truncate");
    if (st != SP_OK) return st;
    st = enter(ses, "sp_session_truncate");
    if (st != SP_OK) return st;
    if (n < 0 || n > ses->past[seq])
        return leave(ses, sp_fail(SP_ERR_INVALID_ARG, "truncate to %d tokens: must be 0..n_past (%d)", n,
                                  ses->past[seq]));
    ses->past[seq] = n;
    return leave(ses, SP_OK);
}

sp_status sp_session_truncate(sp_session *ses, int32_t n) { return sp_session_seq_truncate(ses, 0, n); }

/* sp_session_keep with the session claimed by this thread. */
static sp_status keep_checked(sp_session *ses, int32_t seq, const int32_t *idx, int32_t n) {
    const int32_t P = ses->past[seq];
    if (n < 0 || n > P) return sp_fail(SP_ERR_INVALID_ARG, "keep %d slots: must be 0..n_past (%d)", n, P);
    for (int32_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= P || (i > 0 && idx[i] <= idx[i - 1]))
            return sp_fail(SP_ERR_INVALID_ARG, "keep: slot indices must be strictly increasing and < n_past (%d)", P);
    if (ses->gpu) {
        sp_status st = sp_vk_keep(ses, idx, n);
        if (st == SP_OK) ses->past[seq] = n;
        return st;
    }
    const sp_hparams *hp = &ses->model->hp;
    const size_t KD = (size_t)hp->kv_k_dim * ses->kv_elem, VD = (size_t)hp->kv_v_dim * ses->kv_elem; /* row bytes */
    const bool blocked = ses->model->attn == SP_ATTN_GQA; /* GQA keys in blocks of slots (sp_kcache_at) */
    uint8_t *kc = ses->k_cache, *vc = ses->v_cache;
    sp_f16 *kh = ses->k_cache;
    /* idx[i] >= i, so copying forward in order never overwrites a slot still to be read */
    for (size_t il = 0; il < (size_t)hp->n_layer; il++)
        for (int32_t i = 0; i < n; i++) {
            if (idx[i] == i) continue;
            if (blocked)
                for (int64_t g = 0; g < hp->n_head_kv; g++)
                    for (int64_t d = 0; d < hp->head_dim; d++)
                        kh[sp_kcache_at(ses, (int64_t)il, g, seq, i, d)] =
                            kh[sp_kcache_at(ses, (int64_t)il, g, seq, idx[i], d)];
            else memcpy(kc + sp_vcache_row(ses, (int64_t)il, seq, i) * KD,
                        kc + sp_vcache_row(ses, (int64_t)il, seq, idx[i]) * KD, KD); /* MLA latent rows */
            if (VD)
                memcpy(vc + sp_vcache_row(ses, (int64_t)il, seq, i) * VD,
                       vc + sp_vcache_row(ses, (int64_t)il, seq, idx[i]) * VD, VD);
        }
    ses->past[seq] = n;
    return SP_OK;
}

sp_status sp_session_seq_keep(sp_session *ses, int32_t seq, const int32_t *idx, int32_t n) {
    sp_clear_error();
    if (!ses || (!idx && n)) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_keep: NULL argument");
    sp_status st = check_seq(ses, seq, "sp_session_keep");
    if (st != SP_OK) return st;
    st = enter(ses, "sp_session_keep");
    return st != SP_OK ? st : leave(ses, keep_checked(ses, seq, idx, n));
}

sp_status sp_session_keep(sp_session *ses, const int32_t *idx, int32_t n) { return sp_session_seq_keep(ses, 0, idx, n); }

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
    if (!ses || ses->model->hp.n_expert == 0) return;
    sp_sparsity_acc *a = &ses->sparsity;
    const size_t L = (size_t)ses->model->hp.n_layer;
    memset(a->ring, 0, L * SP_CLS_RING * (size_t)a->words * sizeof *a->ring);
    memset(a->n_seen, 0, L * sizeof *a->n_seen);
    memset(a->n_active, 0, L * sizeof *a->n_active);
    memset(a->cls_inactive, 0, L * (SP_CLS_RING + 1) * sizeof *a->cls_inactive);
    memset(a->cls_chunks, 0, L * (SP_CLS_RING + 1) * sizeof *a->cls_chunks);
    memset(a->bytes, 0, L * sizeof *a->bytes);
}

double sp_session_expert_bytes(const sp_session *ses) {
    if (ses->model->hp.n_expert == 0) return 0.0;
    double bytes = 0.0;
    for (int32_t il = 0; il < ses->model->hp.n_layer; il++) bytes += (double)ses->sparsity.bytes[il];
    return bytes;
}

sp_status sp_session_get_sparsity(const sp_session *ses, int32_t layer, sp_sparsity_stats *out) {
    sp_clear_error();
    if (!ses || !out) return sp_fail(SP_ERR_INVALID_ARG, "sp_session_get_sparsity: NULL argument");
    memset(out, 0, sizeof *out);
    const sp_model *m = ses->model;
    if (m->hp.n_expert == 0) return SP_OK; /* no sparse experts */
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
