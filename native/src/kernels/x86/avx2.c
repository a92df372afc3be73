/* x86/avx2.c: AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time by dispatch.c).
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, nb = K/32 blocks per row.
 *
 * Quantized matmuls: the same weights-stationary scheme as x86/avx512.c with 8 rows per group (one per int32 lane of
 * a ymm) and no VNNI:
 *   - per block, the 8 rows' quants are transposed (xmm loads, vpunpck{l,h}{dq,qdq}) so that vector j holds in lane
 *     l the 4 bytes of row l that multiply activation bytes 4j..4j+3; Q4 nibbles unpacked to bytes 0..15. These
 *     go to a stack buffer once per row group, with d_w (and m_w) per lane.
 *   - Q4: vpmaddubsw(u8 w, s8 x) gives int16 pair sums <= 2*15*127; the 8 of them per lane sum to <= 30480 in int16
 *     without overflow, then vpmaddwd(., 1) makes the int32 lane sum. Q4_0 adds corr = -8 sum(q_x) (q_w - 8).
 *   - Q8_0 (signed x signed): the sign trick, vpmaddubsw(|w|, sign(x, w)) (|w| <= 128, |x| <= 127: no saturation),
 *     widened with vpmaddwd per vector. Both keep ref's exact integer block sums.
 *   - acc[t] += float(isum) * (d_w * d_x) (+ m_w * s_x for Q4_1), up to 4 tokens per register tile.
 * Packed weights (matmul_packed; kernels/pack.c with RG = 8, Q8_0 signed): the transposed vectors above, stored once
 *   at model load and loaded per block, so no transpose or header gather per call (section "packed weights").
 * Float matmuls: 4 weight rows x 2 tokens of ymm FMA accumulators; F16 via vcvtph2ps, BF16 via << 16.
 */
#include "../tiers.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

enum { RG = 8, TT = 4, KC = 64, TC = 64 }; /* rows per group, tokens per tile, blocks per K chunk, tokens per pass */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* ---- activations --------------------------------------------------------------------------------------------- */

void sp_quantize_q8a_avx2(sp_block_q8a *y, const float *x, int64_t k) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < k / SP_QK; i++, x += SP_QK) {
        __m256 v[4];
        __m256 mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id)); /* nearest even */
        const int sum = hsum8_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        /* pack 4 x 8 int32 to 32 int8; packs interleave 128-bit lanes, the permute restores element order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)y[i].qs, p);
        y[i].d = sp_f16_round(d);
        y[i].s = sp_f16_round(d * (float)sum);
    }
}

float sp_dot_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void sp_axpy_f32_avx2(float *y, float a, const float *x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* ---- attention over the F16 cache (kernels.h; the AVX-512 tier's comment describes the method) ------------------
 * Scores: a 16-slot key block is two 8-lane vectors per d; 16 registers hold at most 12 accumulators, so tiles are
 * 6 queries x 1 block, or 3 x 2 blocks when M <= 3. Weighted sums: up to 32 output elements (four vectors) per
 * tile; a query whose p is 0 skips the row by a branch. Tails shorter than 8 go through a zero-padded copy. */

static inline __m256i tail_mask8(int64_t w) { /* lanes i < w all ones */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256 load_f16x8(const sp_f16 *x, int64_t w) { /* w < 8: the first w halves, the rest 0 */
    if (w >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)x));
    sp_f16 tmp[8];
    for (int i = 0; i < 8; i++) tmp[i] = i < w ? x[i] : 0;
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

static inline void store_f32x8(float *y, __m256 v, int64_t w) { /* the first min(w, 8) lanes */
    if (w >= 8) {
        _mm256_storeu_ps(y, v);
        return;
    }
    _mm256_maskstore_ps(y, tail_mask8(w), v);
}

static inline __m256 load_f32x8(const float *x, int64_t w) {
    if (w >= 8) return _mm256_loadu_ps(x);
    return _mm256_maskload_ps(x, tail_mask8(w));
}

ALWAYS_INLINE void scores_tile(const float *q, int64_t ldq, const sp_f16 *k, int64_t D, int nkb, int last,
                               float scale, float *out, int64_t ldo, int NT, int KB) {
    const sp_f16 *kb[2];
    for (int b = 0; b < KB; b++) kb[b] = k + (b < nkb ? b : 0) * SP_KBLK * D;
    __m256 acc[12];
    _Pragma("GCC unroll 12")
    for (int i = 0; i < 2 * NT * KB; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m256 kd[4];
        _Pragma("GCC unroll 2")
        for (int b = 0; b < KB; b++) {
            kd[2 * b] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kb[b] + d * SP_KBLK)));
            kd[2 * b + 1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kb[b] + d * SP_KBLK + 8)));
        }
        _Pragma("GCC unroll 6")
        for (int m = 0; m < NT; m++) {
            const __m256 qm = _mm256_set1_ps(q[m * ldq + d]);
            _Pragma("GCC unroll 4")
            for (int i = 0; i < 2 * KB; i++) acc[m * 2 * KB + i] = _mm256_fmadd_ps(qm, kd[i], acc[m * 2 * KB + i]);
        }
    }
    const __m256 vs = _mm256_set1_ps(scale);
    _Pragma("GCC unroll 6")
    for (int m = 0; m < NT; m++)
        _Pragma("GCC unroll 2")
        for (int b = 0; b < nkb && b < KB; b++) {
            const int lanes = b == nkb - 1 ? last : SP_KBLK;
            float *o = out + m * ldo + b * SP_KBLK;
            store_f32x8(o, _mm256_mul_ps(acc[m * 2 * KB + 2 * b], vs), lanes);
            if (lanes > 8) store_f32x8(o + 8, _mm256_mul_ps(acc[m * 2 * KB + 2 * b + 1], vs), lanes - 8);
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
SCORES_FN(1, 2)
SCORES_FN(2, 2)
SCORES_FN(3, 2)
SCORES_FN(1, 1)
SCORES_FN(2, 1)
SCORES_FN(3, 1)
SCORES_FN(4, 1)
SCORES_FN(5, 1)
SCORES_FN(6, 1)
#define SCORES_CASE(nt, kb) \
    case nt: scores_##nt##_##kb(qt, ldq, kt, D, nkb, last, scale, ot, ldo); break;

void sp_attn_scores_f16_avx2(const float *q, int64_t ldq, int64_t M, const sp_f16 *k, int64_t n, int64_t D,
                             float scale, float *out, int64_t ldo) {
    const int64_t nblk = (n + SP_KBLK - 1) / SP_KBLK;
    const int KB = M <= 3 ? 2 : 1, MT = KB == 2 ? 3 : 6;
    for (int64_t b = 0; b < nblk; b += KB) {
        const int nkb = (int)(nblk - b < KB ? nblk - b : KB);
        const int64_t left = n - (b + nkb - 1) * SP_KBLK; /* slots in the last block */
        const int last = (int)(left < SP_KBLK ? left : SP_KBLK);
        const sp_f16 *kt = k + b * SP_KBLK * D;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int nt = (int)(M - m0 < MT ? M - m0 : MT);
            const float *qt = q + m0 * ldq;
            float *ot = out + m0 * ldo + b * SP_KBLK;
            if (KB == 2) {
                switch (nt) { SCORES_CASE(1, 2) SCORES_CASE(2, 2) default: SCORES_CASE(3, 2) }
            } else {
                switch (nt) {
                    SCORES_CASE(1, 1) SCORES_CASE(2, 1) SCORES_CASE(3, 1) SCORES_CASE(4, 1) SCORES_CASE(5, 1)
                    default: SCORES_CASE(6, 1)
                }
            }
        }
    }
}

