/* fuzz_sampler.c: libFuzzer target for the sampler and sp_top_k: arbitrary parameters (any float bits, NaN and
 * infinities included) and arbitrary logits.
 *
 * Input: n_vocab (1..1024, or rarely up to 65536), the sp_sampler_params fields, a program of accept / sample /
 * candidates / reset steps, then the logits' bits (repeated to fill n_vocab). Checks: a sampler is made exactly when
 * the parameters are valid; a sampled token is a candidate; candidates are in range, distinct, with probabilities
 * in [0, 1] summing to 1; sp_top_k returns k distinct indices in descending order of value. */
#include "fuzz.h"

#include <math.h>

#include "sparrow.h"

static bool params_valid(const sp_sampler_params *p) {
    return isfinite(p->temperature) && p->top_p > 0.0f && p->top_p <= 1.0f && p->min_p >= 0.0f && p->min_p < 1.0f &&
           p->repeat_penalty > 0.0f && isfinite(p->repeat_penalty) && p->repeat_last_n >= 0 &&
           p->repeat_last_n <= (1 << 24);
}

/* A float from one of a few families: plain values, the parameter's edges, or any bit pattern. */
static float some_float(fz_in *in, float lo, float hi) {
    switch (fz_u8(in) % 4) {
    case 0: return lo + (hi - lo) * (float)fz_u16(in) / 65535.0f;
    case 1: return (fz_u8(in) & 1) ? lo : hi;
    case 2: return (float)(int8_t)fz_u8(in);
    default: return fz_f32_bits(in);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    const uint8_t shape = fz_u8(&in);
    const int32_t V = (shape & 0x80) ? 1 + fz_u16(&in) : 1 + fz_u16(&in) % 1024;
    sp_sampler_params p = sp_sampler_default_params();
    p.temperature = some_float(&in, -1.0f, 3.0f);
    p.top_k = (shape & 1) ? (int32_t)fz_u32(&in) : (int32_t)(fz_u16(&in) % (V + 8)) - 4;
    p.top_p = some_float(&in, 0.0f, 1.0f);
    p.min_p = some_float(&in, 0.0f, 1.0f);
    p.repeat_penalty = some_float(&in, 0.0f, 3.0f);
    p.repeat_last_n = (shape & 2) ? (int32_t)fz_u32(&in) % ((1 << 24) + 2) : (int32_t)(fz_u8(&in) % 80) - 8;
    p.seed = fz_u64(&in);
    uint8_t program[16];
    const size_t n_steps = fz_u8(&in) % 16;
    for (size_t i = 0; i < n_steps; i++) program[i] = fz_u8(&in);

    float *logits = malloc((size_t)V * sizeof *logits);
    int32_t *ids = malloc((size_t)V * sizeof *ids);
    float *probs = malloc((size_t)V * sizeof *probs);
    uint8_t *seen = calloc((size_t)V, 1);
    FZ_CHECK(logits && ids && probs && seen);
    const size_t avail = in.n - in.n % 4; /* the logits' bits, repeated to fill V */
    bool has_nan = false;
    for (int32_t i = 0; i < V; i++) {
        if (avail) memcpy(&logits[i], in.p + ((size_t)i * 4) % avail, 4);
        else logits[i] = (float)(i % 7);
        has_nan |= isnan(logits[i]);
    }

    sp_sampler *s = NULL;
    const sp_status st = sp_sampler_new(p, V, &s);
    FZ_CHECK((st == SP_OK) == params_valid(&p));
    FZ_CHECK((st == SP_OK) == (s != NULL));
    for (size_t i = 0; s && i < n_steps; i++) {
        const uint8_t op = program[i];
        switch (op % 4) {
        case 0: sp_sampler_accept(s, (int32_t)(op >> 2) - 8 + (op & 0x80 ? V - 24 : 0)); break;
        case 1: sp_sampler_reset(s); break;
        default: {
            int32_t n = 0, tok = -1;
            sp_status cs = sp_sampler_candidates(s, logits, V, ids, probs, &n);
            sp_status ss = sp_sampler_sample(s, logits, &tok);
            FZ_CHECK(cs == ss); /* both filter the same logits the same way */
            if (cs != SP_OK) break;
            FZ_CHECK(n >= 1 && n <= V);
            double sum = 0;
            bool tok_is_candidate = false;
            for (int32_t k = 0; k < n; k++) {
                FZ_CHECK(ids[k] >= 0 && ids[k] < V && !seen[ids[k]]);
                seen[ids[k]] = 1;
                FZ_CHECK(probs[k] >= 0.0f && probs[k] <= 1.0f);
                sum += probs[k];
                tok_is_candidate |= ids[k] == tok;
            }
            for (int32_t k = 0; k < n; k++) seen[ids[k]] = 0;
            FZ_CHECK(fabs(sum - 1.0) < 1e-3);
            FZ_CHECK(tok_is_candidate);
        }
        }
    }
    sp_sampler_free(s);

    /* sp_top_k on the same logits */
    const int32_t k = 1 + (int32_t)(shape >> 2) % 64;
    int32_t idx[64];
    const sp_status ts = sp_top_k(logits, V, k, idx);
    FZ_CHECK((ts == SP_OK) == (k <= V));
    for (int32_t i = 0; ts == SP_OK && i < k; i++) {
        FZ_CHECK(idx[i] >= 0 && idx[i] < V && !seen[idx[i]]);
        seen[idx[i]] = 1;
        if (i > 0 && !has_nan) FZ_CHECK(logits[idx[i - 1]] >= logits[idx[i]]); /* NaNs: any order */
    }
    free(logits);
    free(ids);
    free(probs);
    free(seen);
    return 0;
}
