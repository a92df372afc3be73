/* generate.c: the decode loop inside the library (sp_generator): sampler, stop conditions and a drafter, with
 * speculative verification of drafted chains. The same rules as runtime/speculative.py (its docstring).
 *
 * Shape legend: V = vocabulary size, K = draft nodes per step at most (<= n_batch - 1), N = nodes drafted this step,
 * T = N + 1 verified tokens, C = n_ctx.
 *
 * One step (the KV cache holds every token of the generation but the last one, the "root"):
 *   draft  = the drafter's tree below the root (draft.c): nodes 1..N, node i's parent par[i-1] < i (0 = the root)
 *   logits = sp_eval([root, d_1 .. d_N], all rows)                       [T, V]: ONE forward pass
 *            a tree (not a chain) gets the ancestor-or-self mask and positions n_past0 + depth
 *   walk:  from the root, the target chooses at each node u from row u (greedy: its argmax; sampling: recursive
 *          rejection over u's children, sparrow.h); if a child holds the choice, go there, else the choice is the
 *          bonus token. The sampler's repetition history takes each token as it is chosen, so row u's distribution
 *          is the one plain decoding would see there.
 *   the cache keeps the root and the accepted path: sp_session_truncate when the path is nodes 1, 2, .. in batch
 *   order (any chain), else sp_session_keep; the drafter observes every row (Token Recycling's matrix).
 * Without a draft (none proposed, or the adaptive drafter's gate chose a plain step) the step is plain decoding:
 * sp_eval(root), sp_sampler_sample.
 * Every buffer is allocated in sp_generator_new; a step allocates nothing. */
#include "draft.h"
#include "model.h"
#include "plan.h"
#include "sampler.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { SP_GEN_MAX_NGRAM = 16 };

struct sp_generator {
    sp_session *ses;
    const sp_model *model;
    sp_generator_params p;
    char stop[SP_GEN_MAX_STOP][SP_GEN_MAX_STOP_LEN + 1]; /* copies of the stop strings */
    size_t stop_len[SP_GEN_MAX_STOP];
    int32_t V, n_ctx, K;       /* K: draft nodes per step at most (0: no drafter) */
    sp_sampler *sampler;
    sp_drafter d;
    float *logits;             /* [K + 1, V] */
    int32_t *ids;              /* [V] the sampler's candidates at a row */
    float *probs;              /* [V] */
    int32_t *batch;            /* [K + 1] the root, then the draft's tokens */
    int32_t *par;              /* [K] the draft's parents */
    int32_t *pos, *depth;      /* [K + 1] a tree's positions and node depths */
    uint8_t *mask;             /* [(K + 1)^2] a tree's ancestor-or-self mask */
    int32_t *kids, *path;      /* [K + 1] a node's children; the accepted path (batch indices, the root first) */
    int32_t *keep;             /* [C] cache slots to keep after a tree */
    bool *accepted;            /* [K] the planner's view of the path: node i accepted */
    bool use_plan, use_gate;
    sp_planner pl;             /* prunes each tree (plan or adaptive) */
    sp_gate gate;              /* adaptive: draft or run plain, per step */
    int32_t plain_learn;       /* adaptive: plain steps since Token Recycling last learned from one */
    int32_t *ctx;              /* [C + 2] prompt, then every token decided (the cache holds ctx[0 .. n_past)) */
    int32_t ctx_len;           /* tokens in ctx */
    int32_t q_next;            /* ctx[q_next .. ctx_len): decided, not yet returned */
    int32_t n_gen;             /* tokens returned in this generation */
    int32_t n_past_left;       /* the session's n_past when the generator last touched it (-1: never) */
    bool started, failed;
    sp_gen_stop done;          /* SP_GEN_RUNNING, or why the generation ended */
    sp_gen_stop pending;       /* the reason to end with at the next call (after returning a token) */
    char *tail;                /* [tail_cap] the last bytes of the generated text (stop strings) */
    size_t tail_len, tail_cap;
    sp_generator_stats stats;
    _Atomic int busy;          /* a thread is inside a call */
};

