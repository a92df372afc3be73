/* x86/avx512.c: AVX-512 (F, BW, VL, DQ, VNNI) kernels. Compiled with -mavx512{f,bw,vl,dq,vnni} -mavx2 -mfma -mf16c,
 * chosen at run time by dispatch.c only on CPUs (and OSes) that support all of them.
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, nb = K/32 blocks per row.
 *
 * Quantized matmuls (Q4_0, Q4_1, Q8_0 weights x sp_block_q8a activations): weights stationary, one weight row per
 * int32 lane.
 *   - A row group is 16 consecutive weight rows (lane l = row rg+l; rows past r1 repeat the last row and are masked
 *     off at the store). For each block b of the group the 16 rows' quants are transposed in registers (4 x 128-bit
 *     loads per 4 rows, vpermt2d + vshufi64x2) so that vector j holds, in lane l, the 4 bytes of row l that multiply
 *     activation bytes 4j..4j+3 of block b. Q4 nibbles are unpacked to bytes 0..15 (vectors 0-3: low nibbles =
 *     elements 0..15, vectors 4-7: high nibbles = elements 16..31); Q8_0 bytes are stored as w+128 (xor 0x80) so
 *     that they are unsigned. The 8 vectors + the 16 scales d_w (and mins m_w) are written to a stack buffer
 *     (`wblk`, 640 bytes per block), once per row group.
 *   - Then for each tile of up to 8 activation rows t: isum[t] (16 lanes) = corr[t,b] + sum_j vpdpbusd(w_j,
 *     broadcast dword j of x[t,b].qs) -- u8 x s8 products, exact int32 -- and acc[t] += float(isum) * (d_w * d_x)
 *     (+ m_w * s_x for Q4_1). corr = -8 * sum(q_x) for Q4_0 (q_w - 8), -128 * sum(q_x) for Q8_0 (w+128), 0 for Q4_1,
 *     so isum equals ref's exact integer dot product. Each weight byte is read from memory once per call and every
 *     vpdpbusd does 64 useful multiply-adds whatever T is; T only adds 12 instructions per (16 rows, block, token).
 *   - Loop order: passes of <= 64 tokens > chunks of KC = 64 blocks (one chunk for K <= 2048) > row groups > token
 *     tiles; y itself accumulates across chunks. The next row group is prefetched while this one is unpacked.
 * Packed weights (matmul_packed, used for model weights repacked at load by kernels/pack.c with RG = 16): the same
 *   math reading, per row group and block, the 4 (Q4) / 8 (Q8_0, stored as q+128) lane vectors and the 16 f16
 *   scales straight from memory -- the transposed form above, stored once -- so no transpose or gather per call.
 * Float matmuls (F32/F16/BF16 weights x f32 activations): 4 weight rows x up to 4 tokens of zmm accumulators; each
 * 16-element weight vector is converted once (vcvtph2ps / bf16 << 16) and applied to the tile's tokens with FMA.
 */
#include "../tiers.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { RG = 16, TT = 8, KC = 64, TC = 64, PF = 1 }; /* ..., prefetch distance in row groups */ /* rows per group, tokens per tile, blocks per K chunk, tokens per pass */
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

/* f16 -> f32 of one scale with F16C (same value as sp_f16_to_f32: the conversion is exact). */
static inline float sp_f16_to_f32_fast(sp_f16 h) { return _cvtsh_ss(h); }

/* ---- activations --------------------------------------------------------------------------------------------- */

void sp_quantize_q8a_avx512(sp_block_q8a *y, const float *x, int64_t k) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t i = 0; i < k / SP_QK; i++, x += SP_QK) {
        const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
        const float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id)); /* nearest even, as nearbyintf in ref */
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
        _mm_storeu_si128((__m128i *)y[i].qs, _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(y[i].qs + 16), _mm512_cvtsepi32_epi8(qb));
        y[i].d = sp_f16_round(d);
        y[i].s = sp_f16_round(d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
    }
}

float sp_dot_f32_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

void sp_axpy_f32_avx512(float *y, float a, const float *x, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

/* ---- attention over the F16 cache (kernels.h) ---------------------------------------------------------------------
 * Scores: the keys are stored in blocks of 16 slots transposed (kernels.h SP_KBLK), so for each d one 32-byte load
 * and one conversion give slot d-values of 16 slots, applied with fused multiply-adds to every query of the tile
 * (q[m][d] broadcast): acc[m] lane l = score of slot l, summed over d in order. KB key blocks at once for small
 * tiles (M <= 4: 4 blocks, <= 8: 2), so there are enough independent chains to hide the FMA latency.
 * Weighted sums: lanes are output elements (up to 64 in four vectors); each value row is converted once per tile of
 * queries and applied to each query's accumulators, masked off where that query's p is 0. */

/* NT queries x KB key blocks (blocks past the valid nkb repeat block 0 and are not stored; the last stored block keeps
 * `last` lanes). */
ALWAYS_INLINE void scores_tile(const float *q, int64_t ldq, const sp_f16 *k, int64_t D, int nkb, int last,
                               float scale, float *out, int64_t ldo, int NT, int KB) {
    const sp_f16 *kb[4];
    for (int b = 0; b < KB; b++) kb[b] = k + (b < nkb ? b : 0) * SP_KBLK * D;
    __m512 acc[16];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < NT * KB; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 kd[4];
        _Pragma("GCC unroll 4")
        for (int b = 0; b < KB; b++) kd[b] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kb[b] + d * SP_KBLK)));
        _Pragma("GCC unroll 16")
        for (int m = 0; m < NT; m++) {
            const __m512 qm = _mm512_set1_ps(q[m * ldq + d]);
            _Pragma("GCC unroll 4")
            for (int b = 0; b < KB; b++) acc[m * KB + b] = _mm512_fmadd_ps(qm, kd[b], acc[m * KB + b]);
        }
    }
    const __m512 vs = _mm512_set1_ps(scale);
    _Pragma("GCC unroll 16")
    for (int m = 0; m < NT; m++)
        _Pragma("GCC unroll 4")
        for (int b = 0; b < KB; b++)
            if (b < nkb) {
                const __mmask16 mk = b == nkb - 1 ? (__mmask16)((1u << last) - 1) : (__mmask16)0xffff;
                _mm512_mask_storeu_ps(out + m * ldo + b * SP_KBLK, mk, _mm512_mul_ps(acc[m * KB + b], vs));
            }
}

/* One small function per tile shape (not one dispatcher with every shape inlined): compilers keep each tile's
 * accumulators in registers, and clang with sanitizers compiles them in seconds, not tens of minutes. */
#define SCORES_FN(nt, kb)                                                                                       \
    static __attribute__((noinline)) void scores_##nt##_##kb(const float *qt, int64_t ldq, const sp_f16 *kt,     \
                                                            int64_t D, int nkb, int last, float scale, float *ot, \
                                                            int64_t ldo) {                                       \
        scores_tile(qt, ldq, kt, D, nkb, last, scale, ot, ldo, nt, kb);                                          \
    }
SCORES_FN(1, 4)
SCORES_FN(2, 4)
SCORES_FN(3, 4)
SCORES_FN(4, 4)
SCORES_FN(1, 2)
SCORES_FN(2, 2)
SCORES_FN(3, 2)
SCORES_FN(4, 2)
SCORES_FN(5, 2)
SCORES_FN(6, 2)
SCORES_FN(7, 2)
SCORES_FN(8, 2)
SCORES_FN(1, 1)
SCORES_FN(2, 1)
SCORES_FN(3, 1)
SCORES_FN(4, 1)
SCORES_FN(5, 1)
SCORES_FN(6, 1)
SCORES_FN(7, 1)
SCORES_FN(8, 1)
SCORES_FN(9, 1)
SCORES_FN(10, 1)
SCORES_FN(11, 1)
SCORES_FN(12, 1)
SCORES_FN(13, 1)
SCORES_FN(14, 1)
SCORES_FN(15, 1)
SCORES_FN(16, 1)
#define SCORES_CASE(nt, kb) \
    case nt: scores_##nt##_##kb(qt, ldq, kt, D, nkb, last, scale, ot, ldo); break;

