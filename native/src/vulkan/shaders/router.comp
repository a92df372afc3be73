#version 450
/* router.comp: BlockFFN's router scores r[t] = norm(relu(router logits[t])) in place for the batch's T tokens
 * (docs/gguf-blockffn.md: an RMS norm with weights, a sum norm, or none), then the chunk's union of active experts:
 * used[e] = 1 when some token has r[t, e] != 0, else 0. One workgroup for the whole batch.
 * a0 r [T, E], a1 norm weights [E] (RMS norm only), a2 used [E]; u0 T, u1 E, u2 norm (0 none, 1 RMS, 2 sum);
 * f0 eps, f1 scale (sum norm). Dispatch: x = 1. */
#include "common.glsl"
layout(local_size_x = 64) in;

shared float red[64];

void main() {
    const uint tid = gl_LocalInvocationID.x, T = pc.u[0], E = pc.u[1], mode = pc.u[2];
    FBuf r = FBuf(pc.a[0]), w = FBuf(pc.a[1]);
    UBuf used = UBuf(pc.a[2]);
    for (uint t = 0; t < T; t++) {
        float acc = 0.0;
        for (uint e = tid; e < E; e += 64) {
            const float x = max(r.v[t * E + e], 0.0);
            r.v[t * E + e] = x;
            acc += mode == 1u ? x * x : x;
        }
        red[tid] = acc;
        barrier();
        for (uint s = 32; s > 0; s >>= 1) {
            if (tid < s) red[tid] += red[tid + s];
            barrier();
        }
        if (mode != 0u) {
            const float inv = mode == 1u ? 1.0 / sqrt(red[0] / float(E) + pc.f[0]) : 1.0 / (red[0] * pc.f[1] + pc.f[0]);
            for (uint e = tid; e < E; e += 64) r.v[t * E + e] = mode == 1u ? r.v[t * E + e] * inv * w.v[e]
                                                                              : r.v[t * E + e] * inv;
        }
        barrier(); /* red is reused by the next token */
    }
    for (uint e = tid; e < E; e += 64) {
        uint any = 0u;
        for (uint t = 0; t < T; t++) any |= r.v[t * E + e] != 0.0 ? 1u : 0u;
        used.v[e] = any;
    }
}
