/* draft.c: the generator's drafters (see draft.h and sparrow.h's sp_drafter_kind). The same proposals as
 * runtime/drafters.py's PromptLookup, Recycling and Hybrid (tests/test_generate_native.py compares them). */
#include "draft.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool uses_recycling(sp_drafter_kind k) {
    return k == SP_DRAFTER_RECYCLING || k == SP_DRAFTER_HYBRID || k == SP_DRAFTER_ADAPTIVE;
}

void sp_drafter_free(sp_drafter *d) {
    if (!d) return;
    free(d->adj);
    free(d->rtok);
    free(d->rpar);
    free(d->rmap);
    free(d->dtok);
    free(d->dlogits);
    memset(d, 0, sizeof *d);
}

sp_status sp_drafter_init(sp_drafter *d, const sp_generator_params *p, const sp_session *target) {
    memset(d, 0, sizeof *d);
    d->kind = p->drafter;
    d->V = target->model->hp.n_vocab;
    d->ngram = p->ngram;
    d->min_ngram = p->min_ngram;
    d->chain_k = p->draft_k;
    const size_t V = (size_t)d->V;
    if (uses_recycling(d->kind)) {
        d->R = p->recycling_k;
        d->n_branching = p->n_branching;
        memcpy(d->branching, p->branching, sizeof d->branching);
        d->tree_nodes = p->max_nodes;
        d->adj = malloc(V * (size_t)d->R * sizeof *d->adj);
        const size_t n = (size_t)d->tree_nodes + 1;
        d->rtok = malloc(n * sizeof *d->rtok);
        d->rpar = malloc(n * sizeof *d->rpar);
        d->rmap = malloc(n * sizeof *d->rmap);
        if (!d->adj || !d->rtok || !d->rpar || !d->rmap) {
            sp_drafter_free(d);
            return sp_fail(SP_ERR_NO_MEMORY, "generator: out of memory for Token Recycling's matrix (%zu x %d)", V,
                           p->recycling_k);
        }
        for (size_t i = 0; i < V * (size_t)d->R; i++) d->adj[i] = -1;
    }
    if (d->kind == SP_DRAFTER_DRAFT_MODEL) {
        sp_session *ds = p->draft_session;
        if (!ds) return sp_fail(SP_ERR_INVALID_ARG, "generator: the draft model drafter needs draft_session");
        if (ds == target)
            return sp_fail(SP_ERR_INVALID_ARG, "generator: draft_session must be a session of its own, not the "
                           "target's");
        if (ds->model->hp.n_vocab != d->V)
            return sp_fail(SP_ERR_INVALID_ARG, "generator: the draft model has %d tokens, the target %d: a draft "
                           "model must share the target's vocabulary", ds->model->hp.n_vocab, d->V);
        d->ds = ds;
        d->dchanges = ds->n_changes - 1; /* unknown until the first proposal */
        d->dtok = malloc((size_t)ds->params.n_ctx * sizeof *d->dtok);
        d->dlogits = malloc(V * sizeof *d->dlogits);
        if (!d->dtok || !d->dlogits) {
            sp_drafter_free(d);
            return sp_fail(SP_ERR_NO_MEMORY, "generator: out of memory for the draft model's buffers");
        }
    }
    return SP_OK;
}

/* ---- proposals ---- */

/* Prompt lookup: the latest earlier occurrence of ctx's last n tokens (n = ngram .. min_ngram), and the up to k
 * tokens after it, into out. Returns how many. */
static int32_t prompt_lookup(const int32_t *ctx, int32_t L, int32_t ngram, int32_t min_ngram, int32_t k, int32_t *out) {
    for (int32_t n = SP_MIN(ngram, L - 1); n >= min_ngram; n--) {
        const int32_t *tail = ctx + L - n;
        for (int32_t j = L - n - 1; j >= 0; j--) {
            if (ctx[j] != tail[0] || memcmp(ctx + j, tail, (size_t)n * sizeof *ctx) != 0) continue;
            const int32_t from = j + n, m = SP_MIN(k, L - from);
            memcpy(out, ctx + from, (size_t)m * sizeof *out);
            return m;
        }
    }
    return 0;
}

static int32_t chain(int32_t *par, int32_t n) {
    for (int32_t i = 0; i < n; i++) par[i] = i;
    return n;
}

/* Token Recycling's tree below root, breadth-first: a node at depth dep gets the first branching[dep] known
 * candidates of its token (stopping at the first unknown one), up to cap nodes. */
static int32_t recycling_tree(const sp_drafter *d, int32_t root, int32_t cap, int32_t *tok, int32_t *par) {
    int32_t n = 0, lo = -1, hi = 0; /* the current level: nodes lo..hi-1 of tok, where -1 is the root */
    for (int32_t dep = 0; n < cap; dep++) {
        const int32_t b = d->branching[SP_MIN(dep, d->n_branching - 1)], first = n;
        for (int32_t u = lo; u < hi && n < cap; u++) {
            const int32_t *cand = d->adj + (size_t)(u < 0 ? root : tok[u]) * (size_t)d->R;
            for (int32_t c = 0; c < b && n < cap && cand[c] >= 0; c++) {
                tok[n] = cand[c];
                par[n] = u + 1; /* batch index: the root is 0 */
                n++;
            }
        }
        if (n == first) break;
        lo = first;
        hi = n;
    }
    return n;
}

/* The index of the node with this parent and token among tok/par[0..n), or -1. */
static int32_t find_node(const int32_t *tok, const int32_t *par, int32_t n, int32_t parent, int32_t token) {
    for (int32_t i = 0; i < n; i++)
        if (par[i] == parent && tok[i] == token) return i;
    return -1;
}