void sp_attn_scores_f16_avx512(const float *q, int64_t ldq, int64_t M, const sp_f16 *k, int64_t n, int64_t D,
                               float scale, float *out, int64_t ldo) {
    const int64_t nblk = (n + SP_KBLK - 1) / SP_KBLK;
    const int KB = M <= 4 ? 4 : M <= 8 ? 2 : 1, MT = 16 / KB;
    for (int64_t b = 0; b < nblk; b += KB) {
        const int nkb = (int)SP_MIN_I(KB, nblk - b), last = (int)SP_MIN_I(SP_KBLK, n - (b + nkb - 1) * SP_KBLK);
        const sp_f16 *kt = k + b * SP_KBLK * D;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int nt = (int)SP_MIN_I(MT, M - m0);
            const float *qt = q + m0 * ldq;
            float *ot = out + m0 * ldo + b * SP_KBLK;
            if (KB == 4) {
                switch (nt) { SCORES_CASE(1, 4) SCORES_CASE(2, 4) SCORES_CASE(3, 4) default: SCORES_CASE(4, 4) }
            } else if (KB == 2) {
                switch (nt) {
                    SCORES_CASE(1, 2) SCORES_CASE(2, 2) SCORES_CASE(3, 2) SCORES_CASE(4, 2)
                    SCORES_CASE(5, 2) SCORES_CASE(6, 2) SCORES_CASE(7, 2) default: SCORES_CASE(8, 2)
                }
            } else {
                switch (nt) {
                    SCORES_CASE(1, 1) SCORES_CASE(2, 1) SCORES_CASE(3, 1) SCORES_CASE(4, 1)
                    SCORES_CASE(5, 1) SCORES_CASE(6, 1) SCORES_CASE(7, 1) SCORES_CASE(8, 1)
                    SCORES_CASE(9, 1) SCORES_CASE(10, 1) SCORES_CASE(11, 1) SCORES_CASE(12, 1)
                    SCORES_CASE(13, 1) SCORES_CASE(14, 1) SCORES_CASE(15, 1) default: SCORES_CASE(16, 1)
                }
            }
        }
    }
}

/* NT queries x elements [i0, i0 + w) (w <= 16 NU) of the output: acc[m][u] over all n rows in order. */
ALWAYS_INLINE void sum_tile(float *out, int64_t ldo, const float *p, int64_t ldp, const sp_f16 *v, int64_t ld,
                            int64_t n, int64_t w, int NT, int NU) {
    __mmask16 mu[4];
    __m512 acc[32];
    _Pragma("GCC unroll 4")
    for (int u = 0; u < NU; u++) {
        const int64_t left = w - 16 * u;
        mu[u] = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    }
    _Pragma("GCC unroll 8")
    for (int m = 0; m < NT; m++)
        _Pragma("GCC unroll 4")
        for (int u = 0; u < NU; u++) acc[m * NU + u] = _mm512_maskz_loadu_ps(mu[u], out + m * ldo + 16 * u);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vj[4];
        _Pragma("GCC unroll 4")
        for (int u = 0; u < NU; u++)
            vj[u] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mu[u], (const void *)(v + j * ld + 16 * u)));
        _Pragma("GCC unroll 8")
        for (int m = 0; m < NT; m++) {
            const __m512 a = _mm512_set1_ps(p[m * ldp + j]);
            const __mmask16 nz = _mm512_cmp_ps_mask(a, zero, _CMP_NEQ_UQ); /* p == 0: the row adds nothing */
            _Pragma("GCC unroll 4")
            for (int u = 0; u < NU; u++) acc[m * NU + u] = _mm512_mask3_fmadd_ps(a, vj[u], acc[m * NU + u], nz);
        }
    }
    _Pragma("GCC unroll 8")
    for (int m = 0; m < NT; m++)
        _Pragma("GCC unroll 4")
        for (int u = 0; u < NU; u++) _mm512_mask_storeu_ps(out + m * ldo + 16 * u, mu[u], acc[m * NU + u]);
}

#define SUM_FN(nt, nu)                                                                                          \
    static __attribute__((noinline)) void sum_##nt##_##nu(float *ot, int64_t ldo, const float *pt, int64_t ldp,     \
                                                         const sp_f16 *v, int64_t ld, int64_t n, int64_t w) {        \
        sum_tile(ot, ldo, pt, ldp, v, ld, n, w, nt, nu);                                                         \
    }
SUM_FN(1, 4)
SUM_FN(2, 4)
SUM_FN(3, 4)
SUM_FN(4, 4)
SUM_FN(5, 4)
SUM_FN(6, 4)
SUM_FN(1, 3)
SUM_FN(2, 3)
SUM_FN(3, 3)
SUM_FN(4, 3)
SUM_FN(5, 3)
SUM_FN(6, 3)
SUM_FN(7, 3)
SUM_FN(8, 3)
SUM_FN(1, 2)
SUM_FN(2, 2)
SUM_FN(3, 2)
SUM_FN(4, 2)
SUM_FN(5, 2)
SUM_FN(6, 2)
SUM_FN(7, 2)
SUM_FN(8, 2)
SUM_FN(1, 1)
SUM_FN(2, 1)
SUM_FN(3, 1)
SUM_FN(4, 1)
SUM_FN(5, 1)
SUM_FN(6, 1)
SUM_FN(7, 1)
SUM_FN(8, 1)
#define SUM_CASE(nt, nu) \
    case nt: sum_##nt##_##nu(ot, ldo, pt, ldp, v + i0, ld, n, w); break;
#define SUM_SWITCH(nu)                                                                                          \
    switch (nt) {                                                                                               \
        SUM_CASE(1, nu) SUM_CASE(2, nu) SUM_CASE(3, nu) SUM_CASE(4, nu) SUM_CASE(5, nu) SUM_CASE(6, nu)          \
        SUM_CASE(7, nu) default: SUM_CASE(8, nu)                                                                 \
    }

void sp_attn_sum_f16_avx512(float *out, int64_t ldo, const float *p, int64_t ldp, int64_t M, const sp_f16 *v,
                            int64_t ld, int64_t n, int64_t D) {
    for (int64_t i0 = 0; i0 < D; i0 += 64) {
        const int64_t w = SP_MIN_I(64, D - i0);
        const int nu = (int)((w + 15) / 16), MT = nu == 4 ? 6 : 8;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int nt = (int)SP_MIN_I(MT, M - m0);
            float *ot = out + m0 * ldo + i0;
            const float *pt = p + m0 * ldp;
            if (nu == 4) {
                switch (nt) {
                    SUM_CASE(1, 4) SUM_CASE(2, 4) SUM_CASE(3, 4) SUM_CASE(4, 4) SUM_CASE(5, 4) default: SUM_CASE(6, 4)
                }
            } else if (nu == 3) {
                SUM_SWITCH(3)
            } else if (nu == 2) {
                SUM_SWITCH(2)
            } else {
                SUM_SWITCH(1)
            }
        }
    }
}

void sp_round_f16_avx512(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm512_mask_storeu_ps(x + i, m, _mm512_cvtph_ps(h));
    }
}

void sp_f32_to_f16_avx512(sp_f16 *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_mask_storeu_epi16((void *)(y + i), m, h);
    }
}

/* exp(x) for x <= 0 (softmax arguments): x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to r^7
 * (truncation below 1e-8 relative), times 2^n by vscalefps; x below -104 gives 0 (as expf underflows). */
