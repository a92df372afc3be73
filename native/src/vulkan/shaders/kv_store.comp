#version 450
/* kv_store.comp: the batch's keys and values into one layer's F16 caches at slots P .. P + T - 1 (a slot: KVD halves,
 * two per word). a0 k [T, KVD], a1 v [T, KVD], a2 key cache, a3 value cache (the layer's [C, KVD / 2] words);
 * u0 T, u1 KVD, u2 P. One invocation per (token, pair). Dispatch: x = ceil(T * KVD / 2 / 64). */
#include "common.glsl"
layout(local_size_x = 64) in;

void main() {
    const uint T = pc.u[0], KVD = pc.u[1], P = pc.u[2], hw = KVD / 2, id = gl_GlobalInvocationID.x;
    if (id >= T * hw) return;
    const uint t = id / hw, i = id % hw;
    FBuf k = FBuf(pc.a[0]), v = FBuf(pc.a[1]);
    UBuf kc = UBuf(pc.a[2]), vc = UBuf(pc.a[3]);
    kc.v[(P + t) * hw + i] = packHalf2x16(vec2(k.v[t * KVD + 2 * i], k.v[t * KVD + 2 * i + 1]));
    vc.v[(P + t) * hw + i] = packHalf2x16(vec2(v.v[t * KVD + 2 * i], v.v[t * KVD + 2 * i + 1]));
}
