/* plan.c: the tree planner and the draft gate of the C generator (see plan.h and runtime/planner.py). Nothing here
 * allocates after init. */
#include "plan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { EXPLORE_EVERY = 16, MIN_SIZES = 3 };
static const double PRIOR_WEIGHT = 2.0;
static const int32_t SCHEDULE[4] = {1, 0, 2, 4};   /* node counts while the cost model warms up */
static const double AROUND[3] = {2.0, 0.5, 1.5};   /* multiples of (chosen size + 1) when exploring later */

/* ---- planner ---- */

void sp_planner_free(sp_planner *pl) {
    if (!pl) return;
    free(pl->key_parent);
    free(pl->key_rank);
    free(pl->slots);
    free(pl->trials);
    free(pl->hits);
    free(pl->union_B);
    free(pl->union_T);
    free(pl->sum_B);
    free(pl->cnt);
    free(pl->key);
    free(pl->p);
    free(pl->order);
    free(pl->keep_key);
    free(pl->new_index);
    memset(pl, 0, sizeof *pl);
}

sp_status sp_planner_init(sp_planner *pl, int32_t max_tokens) {
    memset(pl, 0, sizeof *pl);
    pl->TM = max_tokens;
    const size_t K = SP_PLAN_MAX_KEYS, T = (size_t)max_tokens + 1;
    pl->key_parent = malloc(K * sizeof *pl->key_parent);
    pl->key_rank = malloc(K * sizeof *pl->key_rank);
    pl->slots = calloc(2 * K, sizeof *pl->slots);
    pl->trials = calloc(K, sizeof *pl->trials);
    pl->hits = calloc(K, sizeof *pl->hits);
    pl->union_B = malloc(T * sizeof *pl->union_B);
    pl->union_T = malloc(T * sizeof *pl->union_T);
    pl->sum_B = malloc(T * sizeof *pl->sum_B);
    pl->cnt = malloc(T * sizeof *pl->cnt);
    pl->key = malloc(T * sizeof *pl->key);
    pl->p = malloc(T * sizeof *pl->p);
    pl->order = malloc(T * sizeof *pl->order);
    pl->keep_key = malloc(T * sizeof *pl->keep_key);
    pl->new_index = malloc(T * sizeof *pl->new_index);
    if (!pl->key_parent || !pl->key_rank || !pl->slots || !pl->trials || !pl->hits || !pl->union_B ||
        !pl->union_T || !pl->sum_B || !pl->cnt || !pl->key || !pl->p || !pl->order || !pl->keep_key ||
        !pl->new_index) {
        sp_planner_free(pl);
        return sp_fail(SP_ERR_NO_MEMORY, "generator: out of memory for the tree planner");
    }
    pl->key_parent[0] = -1; /* key 0: the root's empty path */
    pl->key_rank[0] = 0;
    pl->n_keys = 1;
    return SP_OK;
}

/* The key of (parent key, rank), interned; -1 when the key space is full (that node then learns nothing). */
static int32_t intern(sp_planner *pl, int32_t parent, int32_t rank) {
    if (parent < 0) return -1;
    const uint32_t mask = 2 * SP_PLAN_MAX_KEYS - 1;
    uint32_t h = ((uint32_t)parent * 2654435761u) ^ ((uint32_t)rank * 40503u);
    for (uint32_t i = h & mask;; i = (i + 1) & mask) {
        const int32_t id = pl->slots[i] - 1;
        if (id < 0) {
            if (pl->n_keys >= SP_PLAN_MAX_KEYS) return -1;
            const int32_t k = pl->n_keys++;
            pl->key_parent[k] = parent;
            pl->key_rank[k] = rank;
            pl->slots[i] = k + 1;
            return k;
        }
        if (pl->key_parent[id] == parent && pl->key_rank[id] == rank) return id;
    }
}

static double q_of(const sp_planner *pl, int32_t key, int32_t rank) {
    const double q0 = 0.5 / (rank + 1);
    if (key < 0) return q0;
    return ((double)pl->hits[key] + PRIOR_WEIGHT * q0) / ((double)pl->trials[key] + PRIOR_WEIGHT);
}

/* The expected expert bytes of a verification of T tokens: the measured mean per size, linearly interpolated, held
 * at the first below it, extended along the last slope above the largest (0 before any fit). */
static double union_bytes(const sp_planner *pl, double T) {
    const int32_t m = pl->n_union;
    if (m == 0) return 0.0;
    const int32_t *x = pl->union_T;
    const double *y = pl->union_B;
    if (T <= x[0]) return y[0];
    if (T >= x[m - 1]) {
        if (m < 2) return y[m - 1];
        const double slope = fmax(0.0, (y[m - 1] - y[m - 2]) / (x[m - 1] - x[m - 2]));
        return y[m - 1] + slope * (T - x[m - 1]);
    }
    int32_t j = 1;
    while (x[j] < T) j++;
    return y[j - 1] + (y[j] - y[j - 1]) * (T - x[j - 1]) / (x[j] - x[j - 1]);
}