sp_generator_params sp_generator_default_params(void) {
    sp_generator_params p;
    memset(&p, 0, sizeof p);
    p.sampler = sp_sampler_default_params();
    p.max_tokens = 128;
    p.stop_at_eog = true;
    p.drafter = SP_DRAFTER_NONE;
    p.ngram = 3;
    p.min_ngram = 2;
    p.draft_k = 4;
    p.recycling_k = 8;
    p.n_branching = 1;
    p.branching[0] = 1;
    p.max_nodes = 4;
    p.probe_every = 16;
    p.max_probe_every = 256;
    p.learn_every = 4;
    return p;
}

sp_generator_params sp_generator_default_params_for(sp_drafter_kind drafter) {
    sp_generator_params p = sp_generator_default_params();
    p.drafter = drafter;
    if (drafter == SP_DRAFTER_HYBRID || drafter == SP_DRAFTER_ADAPTIVE) {
        p.draft_k = 8;
        p.n_branching = 4;
        const int32_t b[4] = {4, 2, 2, 1};
        memcpy(p.branching, b, sizeof b);
        p.max_nodes = 24;
        p.plan = true;
    }
    return p;
}

void sp_generator_free(sp_generator *g) {
    if (!g) return;
    sp_sampler_free(g->sampler);
    sp_drafter_free(&g->d);
    sp_planner_free(&g->pl);
    sp_gate_free(&g->gate);
    free(g->accepted);
    free(g->par);
    free(g->pos);
    free(g->depth);
    free(g->mask);
    free(g->kids);
    free(g->path);
    free(g->keep);
    free(g->logits);
    free(g->ids);
    free(g->probs);
    free(g->batch);
    free(g->ctx);
    free(g->tail);
    free(g);
}

static sp_status check_params(const sp_session *ses, const sp_generator_params *p) {
    if (p->max_tokens < 0) return sp_fail(SP_ERR_INVALID_ARG, "generator: max_tokens must be >= 0 (got %d)", p->max_tokens);
    const sp_drafter_kind k = p->drafter;
    if (k < SP_DRAFTER_NONE || k > SP_DRAFTER_ADAPTIVE)
        return sp_fail(SP_ERR_INVALID_ARG, "generator: drafter must be SP_DRAFTER_NONE .. SP_DRAFTER_ADAPTIVE "
                       "(0..5, got %d)", (int)k);
    const bool hybrid = k == SP_DRAFTER_HYBRID || k == SP_DRAFTER_ADAPTIVE;
    if (k == SP_DRAFTER_ADAPTIVE &&
        !(1 <= p->probe_every && p->probe_every <= p->max_probe_every && p->learn_every >= 1))
        return sp_fail(SP_ERR_INVALID_ARG, "generator: the adaptive drafter needs 1 <= probe_every <= "
                       "max_probe_every and learn_every >= 1 (got %d, %d, %d)", p->probe_every, p->max_probe_every,
                       p->learn_every);
    const int32_t nb = ses->params.n_batch, V = ses->model->hp.n_vocab;
    if (k != SP_DRAFTER_NONE && nb < 2)
        return sp_fail(SP_ERR_INVALID_ARG, "generator: a drafter's tokens are verified with their root in one batch: "
                       "the session's n_batch must be >= 2 (got %d)", nb);
    if ((k == SP_DRAFTER_PROMPT_LOOKUP || hybrid) &&
        !(1 <= p->min_ngram && p->min_ngram <= p->ngram && p->ngram <= SP_GEN_MAX_NGRAM))
        return sp_fail(SP_ERR_INVALID_ARG, "generator: prompt lookup needs 1 <= min_ngram <= ngram <= %d (got "
                       "min_ngram %d, ngram %d)", SP_GEN_MAX_NGRAM, p->min_ngram, p->ngram);
    if ((k == SP_DRAFTER_PROMPT_LOOKUP || hybrid || k == SP_DRAFTER_DRAFT_MODEL) &&
        (p->draft_k < 1 || p->draft_k > nb - 1))
        return sp_fail(SP_ERR_INVALID_ARG, "generator: draft_k must be 1..n_batch - 1 = %d (got %d)", nb - 1,
                       p->draft_k);
    if (k == SP_DRAFTER_RECYCLING || hybrid) {
        if (p->recycling_k < 1 || p->recycling_k > SP_MIN(SP_GEN_MAX_RECYCLING_K, V))
            return sp_fail(SP_ERR_INVALID_ARG, "generator: recycling_k must be 1..%d (got %d)",
                           SP_MIN(SP_GEN_MAX_RECYCLING_K, V), p->recycling_k);
        if (p->n_branching < 1 || p->n_branching > SP_GEN_MAX_DEPTH)
            return sp_fail(SP_ERR_INVALID_ARG, "generator: n_branching must be 1..%d (got %d)", SP_GEN_MAX_DEPTH,
                           p->n_branching);
        for (int32_t i = 0; i < p->n_branching; i++)
            if (p->branching[i] < 1 || p->branching[i] > p->recycling_k)
                return sp_fail(SP_ERR_INVALID_ARG, "generator: branching[%d] must be 1..recycling_k = %d (got %d)", i,
                               p->recycling_k, p->branching[i]);
        if (p->max_nodes < 1 || p->max_nodes > nb - 1)
            return sp_fail(SP_ERR_INVALID_ARG, "generator: max_nodes must be 1..n_batch - 1 = %d (got %d)", nb - 1,
                           p->max_nodes);
    }
    if (p->n_stop < 0 || p->n_stop > SP_GEN_MAX_STOP)
        return sp_fail(SP_ERR_INVALID_ARG, "generator: n_stop must be 0..%d (got %d)", SP_GEN_MAX_STOP, p->n_stop);
    for (int32_t i = 0; i < p->n_stop; i++) {
        if (!p->stop[i]) return sp_fail(SP_ERR_INVALID_ARG, "generator: stop[%d] is NULL", i);
        const size_t n = strnlen(p->stop[i], SP_GEN_MAX_STOP_LEN + 1);
        if (n == 0 || n > SP_GEN_MAX_STOP_LEN)
            return sp_fail(SP_ERR_INVALID_ARG, "generator: stop[%d] must be 1..%d bytes (got %s)", i,
                           SP_GEN_MAX_STOP_LEN, n == 0 ? "an empty string" : "a longer one");
    }
    return SP_OK;
}

