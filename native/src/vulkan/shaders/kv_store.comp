#version 450
/* kv_store.comp: the batch's cache rows into one layer's F16 caches at slots P .. P + T - 1, two halves a word.
 * Grouped-query attention: keys and values (KD = VD = KVD, from k [T, KVD] and v [T, KVD]); multi-head latent
 * attention: the latent c (KD = KL) and the rotated rope key (VD = DR), both from the kv_a projection's rows
 * [T, KL + DR]. a0 key source, a1 value source, a2 key cache ([C, KD / 2] words), a3 value cache ([C, VD / 2]);
 * u0 T, u1 KD, u2 P, u3 VD, u4 key source row stride, u5 value source row stride (KD, VD, ... all even).
 * An invocation per (token, pair), striding over the grid. Dispatch: x = min(ceil(n / 64), device limit). */
#include "common.glsl"
layout(local_size_x = 64) in;

void main() {
    const uint T = pc.u[0], KD = pc.u[1], P = pc.u[2], VD = pc.u[3], ldk = pc.u[4], ldv = pc.u[5];
    const uint hw = max(KD, VD) / 2;
    FBuf k = FBuf(pc.a[0]), v = FBuf(pc.a[1]);
    UBuf kc = UBuf(pc.a[2]), vc = UBuf(pc.a[3]);
    for (uint id = gl_GlobalInvocationID.x; id < T * hw; id += gl_NumWorkGroups.x * 64) {
        const uint t = id / hw, i = id % hw;
        if (2 * i < KD) kc.v[(P + t) * (KD / 2) + i] = packHalf2x16(vec2(k.v[t * ldk + 2 * i], k.v[t * ldk + 2 * i + 1]));
        if (2 * i < VD) vc.v[(P + t) * (VD / 2) + i] = packHalf2x16(vec2(v.v[t * ldv + 2 * i], v.v[t * ldv + 2 * i + 1]));
    }
}
