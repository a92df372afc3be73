/* q4_1.c: reference matmul for Q4_1 weights x q8a activations.
 *
 * Q4_1 block: x = q * d + m, q in 0..15 (nibbles as in Q4_0).
 * Per block:  sum_i (d_w q_w + m_w)(d_x q_x) = d_w d_x * isum + m_w * s_x,  isum = sum_i q_w q_x (exact int32),
 *             s_x = d_x * sum_i q_x (stored in the activation block).
 */
#include "tiers.h"

void sp_matmul_q4_1_ref(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                        int64_t T) {
    const int64_t nb = K / SP_QK;
    for (int64_t r = r0; r < r1; r++) {
        const sp_block_q4_1 *wr = (const sp_block_q4_1 *)w + r * nb; /* [nb] */
        for (int64_t t = 0; t < T; t++) {
            const sp_block_q8a *xt = (const sp_block_q8a *)x + t * nb; /* [nb] */
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int isum = 0;
                for (int j = 0; j < SP_QK / 2; j++) {
                    isum += (wr[b].qs[j] & 15) * xt[b].qs[j];
                    isum += (wr[b].qs[j] >> 4) * xt[b].qs[j + 16];
                }
                sum += sp_f16_to_f32(wr[b].d) * xt[b].d * (float)isum + sp_f16_to_f32(wr[b].m) * xt[b].s;
            }
            y[t * ldy + r] = sum;
        }
    }
}
