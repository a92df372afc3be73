#version 450
/* expert_up.comp: the up half of BlockFFN's experts over the chunk's union: for expert e and row f of its up half,
 * h[t, e FE + f] = r[t, e] silu(U_e[f] . x[t]) for the tokens that use e and 0 for the others. An expert no token of
 * the batch uses (used[e] == 0) is skipped whole: its weights are not read. One row per subgroup, as matmul.comp.
 * a0 experts (the [E 2FE, H] slab, GPU layout), a1 x [T, H], a2 r [T, E], a3 used [E], a4 h [T, E FE]
 * u0 H, u1 T, u2 E, u3 FE, u5 d_off, u6 m_off, u8 rows per workgroup.
 * Dispatch: x = ceil(FE / u8), y = E. */
#include "common.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_ballot : require
layout(local_size_x = 64) in;

void main() {
    const uint e = gl_WorkGroupID.y, f = gl_WorkGroupID.x * pc.u[8] + gl_SubgroupID;
    const uint H = pc.u[0], T = pc.u[1], E = pc.u[2], FE = pc.u[3], nb = H / 32;
    if (f >= FE || gl_SubgroupID >= pc.u[8] || UBuf(pc.a[3]).v[e] == 0u) return; /* whole subgroups */
    /* the subgroup's live invocations, counted: a device may run a subgroup partly filled (or wider than the
     * workgroup), so neither gl_SubgroupSize nor gl_SubgroupInvocationID is trusted for the stride */
    const uvec4 live = subgroupBallot(true);
    const uint lane = subgroupBallotExclusiveBitCount(live), ns = subgroupBallotBitCount(live);
    UBuf W = UBuf(pc.a[0]);
    FBuf X = FBuf(pc.a[1]), R = FBuf(pc.a[2]), Hb = FBuf(pc.a[4]);
    const uint row = e * 2 * FE + f;
    for (uint t0 = 0; t0 < T; t0 += 8) {
        const uint nt = min(8u, T - t0);
        float acc[8] = float[8](0, 0, 0, 0, 0, 0, 0, 0);
        for (uint b = lane; b < nb; b += ns) {
            float w[32];
            dequant_block(W, row, b, nb, pc.u[5], pc.u[6], w);
            for (uint t = 0; t < nt; t++) {
                if (R.v[(t0 + t) * E + e] == 0.0) continue;
                float s = 0.0;
                for (uint i = 0; i < 32; i++) s += w[i] * X.v[(t0 + t) * H + b * 32 + i];
                acc[t] += s;
            }
        }
        for (uint t = 0; t < nt; t++) {
            const float x = subgroupAdd(acc[t]), rs = R.v[(t0 + t) * E + e];
            if (lane == 0u) Hb.v[(t0 + t) * E * FE + e * FE + f] = rs != 0.0 ? x / (1.0 + exp(-x)) * rs : 0.0;
        }
    }
}
