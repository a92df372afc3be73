/* ffn_blockffn.c: the BlockFFN sparse-expert FFN block (docs/gguf-blockffn.md), run by every pool thread.
 *
 * Shape legend: T = tokens in the batch, H = hidden, E = experts, FE = expert width, A = active experts,
 * n = tokens a task applies its expert to, NT = threads, B = n_batch.
 *
 *   r[t]  = norm(relu(router x[t]))                          [T, E] float32; expert e is active for t iff r[t,e] != 0
 *   y[t]  = sum over active e of  (r[t,e] * silu(U_e x[t])) @ D_e^T        U_e, D_e^T: [FE, H] rows of expert e's slab
 *
 * Execution: thread 0 turns the scores into a task list (an expert + the tokens to apply it to), by ffn_mode:
 *   - SPARSE_CHUNK: one task per expert active in any token of the batch, with exactly the tokens that use it; the
 *     expert's slab is read once for all of them (weights stationary).
 *   - SPARSE_TOKEN: one task per active (token, expert) pair: a slab is read once per token that uses it.
 *   - DENSE: one task per expert with all T tokens, scores of 0 included (the baseline that ignores sparsity).
 * Each task is cut into row slices of the expert (so two threads can share one expert) unless the tasks split evenly
 * over the threads (then a unit is a whole expert: one stream); thread p takes a contiguous
 * share of the (task, slice) units and for each: gathers the task's activation rows (when not all T), computes
 * h = U_e[slice] x (kernel matmul), c = r * silu(h), then y += c @ D_e^T[slice] (kernel accum) into its own partial
 * output (thread 0: s->tmp). Partials are summed into tmp at the end, each thread for its own tokens (sp_split(T)).
 * Threads meet at 3 barriers per layer.
 * The down half is read in the tier's streaming layout (kernels.h accum_packed) when the model packed it at load,
 * in its int8 form (accum_packed_i8: c quantized per token, 16-row group and column block) where the tier has one.
 * Thread 0 adds each phase's time to the session's timings (ffn_router_s .. ffn_reduce_s).
 * Thread 0 also updates the session's sparsity counters (TLS, CLS-k ring, bytes read).
 * With synthetic routing on (routing_synth.c) the router matmul still runs and its scores are then replaced.
 */
#include "forward.h"

#include <math.h>
#include <string.h>

struct sp_ffn_task {
    int32_t e;   /* expert */
    int32_t n;   /* tokens */
    int32_t tok; /* their indices: task_tok[tok .. tok+n), or -1 for all T tokens in order */
};
typedef struct sp_ffn_task sp_ffn_task;

enum { SLICE_MIN = 16 }; /* rows per slice at least (the SIMD matmuls' row group) */

/* r[t] = norm(relu(r[t])) in place for one token (or copy the testing override). */
static void router_norm_row(const sp_hparams *hp, const float *norm_w, float *r) {
    const int64_t E = hp->n_expert;
    for (int64_t e = 0; e < E; e++) r[e] = r[e] > 0.0f ? r[e] : 0.0f;
    if (hp->router_norm == SP_ROUTER_NORM_RMS) {
        double ss = 0;
        for (int64_t e = 0; e < E; e++) ss += (double)r[e] * r[e];
        const float inv = 1.0f / sqrtf((float)(ss / (double)E) + hp->router_norm_eps);
        for (int64_t e = 0; e < E; e++) r[e] = r[e] * inv * norm_w[e];
    } else if (hp->router_norm == SP_ROUTER_NORM_SUM) {
        double sum = 0;
        for (int64_t e = 0; e < E; e++) sum += r[e];
        const float inv = 1.0f / ((float)sum * hp->router_norm_scale + hp->router_norm_eps);
        for (int64_t e = 0; e < E; e++) r[e] = r[e] * inv;
    }
}

