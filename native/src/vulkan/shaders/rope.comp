#version 450
/* rope.comp: RoPE in place as GGUF's llama defines it: adjacent pairs (x[2i], x[2i+1]) of each head's first n_rot
 * values rotate by the host's cos/sin table (the CPU path's rope_cs, so both rotate by the same angles).
 * a0 X [T, ldx], a1 cs [T, n_rot]; u0 T, u1 heads, u2 ldx, u3 head stride, u4 n_rot.
 * An invocation per (token, head, pair), striding over the grid. Dispatch: x = min(ceil(n / 64), device limit). */
#include "common.glsl"
layout(local_size_x = 64) in;

void main() {
    const uint T = pc.u[0], NH = pc.u[1], ldx = pc.u[2], hs = pc.u[3], nr = pc.u[4], np = nr / 2;
    FBuf X = FBuf(pc.a[0]), cs = FBuf(pc.a[1]);
    for (uint id = gl_GlobalInvocationID.x; id < T * NH * np; id += gl_NumWorkGroups.x * 64) {
        const uint t = id / (NH * np), h = (id / np) % NH, i = 2 * (id % np);
        const uint o = t * ldx + h * hs + i;
        const float x0 = X.v[o], x1 = X.v[o + 1], co = cs.v[t * nr + i], si = cs.v[t * nr + i + 1];
        X.v[o] = x0 * co - x1 * si;
        X.v[o + 1] = x0 * si + x1 * co;
    }
}