/* NT queries x output elements [0, w) (w <= 8 NU) of out, all n rows in order. */
ALWAYS_INLINE void sum_tile(float *out, int64_t ldo, const float *p, int64_t ldp, const sp_f16 *v, int64_t ld,
                            int64_t n, int64_t w, int NT, int NU) {
    __m256 acc[12];
    _Pragma("GCC unroll 8")
    for (int m = 0; m < NT; m++)
        _Pragma("GCC unroll 4")
        for (int u = 0; u < NU; u++) acc[m * NU + u] = load_f32x8(out + m * ldo + 8 * u, w - 8 * u);
    for (int64_t j = 0; j < n; j++) {
        __m256 vj[4];
        _Pragma("GCC unroll 4")
        for (int u = 0; u < NU; u++) vj[u] = load_f16x8(v + j * ld + 8 * u, w - 8 * u);
        _Pragma("GCC unroll 8")
        for (int m = 0; m < NT; m++) {
            const float pm = p[m * ldp + j];
            if (pm == 0.0f) continue; /* the row adds nothing */
            const __m256 a = _mm256_set1_ps(pm);
            _Pragma("GCC unroll 4")
            for (int u = 0; u < NU; u++) acc[m * NU + u] = _mm256_fmadd_ps(a, vj[u], acc[m * NU + u]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int m = 0; m < NT; m++)
        _Pragma("GCC unroll 4")
        for (int u = 0; u < NU; u++) store_f32x8(out + m * ldo + 8 * u, acc[m * NU + u], w - 8 * u);
}

#define SUM_FN(nt, nu)                                                                                          \
    static __attribute__((noinline)) void sum_##nt##_##nu(float *ot, int64_t ldo, const float *pt, int64_t ldp,     \
                                                         const sp_f16 *v, int64_t ld, int64_t n, int64_t w) {        \
        sum_tile(ot, ldo, pt, ldp, v, ld, n, w, nt, nu);                                                         \
    }
SUM_FN(1, 4)
SUM_FN(2, 4)
SUM_FN(3, 4)
SUM_FN(1, 3)
SUM_FN(2, 3)
SUM_FN(3, 3)
SUM_FN(4, 3)
SUM_FN(1, 2)
SUM_FN(2, 2)
SUM_FN(3, 2)
SUM_FN(4, 2)
SUM_FN(5, 2)
SUM_FN(6, 2)
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

void sp_attn_sum_f16_avx2(float *out, int64_t ldo, const float *p, int64_t ldp, int64_t M, const sp_f16 *v,
                          int64_t ld, int64_t n, int64_t D) {
    for (int64_t i0 = 0; i0 < D; i0 += 32) {
        const int64_t w = D - i0 < 32 ? D - i0 : 32;
        const int nu = (int)((w + 7) / 8), MT = nu == 4 ? 3 : nu == 3 ? 4 : nu == 2 ? 6 : 8;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int nt = (int)(M - m0 < MT ? M - m0 : MT);
            float *ot = out + m0 * ldo + i0;
            const float *pt = p + m0 * ldp;
            if (nu == 4) {
                switch (nt) { SUM_CASE(1, 4) SUM_CASE(2, 4) default: SUM_CASE(3, 4) }
            } else if (nu == 3) {
                switch (nt) { SUM_CASE(1, 3) SUM_CASE(2, 3) SUM_CASE(3, 3) default: SUM_CASE(4, 3) }
            } else if (nu == 2) {
                switch (nt) {
                    SUM_CASE(1, 2) SUM_CASE(2, 2) SUM_CASE(3, 2) SUM_CASE(4, 2) SUM_CASE(5, 2) default: SUM_CASE(6, 2)
                }
            } else {
                switch (nt) {
                    SUM_CASE(1, 1) SUM_CASE(2, 1) SUM_CASE(3, 1) SUM_CASE(4, 1) SUM_CASE(5, 1) SUM_CASE(6, 1)
                    SUM_CASE(7, 1) default: SUM_CASE(8, 1)
                }
            }
        }
    }
}

/* exp(x) for x <= 0 as in avx512.c, with 2^n built in the exponent field: x is clamped at -87 (2^-126 is the
 * smallest normal), so arguments below give ~1e-38 instead of an underflow to 0: nothing next to the row's maximum. */
ALWAYS_INLINE __m256 exp_nonpos_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

float sp_max_f32_avx2(const float *x, int64_t n, bool *bad) {
    const __m256 inf = _mm256_set1_ps(INFINITY);
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, b = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), c = _mm256_loadu_ps(x + i + 8);
        b = _mm256_or_ps(b, _mm256_or_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ), _mm256_cmp_ps(c, inf, _CMP_NLT_UQ)));
        m0 = _mm256_max_ps(m0, a);
        m1 = _mm256_max_ps(m1, c);
    }
    m0 = _mm256_max_ps(m0, m1);
    float lanes[8];
    _mm256_storeu_ps(lanes, m0);
    float mx = lanes[0];
    for (int j = 1; j < 8; j++) mx = lanes[j] > mx ? lanes[j] : mx;
    if (_mm256_movemask_ps(b)) *bad = true;
    for (; i < n; i++) {
        if (!(x[i] < INFINITY)) *bad = true;
        else if (x[i] > mx) mx = x[i];
    }
    return mx;
}