/* Sparsity counters of layer il for the batch's T tokens (masks from r != 0). */
void sp_ffn_count_sparsity(sp_session *ses, int il, const float *router, int64_t T, uint64_t bytes) {
    sp_sparsity_acc *a = &ses->sparsity;
    const int64_t E = ses->model->hp.n_expert, W = a->words;
    uint64_t *ring = a->ring + (int64_t)il * SP_CLS_RING * W; /* [SP_CLS_RING, W] */
    int64_t *inactive = a->cls_inactive + il * (SP_CLS_RING + 1), *chunks = a->cls_chunks + il * (SP_CLS_RING + 1);
    for (int64_t t = 0; t < T; t++) {
        const int64_t n = a->n_seen[il]++;
        uint64_t *mask = ring + (n % SP_CLS_RING) * W;
        memset(mask, 0, (size_t)W * sizeof *mask);
        for (int64_t e = 0; e < E; e++)
            if (router[t * E + e] != 0.0f) mask[e >> 6] |= 1ull << (e & 63);
        int active = 0;
        for (int64_t w = 0; w < W; w++) active += __builtin_popcountll(mask[w]);
        a->n_active[il] += active;
        /* token n closes a chunk of k tokens when (n + 1) % k == 0: its union is the last k masks */
        for (int k = 2; k <= SP_CLS_RING; k++) {
            if ((n + 1) % k) continue;
            int64_t on = 0;
            for (int64_t w = 0; w < W; w++) {
                uint64_t u = 0;
                for (int j = 0; j < k; j++) u |= ring[((n - j) % SP_CLS_RING) * W + w];
                on += __builtin_popcountll(u);
            }
            inactive[k] += E - on;
            chunks[k]++;
        }
    }
    a->bytes[il] += bytes;
}

/* Thread 0: scores -> task list for the session's ffn_mode; sparsity counters. */
static void plan_tasks(const fwd_ctx *c, int il) {
    sp_session *ses = c->ses;
    sp_scratch *s = &ses->s;
    const sp_model *m = ses->model;
    const sp_hparams *hp = &m->hp;
    const sp_layer *l = &m->layers[il];
    const int64_t T = c->b->n_tokens, E = hp->n_expert;
    const uint64_t slab = 2 * (uint64_t)hp->expert_width * l->experts.row_size;
    for (int64_t t = 0; t < T; t++) {
        float *r = s->router + t * E;
        if (s->router_set) memcpy(r, s->router_set + t * E, (size_t)E * sizeof *r);
        else if (ses->synth.on) sp_synth_routing_scores(ses, il, s->tpos[t], r);
        else router_norm_row(hp, l->router_norm, r);
    }
    sp_ffn_task *task = s->tasks;
    int32_t n_tasks = 0, n_tok = 0;
    switch (ses->params.ffn_mode) {
    case SP_FFN_DENSE:
        for (int64_t e = 0; e < E; e++) task[n_tasks++] = (sp_ffn_task){.e = (int32_t)e, .n = (int32_t)T, .tok = -1};
        break;
    case SP_FFN_SPARSE_TOKEN:
        for (int64_t t = 0; t < T; t++)
            for (int64_t e = 0; e < E; e++)
                if (s->router[t * E + e] != 0.0f) {
                    s->task_tok[n_tok] = (int32_t)t;
                    task[n_tasks++] = (sp_ffn_task){.e = (int32_t)e, .n = 1, .tok = n_tok++};
                }
        break;
    case SP_FFN_AUTO:
    case SP_FFN_SPARSE_CHUNK:
    default:
        for (int64_t e = 0; e < E; e++) {
            const int32_t first = n_tok;
            for (int64_t t = 0; t < T; t++)
                if (s->router[t * E + e] != 0.0f) s->task_tok[n_tok++] = (int32_t)t;
            const int32_t n = n_tok - first;
            if (n) task[n_tasks++] = (sp_ffn_task){.e = (int32_t)e, .n = n, .tok = n == T ? -1 : first};
        }
        break;
    }
    s->n_tasks = n_tasks;
    sp_ffn_count_sparsity(ses, il, s->router, T, slab * (uint64_t)n_tasks);
}

/* Add the time since *clk to *acc and restart the clock. */
static inline void lap_s(double *clk, double *acc) {
    const double now = sp_now_s();
    *acc += now - *clk;
    *clk = now;
}


