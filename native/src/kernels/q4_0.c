/* q4_0.c: reference matmul for Q4_0 weights x q8a activations.
 *
 * Q4_0 block: x = (q - 8) * d, q in 0..15 (element j low nibble of qs[j], element j+16 high nibble).
 * Per block:  sum_i (q_w - 8) d_w * q_x d_x = d_w d_x * isum,  isum = sum_i (q_w - 8) q_x  (exact int32).
 * SIMD tiers compute the same isum exactly (as sum q_w q_x - 8 sum q_x) and differ only in float summation order.
 */
#include "tiers.h"

void sp_matmul_q4_0_ref(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                        int64_t T) {
    const int64_t nb = K / SP_QK;
    for (int64_t r = r0; r < r1; r++) {
        const sp_block_q4_0 *wr = (const sp_block_q4_0 *)w + r * nb; /* [nb] */
        for (int64_t t = 0; t < T; t++) {
            const sp_block_q8a *xt = (const sp_block_q8a *)x + t * nb; /* [nb] */
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int isum = 0;
                for (int j = 0; j < SP_QK / 2; j++) {
                    isum += ((wr[b].qs[j] & 15) - 8) * xt[b].qs[j];
                    isum += ((wr[b].qs[j] >> 4) - 8) * xt[b].qs[j + 16];
                }
                sum += sp_f16_to_f32(wr[b].d) * xt[b].d * (float)isum;
            }
            y[t * ldy + r] = sum;
        }
    }
}
