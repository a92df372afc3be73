/*
 * sampler.c: choose the next token from logits[V].
 *
 * Shape legend: V = vocabulary size, K = candidates still in play, N = repeat_last_n (history length).
 *
 * The pipeline, in this order (each step can be turned off through sp_sampler_params):
 *   1. repetition penalty  each distinct token among the last N accepted: logit > 0 ? logit / penalty
 *                          : logit * penalty (llama.cpp semantics).
 *   2. greedy              temperature <= 0: argmax of the penalised logits, ties -> lowest id. Stop here.
 *   3. top-k               keep the k largest logits (ties -> lower id) with a size-k heap, O(V log k).
 *   4. softmax             p_i = exp((l_i - l_max) / temperature), kept unnormalised (p_max = 1), total Z.
 *   5. top-p               keep the shortest prefix of the sorted candidates whose mass reaches top_p * Z.
 *   6. min-p               keep p_i >= min_p * p_max.
 *   7. renormalise, draw   u ~ U[0, kept mass), walk the kept candidates.
 * Top-p and min-p each keep a prefix of the sorted order, so together they keep the shorter of the two prefixes.
 * Only top-p needs an order: candidates below a floor found from a histogram of the probabilities (nucleus_floor) are
 * dropped first, so at most the survivors are sorted (largest first, ties -> lower id), never all of V.
 *
 * All scratch is allocated in sp_sampler_new; sampling never allocates and never writes the caller's logits.
 * Random numbers: xoshiro256** seeded through splitmix64, so a seed gives the same tokens on every platform.
 */
#include "common.h"
#include "kernels/kernels.h"
#include "sampler.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { SP_MAX_REPEAT_LAST_N = 1 << 24 };

typedef struct sp_cand {
    float v;     /* the logit, then (from step 4) the unnormalised probability */
    int32_t id;  /* token id */
} sp_cand;

struct sp_sampler {
    sp_sampler_params params;
    int32_t n_vocab;       /* V */
    float *logits;         /* [V] the caller's logits after the repetition penalty */
    sp_cand *cand;         /* [V] candidates still in play, cand[0..K) */
    uint8_t *seen;         /* [V] marks distinct history tokens during the penalty; all zero between calls */
    int32_t *history;      /* [N] ring of the last N accepted tokens (NULL when N == 0) */
    int32_t n_history;     /* valid entries in history, <= N */
    int32_t history_next;  /* the slot the next accepted token goes to */
    uint64_t rng[4];       /* xoshiro256** state */
};

