/* PLACEHOLDER: being written (sampler). */
#include "common.h"
sp_sampler_params sp_sampler_default_params(void) { sp_sampler_params p = {0}; return p; }
sp_status sp_sampler_new(sp_sampler_params params, int32_t n_vocab, sp_sampler **out) { *out = NULL; return sp_fail(SP_ERR_UNSUPPORTED, "sampler not built yet"); }
void sp_sampler_free(sp_sampler *sampler) {}
sp_status sp_sampler_sample(sp_sampler *sampler, const float *logits, int32_t *token_out) { return SP_ERR_UNSUPPORTED; }
void sp_sampler_accept(sp_sampler *sampler, int32_t token) {}
void sp_sampler_reset(sp_sampler *sampler) {}