/* Draft nodes per step at most. */
static int32_t max_draft_nodes(const sp_generator_params *p, int32_t n_batch) {
    switch (p->drafter) {
    case SP_DRAFTER_PROMPT_LOOKUP:
    case SP_DRAFTER_DRAFT_MODEL: return p->draft_k;
    case SP_DRAFTER_RECYCLING: return p->max_nodes;
    case SP_DRAFTER_HYBRID:
    case SP_DRAFTER_ADAPTIVE: return n_batch - 1;
    default: return 0;
    }
}

sp_status sp_generator_new(sp_session *ses, const sp_generator_params *params, sp_generator **out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_new: out is NULL");
    *out = NULL;
    if (!ses || !params) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_new: NULL argument");
    sp_status st = check_params(ses, params);
    if (st != SP_OK) return st;
    sp_generator *g = calloc(1, sizeof *g);
    if (!g) return sp_fail(SP_ERR_NO_MEMORY, "generator: out of memory");
    g->ses = ses;
    g->model = ses->model;
    g->p = *params;
    g->V = g->model->hp.n_vocab;
    g->n_ctx = ses->params.n_ctx;
    g->K = max_draft_nodes(params, ses->params.n_batch);
    g->n_past_left = -1;
    g->done = SP_GEN_RUNNING;
    for (int32_t i = 0; i < params->n_stop; i++) {
        g->stop_len[i] = strlen(params->stop[i]);
        memcpy(g->stop[i], params->stop[i], g->stop_len[i] + 1);
        g->p.stop[i] = g->stop[i];
    }
    for (int32_t i = params->n_stop; i < SP_GEN_MAX_STOP; i++) g->p.stop[i] = NULL;
    st = sp_sampler_new(params->sampler, g->V, &g->sampler);
    if (st == SP_OK) st = sp_drafter_init(&g->d, params, ses);
    g->use_gate = params->drafter == SP_DRAFTER_ADAPTIVE;
    g->use_plan = g->use_gate || (params->plan && (params->drafter == SP_DRAFTER_RECYCLING ||
                                                   params->drafter == SP_DRAFTER_HYBRID));
    if (st == SP_OK && g->use_plan) st = sp_planner_init(&g->pl, g->K + 1);
    if (st == SP_OK && g->use_gate) st = sp_gate_init(&g->gate, g->n_ctx, params->probe_every,
                                                       params->max_probe_every);
    if (st != SP_OK) {
        sp_generator_free(g);
        return st;
    }
    const size_t T = (size_t)g->K + 1, V = (size_t)g->V;
    g->logits = malloc(T * V * sizeof *g->logits);
    g->ids = malloc(V * sizeof *g->ids);
    g->probs = malloc(V * sizeof *g->probs);
    g->batch = malloc(T * sizeof *g->batch);
    g->par = malloc(T * sizeof *g->par);
    g->pos = malloc(T * sizeof *g->pos);
    g->depth = malloc(T * sizeof *g->depth);
    g->mask = malloc(T * T);
    g->kids = malloc(T * sizeof *g->kids);
    g->path = malloc(T * sizeof *g->path);
    g->keep = malloc((size_t)g->n_ctx * sizeof *g->keep);
    g->accepted = malloc(T * sizeof *g->accepted);
    g->ctx = malloc(((size_t)g->n_ctx + 2) * sizeof *g->ctx);
    if (params->n_stop > 0) {
        /* room for the longest token's text after the last SP_GEN_MAX_STOP_LEN - 1 bytes */
        size_t longest = 0;
        for (int32_t t = 0; t < g->V; t++) {
            size_t n = 0;
            sp_token_to_piece(g->model, t, false, NULL, 0, &n);
            if (n > longest) longest = n;
        }
        sp_clear_error();
        g->tail_cap = SP_GEN_MAX_STOP_LEN + longest;
        g->tail = malloc(g->tail_cap);
    }
    if (!g->logits || !g->ids || !g->probs || !g->batch || !g->par || !g->pos || !g->depth || !g->mask || !g->kids ||
        !g->path || !g->keep || !g->accepted || !g->ctx || (params->n_stop > 0 && !g->tail)) {
        sp_generator_free(g);
        return sp_fail(SP_ERR_NO_MEMORY, "generator: out of memory (n_vocab %d, n_ctx %d)", (int)V, g->n_ctx);
    }
    *out = g;
    return SP_OK;
}