/* The lookup's chain, then the recycling tree merged in (a recycling node whose parent did not fit is dropped). */
static int32_t hybrid(sp_drafter *d, const int32_t *ctx, int32_t L, int32_t budget, int32_t *tok, int32_t *par) {
    int32_t n = chain(par, prompt_lookup(ctx, L, d->ngram, d->min_ngram, SP_MIN(d->chain_k, budget), tok));
    const int32_t rn = recycling_tree(d, ctx[L - 1], SP_MIN(d->tree_nodes, budget), d->rtok, d->rpar);
    d->rmap[0] = 0;
    for (int32_t i = 0; i < rn; i++) {
        const int32_t p = d->rmap[d->rpar[i]];
        d->rmap[i + 1] = -1;
        if (p < 0) continue;
        int32_t at = find_node(tok, par, n, p, d->rtok[i]);
        if (at < 0) {
            if (n >= budget) continue;
            tok[n] = d->rtok[i];
            par[n] = p;
            at = n++;
        }
        d->rmap[i + 1] = at + 1;
    }
    return n;
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* The draft model's greedy chain: its session catches up with ctx (the longest prefix its cache holds is kept; the
 * last token is always evaluated again, for its logits), then drafts k tokens, evaluating all but the last. */
static sp_status draft_model(sp_drafter *d, const int32_t *ctx, int32_t L, int32_t budget, int32_t *tok, int32_t *par,
                             int32_t *n) {
    sp_session *ds = d->ds;
    const int32_t C = ds->params.n_ctx, nb = ds->params.n_batch;
    const int32_t k = SP_MIN(SP_MIN(d->chain_k, budget), C - L);
    *n = 0;
    if (k <= 0) return SP_OK;
    /* what its cache holds is known only if nobody else changed it since the last proposal */
    const int32_t have = ds->n_changes == d->dchanges ? sp_session_n_past(ds) : 0;
    int32_t common = 0;
    while (common < have && common < L - 1 && d->dtok[common] == ctx[common]) common++;
    const double t0 = sp_now_s();
    sp_status st = sp_session_truncate(ds, common);
    for (int32_t i = common; st == SP_OK && i < L; i += nb) {
        const int32_t m = SP_MIN(nb, L - i);
        sp_batch b = {.tokens = ctx + i, .n_tokens = m, .logits = i + m == L ? d->dlogits : NULL,
                      .logits_last_only = true};
        st = sp_eval(ds, &b);
        if (st == SP_OK) memcpy(d->dtok + i, ctx + i, (size_t)m * sizeof *ctx);
    }
    for (int32_t j = 0; st == SP_OK && j < k; j++) {
        tok[j] = argmax(d->dlogits, d->V);
        par[j] = j;
        *n = j + 1;
        if (j + 1 == k) break;
        sp_batch b = {.tokens = tok + j, .n_tokens = 1, .logits = d->dlogits, .logits_last_only = true};
        st = sp_eval(ds, &b);
        if (st == SP_OK) d->dtok[L + j] = tok[j];
    }
    d->draft_eval_s += sp_now_s() - t0;
    d->dchanges = ds->n_changes;
    if (st != SP_OK) *n = 0;
    return st;
}

sp_status sp_drafter_propose(sp_drafter *d, const int32_t *ctx, int32_t L, int32_t budget, int32_t *tok, int32_t *par,
                             int32_t *n) {
    *n = 0;
    if (budget <= 0) return SP_OK;
    switch (d->kind) {
    case SP_DRAFTER_PROMPT_LOOKUP:
        *n = chain(par, prompt_lookup(ctx, L, d->ngram, d->min_ngram, SP_MIN(d->chain_k, budget), tok));
        return SP_OK;
    case SP_DRAFTER_RECYCLING:
        *n = recycling_tree(d, ctx[L - 1], SP_MIN(d->tree_nodes, budget), tok, par);
        return SP_OK;
    case SP_DRAFTER_HYBRID:
    case SP_DRAFTER_ADAPTIVE:
        *n = hybrid(d, ctx, L, budget, tok, par);
        return SP_OK;
    case SP_DRAFTER_DRAFT_MODEL:
        return draft_model(d, ctx, L, budget, tok, par, n);
    default:
        return SP_OK;
    }
}

void sp_drafter_observe(sp_drafter *d, const int32_t *batch, int32_t T, const float *logits) {
    if (!uses_recycling(d->kind)) return;
    for (int32_t i = 0; i < T; i++) /* a token twice in the batch: the later row wins, as in runtime/drafters.py */
        sp_top_k(logits + (size_t)i * (size_t)d->V, d->V, d->R, d->adj + (size_t)batch[i] * (size_t)d->R);
}

/* ---- Token Recycling's state on disk ---- */

bool sp_drafter_has_state(const sp_drafter *d) { return d->adj != NULL; }

sp_status sp_drafter_save(const sp_drafter *d, const char *path) {
    return sp_npy_save_i32(path, d->adj, d->V, d->R);
}

sp_status sp_drafter_load(sp_drafter *d, const char *path) {
    const size_t n = (size_t)d->V * (size_t)d->R;
    int32_t *tmp = malloc(n * sizeof *tmp);
    if (!tmp) return sp_fail(SP_ERR_NO_MEMORY, "load drafter state: out of memory");
    sp_status st = sp_npy_load_i32(path, tmp, d->V, d->R);
    for (size_t i = 0; st == SP_OK && i < n; i++)
        if (tmp[i] < -1 || tmp[i] >= d->V)
            st = sp_fail(SP_ERR_BAD_FORMAT, "%s: token id %d at row %zu is outside the vocabulary [0, %d) (and not "
                         "-1, none)", path, tmp[i], i / (size_t)d->R, d->V);
    if (st == SP_OK) memcpy(d->adj, tmp, n * sizeof *tmp);
    free(tmp);
    return st;
}