int64_t sp_first_above_avx2(const float *x, int64_t n, float t) {
    const __m256 vt = _mm256_set1_ps(t);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) { /* four vectors per test: the common case is no hit at all */
        const uint32_t m = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vt, _CMP_GT_OQ)) |
                           (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), vt, _CMP_GT_OQ)) << 8 |
                           (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 16), vt, _CMP_GT_OQ)) << 16 |
                           (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 24), vt, _CMP_GT_OQ)) << 24;
        if (m) return i + __builtin_ctz(m);
    }
    for (; i < n; i++)
        if (x[i] > t) return i;
    return n;
}

/* silu as in avx512.c: e = exp(-|z|), sigmoid = (z < 0 ? e : 1) / (1 + e); the tail through a mask. */
void sp_silu_mul_avx2(float *x, const float *m, float s, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), vs = _mm256_set1_ps(s), sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n; i += 8) {
        const __m256i k = tail_mask8(n - i);
        const __m256 z = _mm256_maskload_ps(x + i, k);
        const __m256 e = exp_nonpos_avx2(_mm256_or_ps(z, sign)); /* -|z| */
        const __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
        const __m256 sig = _mm256_div_ps(_mm256_blendv_ps(one, e, neg), _mm256_add_ps(one, e));
        const __m256 f = m ? _mm256_maskload_ps(m + i, k) : vs;
        _mm256_maskstore_ps(x + i, k, _mm256_mul_ps(_mm256_mul_ps(z, sig), f));
    }
}

float sp_exp_sum_avx2(float *x, int64_t n, float mx) {
    const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY), one = _mm256_set1_ps(1.0f);
    const __m256 ulp = _mm256_set1_ps(0x1p36f);
    int64_t acc = 0; /* the sum in units of 2^-36 (kernels.h) */
    bool nan = false;
    for (int64_t i = 0; i < n; i += 8) { /* the tail through a mask: every element takes the same polynomial */
        const __m256i m = tail_mask8(n - i);
        const __m256 v = _mm256_maskload_ps(x + i, m);
        const __m256 d = _mm256_sub_ps(v, vmx);
        const __m256 live = _mm256_and_ps(_mm256_cmp_ps(v, ninf, _CMP_NEQ_UQ), _mm256_castsi256_ps(m));
        const __m256 bad = _mm256_and_ps(live, _mm256_cmp_ps(d, d, _CMP_UNORD_Q)); /* NaN in: NaN out (-inf: 0) */
        const __m256 e = _mm256_blendv_ps(_mm256_and_ps(live, exp_nonpos_avx2(d)), d, bad);
        _mm256_maskstore_ps(x + i, m, e);
        nan |= (_mm256_movemask_ps(bad) & _mm256_movemask_ps(_mm256_castsi256_ps(m))) != 0;
        /* AVX2 has no float -> int64 conversion: each lane by cvtss2si */
        float s[8];
        _mm256_storeu_ps(s, _mm256_mul_ps(_mm256_min_ps(e, one), ulp));
        for (int l = 0; l < 8; l++) acc += llrintf(s[l]);
    }
    return nan ? NAN : (float)((double)acc * 0x1p-36);
}

void sp_round_f16_avx2(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; i++) x[i] = sp_f16_round(x[i]);
}

void sp_f32_to_f16_avx2(sp_f16 *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = sp_f32_to_f16(x[i]);
}

/* ---- quantized matmuls ----------------------------------------------------------------------------------------- */

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;

typedef struct {
    __m256i w[8]; /* lane l: u8 weights (Q4) or |w| (Q8_0) of row l for activation bytes 4j..4j+3 */
    __m256i s[8]; /* Q8_0 only: the signed weights, for sign(x, w) */
    __m256 d;     /* lane l: d_w of row l */
    __m256 m;     /* lane l: m_w of row l (Q4_1) */
} wblk;

static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* out[j] lane l = dword j of the 16 bytes at p[l] + off (an 8 x 4 dword transpose). */
ALWAYS_INLINE void transpose8x4(__m256i out[4], const uint8_t *const p[RG], size_t off) {
    __m256i v[4]; /* v[g] = [row g | row g+4] */
    UNROLL for (int g = 0; g < 4; g++)
        v[g] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p[g] + off))),
                                       _mm_loadu_si128((const __m128i *)(p[g + 4] + off)), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    out[0] = _mm256_unpacklo_epi64(t0, t2);
    out[1] = _mm256_unpackhi_epi64(t0, t2);
    out[2] = _mm256_unpacklo_epi64(t1, t3);
    out[3] = _mm256_unpackhi_epi64(t1, t3);
}

ALWAYS_INLINE void unpack_group(wblk *out, wkind kind, const uint8_t *const p[RG], __m256i hoff, int64_t b0, int n) {
    const size_t bs = kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1)
                                                                               : sizeof(sp_block_q8_0);
    const size_t qoff = kind == W_Q4_1 ? 4 : 2;
    const __m256i lo4 = _mm256_set1_epi8(0x0f), lo16 = _mm256_set1_epi32(0xffff);
    for (int i = 0; i < n; i++) {
        const size_t off = (size_t)(b0 + i) * bs;
        wblk *o = &out[i];
        __m256i q[4];
        transpose8x4(q, p, off + qoff);
        if (kind == W_Q8_0) {
            __m256i q2[4];
            transpose8x4(q2, p, off + qoff + 16);
            UNROLL for (int j = 0; j < 4; j++) {
                o->s[j] = q[j], o->s[4 + j] = q2[j];
                o->w[j] = _mm256_abs_epi8(q[j]), o->w[4 + j] = _mm256_abs_epi8(q2[j]);
            }
        } else {
            UNROLL for (int j = 0; j < 4; j++) {
                o->w[j] = _mm256_and_si256(q[j], lo4);
                o->w[4 + j] = _mm256_and_si256(_mm256_srli_epi16(q[j], 4), lo4);
            }
        }
        const __m256i h = _mm256_i32gather_epi32((const int *)(p[0] + off), hoff, 1); /* [d | m<<16] per lane */
        const __m256i dh = _mm256_and_si256(h, lo16);
        o->d = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(dh), _mm256_extracti128_si256(dh, 1)));
        if (kind == W_Q4_1) {
            const __m256i mh = _mm256_srli_epi32(h, 16);
            o->m = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(mh), _mm256_extracti128_si256(mh, 1)));
        }
    }
}

