#version 450
/* attention.comp: grouped-query attention of one query head of one token over its layer's F16 cache, which already
 * holds the batch's keys and values (kv_store.comp). Token t sees the P slots cached before the batch and the batch
 * slots P + j that the mask allows (mask[t, j] != 0), or with no mask those with j <= t (causal). The query is
 * rounded to F16 first, as the CPU path does. Softmax over chunks of 256 slots with a running maximum (online
 * softmax), so any context length fits in shared memory.
 * a0 q [T, QD], a1 key cache, a2 value cache ([C, KVD / 2] words), a3 out [T, QD], a4 mask (T x T bytes, 4 a word)
 * u0 T, u1 P, u2 D (<= 256, even), u3 QD, u4 KVD, u5 G (query heads per kv head), u6 has mask; f0 1 / sqrt(D)
 * Dispatch: x = heads, y = T. */
#include "common.glsl"
layout(local_size_x = 64) in;

const uint CH = 256;
shared float sq[256];
shared float ss[CH];

bool visible(uint t, uint j, uint T, uint P) {
    if (j < P) return true;
    const uint b = j - P;
    if (pc.u[6] == 0u) return b <= t;
    const uint e = t * T + b;
    return bitfieldExtract(UBuf(pc.a[4]).v[e / 4], int(8 * (e % 4)), 8) != 0u;
}

void main() {
    const uint tid = gl_LocalInvocationID.x, h = gl_WorkGroupID.x, t = gl_WorkGroupID.y;
    const uint T = pc.u[0], P = pc.u[1], D = pc.u[2], QD = pc.u[3], KVD = pc.u[4], G = pc.u[5];
    const uint g = h / G, hw = KVD / 2, S = P + T;
    FBuf q = FBuf(pc.a[0]), o = FBuf(pc.a[3]);
    UBuf kc = UBuf(pc.a[1]), vc = UBuf(pc.a[2]);
    for (uint d = tid; d < D; d += 64) sq[d] = unpackHalf2x16(packHalf2x16(vec2(q.v[t * QD + h * D + d], 0.0))).x;
    barrier();
    float acc[4] = float[4](0, 0, 0, 0); /* dims tid, tid + 64, tid + 128, tid + 192 */
    float M = -1.0 / 0.0, L = 0.0;
    for (uint c0 = 0; c0 < S; c0 += CH) {
        const uint n = min(CH, S - c0);
        for (uint jj = tid; jj < n; jj += 64) {
            const uint j = c0 + jj;
            float s = -1.0 / 0.0;
            if (visible(t, j, T, P)) {
                s = 0.0;
                const uint base = j * hw + g * D / 2;
                for (uint d = 0; d < D; d += 2) {
                    const vec2 kk = unpackHalf2x16(kc.v[base + d / 2]);
                    s += sq[d] * kk.x + sq[d + 1] * kk.y;
                }
                s *= pc.f[0];
            }
            ss[jj] = s;
        }
        barrier();
        float cm = -1.0 / 0.0;
        for (uint jj = 0; jj < n; jj++) cm = max(cm, ss[jj]);
        const float nm = max(M, cm);
        if (nm > -1.0 / 0.0) {
            const float corr = M > -1.0 / 0.0 ? exp(M - nm) : 0.0;
            L *= corr;
            for (uint i = 0; i < 4; i++) acc[i] *= corr;
            for (uint jj = 0; jj < n; jj++) {
                const float s = ss[jj];
                if (s == -1.0 / 0.0) continue;
                const float p = exp(s - nm);
                L += p;
                const uint base = (c0 + jj) * hw + g * D / 2;
                for (uint i = 0; i < 4; i++) {
                    const uint d = tid + 64 * i;
                    if (d < D) {
                        const vec2 vv = unpackHalf2x16(vc.v[base + d / 2]);
                        acc[i] += p * ((d & 1u) == 0u ? vv.x : vv.y);
                    }
                }
            }
            M = nm;
        }
        barrier(); /* before the next chunk overwrites ss */
    }
    const float inv = L > 0.0 ? 1.0 / L : 0.0;
    for (uint i = 0; i < 4; i++) {
        const uint d = tid + 64 * i;
        if (d < D) o.v[t * QD + h * D + d] = acc[i] * inv;
    }
}
