/* q8_0.c: reference matmul for Q8_0 weights x q8a activations.
 *
 * Q8_0 block: x = q * d, q int8.  Per block: d_w d_x * isum, isum = sum_i q_w q_x (exact int32).
 */
#include "tiers.h"

void sp_matmul_q8_0_ref(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                        int64_t T) {
    const int64_t nb = K / SP_QK;
    for (int64_t r = r0; r < r1; r++) {
        const sp_block_q8_0 *wr = (const sp_block_q8_0 *)w + r * nb; /* [nb] */
        for (int64_t t = 0; t < T; t++) {
            const sp_block_q8a *xt = (const sp_block_q8a *)x + t * nb; /* [nb] */
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int isum = 0;
                for (int j = 0; j < SP_QK; j++) isum += wr[b].qs[j] * xt[b].qs[j];
                sum += sp_f16_to_f32(wr[b].d) * xt[b].d * (float)isum;
            }
            y[t * ldy + r] = sum;
        }
    }
}
