/* routing_synth.c: synthetic router scores for BlockFFN layers with a stated token- and chunk-level sparsity, keyed
 * by (layer, position), so that benchmarks on random-weight models of realistic shapes route like a trained model
 * at a chosen TLS / CLS-k (a random-weight router gives arbitrary routing). For benchmarks and tests only.
 *
 * Shape legend: L = layers, E = experts, A = experts active per position, U = experts used by any k consecutive
 * positions, p = position.
 *
 * The pattern ("a sliding band"): each layer has its own random order of the E experts, a ring. Position p uses the
 * A experts ring[start(p) .. start(p) + A) (indices mod E), with start(p) = floor(p (U - A) / (k - 1)). Over any k
 * consecutive positions start() advances by exactly U - A, so their union is exactly U experts: TLS = 1 - A/E for
 * every token and CLS-k = 1 - U/E for every window of k positions (aligned or not). Fewer positions use fewer
 * experts (the band drifts by (U - A)/(k - 1) experts per position), more use more. Active scores are positive,
 * (0.5 + u) / A with u in [0, 1) from a hash of (seed, layer, position, expert).
 * tests/reference/synthetic_routing.py restates this in numpy and the tests compare the two. */
#include "forward.h"

#include <math.h>
#include <stdlib.h>

#define GOLDEN 0x9E3779B97F4A7C15ull

/* splitmix64 output function of x + golden (a bijection). */
static uint64_t mix(uint64_t x) {
    uint64_t z = x + GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ring[E] = a random order of 0..E-1 for layer il: Fisher-Yates drawing from the splitmix64 stream mix(st), st += golden. */
static void layer_ring(int32_t *ring, int32_t E, uint64_t seed, int il) {
    for (int32_t i = 0; i < E; i++) ring[i] = i;
    uint64_t st = mix(seed) ^ (uint64_t)(il + 1) * 0xD1B54A32D192ED03ull;
    for (int32_t i = E - 1; i > 0; i--) {
        const int32_t j = (int32_t)(mix(st) % (uint64_t)(i + 1));
        st += GOLDEN;
        const int32_t t = ring[i];
        ring[i] = ring[j];
        ring[j] = t;
    }
}

sp_status sp_session_set_synthetic_routing(sp_session *ses, const sp_synth_routing_params *p) {
    sp_clear_error();
    if (!ses) return sp_fail(SP_ERR_INVALID_ARG, "synthetic routing: session is NULL");
    if (!p) {
        ses->synth.on = false;
        return SP_OK;
    }
    const sp_model *m = ses->model;
    if (m->hp.n_expert == 0) return sp_fail(SP_ERR_INVALID_ARG, "synthetic routing: the model has no BlockFFN layers");
    if (ses->gpu) return sp_fail(SP_ERR_UNSUPPORTED, "synthetic routing runs on the CPU only, not in a GPU session");
    if (!(p->tls >= 0.0 && p->tls <= 1.0)) return sp_fail(SP_ERR_INVALID_ARG, "synthetic routing: tls must be in [0, 1], got %g", p->tls);
    if (!(p->cls >= 0.0 && p->cls <= 1.0)) return sp_fail(SP_ERR_INVALID_ARG, "synthetic routing: cls must be in [0, 1], got %g", p->cls);
    if (p->k < 2 || p->k > 65536) return sp_fail(SP_ERR_INVALID_ARG, "synthetic routing: k must be 2..65536, got %d", p->k);
    const int32_t E = m->hp.n_expert, L = m->hp.n_layer;
    const int32_t A = (int32_t)lround((1.0 - p->tls) * E), U = (int32_t)lround((1.0 - p->cls) * E);
    if (U < A)
        return sp_fail(SP_ERR_INVALID_ARG,
                       "synthetic routing: cls (%g) must not exceed tls (%g): %d experts per position cannot fit in a "
                       "union of %d (E = %d)", p->cls, p->tls, A, U, E);
    int32_t *ring = ses->synth.ring;
    if (!ring) {
        ring = malloc((size_t)L * (size_t)E * sizeof *ring);
        if (!ring) return sp_fail(SP_ERR_NO_MEMORY, "synthetic routing: out of memory");
    }
    for (int il = 0; il < L; il++) layer_ring(ring + (size_t)il * E, E, p->seed, il);
    ses->synth = (sp_synth_routing){.on = true, .n_active = A, .n_union = U, .k = p->k, .seed = p->seed, .ring = ring};
    return SP_OK;
}

void sp_synth_routing_scores(const sp_session *ses, int il, int64_t pos, float *r) {
    const sp_synth_routing *sy = &ses->synth;
    const int32_t E = ses->model->hp.n_expert, A = sy->n_active;
    const int32_t *ring = sy->ring + (size_t)il * E;
    const int64_t start = pos * (sy->n_union - A) / (sy->k - 1); /* pos >= 0: floor */
    const uint64_t key = mix(mix(sy->seed + (uint64_t)il) + (uint64_t)pos);
    for (int32_t e = 0; e < E; e++) r[e] = 0.0f;
    for (int32_t i = 0; i < A; i++) {
        const int32_t e = ring[(start + i) % E];
        const double u = (double)(mix(key + (uint64_t)e) >> 40) * 0x1p-24;
        r[e] = (float)((0.5 + u) / A);
    }
}
