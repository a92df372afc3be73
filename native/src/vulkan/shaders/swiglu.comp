#version 450
/* swiglu.comp: gate = silu(gate) * up, elementwise over n values. a0 gate, a1 up; u0 n.
 * Dispatch: x = ceil(n / 64). */
#include "common.glsl"
layout(local_size_x = 64) in;

void main() {
    const uint i = gl_GlobalInvocationID.x;
    if (i >= pc.u[0]) return;
    FBuf g = FBuf(pc.a[0]), u = FBuf(pc.a[1]);
    const float x = g.v[i];
    g.v[i] = x / (1.0 + exp(-x)) * u.v[i];
}