ALWAYS_INLINE __m512 exp_nonpos_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  /* ln2 high bits: exact product */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);    /* ln2 low bits */
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* silu(z) = z * sigmoid(z) with e = exp(-|z|) <= 1: sigmoid is 1 / (1 + e) for z >= 0 and e / (1 + e) below. */
void sp_silu_mul_avx512(float *x, const float *m, float s, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), vs = _mm512_set1_ps(s);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 z = _mm512_maskz_loadu_ps(k, x + i);
        const __m512 e = exp_nonpos_avx512(_mm512_castsi512_ps( /* -|z| */
            _mm512_or_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int32_t)0x80000000u))));
        const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 sig = _mm512_div_ps(_mm512_mask_mov_ps(one, neg, e), _mm512_add_ps(one, e));
        const __m512 f = m ? _mm512_maskz_loadu_ps(k, m + i) : vs;
        _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_mul_ps(z, sig), f));
    }
}

float sp_max_f32_avx512(const float *x, int64_t n, bool *bad) {
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    __mmask16 b = 0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 a = _mm512_loadu_ps(x + i), c = _mm512_loadu_ps(x + i + 16);
        b |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(c, inf, _CMP_NLT_UQ); /* NaN or +inf */
        m0 = _mm512_max_ps(m0, a);
        m1 = _mm512_max_ps(m1, c);
    }
    for (; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, x + i);
        b |= _mm512_mask_cmp_ps_mask(live, a, inf, _CMP_NLT_UQ);
        m0 = _mm512_max_ps(m0, a);
    }
    if (b) *bad = true;
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

int64_t sp_first_above_avx512(const float *x, int64_t n, float t) {
    const __m512 vt = _mm512_set1_ps(t);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) { /* four vectors per test: the common case is no hit at all */
        const __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vt, _CMP_GT_OQ);
        const __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 16), vt, _CMP_GT_OQ);
        const __mmask16 m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 32), vt, _CMP_GT_OQ);
        const __mmask16 m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 48), vt, _CMP_GT_OQ);
        const uint64_t m = (uint64_t)m0 | (uint64_t)m1 << 16 | (uint64_t)m2 << 32 | (uint64_t)m3 << 48;
        if (m) return i + __builtin_ctzll(m);
    }
    for (; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __mmask16 m = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, x + i), vt, _CMP_GT_OQ);
        if (m) return i + __builtin_ctz(m);
    }
    return n;
}

float sp_exp_sum_avx512(float *x, int64_t n, float mx) {
    const __m512 vmx = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY), one = _mm512_set1_ps(1.0f);
    const __m512 ulp = _mm512_set1_ps(0x1p36f);
    __m512i acc = _mm512_setzero_si512(); /* the sum in units of 2^-36 (kernels.h), 8 lanes of int64 */
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 d = _mm512_sub_ps(v, vmx);
        const __mmask16 live = _mm512_mask_cmp_ps_mask(m, v, ninf, _CMP_NEQ_UQ); /* NaN is live */
        const __mmask16 bad = _mm512_mask_cmp_ps_mask(live, d, d, _CMP_UNORD_Q); /* NaN in: NaN out (-inf: 0) */
        const __m512 e = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(live, exp_nonpos_avx512(d)), bad, d);
        _mm512_mask_storeu_ps(x + i, m, e);
        nan |= bad;
        const __m512 s = _mm512_mul_ps(_mm512_min_ps(e, one), ulp); /* NaN lanes are flagged above */
        acc = _mm512_add_epi64(acc, _mm512_cvtps_epi64(_mm512_castps512_ps256(s)));
        acc = _mm512_add_epi64(acc, _mm512_cvtps_epi64(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1))));
    }
    return nan ? NAN : (float)((double)_mm512_reduce_add_epi64(acc) * 0x1p-36);
}

/* ---- quantized matmuls ----------------------------------------------------------------------------------------- */

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;

typedef struct {
    __m512i w[8]; /* lane l: u8 weights of row l for activation bytes 4j..4j+3 */
    __m512 d;     /* lane l: d_w of row l */
    __m512 m;     /* lane l: m_w of row l (Q4_1 only) */
} wblk;

static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* out[j] lane l = dword j of the 16 bytes at p[l] + off (a 16 x 4 dword transpose). */
ALWAYS_INLINE void transpose16x4(__m512i out[4], const uint8_t *const p[RG], size_t off) {
    __m512i v[4];
    _Pragma("GCC unroll 16")
    for (int g = 0; g < 4; g++) {
        __m512i a = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p[4 * g] + off)));
        a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(p[4 * g + 1] + off)), 1);
        a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(p[4 * g + 2] + off)), 2);
        v[g] = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(p[4 * g + 3] + off)), 3);
    }
    /* position q of lo: dword k = q>>3 of row q&7 (rows 0-3 from the first source, 4-7 from the second) */
    const __m512i idx_lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i idx_hi = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i a_lo = _mm512_permutex2var_epi32(v[0], idx_lo, v[1]); /* [k0 rows 0-7 | k1 rows 0-7] */
    const __m512i a_hi = _mm512_permutex2var_epi32(v[0], idx_hi, v[1]); /* [k2 rows 0-7 | k3 rows 0-7] */
    const __m512i b_lo = _mm512_permutex2var_epi32(v[2], idx_lo, v[3]); /* rows 8-15 */
    const __m512i b_hi = _mm512_permutex2var_epi32(v[2], idx_hi, v[3]);
    out[0] = _mm512_shuffle_i64x2(a_lo, b_lo, 0x44);
    out[1] = _mm512_shuffle_i64x2(a_lo, b_lo, 0xee);
    out[2] = _mm512_shuffle_i64x2(a_hi, b_hi, 0x44);
    out[3] = _mm512_shuffle_i64x2(a_hi, b_hi, 0xee);
}

/* Unpack blocks [b0, b0+n) of the row group (row pointers p, lane offsets hoff for the header gather). */
ALWAYS_INLINE void unpack_group(wblk *out, wkind kind, const uint8_t *const p[RG], __m512i hoff, int64_t b0, int n,
                                const uint8_t *pf, size_t pf_bytes) {
    const size_t pf_lines = (pf_bytes + 63) / 64, pf_step = (pf_lines + (size_t)n - 1) / (size_t)n;
    const size_t bs = kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1)
                                                                               : sizeof(sp_block_q8_0);
    const size_t qoff = kind == W_Q4_1 ? 4 : 2;
    const __m512i lo4 = _mm512_set1_epi8(0x0f), x80 = _mm512_set1_epi8((char)0x80);
    for (int i = 0; i < n; i++) {
        const size_t off = (size_t)(b0 + i) * bs;
        wblk *o = &out[i];
        for (size_t c = (size_t)i * pf_step; c < SP_MIN_I(pf_lines, (size_t)(i + 1) * pf_step); c++)
            _mm_prefetch((const char *)pf + 64 * c, _MM_HINT_T0); /* the next row group, spread over this one */
        __m512i q[4];
        transpose16x4(q, p, off + qoff);
        if (kind == W_Q8_0) {
            __m512i q2[4];
            transpose16x4(q2, p, off + qoff + 16);
            _Pragma("GCC unroll 16")
            for (int j = 0; j < 4; j++) {
                o->w[j] = _mm512_xor_si512(q[j], x80);
                o->w[4 + j] = _mm512_xor_si512(q2[j], x80);
            }
        } else {
            _Pragma("GCC unroll 16")
            for (int j = 0; j < 4; j++) {
                o->w[j] = _mm512_and_si512(q[j], lo4);
                o->w[4 + j] = _mm512_and_si512(_mm512_srli_epi16(q[j], 4), lo4);
            }
        }
        const __m512i h = _mm512_i32gather_epi32(hoff, (const void *)(p[0] + off), 1); /* [d | m<<16] per lane */
        o->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
        if (kind == W_Q4_1) o->m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
    }
}