static double step_time(const sp_planner *pl, double T) {
    return pl->coef[0] + pl->coef[1] * T + pl->coef[2] * union_bytes(pl, T);
}

static bool ready(const sp_planner *pl) { return pl->n_union >= MIN_SIZES && pl->coef[0] + pl->coef[1] > 0; }

/* Least squares of y on the columns `cols` (a bit set of 3) of X [S, 3] via the normal equations; false when they
 * are singular. */
static bool lstsq(const double (*X)[3], const double *y, int32_t S, unsigned cols, double *c) {
    int idx[3], k = 0;
    for (int j = 0; j < 3; j++)
        if (cols >> j & 1) idx[k++] = j;
    double A[3][4] = {{0}};
    for (int32_t s = 0; s < S; s++)
        for (int a = 0; a < k; a++) {
            for (int b = 0; b < k; b++) A[a][b] += X[s][idx[a]] * X[s][idx[b]];
            A[a][k] += X[s][idx[a]] * y[s];
        }
    for (int col = 0; col < k; col++) { /* Gauss-Jordan with partial pivoting */
        int piv = col;
        for (int r = col + 1; r < k; r++)
            if (fabs(A[r][col]) > fabs(A[piv][col])) piv = r;
        if (fabs(A[piv][col]) < 1e-12 * (1.0 + fabs(A[col][col]))) return false;
        for (int j = 0; j <= k; j++) {
            const double t = A[col][j];
            A[col][j] = A[piv][j];
            A[piv][j] = t;
        }
        for (int r = 0; r < k; r++) {
            if (r == col) continue;
            const double f = A[r][col] / A[col][col];
            for (int j = col; j <= k; j++) A[r][j] -= f * A[col][j];
        }
    }
    c[0] = c[1] = c[2] = 0.0;
    for (int a = 0; a < k; a++) c[idx[a]] = A[a][k] / A[a][a];
    return true;
}

/* Refit the cost model and the union curve to the observations in the window. */
static void fit(sp_planner *pl) {
    const int32_t S = pl->n_obs, TM = pl->TM;
    for (int32_t t = 0; t <= TM; t++) pl->sum_B[t] = 0.0, pl->cnt[t] = 0;
    bool any_B = false;
    for (int32_t s = 0; s < S; s++) {
        const int32_t T = SP_MIN(pl->obs_T[s], TM);
        pl->sum_B[T] += pl->obs_B[s];
        pl->cnt[T]++;
        any_B = any_B || pl->obs_B[s] > 0;
    }
    int32_t m = 0;
    for (int32_t t = 0; t <= TM; t++) m += pl->cnt[t] > 0;
    if (m < 2) return;
    pl->n_union = 0;
    for (int32_t t = 0; t <= TM; t++)
        if (pl->cnt[t]) {
            pl->union_T[pl->n_union] = t;
            pl->union_B[pl->n_union++] = pl->sum_B[t] / pl->cnt[t];
        }
    /* columns 1, T, B scaled to comparable magnitudes (bytes are ~1e6 times seconds per token) */
    double scale[3] = {1.0, 1e-30, 1e-30};
    for (int32_t s = 0; s < S; s++) {
        scale[1] = fmax(scale[1], fabs((double)pl->obs_T[s]));
        scale[2] = fmax(scale[2], fabs(pl->obs_B[s]));
    }
    double X[SP_PLAN_WINDOW][3];
    for (int32_t s = 0; s < S; s++) {
        X[s][0] = 1.0;
        X[s][1] = pl->obs_T[s] / scale[1];
        X[s][2] = pl->obs_B[s] / scale[2];
    }
    /* non-negative least squares for 3 columns: the best unconstrained fit over every subset whose coefficients
     * come out non-negative */
    double best[3] = {0, 0, 0}, best_err = 0.0;
    for (int32_t s = 0; s < S; s++) best_err += pl->obs_s[s] * pl->obs_s[s];
    for (unsigned cols = 1; cols < 8; cols++) {
        if ((cols & 4) && !any_B) continue;
        double c[3];
        if (!lstsq((const double (*)[3])X, pl->obs_s, S, cols, c) || c[0] < 0 || c[1] < 0 || c[2] < 0) continue;
        double err = 0.0;
        for (int32_t s = 0; s < S; s++) {
            const double r = X[s][0] * c[0] + X[s][1] * c[1] + X[s][2] * c[2] - pl->obs_s[s];
            err += r * r;
        }
        if (err < best_err) {
            best_err = err;
            memcpy(best, c, sizeof best);
        }
    }
    for (int j = 0; j < 3; j++) pl->coef[j] = best[j] / scale[j];
}

