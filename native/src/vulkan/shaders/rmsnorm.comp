#version 450
/* rmsnorm.comp: Y[t] = X[t] / sqrt(mean(X[t]^2) + eps) * post * w over the first H values of each row, one
 * workgroup per token (in place when X is Y). a0 X [T, ld], a1 Y [T, ld], a2 w [H]; u0 H, u1 ld (row stride; 0: H);
 * f0 eps, f1 post. Dispatch: x = T. */
#include "common.glsl"
layout(local_size_x = 64) in;

shared float red[64];

void main() {
    const uint tid = gl_LocalInvocationID.x, H = pc.u[0], t = gl_WorkGroupID.x * (pc.u[1] != 0u ? pc.u[1] : H);
    FBuf X = FBuf(pc.a[0]), Y = FBuf(pc.a[1]), w = FBuf(pc.a[2]);
    float ss = 0.0;
    for (uint i = tid; i < H; i += 64) ss += X.v[t + i] * X.v[t + i];
    red[tid] = ss;
    barrier();
    for (uint s = 32; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        barrier();
    }
    const float scale = pc.f[1] / sqrt(red[0] / float(H) + pc.f[0]);
    for (uint i = tid; i < H; i += 64) Y.v[t + i] = X.v[t + i] * scale * w.v[i];
}