/* corr[t*KC + i] = -off * sum(q_x[t, b0+i]) (off = 8 for Q4_0, 128 for Q8_0). */
static void act_corrections(int32_t *corr, const sp_block_q8a *x, int64_t nb, int64_t nt, int64_t b0, int n, int off) {
    const __m256i x80 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    for (int64_t t = 0; t < nt; t++)
        for (int i = 0; i < n; i++) {
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x[t * nb + b0 + i].qs), x80);
            const __m256i s = _mm256_sad_epu8(v, zero); /* 4 x sum(q + 128) over 8 bytes */
            const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            const int sum = (int)(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) - 32 * 128;
            corr[t * KC + i] = -off * sum;
        }
}

/* One tile of NT activation rows against n unpacked blocks of a row group: y[t, 16 lanes] (+)= ... */
ALWAYS_INLINE void tile_q(float *y, int64_t ldy, __mmask16 mask, bool first, const wblk *wb, int n,
                          const sp_block_q8a *x /* row t0, block b0 */, int64_t nb, const int32_t *corr, wkind kind,
                          int NT) {
    __m512 acc[TT];
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) acc[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, y + t * ldy);
    for (int i = 0; i < n; i++) {
        const wblk *o = &wb[i];
        __m512i is[TT];
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++)
            is[t] = kind == W_Q4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(corr[t * KC + i]);
        _Pragma("GCC unroll 16")
        for (int j = 0; j < 8; j++) {
            const __m512i wj = _mm512_load_si512(&o->w[j]);
            _Pragma("GCC unroll 16")
            for (int t = 0; t < NT; t++)
                is[t] = _mm512_dpbusd_epi32(is[t], wj, _mm512_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j)));
        }
        const __m512 d = o->d;
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]), _mm512_mul_ps(d, _mm512_set1_ps(x[t * nb + i].d)),
                                     acc[t]);
        if (kind == W_Q4_1) {
            const __m512 m = o->m;
            _Pragma("GCC unroll 16")
            for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[t * nb + i].s), acc[t]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ldy, mask, acc[t]);
}

ALWAYS_INLINE void matmul_q(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, wkind kind) {
    const size_t bs = kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1)
                                                                               : sizeof(sp_block_q8_0);
    const int64_t nb = K / SP_QK;
    const size_t row_bytes = (size_t)nb * bs;
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    _Alignas(64) wblk wb[KC]; /* one row group's unpacked chunk of blocks */
    int32_t corr[TC * KC];    /* [TC][KC] activation corrections for one pass and chunk */
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int n = (int)SP_MIN_I(KC, nb - b0);
            if (kind != W_Q4_1) act_corrections(corr, x + ts * nb, nb, nts, b0, n, kind == W_Q4_0 ? 8 : 128);
            for (int64_t rg = r0; rg < r1; rg += RG) {
                const int nr = (int)SP_MIN_I(RG, r1 - rg);
                const __mmask16 mask = (__mmask16)((1u << nr) - 1);
                const uint8_t *p[RG];
                int32_t hoff[RG];
                for (int l = 0; l < RG; l++) {
                    const int rl = l < nr ? l : nr - 1;
                    p[l] = (const uint8_t *)w + (size_t)(rg + rl) * row_bytes;
                    hoff[l] = (int32_t)((size_t)rl * row_bytes);
                }
                const uint8_t *pf = (const uint8_t *)w + (size_t)(rg + PF * RG) * row_bytes;
                const size_t pf_bytes = rg + PF * RG < r1 ? (size_t)SP_MIN_I(RG, r1 - rg - PF * RG) * row_bytes : 0;
                unpack_group(wb, kind, p, _mm512_loadu_si512(hoff), b0, n, pf, pf_bytes);
                for (int64_t t0 = ts; t0 < ts + nts; t0 += TT) {
                    const int nt = (int)SP_MIN_I(TT, ts + nts - t0);
                    float *yt = y + t0 * ldy + rg;
                    const sp_block_q8a *xt = x + t0 * nb + b0;
                    const int32_t *ct = corr + (t0 - ts) * KC;
                    const bool first = b0 == 0;
                    switch (nt) { /* constant NT: token loops unroll, accumulators stay in registers */
                    case 1: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 1); break;
                    case 2: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 2); break;
                    case 3: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 3); break;
                    case 4: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 4); break;
                    case 5: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 5); break;
                    case 6: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 6); break;
                    case 7: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 7); break;
                    default: tile_q(yt, ldy, mask, first, wb, n, xt, nb, ct, kind, 8); break;
                    }
                }
            }
        }
    }
}

void sp_matmul_q4_0_avx512(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                           int64_t T) {
    matmul_q(y, ldy, w, x, K, r0, r1, T, W_Q4_0);
}
void sp_matmul_q4_1_avx512(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                           int64_t T) {
    matmul_q(y, ldy, w, x, K, r0, r1, T, W_Q4_1);
}
void sp_matmul_q8_0_avx512(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                           int64_t T) {
    matmul_q(y, ldy, w, x, K, r0, r1, T, W_Q8_0);
}

/* ---- quantized matmuls on packed weights ------------------------------------------------------------------------
 * The weights were repacked at load (pack.c, RG = 16): for row group g and block b the kernel loads the vectors that
 * unpack_group builds by transposition -- vector j lane l = dword j of row 16g+l -- straight from memory, 64-byte
 * aligned: Q4: 4 vectors of nibble pairs, split into w_j = v & 15 (elements 4j..4j+3) and w_{4+j} = (v >> 4) & 15
 * (elements 16+4j..), Q8_0: 8 vectors already stored as q+128; the 16 scales d (and mins m) are one 32-byte f16
 * load each. Math, loop order (passes > K chunks > row groups > token tiles) and summation order are those of
 * matmul_q above, so results are bit-identical to it; only the transpose and header gather are gone. Rows past N
 * in the last group are zero and masked off at the store. In the first token tile of a group the same blocks of
 * the next group are prefetched. */

ALWAYS_INLINE void tile_p(float *y, int64_t ldy, __mmask16 mask, bool first, const uint8_t *q, const sp_f16 *dw,
                          const sp_f16 *mw, int n, const sp_block_q8a *x /* row t0, block b0 */, int64_t nb,
                          const int32_t *corr, size_t pf, wkind kind, int NT) {
    const size_t qb = kind == W_Q8_0 ? 512 : 256; /* quant bytes per (group, block) */
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    __m512 acc[TT];
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) acc[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, y + t * ldy);
    for (int i = 0; i < n; i++) {
        const uint8_t *qi = q + (size_t)i * qb;
        if (pf) { /* the same block of the next row group, pf bytes ahead */
            _Pragma("GCC unroll 16")
            for (size_t c = 0; c < qb; c += 64) _mm_prefetch((const char *)qi + pf + c, _MM_HINT_T0);
            if (!(i & 1)) _mm_prefetch((const char *)(dw + 16 * i) + pf, _MM_HINT_T0);
            if (!(i & 1) && kind == W_Q4_1) _mm_prefetch((const char *)(mw + 16 * i) + pf, _MM_HINT_T0);
        }
        __m512i is[TT];
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++)
            is[t] = kind == W_Q4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(corr[t * KC + i]);
        if (kind == W_Q8_0) {
            _Pragma("GCC unroll 16")
            for (int j = 0; j < 8; j++) {
                const __m512i wj = _mm512_load_si512((const void *)(qi + 64 * j));
                _Pragma("GCC unroll 16")
                for (int t = 0; t < NT; t++)
                    is[t] = _mm512_dpbusd_epi32(is[t], wj, _mm512_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j)));
            }
        } else {
            _Pragma("GCC unroll 16")
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_load_si512((const void *)(qi + 64 * j));
                const __m512i wl = _mm512_and_si512(v, lo4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
                _Pragma("GCC unroll 16")
                for (int t = 0; t < NT; t++)
                    is[t] = _mm512_dpbusd_epi32(is[t], wl, _mm512_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j)));
                _Pragma("GCC unroll 16")
                for (int t = 0; t < NT; t++)
                    is[t] = _mm512_dpbusd_epi32(is[t], wh,
                                                _mm512_set1_epi32(load_i32(x[t * nb + i].qs + 16 + 4 * j)));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dw + 16 * i)));
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]), _mm512_mul_ps(d, _mm512_set1_ps(x[t * nb + i].d)),
                                     acc[t]);
        if (kind == W_Q4_1) {
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mw + 16 * i)));
            _Pragma("GCC unroll 16")
            for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[t * nb + i].s), acc[t]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ldy, mask, acc[t]);
}