/* One call at a time per generator. */
static sp_status enter(sp_generator *g, const char *what) {
    return sp_claim(&g->busy, what, "generator", "give each thread its own session and generator");
}

static sp_status leave(sp_generator *g, sp_status st) { return sp_release(&g->busy, st); }

/* ---- start ---- */

static sp_status start_checked(sp_generator *g, const int32_t *prompt, int32_t n) {
    if (!prompt || n < 1) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_start: the prompt needs at least one token");
    for (int32_t i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= g->V)
            return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_start: prompt token %d at index %d is outside the "
                           "vocabulary [0, %d)", prompt[i], i, g->V);
    if (n > g->n_ctx)
        return sp_fail(SP_ERR_CONTEXT_FULL, "sp_generator_start: the prompt has %d tokens, the context holds %d", n,
                       g->n_ctx);
    sp_session *ses = g->ses;
    /* Reuse the prefix this generator left in the cache (never the last prompt token: it is the first root). */
    const int32_t cached = sp_session_n_past(ses);
    int32_t common = 0;
    if (g->started && cached == g->n_past_left && cached <= g->ctx_len) {
        const int32_t lim = SP_MIN(cached, n - 1);
        while (common < lim && g->ctx[common] == prompt[common]) common++;
    }
    g->started = false;  /* until the prompt is in */
    g->n_past_left = -1;
    sp_status st = sp_session_truncate(ses, common);
    if (st != SP_OK) return st;
    const int32_t nb = ses->params.n_batch;
    for (int32_t i = common; i < n - 1; i += nb) {
        sp_batch b = {.tokens = prompt + i, .n_tokens = SP_MIN(nb, n - 1 - i)};
        st = sp_eval(ses, &b);
        if (st != SP_OK) return st;
    }
    g->stats.prompt_tokens += n - 1 - common;
    memcpy(g->ctx, prompt, (size_t)n * sizeof *prompt);
    g->ctx_len = n;
    g->q_next = n;
    g->n_gen = 0;
    g->tail_len = 0;
    g->done = g->pending = SP_GEN_RUNNING;
    g->failed = false;
    sp_sampler_reset(g->sampler);  /* from its seed, with the prompt as its history */
    for (int32_t i = 0; i < n; i++) sp_sampler_accept(g->sampler, prompt[i]);
    if (g->use_gate) sp_gate_begin(&g->gate, g->ctx, g->ctx_len);
    g->n_past_left = sp_session_n_past(ses);
    g->started = true;
    return SP_OK;
}

