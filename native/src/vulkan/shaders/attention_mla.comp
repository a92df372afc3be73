#version 450
/* attention_mla.comp: multi-head latent attention in the absorbed form (attn_mla.c) for one head of one token: the
 * score of slot j is (q_lat . c_j + q_pe . k_pe_j) / sqrt(DN + DR) over the layer's F16 caches of latents c (KL) and
 * rotated rope keys k_pe (DR), which already hold the batch's rows; the visible slots as attention.comp (P cached,
 * then the mask or causal order); o_lat = sum_j p_j c_j. Online softmax over chunks of 256 slots.
 * a0 q_lat [T, NH, KL], a1 q [T, NH, DN + DR] (the rope query at offset DN of each head), a2 latent cache
 * ([C, KL / 2] words), a3 rope key cache ([C, DR / 2]), a4 o_lat [T, NH, KL]
 * u0 T, u1 P, u2 KL (<= 512, even), u3 DR (<= 256, even), u4 DN, u5 NH, u6 has mask (the mask: u7 = its address's
 * low word, u8 its high word, T x T bytes, 4 a word); f0 1 / sqrt(DN + DR). Dispatch: x = NH, y = T. */
#include "common.glsl"
layout(local_size_x = 64) in;

const uint CH = 256;
shared float sq[512 + 256];
shared float ss[CH];

bool visible(uint t, uint j, uint T, uint P) {
    if (j < P) return true;
    const uint b = j - P;
    if (pc.u[6] == 0u) return b <= t;
    const uint e = t * T + b;
    return bitfieldExtract(UBuf(uvec2(pc.u[7], pc.u[8])).v[e / 4], int(8 * (e % 4)), 8) != 0u;
}

void main() {
    const uint tid = gl_LocalInvocationID.x, h = gl_WorkGroupID.x, t = gl_WorkGroupID.y;
    const uint T = pc.u[0], P = pc.u[1], KL = pc.u[2], DR = pc.u[3], DN = pc.u[4], NH = pc.u[5], S = P + T;
    FBuf ql = FBuf(pc.a[0]), q = FBuf(pc.a[1]), o = FBuf(pc.a[4]);
    UBuf lc = UBuf(pc.a[2]), pc_ = UBuf(pc.a[3]);
    for (uint d = tid; d < KL; d += 64) sq[d] = ql.v[(t * NH + h) * KL + d];
    for (uint d = tid; d < DR; d += 64) sq[512 + d] = q.v[(t * NH + h) * (DN + DR) + DN + d];
    barrier();
    float acc[8] = float[8](0, 0, 0, 0, 0, 0, 0, 0); /* latent dims tid + 64 i */
    float M = -1.0 / 0.0, L = 0.0;
    for (uint c0 = 0; c0 < S; c0 += CH) {
        const uint n = min(CH, S - c0);
        for (uint jj = tid; jj < n; jj += 64) {
            const uint j = c0 + jj;
            float s = -1.0 / 0.0;
            if (visible(t, j, T, P)) {
                float a = 0.0, b = 0.0;
                for (uint d = 0; d < KL; d += 2) {
                    const vec2 c = unpackHalf2x16(lc.v[j * (KL / 2) + d / 2]);
                    a += sq[d] * c.x + sq[d + 1] * c.y;
                }
                for (uint d = 0; d < DR; d += 2) {
                    const vec2 k = unpackHalf2x16(pc_.v[j * (DR / 2) + d / 2]);
                    b += sq[512 + d] * k.x + sq[512 + d + 1] * k.y;
                }
                s = (a + b) * pc.f[0];
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
            for (uint i = 0; i < 8; i++) acc[i] *= corr;
            for (uint jj = 0; jj < n; jj++) {
                const float s = ss[jj];
                if (s == -1.0 / 0.0) continue;
                const float p = exp(s - nm);
                L += p;
                for (uint i = 0; i < 8; i++) {
                    const uint d = tid + 64 * i;
                    if (d < KL) {
                        const vec2 c = unpackHalf2x16(lc.v[(c0 + jj) * (KL / 2) + d / 2]);
                        acc[i] += p * ((d & 1u) == 0u ? c.x : c.y);
                    }
                }
            }
            M = nm;
        }
        barrier();
    }
    const float inv = L > 0.0 ? 1.0 / L : 0.0;
    for (uint i = 0; i < 8; i++) {
        const uint d = tid + 64 * i;
        if (d < KL) o.v[(t * NH + h) * KL + d] = acc[i] * inv;
    }
}