void sp_ffn_blockffn(const fwd_ctx *c, int il, int ith, int nth) {
    sp_session *ses = c->ses;
    sp_scratch *s = &ses->s;
    const sp_model *m = ses->model;
    const sp_hparams *hp = &m->hp;
    const sp_layer *l = &m->layers[il];
    const sp_tensor *X = &l->experts; /* [E * 2FE, H] */
    const int64_t T = c->b->n_tokens, H = hp->n_embd, E = hp->n_expert, FE = hp->expert_width;
    const int64_t B = ses->params.n_batch;
    const bool q8 = sp_type_traits_of(X->type).act_q8;
    const size_t xrow = q8 ? (size_t)(H / SP_QK) * sizeof(sp_block_q8a) : (size_t)H * sizeof(float); /* bytes */
    const void *x_all = q8 ? s->xq : (const void *)s->xn; /* [T] rows of xrow bytes */
    float *y = ith == 0 ? s->tmp : s->ypart + (int64_t)(ith - 1) * B * H; /* [T, H] this thread's partial */
    uint8_t *xg = (uint8_t *)s->xg + (size_t)ith * (size_t)B * xrow;        /* [B] gathered rows */
    float *h = s->hbuf + (int64_t)ith * B * FE;                             /* [B, FE] */

    sp_timings *tm = ith == 0 ? &ses->times : NULL; /* thread 0 times the phases (forward.c's convention) */
    double clk = tm ? sp_now_s() : 0.0, t_up = 0.0, t_down = 0.0;

    /* 1. router logits [T, E] = x @ router^T (split by expert rows); zero this thread's partial output */
    if (!s->router_set) sp_fwd_matmul_rows(c, s->router, E, &l->router, s->xn, T, ith, nth);
    memset(y, 0, (size_t)(T * H) * sizeof *y);
    sp_pool_barrier(ses->pool);
    if (tm) lap_s(&clk, &tm->ffn_router_s);

    /* 2. thread 0: relu + norm, the task list, sparsity counters */
    if (ith == 0) plan_tasks(c, il);
    sp_pool_barrier(ses->pool);
    if (tm) lap_s(&clk, &tm->ffn_plan_s);

    /* 3. this thread's (task, row slice) units: h = U x, c = r silu(h), y += c D^T */
    /* whole experts when the tasks split evenly over the threads (each unit then reads one expert's packed up and
     * down halves, adjacent in memory, as one stream); else row slices, so that no thread waits for another */
    const int64_t n_slices = s->n_tasks % nth == 0 ? 1 : SP_MAX(1, SP_MIN(nth, FE / SLICE_MIN));
    const int64_t per = ((FE + n_slices - 1) / n_slices + SLICE_MIN - 1) / SLICE_MIN * SLICE_MIN;
    int64_t u0, u1;
    sp_split((int64_t)s->n_tasks * n_slices, ith, nth, &u0, &u1);
    int64_t gathered = -1; /* task whose rows xg holds */
    for (int64_t u = u0; u < u1; u++) {
        const sp_ffn_task *tk = &s->tasks[u / n_slices];
        const int64_t f0 = SP_MIN(FE, (u % n_slices) * per), f1 = SP_MIN(FE, f0 + per);
        if (f0 >= f1) continue;
        const int32_t *idx = tk->tok < 0 ? NULL : s->task_tok + tk->tok; /* [n] or NULL: all T */
        const void *x = x_all;
        if (idx && tk->n == 1) {
            x = (const uint8_t *)x_all + (size_t)idx[0] * xrow;
        } else if (idx) {
            if (gathered != u / n_slices)
                for (int32_t i = 0; i < tk->n; i++)
                    memcpy(xg + (size_t)i * xrow, (const uint8_t *)x_all + (size_t)idx[i] * xrow, xrow);
            gathered = u / n_slices;
            x = xg;
        }
        const uint8_t *slab = (const uint8_t *)X->data + (size_t)tk->e * 2 * (size_t)FE * X->row_size;
        const double u_clk = tm ? sp_now_s() : 0.0;
        if (l->experts_up_packed) /* h[i, f] = U_e[f] . x[i] */
            c->k->matmul_packed[X->type](h, FE, l->experts_up_packed + (size_t)tk->e * l->experts_up_stride, x, H,
                                         f0, f1, tk->n);
        else
            c->k->matmul[X->type](h, FE, slab, x, H, f0, f1, tk->n);
        for (int32_t i = 0; i < tk->n; i++) {
            const float r = s->router[(idx ? idx[i] : i) * E + tk->e];
            c->k->silu_mul(h + i * FE + f0, NULL, r, f1 - f0); /* r silu(h) */
        }
        const double d_clk = tm ? sp_now_s() : 0.0;
        if (l->experts_down_packed) { /* the down half in the streaming layout: rows f0.. start a 16-row group */
            const sp_accum_fn down = (l->experts_down_i8 ? c->k->accum_packed_i8 : c->k->accum_packed)[X->type];
            down(y, H, idx, h + f0, FE,
                 l->experts_down_packed + (size_t)tk->e * l->experts_up_stride + c->k->packed_down_size[X->type](f0, H),
                 f1 - f0, H, tk->n);
        } else {
            c->k->accum[X->type](y, H, idx, h + f0, FE, slab + (size_t)(FE + f0) * X->row_size, f1 - f0, H, tk->n);
        }
        if (tm) {
            const double now = sp_now_s();
            t_up += d_clk - u_clk;
            t_down += now - d_clk;
        }
    }
    sp_pool_barrier(ses->pool);
    if (tm) {
        lap_s(&clk, &tm->ffn_experts_s);
        tm->ffn_up_s += t_up;
        tm->ffn_down_s += t_down;
    }

    /* 4. tmp += the other threads' partials, for this thread's tokens (sp_split(T)); no barrier after it: the caller
     * goes on with the same tokens (forward.c: the residual add and the next layer's norm) */
    if (nth > 1) {
        int64_t t0, t1;
        sp_split(T, ith, nth, &t0, &t1);
        for (int p = 1; p < nth; p++) {
            const float *yp = s->ypart + (int64_t)(p - 1) * B * H;
            for (int64_t i = t0 * H; i < t1 * H; i++) s->tmp[i] += yp[i];
        }
    }
    if (tm) lap_s(&clk, &tm->ffn_reduce_s);
}

