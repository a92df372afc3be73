#version 450
/* matmul.comp: Y[t, r] = W[r] . X[t] (or Y[t, r] += alpha * W[r] . X[t]). One weight row per subgroup: its blocks
 * are shared out over the subgroup's invocations and their partial sums added by subgroupAdd (no shared memory, no
 * barriers); a workgroup of 64 invocations holds 64 / subgroup size rows. Tokens in tiles of 8, each tile reading
 * the row again (from the caches).
 * a0 W (GPU layout, common.glsl), a1 X [T, ldx], a2 Y [T, ldy]
 * u0 K, u1 N (rows), u2 T, u3 ldx, u4 ldy, u5 d_off, u6 m_off, u7 accumulate (0/1), u8 rows per workgroup,
 * u9 first row of W (rows u9 .. u9 + N - 1 give Y's columns 0 .. N - 1: one head's rows of a per-head weight);
 * f0 alpha. Dispatch: x = min(groups, max x), y = ceil(groups / x) for groups = ceil(N / u8). */
#include "common.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_ballot : require
layout(local_size_x = 64) in;

void main() {
    const uint wg = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    const uint r = wg * pc.u[8] + gl_SubgroupID;
    const uint K = pc.u[0], N = pc.u[1], T = pc.u[2], ldx = pc.u[3], ldy = pc.u[4], nb = K / 32;
    if (r >= N || gl_SubgroupID >= pc.u[8]) return; /* whole subgroups */
    /* the subgroup's live invocations, counted: a device may run a subgroup partly filled (or wider than the
     * workgroup), so neither gl_SubgroupSize nor gl_SubgroupInvocationID is trusted for the stride */
    const uvec4 live = subgroupBallot(true);
    const uint lane = subgroupBallotExclusiveBitCount(live), ns = subgroupBallotBitCount(live);
    UBuf W = UBuf(pc.a[0]);
    FBuf X = FBuf(pc.a[1]), Y = FBuf(pc.a[2]);
    for (uint t0 = 0; t0 < T; t0 += 8) {
        const uint nt = min(8u, T - t0);
        float acc[8] = float[8](0, 0, 0, 0, 0, 0, 0, 0);
        for (uint b = lane; b < nb; b += ns) {
            float w[32];
            dequant_block(W, pc.u[9] + r, b, nb, pc.u[5], pc.u[6], w);
            for (uint t = 0; t < nt; t++) {
                const uint xo = (t0 + t) * ldx + b * 32;
                float s = 0.0;
                for (uint i = 0; i < 32; i++) s += w[i] * X.v[xo + i];
                acc[t] += s;
            }
        }
        for (uint t = 0; t < nt; t++) {
            const float y = subgroupAdd(acc[t]);
            if (lane == 0u) {
                const uint o = (t0 + t) * ldy + r;
                Y.v[o] = pc.u[7] != 0u ? Y.v[o] + pc.f[0] * y : y;
            }
        }
    }
}