ALWAYS_INLINE void matmul_p(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, wkind kind) {
    const sp_type type = kind == W_Q4_0 ? SP_TYPE_Q4_0 : kind == W_Q4_1 ? SP_TYPE_Q4_1 : SP_TYPE_Q8_0;
    const size_t qb = kind == W_Q8_0 ? 512 : 256;
    const int64_t nb = K / SP_QK;
    const size_t gbytes = sp_packed_group_bytes(type, K, RG);
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    int32_t corr[TC * KC];                            /* [TC][KC] activation corrections for one pass and chunk */
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int n = (int)SP_MIN_I(KC, nb - b0);
            if (kind != W_Q4_1) act_corrections(corr, x + ts * nb, nb, nts, b0, n, kind == W_Q4_0 ? 8 : 128);
            for (int64_t rg = r0; rg < r1; rg += RG) {
                const int nr = (int)SP_MIN_I(RG, r1 - rg);
                const __mmask16 mask = (__mmask16)((1u << nr) - 1);
                const uint8_t *base = (const uint8_t *)w + (size_t)(rg / RG) * gbytes;
                const uint8_t *q = base + (size_t)b0 * qb;
                const sp_f16 *dw = (const sp_f16 *)(base + (size_t)nb * qb) + b0 * RG;
                const sp_f16 *mw = dw + nb * RG;
                const size_t pf = rg + RG < r1 ? gbytes : 0;
                for (int64_t t0 = ts; t0 < ts + nts; t0 += TT) {
                    const int nt = (int)SP_MIN_I(TT, ts + nts - t0);
                    float *yt = y + t0 * ldy + rg;
                    const sp_block_q8a *xt = x + t0 * nb + b0;
                    const int32_t *ct = corr + (t0 - ts) * KC;
                    const bool first = b0 == 0;
                    const size_t p = t0 == ts ? pf : 0;
                    switch (nt) { /* constant NT: token loops unroll, accumulators stay in registers */
                    case 1: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 1); break;
                    case 2: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 2); break;
                    case 3: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 3); break;
                    case 4: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 4); break;
                    case 5: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 5); break;
                    case 6: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 6); break;
                    case 7: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 7); break;
                    default: tile_p(yt, ldy, mask, first, q, dw, mw, n, xt, nb, ct, p, kind, 8); break;
                    }
                }
            }
        }
    }
}

#define PACKED_AVX512(name, kind, type)                                                                         \
    static size_t packed_size_##name(int64_t N, int64_t K) { return sp_packed_size_rg(type, N, K, RG); }        \
    static void pack_##name(void *dst, const void *src, int64_t N, int64_t K) {                                 \
        sp_pack_rg(type, dst, src, N, K, RG, true);                                                              \
    }                                                                                                            \
    static void matmul_packed_##name(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, \
                                     int64_t r1, int64_t T) {                                                    \
        matmul_p(y, ldy, w, x, K, r0, r1, T, kind);                                                              \
    }
PACKED_AVX512(q4_0, W_Q4_0, SP_TYPE_Q4_0)
PACKED_AVX512(q4_1, W_Q4_1, SP_TYPE_Q4_1)
PACKED_AVX512(q8_0, W_Q8_0, SP_TYPE_Q8_0)

/* ---- float matmuls --------------------------------------------------------------------------------------------- */

typedef enum { W_F32, W_F16, W_BF16 } fkind;

ALWAYS_INLINE __m512 load_w16(const void *w, int64_t k, __mmask16 m, fkind kind) {
    if (kind == W_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + k);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + k);
    if (kind == W_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* NR weight rows x NT tokens: y[t*ldy + r] = W[r] . x[t]. */
ALWAYS_INLINE void tile_f(float *y, int64_t ldy, const uint8_t *w, size_t row_bytes, const float *x, int64_t K,
                          fkind kind, int NR, int NT) {
    __m512 acc[4][4];
    _Pragma("GCC unroll 16")
    for (int r = 0; r < NR; r++)
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[4];
        _Pragma("GCC unroll 16")
        for (int r = 0; r < NR; r++) wv[r] = load_w16(w + r * row_bytes, k, m, kind);
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * K + k);
            _Pragma("GCC unroll 16")
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int r = 0; r < NR; r++)
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

ALWAYS_INLINE void matmul_f(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, fkind kind) {
    const size_t row_bytes = (size_t)K * (kind == W_F32 ? 4 : 2);
    const float *x = (const float *)xv; /* [T, K] */
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * row_bytes;
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 4, 4);
        switch (T - t) {
        case 3: tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 4, 3); break;
        case 2: tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 4, 2); break;
        case 1: tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 4, 1); break;
        default: break;
        }
    }
    for (; r < r1; r++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * row_bytes;
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 1, 4);
        for (; t < T; t++) tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 1, 1);
    }
}

void sp_matmul_f32_avx512(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                          int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_F32);
}
void sp_matmul_f16_avx512(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                          int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_F16);
}
void sp_matmul_bf16_avx512(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                           int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_BF16);
}

/* ---- accum: y[idx[t]] += c[t] @ D (kernels/accum.c) -------------------------------------------------------------
 * A column tile is 32 elements of D's rows (one quant block; 2 zmm), a token tile up to 8 rows of y: 16 zmm
 * accumulators stay in registers while f runs over all F rows, so y is loaded and stored once per tile. Each
 * 32-element piece of row f is dequantized once per token tile (w = q*d [+ m]) and applied to the tile's tokens with
 * FMAs whose c[t, f] operand is broadcast from memory. Rows are visited with a stride (one piece of each row per
 * column tile), so the piece 4 tiles ahead in the same row is prefetched. */

typedef enum { A_F32, A_F16, A_BF16, A_Q4_0, A_Q4_1, A_Q8_0 } akind;

/* w[0..1] = elements [j0, j0+32) of a row (masked to n < 32 for float types). */
ALWAYS_INLINE void load_piece(__m512 w[2], const uint8_t *row, int64_t j0, int n, akind kind) {
    const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n >= 32 ? 0xffff : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
    switch (kind) {
    case A_F32:
        w[0] = _mm512_maskz_loadu_ps(m0, (const float *)row + j0);
        w[1] = _mm512_maskz_loadu_ps(m1, (const float *)row + j0 + 16);
        break;
    case A_F16:
        w[0] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, (const uint16_t *)row + j0));
        w[1] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, (const uint16_t *)row + j0 + 16));
        break;
    case A_BF16:
        w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m0, (const uint16_t *)row + j0)), 16));
        w[1] = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m1, (const uint16_t *)row + j0 + 16)), 16));
        break;
    case A_Q4_0: {
        const sp_block_q4_0 *b = (const sp_block_q4_0 *)row + j0 / SP_QK;
        const __m128i v = _mm_loadu_si128((const __m128i *)b->qs), lo4 = _mm_set1_epi8(0x0f), k8 = _mm_set1_epi8(8);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, lo4), k8);                        /* elements 0..15 */
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), lo4), k8);    /* elements 16..31 */
        const __m512 d = _mm512_set1_ps(sp_f16_to_f32_fast(b->d));
        w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d);
        w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d);
        break;
    }
    case A_Q4_1: {
        const sp_block_q4_1 *b = (const sp_block_q4_1 *)row + j0 / SP_QK;
        const __m128i v = _mm_loadu_si128((const __m128i *)b->qs), lo4 = _mm_set1_epi8(0x0f);
        const __m512 d = _mm512_set1_ps(sp_f16_to_f32_fast(b->d)), mn = _mm512_set1_ps(sp_f16_to_f32_fast(b->m));
        w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, lo4))), d, mn);
        w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), lo4))), d,
                               mn);
        break;
    }
    case A_Q8_0: {
        const sp_block_q8_0 *b = (const sp_block_q8_0 *)row + j0 / SP_QK;
        const __m512 d = _mm512_set1_ps(sp_f16_to_f32_fast(b->d));
        w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->qs))), d);
        w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16)))),
                             d);
        break;
    }
    }
}

