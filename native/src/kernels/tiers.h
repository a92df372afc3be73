/* tiers.h: the functions each kernel tier provides (internal; dispatch.c assembles them into sp_kernels tables).
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows; every matmul follows
 * sp_matmul_fn in kernels.h: y[t*ldy + r] = dot(W[r, :], x[t, :]) for t < T, r in [r0, r1).
 */
#ifndef SP_KERNEL_TIERS_H
#define SP_KERNEL_TIERS_H

#include "kernels.h"

#define SP_DECLARE_TIER(tier)                                                                                   \
    void sp_quantize_q8a_##tier(sp_block_q8a *y, const float *x, int64_t k);                                    \
    void sp_matmul_q4_0_##tier(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,       \
                               int64_t r1, int64_t T);                                                           \
    void sp_matmul_q4_1_##tier(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,       \
                               int64_t r1, int64_t T);                                                           \
    void sp_matmul_q8_0_##tier(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,       \
                               int64_t r1, int64_t T);                                                           \
    void sp_matmul_f32_##tier(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,        \
                              int64_t r1, int64_t T);                                                            \
    void sp_matmul_f16_##tier(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,        \
                              int64_t r1, int64_t T);                                                            \
    void sp_matmul_bf16_##tier(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,       \
                               int64_t r1, int64_t T);                                                           \
    void sp_accum_q4_0_##tier(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,            \
                              const void *d, int64_t F, int64_t H, int64_t T);                                   \
    void sp_accum_q4_1_##tier(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,            \
                              const void *d, int64_t F, int64_t H, int64_t T);                                   \
    void sp_accum_q8_0_##tier(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,            \
                              const void *d, int64_t F, int64_t H, int64_t T);                                   \
    void sp_accum_f32_##tier(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,             \
                             const void *d, int64_t F, int64_t H, int64_t T);                                    \
    void sp_accum_f16_##tier(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,             \
                             const void *d, int64_t F, int64_t H, int64_t T);                                    \
    void sp_accum_bf16_##tier(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,            \
                              const void *d, int64_t F, int64_t H, int64_t T);                                   \
    float sp_dot_f32_##tier(const float *a, const float *b, int64_t n);                                         \
    void sp_axpy_f32_##tier(float *y, float a, const float *x, int64_t n);                                      \
    void sp_attn_scores_f16_##tier(const float *q, int64_t ldq, int64_t M, const sp_f16 *k, int64_t n, int64_t D,  \
                                   float scale, float *out, int64_t ldo);                                        \
    void sp_attn_sum_f16_##tier(float *out, int64_t ldo, const float *p, int64_t ldp, int64_t M, const sp_f16 *v,  \
                                int64_t ld, int64_t n, int64_t D);                                               \
    void sp_f32_to_f16_##tier(sp_f16 *y, const float *x, int64_t n);                                            \
    void sp_round_f16_##tier(float *x, int64_t n);                                                              \
    float sp_exp_sum_##tier(float *x, int64_t n, float mx);                                                     \
    void sp_silu_mul_##tier(float *x, const float *m, float s, int64_t n);                                      \
    int64_t sp_first_above_##tier(const float *x, int64_t n, float t);                                         \
    float sp_max_f32_##tier(const float *x, int64_t n, bool *bad);

/* pack.c: the row-interleaved packed layout of Q4_0/Q4_1/Q8_0 weights with rg rows per group (layout there). */
size_t sp_packed_group_bytes(sp_type type, int64_t K, int rg);
size_t sp_packed_size_rg(sp_type type, int64_t N, int64_t K, int rg); /* 0 for types that do not pack */
void sp_pack_rg(sp_type type, void *dst, const void *src, int64_t N, int64_t K, int rg, bool q8_unsigned);
/* pack.c: the "down" streaming layout of Q4_0 rows D[F, H] for accum_packed (layout there). */
enum { SP_DOWN_RG = 16 };
size_t sp_packed_down_size_q4_0(int64_t F, int64_t H);
void sp_pack_down_q4_0(void *dst, const void *src, int64_t F, int64_t H);
/* pack.c: the "down int8" layout of the same rows for accum_packed_i8 (same size as "down"; layout there). */
void sp_pack_down_i8_q4_0(void *dst, const void *src, int64_t F, int64_t H);

SP_DECLARE_TIER(ref)
#if defined(SP_HAVE_X86)
SP_DECLARE_TIER(avx2)
SP_DECLARE_TIER(avx512)
#endif
/* The ARM tiers (arm/neon.c, arm/dotprod.c, arm/i8mm.c) keep their functions static and fill their table entries
 * through sp_kernels_fill_<tier> (dispatch.c): each starts from the tier below, so it defines only what it
 * improves. */

#endif