/* ---- random numbers: splitmix64 to seed, xoshiro256** to draw ---- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&seed);  /* never all zero: splitmix64 is a bijection */
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(uint64_t s[4]) {
    const uint64_t out = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

static double rng_uniform(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; } /* [0, 1) */

/* ---- candidate selection helpers ---- */

/* Strict total order on candidates: a ranks below b (smaller value; on equal values, the higher id). */
static inline bool cand_worse(sp_cand a, sp_cand b) { return a.v < b.v || (a.v == b.v && a.id > b.id); }

static int cand_cmp_desc(const void *pa, const void *pb) {
    const sp_cand a = *(const sp_cand *)pa, b = *(const sp_cand *)pb;
    return cand_worse(a, b) ? 1 : (cand_worse(b, a) ? -1 : 0);
}

static void heap_sift_down(sp_cand *h, int32_t n, int32_t i) {
    for (;;) {
        int32_t w = i;
        const int32_t a = 2 * i + 1, b = a + 1;
        if (a < n && cand_worse(h[a], h[w])) w = a;
        if (b < n && cand_worse(h[b], h[w])) w = b;
        if (w == i) return;
        const sp_cand t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* c[0..k) = the k largest of l[0..V), in heap order; ties go to the lower id. A min-heap keeps the worst survivor at
 * the root; token i (ids rising) enters only when l[i] > root: on a tie its id is higher, so it loses. */
static void top_k_select(sp_cand *c /* [k] */, const float *l /* [V] */, int32_t V, int32_t k) {
    for (int32_t i = 0; i < k; i++) c[i] = (sp_cand){l[i], i};
    for (int32_t i = k / 2 - 1; i >= 0; i--) heap_sift_down(c, k, i);
    /* The next entrant found by the kernel tier's vector scan: once the heap holds large values, entrants are rare. */
    const sp_kernels *kt = sp_kernels_get();
    for (int32_t i = k; i < V; i++) {
        i += (int32_t)kt->first_above(l + i, V - i, c[0].v);
        if (i >= V) break;
        c[0] = (sp_cand){l[i], i};
        heap_sift_down(c, k, 0);
    }
}

/* Keep the candidates with v >= t, in order; returns how many. */
static int32_t compact(sp_cand *c /* [K] */, int32_t K, double t) {
    int32_t m = 0;
    for (int32_t i = 0; i < K; i++)
        if ((double)c[i].v >= t) c[m++] = c[i];
    return m;
}

/* A floor under the top-p nucleus, so that only the candidates at or above it need sorting. Probabilities (in
 * [0, 1]) are binned by their float exponent and top 2 mantissa bits (bins a quarter octave wide); walking down from
 * the top bin, the lower edge of the bin where the mass reaches target is returned. Everything at or above it holds
 * at least target, so the sorted walk reaches target among those candidates: the nucleus lies above the floor. */
enum { SP_NUCLEUS_BINS = 512 };  /* bin = float bits >> 21; 1.0f falls in bin 508 */

static double nucleus_floor(const sp_cand *c /* [K] */, int32_t K, double target) {
    double mass[SP_NUCLEUS_BINS] = {0};
    for (int32_t i = 0; i < K; i++) {
        uint32_t bits;
        memcpy(&bits, &c[i].v, sizeof bits);
        mass[(bits >> 21) & (SP_NUCLEUS_BINS - 1)] += c[i].v;
    }
    double cum = 0.0;
    for (int32_t b = SP_NUCLEUS_BINS - 1; b > 0; b--) {
        cum += mass[b];
        if (cum >= target) {
            const uint32_t bits = (uint32_t)b << 21;
            float edge;
            memcpy(&edge, &bits, sizeof edge);
            return edge;
        }
    }
    return 0.0;  /* keep everything */
}

/* ---- the pipeline ---- */

/* One checked pass over x[0..V) with the kernel tier's max_f32: NaN and +inf refused (-inf is a mask and allowed; the
 * offending index looked for only on failure); the largest value into *mx. */
static sp_status scan_logits(const float *x, int32_t V, float *mx) {
    bool bad = false;
    *mx = sp_kernels_get()->max_f32(x, V, &bad);
    if (bad)
        for (int32_t i = 0; i < V; i++)
            if (!(x[i] < INFINITY))
                return sp_fail(SP_ERR_INVALID_ARG, "sampler: logits[%d] is %s; logits must be finite or -inf", i,
                               isnan(x[i]) ? "NaN" : "+inf");
    return SP_OK;
}

/* Greedy's answer: the first token whose logit is mx (ties -> the lowest id), alone with probability 1. Nothing is
 * above mx, so the first element above the float just below it is the first equal to it. */
static sp_status pick_argmax(const float *x, int32_t V, float mx, sp_cand *c, int32_t *n_out, double *mass) {
    if (mx == -INFINITY) return sp_fail(SP_ERR_INVALID_ARG, "sampler: every logit is -inf, nothing to sample");
    int32_t best = (int32_t)sp_kernels_get()->first_above(x, V, nextafterf(mx, -INFINITY));
    if (best >= V) best = V - 1; /* unreachable: x holds mx */
    c[0] = (sp_cand){1.0f, best};
    *n_out = 1;
    *mass = 1.0;
    return SP_OK;
}

/* Steps 1-6: leaves the kept candidates in s->cand[0..*n_out) with unnormalised probabilities in .v and their total
 * in *mass. Greedy leaves the argmax alone with probability 1. */
static sp_status sampler_filter(sp_sampler *s, const float *logits /* [V] */, int32_t *n_out, double *mass) {
    const sp_sampler_params *p = &s->params;
    const int32_t V = s->n_vocab;
    float *l = s->logits;
    sp_cand *c = s->cand;

    /* Greedy without a penalty to apply: the argmax of the caller's logits in one checked pass, nothing copied. */
    if (p->temperature <= 0.0f && !(p->repeat_penalty != 1.0f && s->n_history > 0)) {
        float mx = -INFINITY;
        sp_status st = scan_logits(logits, V, &mx);
        return st != SP_OK ? st : pick_argmax(logits, V, mx, c, n_out, mass);
    }

    /* Copy the logits, refusing NaN and +inf (-inf is a mask and allowed). */
    float mx0;
    sp_status st = scan_logits(logits, V, &mx0);
    if (st != SP_OK) return st;
    memcpy(l, logits, (size_t)V * sizeof *l);

    /* 1. Repetition penalty, once per distinct token of the history. */
    if (p->repeat_penalty != 1.0f && s->n_history > 0) {
        for (int32_t h = 0; h < s->n_history; h++) {
            const int32_t t = s->history[h];
            if (s->seen[t]) continue;
            s->seen[t] = 1;
            const float x = l[t] > 0.0f ? l[t] / p->repeat_penalty : l[t] * p->repeat_penalty;
            /* a finite logit stays finite: a penalty near 0 would make +inf, and inf - inf a NaN in the softmax */
            l[t] = l[t] == -INFINITY ? x : fmaxf(-FLT_MAX, fminf(FLT_MAX, x));
        }
        for (int32_t h = 0; h < s->n_history; h++) s->seen[s->history[h]] = 0;
    }

    /* 2. Greedy: argmax, ties -> lowest id (the penalised copy holds no NaN or +inf). */
    if (p->temperature <= 0.0f) {
        float mx = -INFINITY;
        if ((st = scan_logits(l, V, &mx)) != SP_OK) return st;
        return pick_argmax(l, V, mx, c, n_out, mass);
    }

    /* 3. Top-k. */
    int32_t K = V;
    if (p->top_k > 0 && p->top_k < V) {
        K = p->top_k;
        top_k_select(c, l, V, K);
    } else {
        for (int32_t i = 0; i < V; i++) c[i] = (sp_cand){l[i], i};
    }

    /* 4. Temperature-scaled softmax, unnormalised: the largest gets exp(0) = 1. */
    float lmax = -INFINITY;
    for (int32_t i = 0; i < K; i++) lmax = c[i].v > lmax ? c[i].v : lmax;
    if (lmax == -INFINITY) return sp_fail(SP_ERR_INVALID_ARG, "sampler: every logit is -inf, nothing to sample");
    double z = 0.0;
    for (int32_t i = 0; i < K; i++) {
        c[i].v = expf((c[i].v - lmax) / p->temperature);
        z += c[i].v;
    }

    /* 5-6. Top-p and min-p: the shorter of two prefixes of the sorted order. */
    const bool use_top_p = p->top_p < 1.0f, use_min_p = p->min_p > 0.0f;
    if (use_top_p) {
        /* Drop what lies below both prefixes (see nucleus_floor), sort the rest, walk to the shorter prefix. */
        const double target = (double)p->top_p * z;
        double t = nucleus_floor(c, K, target);
        if (use_min_p && p->min_p > t) t = p->min_p;
        K = compact(c, K, t);
        qsort(c, (size_t)K, sizeof *c, cand_cmp_desc);
        double cum = 0.0;
        int32_t n = 0;
        for (int32_t i = 0; i < K; i++) {
            if (use_min_p && c[i].v < p->min_p) break;  /* never the first: c[0].v = 1 > min_p */
            cum += c[i].v;
            n = i + 1;
            if (cum >= target) break;
        }
        K = n;
    } else if (use_min_p) {
        K = compact(c, K, p->min_p);  /* without top-p the order does not matter: no sort */
    }

    /* 7 (first half). The kept mass, to renormalise by. */
    double m = 0.0;
    for (int32_t i = 0; i < K; i++) m += c[i].v;
    *n_out = K;
    *mass = m;
    return SP_OK;
}

/* ---- public API ---- */

sp_sampler_params sp_sampler_default_params(void) {
    sp_sampler_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 0.8f;
    p.top_k = 40;
    p.top_p = 0.95f;
    p.min_p = 0.05f;
    p.repeat_penalty = 1.0f;
    p.repeat_last_n = 64;
    p.seed = 0xC0FFEE;
    return p;
}

static sp_status check_params(const sp_sampler_params *p, int32_t n_vocab) {
    if (n_vocab <= 0) return sp_fail(SP_ERR_INVALID_ARG, "sampler: n_vocab must be > 0 (got %d)", n_vocab);
    if (!isfinite(p->temperature))
        return sp_fail(SP_ERR_INVALID_ARG, "sampler: temperature must be finite (got %g); <= 0 means greedy",
                       (double)p->temperature);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return sp_fail(SP_ERR_INVALID_ARG, "sampler: top_p must be in (0, 1] (got %g); 1 turns it off",
                       (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p < 1.0f))
        return sp_fail(SP_ERR_INVALID_ARG, "sampler: min_p must be in [0, 1) (got %g); 0 turns it off",
                       (double)p->min_p);
    if (!(p->repeat_penalty > 0.0f && isfinite(p->repeat_penalty)))
        return sp_fail(SP_ERR_INVALID_ARG, "sampler: repeat_penalty must be finite and > 0 (got %g); 1 turns it off",
                       (double)p->repeat_penalty);
    if (p->repeat_last_n < 0 || p->repeat_last_n > SP_MAX_REPEAT_LAST_N)
        return sp_fail(SP_ERR_INVALID_ARG, "sampler: repeat_last_n must be in [0, %d] (got %d)", SP_MAX_REPEAT_LAST_N,
                       p->repeat_last_n);
    return SP_OK;
}

sp_status sp_sampler_new(sp_sampler_params params, int32_t n_vocab, sp_sampler **out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_sampler_new: out is NULL");
    *out = NULL;
    sp_status st = check_params(&params, n_vocab);
    if (st != SP_OK) return st;

    sp_sampler *s = calloc(1, sizeof *s);
    if (!s) return sp_fail(SP_ERR_NO_MEMORY, "sampler: out of memory");
    s->params = params;
    s->n_vocab = n_vocab;
    s->logits = malloc((size_t)n_vocab * sizeof *s->logits);
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->seen = calloc((size_t)n_vocab, 1);
    if (params.repeat_last_n > 0) s->history = malloc((size_t)params.repeat_last_n * sizeof *s->history);
    if (!s->logits || !s->cand || !s->seen || (params.repeat_last_n > 0 && !s->history)) {
        sp_sampler_free(s);
        return sp_fail(SP_ERR_NO_MEMORY, "sampler: out of memory for n_vocab = %d", n_vocab);
    }
    rng_seed(s->rng, params.seed);
    *out = s;
    return SP_OK;
}

void sp_sampler_free(sp_sampler *s) {
    if (!s) return;
    free(s->logits);
    free(s->cand);
    free(s->seen);
    free(s->history);
    free(s);
}

sp_status sp_sampler_sample(sp_sampler *s, const float *logits, int32_t *token_out) {
    sp_clear_error();
    if (!s || !logits || !token_out) return sp_fail(SP_ERR_INVALID_ARG, "sp_sampler_sample: NULL argument");
    int32_t K;
    double mass;
    sp_status st = sampler_filter(s, logits, &K, &mass);
    if (st != SP_OK) return st;
    if (K == 1) {  /* greedy, or a single survivor: no draw, the random state stays put */
        *token_out = s->cand[0].id;
        return SP_OK;
    }
    /* 7. Draw: the first candidate whose cumulative mass passes u. */
    const double u = rng_uniform(s->rng) * mass;
    double cum = 0.0;
    int32_t last = 0;
    for (int32_t i = 0; i < K; i++) {
        if (s->cand[i].v <= 0.0f) continue;
        cum += s->cand[i].v;
        last = i;
        if (u < cum) break;
    }
    *token_out = s->cand[last].id;  /* also the fallback when rounding leaves u >= the summed mass */
    return SP_OK;
}

sp_status sp_sampler_candidates(sp_sampler *s, const float *logits, int32_t cap, int32_t *ids, float *probs,
                                int32_t *n_out) {
    sp_clear_error();
    if (!s || !logits || !ids || !probs || !n_out)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_sampler_candidates: NULL argument");
    int32_t K;
    double mass;
    sp_status st = sampler_filter(s, logits, &K, &mass);
    if (st != SP_OK) return st;
    if (K > cap)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_sampler_candidates: %d candidates, room for %d (n_vocab always fits)",
                       K, cap);
    for (int32_t i = 0; i < K; i++) {
        ids[i] = s->cand[i].id;
        probs[i] = (float)(s->cand[i].v / mass);
    }
    *n_out = K;
    return SP_OK;
}

sp_status sp_sampler_probs(sp_sampler *s, const float *logits, float *probs) {
    sp_clear_error();
    if (!s || !logits || !probs) return sp_fail(SP_ERR_INVALID_ARG, "sp_sampler_probs: NULL argument");
    int32_t K;
    double mass;
    sp_status st = sampler_filter(s, logits, &K, &mass);
    if (st != SP_OK) return st;
    memset(probs, 0, (size_t)s->n_vocab * sizeof *probs);
    for (int32_t i = 0; i < K; i++) probs[s->cand[i].id] = (float)(s->cand[i].v / mass);
    return SP_OK;
}

sp_status sp_top_k(const float *x, int32_t n, int32_t k, int32_t *idx_out) {
    sp_clear_error();
    if (!x || !idx_out) return sp_fail(SP_ERR_INVALID_ARG, "sp_top_k: NULL argument");
    if (k < 1 || k > SP_TOP_K_MAX || k > n)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_top_k: k=%d must be in [1, min(n=%d, %d)]", k, n, SP_TOP_K_MAX);
    sp_cand c[SP_TOP_K_MAX];
    top_k_select(c, x, n, k);
    qsort(c, (size_t)k, sizeof *c, cand_cmp_desc);
    for (int32_t i = 0; i < k; i++) idx_out[i] = c[i].id;
    return SP_OK;
}

double sp_sampler_uniform(sp_sampler *s) { return rng_uniform(s->rng); }

/* Tokens outside [0, V) are ignored: they cannot be penalised. */
void sp_sampler_accept(sp_sampler *s, int32_t token) {
    if (!s || token < 0 || token >= s->n_vocab || s->params.repeat_last_n == 0) return;
    const int32_t N = s->params.repeat_last_n;
    s->history[s->history_next] = token;
    s->history_next = (s->history_next + 1) % N;
    if (s->n_history < N) s->n_history++;
}

void sp_sampler_reset(sp_sampler *s) {
    if (!s) return;
    s->n_history = 0;
    s->history_next = 0;
    rng_seed(s->rng, s->params.seed);
}