sp_status sp_generator_start(sp_generator *g, const int32_t *prompt, int32_t n_prompt) {
    sp_clear_error();
    if (!g) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_start: generator is NULL");
    sp_status st = enter(g, "sp_generator_start");
    return st != SP_OK ? st : leave(g, start_checked(g, prompt, n_prompt));
}

/* ---- one step ---- */

/* The target's choice at node u's row given its children kids[0..nk) (batch indices): *x the token, *child the child
 * holding it or -1. Greedy (or a single survivor): the argmax. Sampling: recursive rejection, each child's token
 * accepted with its probability under what the earlier rejected siblings left (they drop out, the rest renormalised);
 * when none is, the token is drawn from the rest. For one child: accepted with probability p(d), else drawn from p
 * without d. */
static sp_status choose(sp_generator *g, const float *row, const int32_t *kids, int32_t nk, int32_t *x,
                        int32_t *child) {
    int32_t K = 0;
    *child = -1;
    sp_status st = sp_sampler_candidates(g->sampler, row, g->V, g->ids, g->probs, &K);
    if (st != SP_OK) return st;
    if (K == 1) {  /* greedy, or a single survivor: no draw */
        *x = g->ids[0];
        for (int32_t j = 0; j < nk && *child < 0; j++)
            if (g->batch[kids[j]] == *x) *child = kids[j];
        return SP_OK;
    }
    double mass = 0.0;
    for (int32_t i = 0; i < K; i++) mass += g->probs[i];
    for (int32_t j = 0; j < nk && mass > 0.0; j++) {
        const int32_t d = g->batch[kids[j]];
        int32_t i = 0;
        while (i < K && g->ids[i] != d) i++;
        if (i == K || g->probs[i] <= 0.0f) continue;  /* probability 0 (or a sibling's token, rejected): never taken */
        if (sp_sampler_uniform(g->sampler) * mass < g->probs[i]) {
            *x = d;
            *child = kids[j];
            return SP_OK;
        }
        mass -= g->probs[i];
        g->probs[i] = 0.0f;
        if (mass <= 1e-12) {  /* rounding: recount what is left */
            mass = 0.0;
            for (int32_t r = 0; r < K; r++) mass += g->probs[r];
        }
    }
    /* every child rejected: draw from what is left */
    const double u = sp_sampler_uniform(g->sampler) * mass;
    double cum = 0.0;
    int32_t last = -1;
    for (int32_t i = 0; i < K; i++) {
        if (g->probs[i] <= 0.0f) continue;
        cum += g->probs[i];
        last = i;
        if (u < cum) break;
    }
    if (last < 0) return sp_fail(SP_ERR_INTERNAL, "generator: no token left after rejecting the drafts");
    *x = g->ids[last];  /* also the fallback when rounding leaves u >= the summed mass */
    return SP_OK;
}

/* The mask and positions of a tree (node i's parent par[i-1]) of T tokens over n_past0 cached ones. */
static void tree_mask(sp_generator *g, int32_t T, int32_t n_past0) {
    uint8_t *m = g->mask;
    memset(m, 0, (size_t)T * (size_t)T);
    m[0] = 1;
    g->depth[0] = 0;
    g->pos[0] = n_past0;
    for (int32_t i = 1; i < T; i++) {
        const int32_t p = g->par[i - 1];
        memcpy(m + (size_t)i * T, m + (size_t)p * T, (size_t)i);
        m[(size_t)i * T + i] = 1;
        g->depth[i] = g->depth[p] + 1;
        g->pos[i] = n_past0 + g->depth[i];
    }
}