ALWAYS_INLINE void accum_tile(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                              const uint8_t *d, size_t row_bytes, size_t pf_off, int64_t F, int64_t j0, int n,
                              akind kind, int NT) {
    const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n >= 32 ? 0xffff : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
    float *yr[TT];
    __m512 acc[TT][2];
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) {
        yr[t] = y + (idx ? idx[t] : t) * ldy + j0;
        acc[t][0] = _mm512_maskz_loadu_ps(m0, yr[t]);
        acc[t][1] = _mm512_maskz_loadu_ps(m1, yr[t] + 16);
    }
    for (int64_t f = 0; f < F; f++) {
        const uint8_t *row = d + (size_t)f * row_bytes;
        if (pf_off) _mm_prefetch((const char *)row + pf_off, _MM_HINT_T0);
        __m512 w[2];
        load_piece(w, row, j0, n, kind);
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++) {
            const __m512 a = _mm512_set1_ps(c[t * ldc + f]);
            acc[t][0] = _mm512_fmadd_ps(a, w[0], acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(a, w[1], acc[t][1]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) {
        _mm512_mask_storeu_ps(yr[t], m0, acc[t][0]);
        _mm512_mask_storeu_ps(yr[t] + 16, m1, acc[t][1]);
    }
}

ALWAYS_INLINE void accum_a(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc, const void *dv,
                           int64_t F, int64_t H, int64_t T, akind kind) {
    const sp_type type = kind == A_F32 ? SP_TYPE_F32 : kind == A_F16 ? SP_TYPE_F16 : kind == A_BF16 ? SP_TYPE_BF16
                         : kind == A_Q4_0 ? SP_TYPE_Q4_0 : kind == A_Q4_1 ? SP_TYPE_Q4_1 : SP_TYPE_Q8_0;
    const size_t row_bytes = sp_row_size(type, H), piece_bytes = sp_row_size(type, 32);
    const uint8_t *d = (const uint8_t *)dv;
    for (int64_t j0 = 0; j0 < H; j0 += 32) {
        const int n = (int)SP_MIN_I(32, H - j0);
        const int64_t ahead = j0 + 4 * 32; /* prefetch the piece 4 column tiles ahead, once (first token tile) */
        const size_t pf = ahead < H ? (size_t)(ahead / 32) * piece_bytes : 0;
        for (int64_t t0 = 0; t0 < T; t0 += TT) {
            const int nt = (int)SP_MIN_I(TT, T - t0);
            float *yt = idx ? y : y + t0 * ldy;
            const int32_t *it = idx ? idx + t0 : NULL;
            const float *ct = c + t0 * ldc;
            const size_t p = t0 == 0 ? pf : 0;
            switch (nt) { /* constant NT: the accumulators stay in registers */
            case 1: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 1); break;
            case 2: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 2); break;
            case 3: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 3); break;
            case 4: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 4); break;
            case 5: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 5); break;
            case 6: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 6); break;
            case 7: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 7); break;
            default: accum_tile(yt, ldy, it, ct, ldc, d, row_bytes, p, F, j0, n, kind, 8); break;
            }
        }
    }
}

#define ACCUM_AVX512(name, kind)                                                                                \
    void sp_accum_##name##_avx512(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,        \
                                  const void *d, int64_t F, int64_t H, int64_t T) {                              \
        accum_a(y, ldy, idx, c, ldc, d, F, H, T, kind);                                                          \
    }
ACCUM_AVX512(f32, A_F32)
ACCUM_AVX512(f16, A_F16)
ACCUM_AVX512(bf16, A_BF16)
ACCUM_AVX512(q4_0, A_Q4_0)
ACCUM_AVX512(q4_1, A_Q4_1)
ACCUM_AVX512(q8_0, A_Q8_0)

/* ---- accum_packed: y[idx[t]] += c[t] @ D with D in the "down" streaming layout (kernels/pack.c) ----------------
 * For each group of 16 rows and each block column b (288 bytes: 16 rows' quants, then their 16 scales): the 32-column
 * tile of y for up to 8 tokens is loaded into zmm accumulators, the 16 products a[t, l] = c[t, f] * d[f, b] are
 * formed as one vector per token and kept in a small buffer, and each row's 32 nibbles are unpacked once (q - 8 as
 * float: a broadcast qword, a per-lane shift and a 16-entry table lookup -- vpermps -- per 16 elements, measured
 * ~20% faster from the caches than sign-extending shifts plus a conversion) and applied to the tile's tokens with FMAs broadcasting a[t, l]. The weight is read front to back; the
 * group 512 bytes ahead is prefetched. Rounding: (c*d) rounded once, then fused with q - 8 (exact), where the
 * unpacked kernel rounds c*((q-8)*d); both within accum's bound. */
ALWAYS_INLINE void accum_down_tile(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                                   const uint8_t *col, int64_t j0, int nrows, int NT) {
    /* One accumulator chain per token and column half, rows in order: a token's sums do not depend on how many
     * tokens share its tile, so the token, chunk and dense paths stay bit-identical with one thread (several chains
     * for small tiles were measured ~20% faster in cache, but round a decode token differently from a batch) */
    const __mmask16 rm = nrows >= 16 ? 0xffff : (__mmask16)((1u << nrows) - 1);
    const __m512 dsc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(col + 256)));
    _Alignas(64) float a[TT][16];
    float *yr[TT];
    __m512 acc[TT][2];
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) {
        _mm512_store_ps(a[t], _mm512_mul_ps(_mm512_maskz_loadu_ps(rm, c + t * ldc), dsc));
        yr[t] = y + (idx ? idx[t] : t) * ldy + j0;
        acc[t][0] = _mm512_loadu_ps(yr[t]);
        acc[t][1] = _mm512_loadu_ps(yr[t] + 16);
    }
    /* lane i of a broadcast qword: dword i & 1, nibble i >> 1 (pack.c's order) shifted to the low 4 bits, which
     * index a table of the nibble read as a signed 4-bit number (q - 8; vpermps ignores the bits above) */
    const __m512i sh = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    _Pragma("GCC unroll 16")
    for (int l = 0; l < 16; l++) {
        if (l >= nrows) break;
        int64_t q0, q1;
        memcpy(&q0, col + 16 * l, 8);
        memcpy(&q1, col + 16 * l + 8, 8);
        const __m512 w0 = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q0), sh), tab);
        const __m512 w1 = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q1), sh), tab);
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++) {
            const __m512 al = _mm512_set1_ps(a[t][l]);
            acc[t][0] = _mm512_fmadd_ps(al, w0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(al, w1, acc[t][1]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) {
        _mm512_storeu_ps(yr[t], acc[t][0]);
        _mm512_storeu_ps(yr[t] + 16, acc[t][1]);
    }
}

/* One token, two column blocks at once: four independent accumulator chains where one block has two, so the core does
 * not wait on FMA latency; each column still sums the rows in order with the same products as accum_down_tile, so
 * the result is the same bit for bit. */
ALWAYS_INLINE void accum_down_pair1(float *yr, const float *c, const uint8_t *col, int nrows) {
    const __mmask16 rm = nrows >= 16 ? 0xffff : (__mmask16)((1u << nrows) - 1);
    const uint8_t *col2 = col + SP_DOWN_RG * 18;
    const __m512 cv = _mm512_maskz_loadu_ps(rm, c);
    _Alignas(64) float a[2][16];
    _mm512_store_ps(a[0], _mm512_mul_ps(cv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(col + 256)))));
    _mm512_store_ps(a[1], _mm512_mul_ps(cv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(col2 + 256)))));
    const __m512i sh = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    __m512 acc0 = _mm512_loadu_ps(yr), acc1 = _mm512_loadu_ps(yr + 16), acc2 = _mm512_loadu_ps(yr + 32),
           acc3 = _mm512_loadu_ps(yr + 48);
    _Pragma("GCC unroll 16")
    for (int l = 0; l < 16; l++) {
        if (l >= nrows) break;
        int64_t q[4];
        memcpy(&q[0], col + 16 * l, 8);
        memcpy(&q[1], col + 16 * l + 8, 8);
        memcpy(&q[2], col2 + 16 * l, 8);
        memcpy(&q[3], col2 + 16 * l + 8, 8);
        const __m512 a0 = _mm512_set1_ps(a[0][l]), a1 = _mm512_set1_ps(a[1][l]);
        acc0 = _mm512_fmadd_ps(a0, _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q[0]), sh), tab), acc0);
        acc1 = _mm512_fmadd_ps(a0, _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q[1]), sh), tab), acc1);
        acc2 = _mm512_fmadd_ps(a1, _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q[2]), sh), tab), acc2);
        acc3 = _mm512_fmadd_ps(a1, _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q[3]), sh), tab), acc3);
    }
    _mm512_storeu_ps(yr, acc0);
    _mm512_storeu_ps(yr + 16, acc1);
    _mm512_storeu_ps(yr + 32, acc2);
    _mm512_storeu_ps(yr + 48, acc3);
}

