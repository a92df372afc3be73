#version 450
/* rmsnorm.comp: Y[t] = X[t] / sqrt(mean(X[t]^2) + eps) * post * w, one workgroup per token.
 * a0 X [T, H], a1 Y [T, H], a2 w [H]; u0 H; f0 eps, f1 post. Dispatch: x = T. */
#include "common.glsl"
layout(local_size_x = 64) in;

shared float red[64];

void main() {
    const uint tid = gl_LocalInvocationID.x, t = gl_WorkGroupID.x, H = pc.u[0];
    FBuf X = FBuf(pc.a[0]), Y = FBuf(pc.a[1]), w = FBuf(pc.a[2]);
    float ss = 0.0;
    for (uint i = tid; i < H; i += 64) ss += X.v[t * H + i] * X.v[t * H + i];
    red[tid] = ss;
    barrier();
    for (uint s = 32; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        barrier();
    }
    const float scale = pc.f[1] / sqrt(red[0] / float(H) + pc.f[0]);
    for (uint i = tid; i < H; i += 64) Y.v[t * H + i] = X.v[t * H + i] * scale * w.v[i];
}