/* corr[t*KC + i] = -8 * sum(q_x[t, b0+i]) (Q4_0 only). */
static void act_corrections(int32_t *corr, const sp_block_q8a *x, int64_t nb, int64_t nt, int64_t b0, int n) {
    const __m256i x80 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    for (int64_t t = 0; t < nt; t++)
        for (int i = 0; i < n; i++) {
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x[t * nb + b0 + i].qs), x80);
            const __m256i s = _mm256_sad_epu8(v, zero); /* 4 x sum(q + 128) over 8 bytes */
            const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            corr[t * KC + i] = -8 * ((int)(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) - 32 * 128);
        }
}

ALWAYS_INLINE void tile_q(float *y, int64_t ldy, int nr, bool first, const wblk *wb, int n,
                          const sp_block_q8a *x /* row t0, block b0 */, int64_t nb, const int32_t *corr, wkind kind,
                          int NT) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[TT];
    UNROLL for (int t = 0; t < NT; t++) {
        if (first || nr < RG) {
            float buf[RG] = {0};
            if (!first) memcpy(buf, y + t * ldy, (size_t)nr * 4);
            acc[t] = _mm256_loadu_ps(buf);
        } else {
            acc[t] = _mm256_loadu_ps(y + t * ldy);
        }
    }
    for (int i = 0; i < n; i++) {
        const wblk *o = &wb[i];
        __m256i is[TT];
        if (kind == W_Q8_0) {
            UNROLL for (int t = 0; t < NT; t++) is[t] = _mm256_setzero_si256();
            UNROLL for (int j = 0; j < 8; j++) {
                const __m256i wj = _mm256_load_si256(&o->w[j]), sj = _mm256_load_si256(&o->s[j]);
                UNROLL for (int t = 0; t < NT; t++) {
                    const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j)), sj);
                    is[t] = _mm256_add_epi32(is[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wj, xs), ones));
                }
            }
        } else {
            __m256i p16[TT];
            UNROLL for (int t = 0; t < NT; t++) p16[t] = _mm256_setzero_si256();
            UNROLL for (int j = 0; j < 8; j++) {
                const __m256i wj = _mm256_load_si256(&o->w[j]);
                UNROLL for (int t = 0; t < NT; t++)
                    p16[t] = _mm256_add_epi16(p16[t], _mm256_maddubs_epi16(wj, _mm256_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j))));
            }
            UNROLL for (int t = 0; t < NT; t++) {
                is[t] = _mm256_madd_epi16(p16[t], ones);
                if (kind == W_Q4_0) is[t] = _mm256_add_epi32(is[t], _mm256_set1_epi32(corr[t * KC + i]));
            }
        }
        const __m256 d = o->d;
        UNROLL for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(d, _mm256_set1_ps(x[t * nb + i].d)),
                                     acc[t]);
        if (kind == W_Q4_1) {
            const __m256 m = o->m;
            UNROLL for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[t * nb + i].s), acc[t]);
        }
    }
    UNROLL for (int t = 0; t < NT; t++) {
        if (nr < RG) {
            float buf[RG];
            _mm256_storeu_ps(buf, acc[t]);
            memcpy(y + t * ldy, buf, (size_t)nr * 4);
        } else {
            _mm256_storeu_ps(y + t * ldy, acc[t]);
        }
    }
}

ALWAYS_INLINE void matmul_q(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, wkind kind) {
    const size_t bs = kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1)
                                                                               : sizeof(sp_block_q8_0);
    const int64_t nb = K / SP_QK;
    const size_t row_bytes = (size_t)nb * bs;
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    _Alignas(32) wblk wb[KC];                         /* one row group's unpacked chunk of blocks */
    int32_t corr[TC * KC];                            /* [TC][KC] Q4_0 activation corrections */
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int n = (int)SP_MIN_I(KC, nb - b0);
            if (kind == W_Q4_0) act_corrections(corr, x + ts * nb, nb, nts, b0, n);
            for (int64_t rg = r0; rg < r1; rg += RG) {
                const int nr = (int)SP_MIN_I(RG, r1 - rg);
                const uint8_t *p[RG];
                int32_t hoff[RG];
                for (int l = 0; l < RG; l++) {
                    const int rl = l < nr ? l : nr - 1;
                    p[l] = (const uint8_t *)w + (size_t)(rg + rl) * row_bytes;
                    hoff[l] = (int32_t)((size_t)rl * row_bytes);
                }
                const uint8_t *pf = (const uint8_t *)w + (size_t)(rg + RG) * row_bytes; /* next group */
                if (rg + RG < r1)
                    for (size_t c = 0; c < (size_t)SP_MIN_I(RG, r1 - rg - RG) * row_bytes; c += 64)
                        _mm_prefetch((const char *)pf + c, _MM_HINT_T0);
                unpack_group(wb, kind, p, _mm256_loadu_si256((const __m256i *)hoff), b0, n);
                for (int64_t t0 = ts; t0 < ts + nts; t0 += TT) {
                    const int nt = (int)SP_MIN_I(TT, ts + nts - t0);
                    float *yt = y + t0 * ldy + rg;
                    const sp_block_q8a *xt = x + t0 * nb + b0;
                    const int32_t *ct = corr + (t0 - ts) * KC;
                    const bool first = b0 == 0;
                    switch (nt) {
                    case 1: tile_q(yt, ldy, nr, first, wb, n, xt, nb, ct, kind, 1); break;
                    case 2: tile_q(yt, ldy, nr, first, wb, n, xt, nb, ct, kind, 2); break;
                    case 3: tile_q(yt, ldy, nr, first, wb, n, xt, nb, ct, kind, 3); break;
                    default: tile_q(yt, ldy, nr, first, wb, n, xt, nb, ct, kind, 4); break;
                    }
                }
            }
        }
    }
}

void sp_matmul_q4_0_avx2(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                         int64_t T) {
    matmul_q(y, ldy, w, x, K, r0, r1, T, W_Q4_0);
}
void sp_matmul_q4_1_avx2(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                         int64_t T) {
    matmul_q(y, ldy, w, x, K, r0, r1, T, W_Q4_1);
}
void sp_matmul_q8_0_avx2(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                         int64_t T) {
    matmul_q(y, ldy, w, x, K, r0, r1, T, W_Q8_0);
}

