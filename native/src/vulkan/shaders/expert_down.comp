#version 450
/* expert_down.comp: the down half of BlockFFN's experts over the chunk's union, added to the residual stream:
 * Y[t, i] += alpha * sum over used experts e and f < FE of h[t, e FE + f] * Dt_e[f, i] (Dt_e: the FE rows of the
 * down half, stored transposed after the up half in the slab). One invocation per output column i, all tokens; the
 * experts no token uses are skipped (not read).
 * a0 experts (GPU layout), a1 h [T, E FE], a2 used [E], a3 Y [T, H]
 * u0 H, u1 T, u2 E, u3 FE, u5 d_off, u6 m_off; f0 alpha. Dispatch: x = ceil(H / 64). */
#include "common.glsl"
layout(local_size_x = 64) in;

void main() {
    const uint i = gl_GlobalInvocationID.x, H = pc.u[0], T = pc.u[1], E = pc.u[2], FE = pc.u[3];
    if (i >= H) return;
    UBuf W = UBuf(pc.a[0]), used = UBuf(pc.a[2]);
    FBuf Hb = FBuf(pc.a[1]), Y = FBuf(pc.a[3]);
    for (uint t0 = 0; t0 < T; t0 += 8) {
        const uint nt = min(8u, T - t0);
        float acc[8] = float[8](0, 0, 0, 0, 0, 0, 0, 0);
        for (uint e = 0; e < E; e++) {
            if (used.v[e] == 0u) continue;
            for (uint f = 0; f < FE; f++) {
                const float w = dequant_one(W, e * 2 * FE + FE + f, i, H, pc.u[5], pc.u[6]);
                for (uint t = 0; t < nt; t++) acc[t] += Hb.v[(t0 + t) * E * FE + e * FE + f] * w;
            }
        }
        for (uint t = 0; t < nt; t++) Y.v[(t0 + t) * H + i] += pc.f[0] * acc[t];
    }
}