void sp_planner_plan(sp_planner *pl, int32_t *tok, int32_t *par, int32_t *n_io) {
    const int32_t N = SP_MIN(*n_io, pl->TM);
    pl->explored = false;
    pl->n_kept = 0;
    if (N == 0) {
        *n_io = 0;
        return;
    }
    /* keys (sibling ranks along the path) and path probabilities */
    int32_t *rank = pl->order; /* reused as per-parent child counters first */
    for (int32_t i = 0; i <= N; i++) rank[i] = 0;
    for (int32_t i = 0; i < N; i++) {
        const int32_t pb = par[i], r = rank[pb]++;
        const int32_t parent_key = pb == 0 ? 0 : pl->key[pb - 1];
        pl->key[i] = intern(pl, parent_key, r);
        pl->p[i] = (pb == 0 ? 1.0 : pl->p[pb - 1]) * q_of(pl, pl->key[i], r);
    }
    /* order: p descending, then batch index (insertion sort: N is small) */
    int32_t *order = pl->order;
    for (int32_t i = 0; i < N; i++) {
        int32_t j = i;
        while (j > 0 && pl->p[order[j - 1]] < pl->p[i]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    const bool warm = !ready(pl);
    const bool explore = warm || pl->steps % EXPLORE_EVERY == EXPLORE_EVERY - 1;
    int32_t n;
    if (warm) {
        n = SP_MIN(N, SCHEDULE[pl->sched++ % 4]);
    } else if (explore) {
        n = SP_MIN(N, (int32_t)nearbyint(AROUND[pl->around++ % 3] * (pl->last_choice + 1)) - 1);
        if (n < 0) n = 0;
    } else {
        double gain = 1.0, best = gain / step_time(pl, 1.0);
        n = 0;
        for (int32_t j = 0; j < N; j++) {
            gain += pl->p[order[j]];
            const double v = gain / step_time(pl, j + 2.0);
            if (v > best) best = v, n = j + 1;
        }
        pl->last_choice = n;
    }
    pl->explored = explore;
    pl->candidates += N;
    /* keep order[0..n) in batch order, renumbered (a subtree: every kept node's parent is kept) */
    for (int32_t i = 0; i <= N; i++) pl->new_index[i] = -1;
    pl->new_index[0] = 0;
    for (int32_t j = 0; j < n; j++) pl->new_index[order[j] + 1] = 1; /* marked */
    int32_t m = 0;
    for (int32_t i = 0; i < N; i++) {
        if (pl->new_index[i + 1] < 0) continue;
        const int32_t np = pl->new_index[par[i]];
        if (np < 0) { /* cannot happen (p never grows down a path); dropped to stay a tree */
            pl->new_index[i + 1] = -1;
            continue;
        }
        tok[m] = tok[i];
        par[m] = np;
        pl->keep_key[m] = pl->key[i];
        pl->new_index[i + 1] = ++m;
    }
    pl->n_kept = m;
    *n_io = m;
}

void sp_planner_observe(sp_planner *pl, const int32_t *par, const bool *accepted, int32_t T, double bytes,
                        double seconds) {
    for (int32_t i = 0; i < pl->n_kept; i++) {
        const int32_t k = pl->keep_key[i], pb = par[i];
        if (k < 0 || !(pb == 0 || accepted[pb - 1])) continue;
        pl->trials[k]++;
        pl->hits[k] += accepted[i];
    }
    pl->obs_T[pl->obs_next] = T;
    pl->obs_B[pl->obs_next] = bytes;
    pl->obs_s[pl->obs_next] = seconds;
    pl->obs_next = (pl->obs_next + 1) % SP_PLAN_WINDOW;
    if (pl->n_obs < SP_PLAN_WINDOW) pl->n_obs++;
    pl->steps++;
    pl->kept += pl->n_kept;
    if (!ready(pl) || pl->steps % 8 == 0) fit(pl);
}

/* ---- gate ---- */

static const double MARGIN = 1.03, ALPHA = 0.05, ALPHA_PROBE = 0.3;
enum { ARM1 = 2, ARM2 = 4, MIN_PLAIN = 2 };

void sp_gate_free(sp_gate *g) {
    if (!g) return;
    free(g->bkey);
    free(g->bval);
    memset(g, 0, sizeof *g);
}

sp_status sp_gate_init(sp_gate *g, int32_t n_ctx, int32_t probe_every, int32_t max_probe_every) {
    memset(g, 0, sizeof *g);
    g->probe_every = probe_every;
    g->max_probe_every = max_probe_every;
    for (int a = 0; a < 3; a++) g->interval[a] = probe_every;
    g->cap = 16;
    while (g->cap < 2 * (n_ctx + 2)) g->cap *= 2;
    g->bkey = calloc((size_t)g->cap, sizeof *g->bkey);
    g->bval = malloc((size_t)g->cap * sizeof *g->bval);
    if (!g->bkey || !g->bval) {
        sp_gate_free(g);
        return sp_fail(SP_ERR_NO_MEMORY, "generator: out of memory for the draft gate");
    }
    return SP_OK;
}

static int32_t *slot(sp_gate *g, int32_t a, int32_t b, bool insert) {
    const int64_t key = ((int64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    const uint32_t mask = (uint32_t)g->cap - 1;
    for (uint32_t i = ((uint32_t)a * 2654435761u ^ (uint32_t)b * 40503u) & mask;; i = (i + 1) & mask) {
        if (g->bkey[i] == key) return &g->bval[i];
        if (g->bkey[i] == 0) {
            if (!insert) return NULL;
            g->bkey[i] = key;
            return &g->bval[i];
        }
    }
}

static void set_arm(sp_gate *g) { g->arm = g->run < ARM1 ? 0 : g->run < ARM2 ? 1 : 2; }

void sp_gate_begin(sp_gate *g, const int32_t *ctx, int32_t L) {
    memset(g->bkey, 0, (size_t)g->cap * sizeof *g->bkey);
    for (int32_t i = 2; i < L; i++) *slot(g, ctx[i - 2], ctx[i - 1], true) = i;
    g->run = 0;
    if (L >= 2) {
        const int32_t *j = slot(g, ctx[L - 2], ctx[L - 1], false);
        if (j) g->run = 2, g->next = *j;
    }
    set_arm(g);
}

void sp_gate_push(sp_gate *g, const int32_t *ctx, int32_t L) {
    const int32_t t = ctx[L - 1];
    if (L >= 3) *slot(g, ctx[L - 3], ctx[L - 2], true) = L - 1;
    if (g->run && ctx[g->next] == t) {
        g->run++;
        g->next++;
    } else {
        const int32_t *j = L >= 2 ? slot(g, ctx[L - 2], t, false) : NULL;
        g->run = j ? 2 : 0;
        g->next = j ? *j : 0;
    }
    set_arm(g);
}

bool sp_gate_drafts(const sp_gate *g) {
    const int a = g->arm;
    return g->on[a] || (g->wait[a] <= 0 && g->n_plain >= MIN_PLAIN);
}

void sp_gate_plain(sp_gate *g, double seconds) {
    g->wait[g->arm]--;
    g->plain_s[g->plain_next] = seconds;
    g->plain_next = (g->plain_next + 1) % SP_GATE_WINDOW;
    if (g->n_plain < SP_GATE_WINDOW) g->n_plain++;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void sp_gate_observe(sp_gate *g, int32_t arm, int32_t tokens, double seconds, bool explored) {
    if (explored && g->unjudged < 4) {
        g->unjudged++;
        return;
    }
    g->unjudged = 0;
    double times[SP_GATE_WINDOW];
    memcpy(times, g->plain_s, (size_t)g->n_plain * sizeof *times);
    qsort(times, (size_t)g->n_plain, sizeof *times, cmp_double);
    const double median = g->n_plain ? times[g->n_plain / 2] : seconds;
    const double c = fmax(1.0, median > 0 ? seconds / median : 1.0);
    const double a = g->on[arm] ? ALPHA : ALPHA_PROBE;
    if (!g->on[arm]) { /* a probe: a new episode */
        g->ep_tok[arm] = g->ep_cost[arm] = 0.0;
        g->probes[arm]++;
    }
    if (!g->have_tok[arm]) {
        g->have_tok[arm] = true;
        g->tok[arm] = tokens;
        g->cost[arm] = c;
    } else {
        g->tok[arm] += a * (tokens - g->tok[arm]);
        g->cost[arm] += a * (c - g->cost[arm]);
    }
    g->ep_tok[arm] += tokens;
    g->ep_cost[arm] += c;
    g->on[arm] = g->tok[arm] > MARGIN * g->cost[arm];
    if (!g->on[arm]) { /* the episode ends */
        const bool paid = g->ep_tok[arm] > MARGIN * g->ep_cost[arm];
        if (paid) {
            g->paid[arm]++;
            g->interval[arm] = g->probe_every;
        }
        g->wait[arm] = g->interval[arm];
        if (!paid) g->interval[arm] = SP_MIN(2 * g->interval[arm], g->max_probe_every);
    }
}