/* ---- quantized matmuls on packed weights ------------------------------------------------------------------------
 * Weights repacked at load (kernels/pack.c, RG = 8, Q8_0 kept signed): per row group and block, vector j lane l =
 * dword j of row 8g+l, loaded straight from memory (32-byte aligned) instead of transposed per call: Q4: 4 vectors
 * of nibble pairs (w_j = v & 15, w_{4+j} = (v >> 4) & 15), Q8_0: 8 signed vectors (|w| and sign(x, w) as above);
 * then 8 f16 scales d (and mins m) per block. Same integer sums and float order as matmul_q: bit-identical. */

ALWAYS_INLINE void tile_p(float *y, int64_t ldy, int nr, bool first, const uint8_t *q, const sp_f16 *dw,
                          const sp_f16 *mw, int n, const sp_block_q8a *x /* row t0, block b0 */, int64_t nb,
                          const int32_t *corr, size_t pf, wkind kind, int NT) {
    const size_t qb = kind == W_Q8_0 ? 256 : 128; /* quant bytes per (group, block) */
    const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0f);
    __m256 acc[TT];
    UNROLL for (int t = 0; t < NT; t++) {
        if (first || nr < RG) {
            float buf[RG] = {0};
            if (!first) memcpy(buf, y + t * ldy, (size_t)nr * 4);
            acc[t] = _mm256_loadu_ps(buf);
        } else {
            acc[t] = _mm256_loadu_ps(y + t * ldy);
        }
    }
    for (int i = 0; i < n; i++) {
        const uint8_t *qi = q + (size_t)i * qb;
        if (pf) { /* the same block of the next row group */
            UNROLL for (size_t c = 0; c < qb; c += 64) _mm_prefetch((const char *)qi + pf + c, _MM_HINT_T0);
            if (!(i & 3)) _mm_prefetch((const char *)(dw + 8 * i) + pf, _MM_HINT_T0);
            if (!(i & 3) && kind == W_Q4_1) _mm_prefetch((const char *)(mw + 8 * i) + pf, _MM_HINT_T0);
        }
        __m256i is[TT];
        if (kind == W_Q8_0) {
            UNROLL for (int t = 0; t < NT; t++) is[t] = _mm256_setzero_si256();
            UNROLL for (int j = 0; j < 8; j++) {
                const __m256i sj = _mm256_load_si256((const __m256i *)(qi + 32 * j)), wj = _mm256_abs_epi8(sj);
                UNROLL for (int t = 0; t < NT; t++) {
                    const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j)), sj);
                    is[t] = _mm256_add_epi32(is[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wj, xs), ones));
                }
            }
        } else {
            __m256i p16[TT], v[4];
            UNROLL for (int t = 0; t < NT; t++) p16[t] = _mm256_setzero_si256();
            UNROLL for (int j = 0; j < 4; j++) v[j] = _mm256_load_si256((const __m256i *)(qi + 32 * j));
            UNROLL for (int j = 0; j < 8; j++) {
                const __m256i wj = j < 4 ? _mm256_and_si256(v[j], lo4)
                                         : _mm256_and_si256(_mm256_srli_epi16(v[j - 4], 4), lo4);
                UNROLL for (int t = 0; t < NT; t++)
                    p16[t] = _mm256_add_epi16(p16[t], _mm256_maddubs_epi16(wj, _mm256_set1_epi32(load_i32(x[t * nb + i].qs + 4 * j))));
            }
            UNROLL for (int t = 0; t < NT; t++) {
                is[t] = _mm256_madd_epi16(p16[t], ones);
                if (kind == W_Q4_0) is[t] = _mm256_add_epi32(is[t], _mm256_set1_epi32(corr[t * KC + i]));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dw + 8 * i)));
        UNROLL for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(d, _mm256_set1_ps(x[t * nb + i].d)),
                                     acc[t]);
        if (kind == W_Q4_1) {
            const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mw + 8 * i)));
            UNROLL for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[t * nb + i].s), acc[t]);
        }
    }
    UNROLL for (int t = 0; t < NT; t++) {
        if (nr < RG) {
            float buf[RG];
            _mm256_storeu_ps(buf, acc[t]);
            memcpy(y + t * ldy, buf, (size_t)nr * 4);
        } else {
            _mm256_storeu_ps(y + t * ldy, acc[t]);
        }
    }
}

ALWAYS_INLINE void matmul_p(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, wkind kind) {
    const sp_type type = kind == W_Q4_0 ? SP_TYPE_Q4_0 : kind == W_Q4_1 ? SP_TYPE_Q4_1 : SP_TYPE_Q8_0;
    const size_t qb = kind == W_Q8_0 ? 256 : 128;
    const int64_t nb = K / SP_QK;
    const size_t gbytes = sp_packed_group_bytes(type, K, RG);
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    int32_t corr[TC * KC];                            /* [TC][KC] Q4_0 activation corrections */
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int n = (int)SP_MIN_I(KC, nb - b0);
            if (kind == W_Q4_0) act_corrections(corr, x + ts * nb, nb, nts, b0, n);
            for (int64_t rg = r0; rg < r1; rg += RG) {
                const int nr = (int)SP_MIN_I(RG, r1 - rg);
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
                    switch (nt) {
                    case 1: tile_p(yt, ldy, nr, first, q, dw, mw, n, xt, nb, ct, p, kind, 1); break;
                    case 2: tile_p(yt, ldy, nr, first, q, dw, mw, n, xt, nb, ct, p, kind, 2); break;
                    case 3: tile_p(yt, ldy, nr, first, q, dw, mw, n, xt, nb, ct, p, kind, 3); break;
                    default: tile_p(yt, ldy, nr, first, q, dw, mw, n, xt, nb, ct, p, kind, 4); break;
                    }
                }
            }
        }
    }
}

#define PACKED_AVX2(name, kind, type)                                                                           \
    static size_t packed_size_##name(int64_t N, int64_t K) { return sp_packed_size_rg(type, N, K, RG); }        \
    static void pack_##name(void *dst, const void *src, int64_t N, int64_t K) {                                 \
        sp_pack_rg(type, dst, src, N, K, RG, false);                                                             \
    }                                                                                                            \
    static void matmul_packed_##name(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, \
                                     int64_t r1, int64_t T) {                                                    \
        matmul_p(y, ldy, w, x, K, r0, r1, T, kind);                                                              \
    }