static void accum_packed_q4_0(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc, const void *dv,
                              int64_t F, int64_t H, int64_t T) {
    const int64_t nb = H / SP_QK, G = (F + SP_DOWN_RG - 1) / SP_DOWN_RG;
    const size_t gbytes = sp_packed_down_size_q4_0(SP_DOWN_RG, H), cbytes = SP_DOWN_RG * 18;
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *base = (const uint8_t *)dv + (size_t)g * gbytes;
        const int nrows = (int)SP_MIN_I(SP_DOWN_RG, F - g * SP_DOWN_RG);
        const float *cg = c + g * SP_DOWN_RG;
        if (T == 1) { /* decode: two column blocks per pass (the last one alone when nb is odd) */
            float *yr = y + (idx ? idx[0] : 0) * ldy;
            for (int64_t b = 0; b < nb; b += 2) {
                const uint8_t *col = base + (size_t)b * cbytes;
                for (int k = 0; k < 10; k++) _mm_prefetch((const char *)col + 576 + 64 * k, _MM_HINT_T0);
                if (b + 1 < nb) accum_down_pair1(yr + b * SP_QK, cg, col, nrows);
                else accum_down_tile(yr, ldy, NULL, cg, ldc, col, b * SP_QK, nrows, 1);
            }
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *col = base + (size_t)b * cbytes;
            _mm_prefetch((const char *)col + 512, _MM_HINT_T0);
            _mm_prefetch((const char *)col + 576, _MM_HINT_T0);
            _mm_prefetch((const char *)col + 640, _MM_HINT_T0);
            _mm_prefetch((const char *)col + 704, _MM_HINT_T0);
            _mm_prefetch((const char *)col + 768, _MM_HINT_T0);
            for (int64_t t0 = 0; t0 < T; t0 += TT) {
                const int nt = (int)SP_MIN_I(TT, T - t0);
                float *yt = idx ? y : y + t0 * ldy;
                const int32_t *it = idx ? idx + t0 : NULL;
                const float *ct = cg + t0 * ldc;
                switch (nt) { /* constant NT: the accumulators stay in registers */
                case 1: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 1); break;
                case 2: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 2); break;
                case 3: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 3); break;
                case 4: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 4); break;
                case 5: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 5); break;
                case 6: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 6); break;
                case 7: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 7); break;
                default: accum_down_tile(yt, ldy, it, ct, ldc, col, b * SP_QK, nrows, 8); break;
                }
            }
        }
    }
}

/* ---- accum_packed_i8: y[idx[t]] += c[t] @ D, D in the "down int8" layout (kernels/pack.c), VNNI ---------------
 * The weight's scales vary along f (one per row and column block), so they are folded into the activations: for a
 * token t and a group of 16 rows, a[f, b] = c[t, f] * d[f, b] is quantized along f, per column block b, to int8
 * (kernels.h accum_packed_i8: scale s = max_f |a| / 127). down_i8_quant does that for 16 blocks at once (lane = b:
 * one vector per row f, the max over f a vertical max -- on the bits of |a|, so NaN and inf win -- then 4 dwords per
 * block holding rows 4k..4k+3's bytes, the correction -8 sum_f q, and s). Then per block b (256 bytes: 4 vectors of
 * nibble pairs, split into w & 15 = columns 0..15 and (w >> 4) & 15 = columns 16..31, 4 rows per dword lane) and
 * token: isum = -8 sum q + sum_k vpdpbusd(w_k, broadcast dword k of q) -- exact, |isum| <= 16 * 127 * 8 -- and
 * y += float(isum) * s, one FMA per 16 columns, groups in order. 8 vpdpbusd do the 512 multiply-adds of a block and
 * token that the float kernel above does with 32 FMAs after unpacking 32 nibbles to floats. */
enum { DB = 64 }; /* column blocks quantized at a time (per token: 4 + 2 words each on the stack) */
/* Software prefetch distance in bytes: Zen 5's hardware prefetchers alone left this stream at about 10 GB/s from DRAM
 * (one thread); distances timed in turn in one process, one thread, 0.5b's expert down halves from DRAM at T = 1:
 * 2 / 4 / 6 / 8 KB / one group (11.5 KB) ahead: 4.2 / 3.7 / 3.3 / 3.0 / 2.9 us per expert (1.2b's: 6.3 / 5.6 / 5.3 /
 * 5.4 / 5.3; T = 4: 7.2 / 6.1 / 5.7 / 5.6 / 5.6). */
enum { DOWN_PF = 8192 };

/* One call per token, 16-row group and DB blocks (not inlined: clang's sanitizer build of this file stays short). */
static __attribute__((noinline)) void down_i8_quant(int32_t qd[4][DB], int32_t *corr, float *sc, const float *c,
    int nrows, const sp_f16 *ds /* [16][nb] */, int64_t nb, int64_t b0, int n) {
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), ff = _mm512_set1_epi32(0xff);
    for (int i0 = 0; i0 < n; i0 += 16) {
        const __mmask16 m = n - i0 >= 16 ? 0xffff : (__mmask16)((1u << (n - i0)) - 1);
        __m512 a[16];
        __m512i amax = _mm512_setzero_si512();
        _Pragma("GCC unroll 16")
        for (int l = 0; l < 16; l++) {
            a[l] = l < nrows ? _mm512_mul_ps(_mm512_set1_ps(c[l]),
                                             _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, ds + l * nb + b0 + i0)))
                             : _mm512_setzero_ps();
            amax = _mm512_max_epu32(amax, _mm512_and_si512(_mm512_castps_si512(a[l]), absm));
        }
        /* amax < 2^-100: 0; not finite: NaN */
        const __mmask16 live = _mm512_cmpge_epu32_mask(amax, _mm512_set1_epi32(0x0d800000));
        const __mmask16 bad = _mm512_cmpge_epu32_mask(amax, _mm512_set1_epi32(0x7f800000));
        const __m512 mx = _mm512_castsi512_ps(amax);
        const __m512 id = _mm512_maskz_div_ps(live & ~bad, _mm512_set1_ps(127.0f), mx);
        const __m512 s = _mm512_mask_blend_ps(bad, _mm512_maskz_div_ps(live, mx, _mm512_set1_ps(127.0f)),
                                              _mm512_set1_ps(NAN));
        __m512i q[16], sum = _mm512_setzero_si512();
        _Pragma("GCC unroll 16")
        for (int l = 0; l < 16; l++) {
            q[l] = _mm512_cvtps_epi32(_mm512_mul_ps(a[l], id)); /* nearest even; |q| <= 127 */
            sum = _mm512_add_epi32(sum, q[l]);
        }
        _Pragma("GCC unroll 4")
        for (int k = 0; k < 4; k++) { /* dword k of block b = the bytes of rows 4k..4k+3 */
            __m512i v = _mm512_and_si512(q[4 * k], ff);
            v = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(q[4 * k + 1], 8), _mm512_slli_epi32(ff, 8), 0xf8);
            v = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(q[4 * k + 2], 16), _mm512_slli_epi32(ff, 16), 0xf8);
            _mm512_storeu_si512(qd[k] + i0, _mm512_or_si512(v, _mm512_slli_epi32(q[4 * k + 3], 24)));
        }
        _mm512_storeu_si512(corr + i0, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 3)));
        _mm512_storeu_ps(sc + i0, s);
    }
}

