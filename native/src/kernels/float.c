/* float.c: reference matmuls for float weights (F32, F16, BF16) x float32 activations.
 *
 * y[t*ldy + r] = sum_k W[r, k] * x[t, k], accumulated in float32 in k order.
 */
#include "tiers.h"

#define FLOAT_MATMUL_REF(name, wtype, load)                                                                    \
    void sp_matmul_##name##_ref(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,      \
                                int64_t r1, int64_t T) {                                                         \
        for (int64_t r = r0; r < r1; r++) {                                                                      \
            const wtype *wr = (const wtype *)w + r * K; /* [K] */                                                \
            for (int64_t t = 0; t < T; t++) {                                                                    \
                const float *xt = (const float *)x + t * K; /* [K] */                                            \
                float sum = 0.0f;                                                                                \
                for (int64_t k = 0; k < K; k++) sum += load(wr[k]) * xt[k];                                     \
                y[t * ldy + r] = sum;                                                                            \
            }                                                                                                    \
        }                                                                                                        \
    }

#define LOAD_F32(v) (v)
FLOAT_MATMUL_REF(f32, float, LOAD_F32)
FLOAT_MATMUL_REF(f16, sp_f16, sp_f16_to_f32)
FLOAT_MATMUL_REF(bf16, sp_bf16, sp_bf16_to_f32)