PACKED_AVX2(q4_0, W_Q4_0, SP_TYPE_Q4_0)
PACKED_AVX2(q4_1, W_Q4_1, SP_TYPE_Q4_1)
PACKED_AVX2(q8_0, W_Q8_0, SP_TYPE_Q8_0)

/* ---- float matmuls --------------------------------------------------------------------------------------------- */

typedef enum { W_F32, W_F16, W_BF16 } fkind;

ALWAYS_INLINE __m256 load_w8(const void *w, int64_t k, fkind kind) {
    if (kind == W_F32) return _mm256_loadu_ps((const float *)w + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    if (kind == W_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

ALWAYS_INLINE float load_w1(const void *w, int64_t k, fkind kind) {
    if (kind == W_F32) return ((const float *)w)[k];
    if (kind == W_F16) return sp_f16_to_f32(((const sp_f16 *)w)[k]);
    return sp_bf16_to_f32(((const sp_bf16 *)w)[k]);
}

/* NR weight rows x NT tokens: y[t*ldy + r] = W[r] . x[t]. */
ALWAYS_INLINE void tile_f(float *y, int64_t ldy, const uint8_t *w, size_t row_bytes, const float *x, int64_t K,
                          fkind kind, int NR, int NT) {
    __m256 acc[4][2];
    UNROLL for (int r = 0; r < NR; r++) UNROLL for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        UNROLL for (int r = 0; r < NR; r++) wv[r] = load_w8(w + r * row_bytes, k, kind);
        UNROLL for (int t = 0; t < NT; t++) {
            const __m256 xv = _mm256_loadu_ps(x + t * K + k);
            UNROLL for (int r = 0; r < NR; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    UNROLL for (int r = 0; r < NR; r++) UNROLL for (int t = 0; t < NT; t++) {
        float s = hsum8(acc[r][t]);
        for (int64_t kk = k; kk < K; kk++) s += load_w1(w + r * row_bytes, kk, kind) * x[t * K + kk];
        y[t * ldy + r] = s;
    }
}

ALWAYS_INLINE void matmul_f(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, fkind kind) {
    const size_t row_bytes = (size_t)K * (kind == W_F32 ? 4 : 2);
    const float *x = (const float *)xv; /* [T, K] */
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * row_bytes;
        int64_t t = 0;
        for (; t + 2 <= T; t += 2) tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 4, 2);
        if (t < T) tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 4, 1);
    }
    for (; r < r1; r++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * row_bytes;
        for (int64_t t = 0; t < T; t++) tile_f(y + t * ldy + r, ldy, wr, row_bytes, x + t * K, K, kind, 1, 1);
    }
}

void sp_matmul_f32_avx2(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                        int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_F32);
}
void sp_matmul_f16_avx2(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                        int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_F16);
}
void sp_matmul_bf16_avx2(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                         int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_BF16);
}

/* ---- accum: y[idx[t]] += c[t] @ D (kernels/accum.c) -------------------------------------------------------------
 * As in x86/avx512.c with ymm: a column tile is 32 elements of D's rows (one quant block; 4 ymm), a token tile up
 * to 3 rows of y (12 ymm accumulators kept in registers over all F rows). Each 32-element piece of row f is
 * dequantized once per token tile (w = q*d [+ m]); float tails past H are handled by a scalar loop. */

typedef enum { A_F32, A_F16, A_BF16, A_Q4_0, A_Q4_1, A_Q8_0 } akind;
enum { ATT = 3 }; /* tokens per accum tile */

/* w[0..3] = elements [j0, j0+32) of a row (a full piece). */
ALWAYS_INLINE void load_piece8(__m256 w[4], const uint8_t *row, int64_t j0, akind kind) {
    switch (kind) {
    case A_F32:
        UNROLL for (int i = 0; i < 4; i++) w[i] = _mm256_loadu_ps((const float *)row + j0 + 8 * i);
        break;
    case A_F16:
        UNROLL for (int i = 0; i < 4; i++)
            w[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j0 + 8 * i)));
        break;
    case A_BF16:
        UNROLL for (int i = 0; i < 4; i++)
            w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j0 + 8 * i))), 16));
        break;
    case A_Q4_0:
    case A_Q4_1: {
        const bool q41 = kind == A_Q4_1;
        const uint8_t *qs = q41 ? ((const sp_block_q4_1 *)row + j0 / SP_QK)->qs : ((const sp_block_q4_0 *)row + j0 / SP_QK)->qs;
        const sp_f16 dh = q41 ? ((const sp_block_q4_1 *)row + j0 / SP_QK)->d : ((const sp_block_q4_0 *)row + j0 / SP_QK)->d;
        const __m128i v = _mm_loadu_si128((const __m128i *)qs), lo4 = _mm_set1_epi8(0x0f);
        const __m128i k = _mm_set1_epi8(q41 ? 0 : 8);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, lo4), k), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), lo4), k);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
        const __m256 mn = _mm256_set1_ps(q41 ? _cvtsh_ss(((const sp_block_q4_1 *)row + j0 / SP_QK)->m) : 0.0f);
        w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d, mn);
        w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d, mn);
        w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d, mn);
        w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d, mn);
        break;
    }
    case A_Q8_0: {
        const sp_block_q8_0 *b = (const sp_block_q8_0 *)row + j0 / SP_QK;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(b->d));
        UNROLL for (int i = 0; i < 4; i++)
            w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + 8 * i)))), d);
        break;
    }
    }
}

ALWAYS_INLINE void accum_tile8(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                               const uint8_t *d, size_t row_bytes, size_t pf_off, int64_t F, int64_t j0, akind kind,
                               int NT) {
    float *yr[ATT];
    __m256 acc[ATT][4];
    UNROLL for (int t = 0; t < NT; t++) {
        yr[t] = y + (idx ? idx[t] : t) * ldy + j0;
        UNROLL for (int i = 0; i < 4; i++) acc[t][i] = _mm256_loadu_ps(yr[t] + 8 * i);
    }
    for (int64_t f = 0; f < F; f++) {
        const uint8_t *row = d + (size_t)f * row_bytes;
        if (pf_off) _mm_prefetch((const char *)row + pf_off, _MM_HINT_T0);
        __m256 w[4];
        load_piece8(w, row, j0, kind);
        UNROLL for (int t = 0; t < NT; t++) {
            const __m256 a = _mm256_broadcast_ss(c + t * ldc + f);
            UNROLL for (int i = 0; i < 4; i++) acc[t][i] = _mm256_fmadd_ps(a, w[i], acc[t][i]);
        }
    }
    UNROLL for (int t = 0; t < NT; t++)
        UNROLL for (int i = 0; i < 4; i++) _mm256_storeu_ps(yr[t] + 8 * i, acc[t][i]);
}