/* ---- testing hook ---- */

typedef struct { fwd_ctx c; int il; } run_ctx;

static void run_worker(void *p, int ith, int nth) {
    const run_ctx *rc = p;
    sp_ffn_blockffn(&rc->c, rc->il, ith, nth);
}

sp_status sp_ffn_blockffn_run(sp_session *ses, int il, const float *xn, const float *r, int64_t r_cols, int32_t T,
                              sp_ffn_mode mode, float *out) {
    const sp_model *m = ses->model;
    const int64_t H = m->hp.n_embd;
    if (m->hp.n_expert == 0) return sp_fail(SP_ERR_INVALID_ARG, "the model has no BlockFFN layers");
    if (ses->gpu) return sp_fail(SP_ERR_UNSUPPORTED, "the FFN block alone runs on the CPU only, not in a GPU session");
    if (il < 0 || il >= m->hp.n_layer) return sp_fail(SP_ERR_INVALID_ARG, "layer %d out of range", il);
    if (T < 1 || T > ses->params.n_batch) return sp_fail(SP_ERR_INVALID_ARG, "T must be 1..n_batch");
    if (mode < SP_FFN_AUTO || mode > SP_FFN_SPARSE_CHUNK) return sp_fail(SP_ERR_INVALID_ARG, "bad ffn mode");
    if (r && r_cols != m->hp.n_expert) return sp_fail(SP_ERR_INVALID_ARG, "r must have E = %d columns", m->hp.n_expert);
    const sp_kernels *k = sp_kernels_get();
    sp_scratch *s = &ses->s;
    if (xn) {
        memcpy(s->xn, xn, (size_t)(T * H) * sizeof *xn);
        if (m->act_q8)
            for (int32_t t = 0; t < T; t++) k->quantize_q8a((sp_block_q8a *)s->xq + t * (H / SP_QK), xn + t * H, H);
    }
    sp_batch b = {.n_tokens = T};
    s->runs[0] = (sp_run){.t0 = 0, .n = T, .seq = 0, .P = ses->past[0]}; /* one run of sequence 0 */
    s->n_runs = 1;
    for (int32_t t = 0; t < T; t++) s->trun[t] = 0, s->tpos[t] = ses->past[0] + t;
    run_ctx rc = {.c = {.ses = ses, .b = &b, .k = k, .q8 = m->act_q8}, .il = il};
    const sp_ffn_mode saved = ses->params.ffn_mode;
    ses->params.ffn_mode = mode;
    s->router_set = r;
    sp_pool_run(ses->pool, run_worker, &rc);
    s->router_set = NULL;
    ses->params.ffn_mode = saved;
    if (out) memcpy(out, s->tmp, (size_t)(T * H) * sizeof *out);
    return SP_OK;
}
