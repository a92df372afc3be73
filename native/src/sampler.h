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

#endif