ALWAYS_INLINE void accum_a8(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc, const void *dv,
                            int64_t F, int64_t H, int64_t T, akind kind, sp_type type) {
    const size_t row_bytes = sp_row_size(type, H), piece_bytes = sp_row_size(type, 32);
    const uint8_t *d = (const uint8_t *)dv;
    const int64_t Hf = H / 32 * 32; /* full pieces; float types may have a tail */
    for (int64_t j0 = 0; j0 < Hf; j0 += 32) {
        const int64_t ahead = j0 + 4 * 32;
        const size_t pf = ahead + 32 <= Hf ? (size_t)(ahead / 32) * piece_bytes : 0;
        for (int64_t t0 = 0; t0 < T; t0 += ATT) {
            const int nt = (int)SP_MIN_I(ATT, T - t0);
            float *yt = idx ? y : y + t0 * ldy;
            const int32_t *it = idx ? idx + t0 : NULL;
            const size_t p = t0 == 0 ? pf : 0;
            switch (nt) {
            case 1: accum_tile8(yt, ldy, it, c + t0 * ldc, ldc, d, row_bytes, p, F, j0, kind, 1); break;
            case 2: accum_tile8(yt, ldy, it, c + t0 * ldc, ldc, d, row_bytes, p, F, j0, kind, 2); break;
            default: accum_tile8(yt, ldy, it, c + t0 * ldc, ldc, d, row_bytes, p, F, j0, kind, 3); break;
            }
        }
    }
    if (Hf < H) /* float tail: the reference's order */
        for (int64_t f = 0; f < F; f++)
            for (int64_t t = 0; t < T; t++) {
                float *yt = y + (idx ? idx[t] : t) * ldy;
                const float a = c[t * ldc + f];
                for (int64_t j = Hf; j < H; j++) {
                    const uint8_t *row = d + (size_t)f * row_bytes;
                    const float wj = kind == A_F32 ? ((const float *)row)[j]
                                     : kind == A_F16 ? _cvtsh_ss(((const uint16_t *)row)[j])
                                                     : sp_bf16_to_f32(((const uint16_t *)row)[j]);
                    yt[j] += a * wj;
                }
            }
}

#define ACCUM_AVX2(name, kind, type)                                                                            \
    void sp_accum_##name##_avx2(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,          \
                                const void *d, int64_t F, int64_t H, int64_t T) {                                \
        accum_a8(y, ldy, idx, c, ldc, d, F, H, T, kind, type);                                                   \
    }
ACCUM_AVX2(f32, A_F32, SP_TYPE_F32)
ACCUM_AVX2(f16, A_F16, SP_TYPE_F16)
ACCUM_AVX2(bf16, A_BF16, SP_TYPE_BF16)
ACCUM_AVX2(q4_0, A_Q4_0, SP_TYPE_Q4_0)
ACCUM_AVX2(q4_1, A_Q4_1, SP_TYPE_Q4_1)
ACCUM_AVX2(q8_0, A_Q8_0, SP_TYPE_Q8_0)

/* ---- accum_packed_i8: y[idx[t]] += c[t] @ D, D in the "down int8" layout (kernels/pack.c) ---------------------
 * x86/avx512.c's int8 down path (the math and bound in kernels.h accum_packed_i8) with 8 lanes and no VNNI: the
 * products a[f, b] = c[t, f] * d[f, b] are quantized 8 blocks b at a time (one ymm per row f, the max over f a
 * vertical max on the bits of |a|); per block the 4 vectors of the layout are 8 ymm halves (columns 0..7 and 8..15
 * in their low nibbles, 16..23 and 24..31 in the high ones) and each of the 4 column quarters sums, in int16, the
 * vpmaddubsw(u8 w, s8 q) pair sums of the 4 row quads (<= 4 * 2 * 15 * 127 = 15240, no saturation), then vpmaddwd by
 * 1 makes its int32 lane sums: the same exact isum = -8 sum q + sum q w as VNNI, so the result equals avx512's up to
 * nothing (one FMA per 8 columns and group, the same order). */
enum { DB2 = 64, DOWN_PF2 = 8192 }; /* column blocks quantized at a time; prefetch distance (avx512.c's DOWN_PF) */

/* One call per token, 16-row group and DB2 blocks (not inlined: clang's sanitizer build of this file stays short). */
static __attribute__((noinline)) void down_i8_quant8(int32_t qd[4][DB2], int32_t *corr, float *sc, const float *c,
    int nrows, const sp_f16 *ds /* [16][nb] */, int64_t nb, int64_t b0, int n) {
    const __m256i absm = _mm256_set1_epi32(0x7fffffff), ff = _mm256_set1_epi32(0xff);
    for (int i0 = 0; i0 < n; i0 += 8) {
        const int m = SP_MIN_I(8, n - i0);
        __m256 a[16];
        __m256i amax = _mm256_setzero_si256();
        UNROLL
        for (int l = 0; l < 16; l++) {
            if (l < nrows) {
                __m128i h = _mm_setzero_si128();
                if (m == 8) h = _mm_loadu_si128((const __m128i *)(ds + l * nb + b0 + i0));
                else memcpy(&h, ds + l * nb + b0 + i0, (size_t)m * sizeof(sp_f16)); /* the last blocks: zeros after */
                a[l] = _mm256_mul_ps(_mm256_set1_ps(c[l]), _mm256_cvtph_ps(h));
            } else {
                a[l] = _mm256_setzero_ps();
            }
            amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(a[l]), absm));
        }
        /* amax < 2^-100: 0; not finite: NaN (|a|'s bits are non-negative as int32: signed compares) */
        const __m256i live = _mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x0d800000 - 1));
        const __m256i bad = _mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x7f800000 - 1));
        const __m256 mx = _mm256_castsi256_ps(amax), k127 = _mm256_set1_ps(127.0f);
        const __m256 id = _mm256_and_ps(_mm256_castsi256_ps(_mm256_andnot_si256(bad, live)), _mm256_div_ps(k127, mx));
        const __m256 s = _mm256_blendv_ps(_mm256_and_ps(_mm256_castsi256_ps(live), _mm256_div_ps(mx, k127)),
                                          _mm256_set1_ps(NAN), _mm256_castsi256_ps(bad));
        __m256i q[16], sum = _mm256_setzero_si256();
        UNROLL
        for (int l = 0; l < 16; l++) {
            q[l] = _mm256_cvtps_epi32(_mm256_mul_ps(a[l], id)); /* nearest even; |q| <= 127 */
            sum = _mm256_add_epi32(sum, q[l]);
        }
        UNROLL
        for (int k = 0; k < 4; k++) { /* dword k of block b = the bytes of rows 4k..4k+3 */
            __m256i v = _mm256_and_si256(q[4 * k], ff);
            v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(q[4 * k + 1], ff), 8));
            v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(q[4 * k + 2], ff), 16));
            _mm256_storeu_si256((__m256i *)(qd[k] + i0), _mm256_or_si256(v, _mm256_slli_epi32(q[4 * k + 3], 24)));
        }
        _mm256_storeu_si256((__m256i *)(corr + i0), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, 3)));
        _mm256_storeu_ps(sc + i0, s);
    }
}