/* Append a decided token to the context (and the gate's suffix match). */
static void push_token(sp_generator *g, int32_t x) {
    sp_sampler_accept(g->sampler, x);
    g->ctx[g->ctx_len++] = x;
    if (g->use_gate) sp_gate_push(&g->gate, g->ctx, g->ctx_len);
}

static sp_status step(sp_generator *g) {
    sp_session *ses = g->ses;
    const double t0 = sp_now_s(), draft0 = g->d.draft_eval_s;
    const int32_t n_past0 = sp_session_n_past(ses);
    if (n_past0 != g->n_past_left || n_past0 != g->ctx_len - 1)
        return sp_fail(SP_ERR_INVALID_ARG, "generator: the session's KV cache was changed outside the generator "
                       "(n_past %d, expected %d): start the generation again", n_past0, g->ctx_len - 1);
    /* the adaptive drafter's gate may choose a plain decoding step: no draft, no planner */
    const bool plain = g->use_gate && !sp_gate_drafts(&g->gate), plan = g->use_plan && !plain;
    const int32_t arm = g->use_gate ? g->gate.arm : 0;
    const double bytes0 = plan ? sp_session_expert_bytes(ses) : 0.0;
    const int32_t room = g->n_ctx - n_past0;  /* slots for the root and the drafts */
    const int32_t budget = plain ? 0 : SP_MIN(g->K, room - 1);
    int32_t N = 0;
    sp_status st = sp_drafter_propose(&g->d, g->ctx, g->ctx_len, budget, g->batch + 1, g->par, &N);
    g->stats.draft_eval_s += g->d.draft_eval_s - draft0;
    if (st != SP_OK) return st;  /* the target's cache is untouched */
    if (plan) sp_planner_plan(&g->pl, g->batch + 1, g->par, &N);
    g->batch[0] = g->ctx[g->ctx_len - 1];
    const int32_t T = N + 1;
    bool is_chain = true;
    for (int32_t i = 0; i < N; i++) is_chain = is_chain && g->par[i] == i;
    if (!is_chain) tree_mask(g, T, n_past0);
    sp_batch b = {.tokens = g->batch, .n_tokens = T, .logits = g->logits, .logits_last_only = N == 0,
                  .pos = is_chain ? NULL : g->pos, .mask = is_chain ? NULL : g->mask};
    const double t1 = sp_now_s();
    st = sp_eval(ses, &b);
    const double t2 = sp_now_s();
    if (st != SP_OK) return st;  /* nothing changed */
    const size_t V = (size_t)g->V;
    int32_t n_path = 1, u = 0;
    g->path[0] = 0;
    for (;;) {
        const float *row = g->logits + (size_t)u * V;
        int32_t nk = 0, x, child = -1;
        for (int32_t v = u + 1; v < T; v++)
            if (g->par[v - 1] == u) g->kids[nk++] = v;
        if (nk > 0) st = choose(g, row, g->kids, nk, &x, &child);
        else st = sp_sampler_sample(g->sampler, row, &x);
        if (st != SP_OK) { /* roll the cache back, keeping the sampler's message (truncate clears it) */
            char why[512];
            snprintf(why, sizeof why, "%s", sp_last_error());
            g->failed = true;
            sp_session_truncate(ses, n_past0);
            g->n_past_left = n_past0;
            return sp_fail(st, "%s", why);
        }
        push_token(g, x);
        if (child < 0) break;
        g->path[n_path++] = u = child;
    }
    if (N > 0) {
        bool prefix = true;  /* the path is batch slots 0, 1, .., n_path - 1 */
        for (int32_t j = 0; j < n_path; j++) prefix = prefix && g->path[j] == j;
        if (prefix) {
            st = sp_session_truncate(ses, n_past0 + n_path);
        } else {
            for (int32_t i = 0; i < n_past0; i++) g->keep[i] = i;
            for (int32_t j = 0; j < n_path; j++) g->keep[n_past0 + j] = n_past0 + g->path[j];
            st = sp_session_keep(ses, g->keep, n_past0 + n_path);
        }
        if (st != SP_OK) {
            g->failed = true;
            return st;
        }
    }
    /* Token Recycling learns from every verified row; on the gate's plain steps from every learn_every-th one, and
     * from every one whose root it has no candidates for */
    if (!plain) {
        sp_drafter_observe(&g->d, g->batch, T, g->logits);
    } else if (++g->plain_learn >= g->p.learn_every || g->d.adj[(size_t)g->batch[0] * (size_t)g->d.R] < 0) {
        g->plain_learn = 0;
        sp_drafter_observe(&g->d, g->batch, 1, g->logits);
    }
    const double t3 = sp_now_s();
    if (plan) {
        for (int32_t i = 0; i < N; i++) g->accepted[i] = false;
        for (int32_t j = 1; j < n_path; j++) g->accepted[g->path[j] - 1] = true;
        sp_planner_observe(&g->pl, g->par, g->accepted, T, sp_session_expert_bytes(ses) - bytes0, t3 - t0);
    }
    if (plain) sp_gate_plain(&g->gate, t3 - t0);
    else if (g->use_gate) sp_gate_observe(&g->gate, arm, n_path, sp_now_s() - t0, plan && g->pl.explored);
    g->n_past_left = sp_session_n_past(ses);
    g->stats.steps++;
    g->stats.plain_steps += plain;
    g->stats.drafted += N;
    g->stats.accepted += n_path - 1;
    g->stats.eval_s += t2 - t1;
    g->stats.loop_s += (t1 - t0) + (sp_now_s() - t2);
    return SP_OK;
}

