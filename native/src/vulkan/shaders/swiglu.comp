#version 450
/* swiglu.comp: gate = silu(gate) * up, elementwise over n values, striding over the grid. a0 gate, a1 up; u0 n.
 * Dispatch: x = min(ceil(n / 64), device limit). */
#include "common.glsl"
layout(local_size_x = 64) in;

void main() {
    FBuf g = FBuf(pc.a[0]), u = FBuf(pc.a[1]);
    for (uint i = gl_GlobalInvocationID.x; i < pc.u[0]; i += gl_NumWorkGroups.x * 64) {
        const float x = g.v[i];
        g.v[i] = x / (1.0 + exp(-x)) * u.v[i];
    }
}