static void accum_down_i8_tile8(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                                const uint8_t *base, int nrows, int64_t nb, size_t sbytes, int64_t b0, int n,
                                bool pf, int nt) {
    int32_t qd[TT][4][DB2], corr[TT][DB2];
    float sc[TT][DB2];
    float *yr[TT];
    if (pf && b0 == 0) /* keep the stream going while the scales are read and the tile quantized */
        for (size_t o = 0; o < sbytes; o += 64) _mm_prefetch((const char *)base + o + DOWN_PF2, _MM_HINT_T0);
    for (int t = 0; t < nt; t++) {
        down_i8_quant8(qd[t], corr[t], sc[t], c + t * ldc, nrows, (const sp_f16 *)base, nb, b0, n);
        yr[t] = y + (idx ? idx[t] : t) * ldy;
    }
    const __m256i lo4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int i = 0; i < n; i++) {
        const int64_t b = b0 + i;
        const uint8_t *qb = base + sbytes + (size_t)b * 256;
        if (pf) {
            UNROLL
            for (int k = 0; k < 4; k++) _mm_prefetch((const char *)qb + DOWN_PF2 + 64 * k, _MM_HINT_T0);
        }
        __m256i w[4][4]; /* [row quad k][column quarter h]: columns 8h..8h+7 of rows 4k..4k+3, u8 */
        UNROLL
        for (int k = 0; k < 4; k++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(qb + 64 * k));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(qb + 64 * k + 32));
            w[k][0] = _mm256_and_si256(v0, lo4);
            w[k][1] = _mm256_and_si256(v1, lo4);
            w[k][2] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo4);
            w[k][3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo4);
        }
        const int64_t j0 = b * SP_QK;
        for (int t = 0; t < nt; t++) { /* nt at run time: per token a few vectors, nothing kept across tokens */
            const __m256i cr = _mm256_set1_epi32(corr[t][i]);
            const __m256 sv = _mm256_set1_ps(sc[t][i]);
            __m256i x[4];
            UNROLL
            for (int k = 0; k < 4; k++) x[k] = _mm256_set1_epi32(qd[t][k][i]);
            UNROLL
            for (int h = 0; h < 4; h++) {
                __m256i p = _mm256_maddubs_epi16(w[0][h], x[0]);
                UNROLL
                for (int k = 1; k < 4; k++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[k][h], x[k]));
                const __m256i is = _mm256_add_epi32(cr, _mm256_madd_epi16(p, ones));
                float *yc = yr[t] + j0 + 8 * h;
                _mm256_storeu_ps(yc, _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), sv, _mm256_loadu_ps(yc)));
            }
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
        for (int64_t b0 = 0; b0 < nb; b0 += DB2) {
            const int n = (int)SP_MIN_I(DB2, nb - b0);
            for (int64_t t0 = 0; t0 < T; t0 += TT) {
                const int nt = (int)SP_MIN_I(TT, T - t0);
                float *yt = idx ? y : y + t0 * ldy;
                const int32_t *it = idx ? idx + t0 : NULL;
                const float *ct = c + t0 * ldc + g * SP_DOWN_RG;
                accum_down_i8_tile8(yt, ldy, it, ct, ldc, base, nrows, nb, sbytes, b0, n, t0 == 0, nt);
            }
        }
    }
}

void sp_kernels_fill_avx2(sp_kernels *k) {
    k->accum[SP_TYPE_F32] = sp_accum_f32_avx2;
    k->accum[SP_TYPE_F16] = sp_accum_f16_avx2;
    k->accum[SP_TYPE_BF16] = sp_accum_bf16_avx2;
    k->accum[SP_TYPE_Q4_0] = sp_accum_q4_0_avx2;
    k->accum[SP_TYPE_Q4_1] = sp_accum_q4_1_avx2;
    k->accum[SP_TYPE_Q8_0] = sp_accum_q8_0_avx2;
    k->quantize_q8a = sp_quantize_q8a_avx2;
    k->matmul[SP_TYPE_Q4_0] = sp_matmul_q4_0_avx2;
    k->matmul[SP_TYPE_Q4_1] = sp_matmul_q4_1_avx2;
    k->matmul[SP_TYPE_Q8_0] = sp_matmul_q8_0_avx2;
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
    k->matmul[SP_TYPE_F32] = sp_matmul_f32_avx2;
    k->matmul[SP_TYPE_F16] = sp_matmul_f16_avx2;
    k->matmul[SP_TYPE_BF16] = sp_matmul_bf16_avx2;
    k->dot_f32 = sp_dot_f32_avx2;
    k->axpy_f32 = sp_axpy_f32_avx2;
    k->attn_scores_f16 = sp_attn_scores_f16_avx2;
    k->attn_sum_f16 = sp_attn_sum_f16_avx2;
    k->f32_to_f16 = sp_f32_to_f16_avx2;
    k->round_f16 = sp_round_f16_avx2;
    k->exp_sum = sp_exp_sum_avx2;
    k->silu_mul = sp_silu_mul_avx2;
    k->first_above = sp_first_above_avx2;
    k->max_f32 = sp_max_f32_avx2;
    k->packed_down_size[SP_TYPE_Q4_0] = sp_packed_down_size_q4_0; /* the int8 down path only (no float "down" kernel) */
    k->pack_down_i8[SP_TYPE_Q4_0] = sp_pack_down_i8_q4_0;
    k->accum_packed_i8[SP_TYPE_Q4_0] = accum_packed_i8_q4_0;
}