/* Append a returned token's text to the tail and say whether the text now ends with a stop string (checked only where
 * a match ends inside the new bytes). */
static bool stop_string_hit(sp_generator *g, int32_t token) {
    if (g->p.n_stop == 0) return false;
    const size_t old = g->tail_len;
    size_t n = 0;
    if (sp_token_to_piece(g->model, token, false, g->tail + old, g->tail_cap - old, &n) != SP_OK) n = 0;
    sp_clear_error();
    const size_t len = old + n;
    bool hit = false;
    for (int32_t s = 0; s < g->p.n_stop && !hit && n > 0; s++) {
        const size_t sl = g->stop_len[s];
        if (sl > len) continue;
        for (size_t at = old + 1 > sl ? old + 1 - sl : 0; at + sl <= len; at++)
            if (memcmp(g->tail + at, g->stop[s], sl) == 0) {
                hit = true;
                break;
            }
    }
    /* keep the last SP_GEN_MAX_STOP_LEN - 1 bytes: a later match can start there at the earliest */
    const size_t keep = SP_MIN(len, (size_t)SP_GEN_MAX_STOP_LEN - 1);
    memmove(g->tail, g->tail + len - keep, keep);
    g->tail_len = keep;
    return hit;
}

static sp_status next_checked(sp_generator *g, int32_t *token, sp_gen_stop *stop) {
    *token = -1;
    if (!g->started) return sp_fail(SP_ERR_INVALID_ARG, "generator: no generation started (sp_generator_start)");
    if (g->failed) return sp_fail(SP_ERR_INVALID_ARG, "generator: the generation failed earlier: start it again");
    if (g->done == SP_GEN_RUNNING && g->pending != SP_GEN_RUNNING) g->done = g->pending;
    if (g->done == SP_GEN_RUNNING && g->n_gen >= g->p.max_tokens) g->done = SP_GEN_MAX_TOKENS;
    if (g->done == SP_GEN_RUNNING && g->q_next == g->ctx_len) {
        if (g->n_ctx - sp_session_n_past(g->ses) <= 0) {
            g->done = SP_GEN_CONTEXT_FULL;
        } else {
            sp_status st = step(g);
            if (st != SP_OK) return st;
        }
    }
    if (g->done != SP_GEN_RUNNING) {
        *stop = g->done;
        return SP_OK;
    }
    const int32_t tok = g->ctx[g->q_next++];
    if (g->p.stop_at_eog && sp_token_is_eog(g->model, tok)) {
        g->done = SP_GEN_EOG;
        *stop = g->done;
        return SP_OK;
    }
    g->n_gen++;
    g->stats.tokens++;
    if (stop_string_hit(g, tok)) g->pending = SP_GEN_STOP_STRING;
    else if (g->n_gen >= g->p.max_tokens) g->pending = SP_GEN_MAX_TOKENS;
    else if (g->q_next - 1 >= g->n_ctx) g->pending = SP_GEN_CONTEXT_FULL;
    *token = tok;
    *stop = SP_GEN_RUNNING;
    return SP_OK;
}

