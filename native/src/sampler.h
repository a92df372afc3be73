/* sampler.h: internals of the token sampler (sampler.c) that tests reach through the binding's `testing` module.
 * Shape legend: V = vocabulary size. */
#ifndef SP_SAMPLER_H
#define SP_SAMPLER_H

#include "sparrow.h"

/* The distribution sp_sampler_sample() would draw from for these logits, after the whole pipeline and the final
 * renormalisation: probs[V] sums to 1 (greedy: one-hot at the argmax). Uses the sampler's history, draws nothing,
 * does not touch the random state. */
sp_status sp_sampler_probs(sp_sampler *sampler, const float *logits /* [V] */, float *probs /* [V] */);

/* A uniform draw in [0, 1) from the sampler's random state (speculative sampling's acceptance tests, generate.c). */
double sp_sampler_uniform(sp_sampler *sampler);

/* Whether the sampler's next choice is the plain argmax of the logits: greedy (temperature <= 0) with no repetition
 * penalty to apply. */
bool sp_sampler_plain_greedy(const sp_sampler *sampler);

typedef struct sp_cand {
    float v;     /* the logit (the sampler: from its softmax on, the unnormalised probability) */
    int32_t id;  /* token id */
} sp_cand;

/* Strict total order of candidates: a ranks below b (smaller value; on equal values, the higher id). */
static inline bool sp_cand_worse(sp_cand a, sp_cand b) { return a.v < b.v || (a.v == b.v && a.id > b.id); }

/* The min(k, n) largest of x[0..n) as candidates with ids id0 + i, sorted (largest first, ties -> lower id), into
 * out[0..); returns how many. k <= SP_TOP_K_MAX. */
int32_t sp_top_k_range(const float *x, int32_t n, int32_t k, int32_t id0, sp_cand *out);

#endif
