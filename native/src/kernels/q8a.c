/* q8a.c: reference activation quantization (float rows -> sp_block_q8a) and the float / F16 vector helpers of
 * attention.
 *
 * Activation block (kernels.h): 32 int8 q with d = amax/127, q = round-to-nearest-even(x * (1/d)), and
 * s = d * sum(q), used by the Q4_1 min term and the Q4_0 / Q8_0 offset corrections. SIMD tiers reproduce these
 * bytes exactly (they use the same reciprocal multiply and the CPU's default nearest-even rounding).
 * d and s are kept at F16 precision (q is computed with the unrounded d), exactly as ggml's Q8_0/Q8_1 activation
 * blocks store them, so that Sparrow's quantized matmuls differ from llama.cpp's by summation order only.
 */
#include "tiers.h"

#include <math.h>

void sp_quantize_q8a_ref(sp_block_q8a *y, const float *x, int64_t k) {
    for (int64_t i = 0; i < k / SP_QK; i++, x += SP_QK) {
        float amax = 0.0f;
        for (int j = 0; j < SP_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < SP_QK; j++) {
            const int q = (int)nearbyintf(x[j] * id);
            y[i].qs[j] = (int8_t)q;
            sum += q;
        }
        y[i].d = sp_f16_round(d);
        y[i].s = sp_f16_round(d * (float)sum);
    }
}

float sp_dot_f32_ref(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void sp_axpy_f32_ref(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void sp_attn_scores_f16_ref(const float *q, int64_t ldq, int64_t M, const sp_f16 *k, int64_t n, int64_t D,
                            float scale, float *out, int64_t ldo) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < n; j++) {
            const sp_f16 *kj = k + (j / SP_KBLK) * SP_KBLK * D + j % SP_KBLK; /* the blocked layout: stride 16 in d */
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += q[m * ldq + d] * sp_f16_to_f32(kj[d * SP_KBLK]);
            out[m * ldo + j] = s * scale;
        }
}

void sp_attn_sum_f16_ref(float *out, int64_t ldo, const float *p, int64_t ldp, int64_t M, const sp_f16 *v,
                         int64_t ld, int64_t n, int64_t D) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < n; j++) {
            const float a = p[m * ldp + j];
            if (a == 0.0f) continue;
            for (int64_t i = 0; i < D; i++) out[m * ldo + i] += a * sp_f16_to_f32(v[j * ld + i]);
        }
}

void sp_round_f16_ref(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = sp_f16_round(x[i]);
}

void sp_f32_to_f16_ref(sp_f16 *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = sp_f32_to_f16(x[i]);
}

float sp_max_f32_ref(const float *x, int64_t n, bool *bad) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (!(x[i] < INFINITY)) *bad = true;
        else if (x[i] > mx) mx = x[i];
    }
    return mx;
}

int64_t sp_first_above_ref(const float *x, int64_t n, float t) {
    int64_t i = 0;
    while (i < n && !(x[i] > t)) i++;
    return i;
}

void sp_silu_mul_ref(float *x, const float *m, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i])) * (m ? m[i] : s);
}

float sp_exp_sum_ref(float *x, int64_t n, float mx) {
    int64_t acc = 0; /* the sum in units of 2^-36 (kernels.h) */
    bool nan = false;
    for (int64_t i = 0; i < n; i++) {
        x[i] = x[i] == -INFINITY ? 0.0f : expf(x[i] - mx);
        if (x[i] != x[i]) nan = true;
        else acc += llrintf(fminf(x[i], 1.0f) * 0x1p36f); /* terms are <= 1 when mx is the maximum */
    }
    return nan ? NAN : (float)((double)acc * 0x1p-36);
}