static void accum_down_i8_tile(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                               const uint8_t *base, int nrows, int64_t nb, size_t sbytes, int64_t b0, int n,
                               bool pf, int nt) {
    int32_t qd[TT][4][DB], corr[TT][DB];
    float sc[TT][DB];
    float *yr[TT];
    if (pf && b0 == 0) /* keep the stream going while the scales are read and the tile quantized: without this the
                        * memory idled once per group (measured on Zen 5: 21 against 26 GB/s from DRAM, one thread) */
        for (size_t o = 0; o < sbytes; o += 64) _mm_prefetch((const char *)base + o + DOWN_PF, _MM_HINT_T0);
    for (int t = 0; t < nt; t++) {
        down_i8_quant(qd[t], corr[t], sc[t], c + t * ldc, nrows, (const sp_f16 *)base, nb, b0, n);
        yr[t] = y + (idx ? idx[t] : t) * ldy;
    }
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    for (int i = 0; i < n; i++) {
        const int64_t b = b0 + i;
        const uint8_t *qb = base + sbytes + (size_t)b * 256;
        if (pf) { /* the stream DOWN_PF ahead (past the group's end: the next group's scales, then quants) */
            _Pragma("GCC unroll 4")
            for (int k = 0; k < 4; k++) _mm_prefetch((const char *)qb + DOWN_PF + 64 * k, _MM_HINT_T0);
        }
        __m512i w[8];
        _Pragma("GCC unroll 4")
        for (int k = 0; k < 4; k++) {
            const __m512i v = _mm512_load_si512((const void *)(qb + 64 * k));
            w[k] = _mm512_and_si512(v, lo4);
            w[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
        }
        const int64_t j0 = b * SP_QK;
        for (int t = 0; t < nt; t++) { /* nt at run time: per token a few vectors, nothing kept across tokens */
            __m512i s0 = _mm512_set1_epi32(corr[t][i]), s1 = s0;
            _Pragma("GCC unroll 4")
            for (int k = 0; k < 4; k++) {
                const __m512i x = _mm512_set1_epi32(qd[t][k][i]);
                s0 = _mm512_dpbusd_epi32(s0, w[k], x);
                s1 = _mm512_dpbusd_epi32(s1, w[4 + k], x);
            }
            const __m512 sv = _mm512_set1_ps(sc[t][i]);
            _mm512_storeu_ps(yr[t] + j0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), sv, _mm512_loadu_ps(yr[t] + j0)));
            _mm512_storeu_ps(yr[t] + j0 + 16,
                             _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), sv, _mm512_loadu_ps(yr[t] + j0 + 16)));
        }
    }
}

static void accum_packed_i8_q4_0(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                                 const void *dv, int64_t F, int64_t H, int64_t T) {
    const int64_t nb = H / SP_QK, G = (F + SP_DOWN_RG - 1) / SP_DOWN_RG;
    const size_t gbytes = sp_packed_down_size_q4_0(SP_DOWN_RG, H);
    const size_t sbytes = ((size_t)nb * SP_DOWN_RG * 2 + 63) / 64 * 64; /* the group's scales, padded */
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *base = (const uint8_t *)dv + (size_t)g * gbytes;
        const int nrows = (int)SP_MIN_I(SP_DOWN_RG, F - g * SP_DOWN_RG);
        for (int64_t b0 = 0; b0 < nb; b0 += DB) {
            const int n = (int)SP_MIN_I(DB, nb - b0);
            for (int64_t t0 = 0; t0 < T; t0 += TT) {
                const int nt = (int)SP_MIN_I(TT, T - t0);
                float *yt = idx ? y : y + t0 * ldy;
                const int32_t *it = idx ? idx + t0 : NULL;
                const float *ct = c + t0 * ldc + g * SP_DOWN_RG;
                accum_down_i8_tile(yt, ldy, it, ct, ldc, base, nrows, nb, sbytes, b0, n, t0 == 0, nt);
            }
        }
    }
}

void sp_kernels_fill_avx512(sp_kernels *k) {
    k->accum[SP_TYPE_F32] = sp_accum_f32_avx512;
    k->accum[SP_TYPE_F16] = sp_accum_f16_avx512;
    k->accum[SP_TYPE_BF16] = sp_accum_bf16_avx512;
    k->accum[SP_TYPE_Q4_0] = sp_accum_q4_0_avx512;
    k->accum[SP_TYPE_Q4_1] = sp_accum_q4_1_avx512;
    k->accum[SP_TYPE_Q8_0] = sp_accum_q8_0_avx512;
    k->packed_down_size[SP_TYPE_Q4_0] = sp_packed_down_size_q4_0;
    k->pack_down[SP_TYPE_Q4_0] = sp_pack_down_q4_0;
    k->accum_packed[SP_TYPE_Q4_0] = accum_packed_q4_0;
    k->pack_down_i8[SP_TYPE_Q4_0] = sp_pack_down_i8_q4_0;
    k->accum_packed_i8[SP_TYPE_Q4_0] = accum_packed_i8_q4_0;
    k->quantize_q8a = sp_quantize_q8a_avx512;
    k->matmul[SP_TYPE_Q4_0] = sp_matmul_q4_0_avx512;
    k->matmul[SP_TYPE_Q4_1] = sp_matmul_q4_1_avx512;
    k->matmul[SP_TYPE_Q8_0] = sp_matmul_q8_0_avx512;
    k->pack_rows = RG;
    k->packed_size[SP_TYPE_Q4_0] = packed_size_q4_0;
    k->packed_size[SP_TYPE_Q4_1] = packed_size_q4_1;
    k->packed_size[SP_TYPE_Q8_0] = packed_size_q8_0;
    k->pack[SP_TYPE_Q4_0] = pack_q4_0;
    k->pack[SP_TYPE_Q4_1] = pack_q4_1;
    k->pack[SP_TYPE_Q8_0] = pack_q8_0;
    k->matmul_packed[SP_TYPE_Q4_0] = matmul_packed_q4_0;
    k->matmul_packed[SP_TYPE_Q4_1] = matmul_packed_q4_1;
    k->matmul_packed[SP_TYPE_Q8_0] = matmul_packed_q8_0;
    k->matmul[SP_TYPE_F32] = sp_matmul_f32_avx512;
    k->matmul[SP_TYPE_F16] = sp_matmul_f16_avx512;
    k->matmul[SP_TYPE_BF16] = sp_matmul_bf16_avx512;
    k->dot_f32 = sp_dot_f32_avx512;
    k->axpy_f32 = sp_axpy_f32_avx512;
    k->attn_scores_f16 = sp_attn_scores_f16_avx512;
    k->attn_sum_f16 = sp_attn_sum_f16_avx512;
    k->exp_sum = sp_exp_sum_avx512;
    k->silu_mul = sp_silu_mul_avx512;
    k->first_above = sp_first_above_avx512;
    k->max_f32 = sp_max_f32_avx512;
    k->f32_to_f16 = sp_f32_to_f16_avx512;
    k->round_f16 = sp_round_f16_avx512;
}
