/* accum.c: reference "accumulate rows" kernels, y[T, H] += C[T, F] @ D[F, H], for every weight type.
 *
 * Shape legend: T = tokens (rows of y and C), F = rows of D (an expert's width), H = row length of D (hidden size).
 *
 * This is the second half of a BlockFFN expert: D holds the expert's down projection transposed, one row of H
 * elements per hidden unit f, stored in the weight type (rows of row_size(H) bytes, contiguous). Weights stationary:
 * each row f is dequantized once (in 32-element pieces) and applied to all T tokens:
 *     y[idx[t], j] += c[t, f] * D[f, j]        for f in order, then t, then j
 * idx (NULL = identity) scatters the T rows into y, so a subset of a batch's tokens can be accumulated in place.
 * SIMD tiers (x86/avx2.c, x86/avx512.c) compute the same sums and differ only in float rounding (FMA, order).
 */
#include "tiers.h"

enum { PIECE = 32 }; /* elements dequantized at a time: one block of every quantized type */

static void accum_ref(sp_type type, float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                      const void *d, int64_t F, int64_t H, int64_t T) {
    const sp_type_traits tr = sp_type_traits_of(type);
    const size_t row_bytes = sp_row_size(type, H);
    float w[PIECE];
    for (int64_t f = 0; f < F; f++) {
        const uint8_t *row = (const uint8_t *)d + (size_t)f * row_bytes; /* D[f, :] */
        for (int64_t j0 = 0; j0 < H; j0 += PIECE) {
            const int64_t n = H - j0 < PIECE ? H - j0 : PIECE;
            sp_dequantize_row(type, row + (size_t)(j0 / tr.block_size) * tr.type_size, w, n);
            for (int64_t t = 0; t < T; t++) {
                const float a = c[t * ldc + f];
                float *yt = y + (idx ? idx[t] : t) * ldy + j0;
                for (int64_t j = 0; j < n; j++) yt[j] += a * w[j];
            }
        }
    }
}

#define ACCUM_REF(name, TYPE)                                                                                   \
    void sp_accum_##name##_ref(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,           \
                               const void *d, int64_t F, int64_t H, int64_t T) {                                 \
        accum_ref(TYPE, y, ldy, idx, c, ldc, d, F, H, T);                                                        \
    }

ACCUM_REF(f32, SP_TYPE_F32)
ACCUM_REF(f16, SP_TYPE_F16)
ACCUM_REF(bf16, SP_TYPE_BF16)
ACCUM_REF(q4_0, SP_TYPE_Q4_0)
ACCUM_REF(q4_1, SP_TYPE_Q4_1)
ACCUM_REF(q8_0, SP_TYPE_Q8_0)