sp_status sp_generate_next(sp_generator *g, int32_t *token, sp_gen_stop *stop) {
    sp_clear_error();
    if (!g || !token) return sp_fail(SP_ERR_INVALID_ARG, "sp_generate_next: NULL argument");
    sp_gen_stop dummy;
    sp_status st = enter(g, "sp_generate_next");
    return st != SP_OK ? st : leave(g, next_checked(g, token, stop ? stop : &dummy));
}

sp_status sp_generate(sp_generator *g, sp_token_callback cb, void *user_data, sp_gen_stop *stop) {
    sp_clear_error();
    if (!g) return sp_fail(SP_ERR_INVALID_ARG, "sp_generate: generator is NULL");
    sp_status st = enter(g, "sp_generate");
    if (st != SP_OK) return st;
    sp_gen_stop why = SP_GEN_RUNNING;
    for (;;) {
        int32_t tok;
        st = next_checked(g, &tok, &why);
        if (st != SP_OK || why != SP_GEN_RUNNING) break;
        if (cb && !cb(tok, user_data)) {
            g->done = why = SP_GEN_CALLBACK;
            break;
        }
    }
    if (stop) *stop = why;
    return leave(g, st);
}

sp_status sp_generator_get_stats(const sp_generator *g, sp_generator_stats *out) {
    sp_clear_error();
    if (!g || !out) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_get_stats: NULL argument");
    *out = g->stats;
    if (g->use_plan) {
        out->plan_steps = g->pl.steps;
        out->plan_candidates = g->pl.candidates;
        out->plan_kept = g->pl.kept;
        out->cost_step_s = g->pl.coef[0];
        out->cost_token_s = g->pl.coef[1];
        out->cost_expert_byte_s = g->pl.coef[2];
    }
    for (int a = 0; a < 3 && g->use_gate; a++) {
        out->gate_drafting[a] = g->gate.on[a];
        out->gate_probes[a] = g->gate.probes[a];
        out->gate_paid[a] = g->gate.paid[a];
    }
    return SP_OK;
}

void sp_generator_reset_stats(sp_generator *g) {
    if (g) memset(&g->stats, 0, sizeof g->stats);
}

int32_t sp_generator_context(const sp_generator *g, const int32_t **tokens) {
    if (!g || !g->started) {
        if (tokens) *tokens = NULL;
        return 0;
    }
    if (tokens) *tokens = g->ctx;
    return g->ctx_len;
}

/* ---- the drafter's state ---- */

static sp_status state_check(const sp_generator *g, const char *path, const char *what) {
    if (!path || !*path) return sp_fail(SP_ERR_INVALID_ARG, "%s: the path is empty", what);
    if (!sp_drafter_has_state(&g->d))
        return sp_fail(SP_ERR_INVALID_ARG, "%s: only the recycling, hybrid and adaptive drafters have a state (Token Recycling's "
                       "matrix)", what);
    return SP_OK;
}

sp_status sp_generator_save_drafter(const sp_generator *gen, const char *path) {
    sp_clear_error();
    if (!gen) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_save_drafter: generator is NULL");
    sp_generator *g = (sp_generator *)gen;  /* for the claim only: nothing else is written */
    sp_status st = enter(g, "sp_generator_save_drafter");
    if (st != SP_OK) return st;
    st = state_check(g, path, "sp_generator_save_drafter");
    if (st == SP_OK) st = sp_drafter_save(&g->d, path);
    return leave(g, st);
}

sp_status sp_generator_load_drafter(sp_generator *g, const char *path) {
    sp_clear_error();
    if (!g) return sp_fail(SP_ERR_INVALID_ARG, "sp_generator_load_drafter: generator is NULL");
    sp_status st = enter(g, "sp_generator_load_drafter");
    if (st != SP_OK) return st;
    st = state_check(g, path, "sp_generator_load_drafter");
    if (st == SP_OK) st = sp_drafter_load(&g->d, path);
    return leave(g, st);
}
