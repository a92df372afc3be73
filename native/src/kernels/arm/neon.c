/* arm/neon.c: the Armv8.0 Advanced SIMD (NEON) kernel tier, for every AArch64 CPU (chosen at run time by
 * dispatch.c; arm/dotprod.c and arm/i8mm.c start from this table). Base AArch64 intrinsics only: no SDOT/UDOT, no
 * SMMLA, no FP16 arithmetic (the F16 <-> F32 conversions FCVTL / FCVTN / FCVT are base AArch64).
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, nb = K/32 blocks per row.
 * Instruction counts below: "body" = the instructions one block (or one d, one row) and one token needs, as written;
 * "loop" = the whole compiled inner loop (objdump of GCC 12 -O2, clang 14 -O2 in brackets), with its loads, loop
 * control and the compiler's register moves and spills, divided by the multiply-adds it does. qemu timings mean
 * nothing; these do.
 *
 * Activations: quantize_q8a as q8a.c, bit for bit: amax by FMAXNM (fmaxf's NaN rule), the same scalar d = amax/127
 * and 1/d, q = FCVTNS(x * id) (nearest even, as nearbyintf), narrowed by XTN (the (int8_t) cast's wrap), the int32 sum.
 *
 * Quantized matmuls (Q4_0, Q4_1, Q8_0 weights x sp_block_q8a activations): weights stationary, lane l of a float32x4
 * accumulator = weight row l of a group of 4.
 *   - Per chunk of KC = 64 blocks a 4-row group (rows past r1 repeat the last row and are not stored) is unpacked once
 *     into a stack buffer (`wblk`: per block 4 x 32 int8 weights -- Q4_0 as q - 8, Q4_1 as q, Q8_0 as is -- and the
 *     rows' d_w, m_w as float), then applied to each tile of up to 4 tokens: per block the 8 weight vectors and d_w are
 *     loaded once and used for every token of the tile.
 *   - Integer dot products, exact (ref's isum bit for bit): SMULL / SMLAL / SMLAL2 multiply 8 int8 pairs into int16
 *     lanes. Q4 (|w| <= 15, |q_x| <= 128): 4 products per int16 lane (<= 7680); ADDP of two rows' vectors and ADDP of
 *     two such results sum 16 products per lane (<= 30720 < 2^15); SADDLP widens: one int32x4, lane l = row l's isum.
 *     Q8_0: 2 products per int16 lane (<= 2 * 128 * 127 = 32512 when no activation byte is -128, which quantize_q8a
 *     gives only for blocks of amax below ~1e-40), SADDLP + SADALP per row, an ADDP tree over the 4 rows; a call whose
 *     activations hold a -128 (one SMINV scan per call) takes the one-product-per-lane path, SMULL(2) + SADALP.
 *   - acc[t] += float(isum) * (d_w * d_x) (SCVTF, FMUL by element, FMLA), + m_w * s_x for Q4_1 (FMLA by element):
 *     ref's per-block float math, only the summation order (FMA) differs.
 *   - Multiply-adds per block and token: 4 rows x 32 = 128. Body: 3 loads (2 x LDR q of x's quants, LDR of d_x (and
 *     s_x)) + 16 SMULL/SMLAL/SMLAL2 + 4 ADDP/SADDLP + 3 SCVTF/FMUL/FMLA:
 *       Q4_0 26 instructions = 0.203 per multiply-add; Q4_1 27 (+ FMLA m_w s_x) = 0.211;
 *       Q8_0 33 (8 SADDLP/SADALP + 3 ADDP instead of 4) = 0.258; Q8_0 with a -128 activation 41 = 0.320.
 *     Loop (4-token tile, the weight loads amortized over the tile), per 512 multiply-adds: Q4_0 116 instructions =
 *     0.227 [114]; Q4_1 129 = 0.252 [117]; Q8_0 150 = 0.293 [157]; Q8_0's -128 path 191 = 0.373 [172]. One token
 *     (T = 1), per 128: Q4_0 37 = 0.289 [34]; Q4_1 39 = 0.305 [36]; Q8_0 44 = 0.344 [41].
 *   - Loop order: passes of <= 64 tokens > chunks of 64 blocks > row groups (unpack) > token tiles > blocks; y itself
 *     accumulates across chunks.
 * Float matmuls (F32, F16, BF16 weights x f32 activations): 4 weight rows x up to 4 tokens of float32x4 FMLA
 *   accumulators; each 4-element weight vector is converted once (FCVTL / BF16 by SHLL #16) and applied to the tile's
 *   tokens; an ADDP tree gives a vector of the 4 rows per token; a K tail goes through zero-padded vectors. Loop (4 x 4
 *   tile, 64 multiply-adds): F32 27 instructions = 0.42 [30], F16 32 = 0.5 [34].
 * Accum (y[idx[t]] += c[t] @ D, kernels/accum.c): a column piece is 16 elements of D's rows (4 vectors; half a quant
 *   block: Q4's low or high nibbles), a token tile up to 4 rows of y (16 accumulators kept over all F rows). Each piece
 *   of row f is dequantized once per token tile (w = d * q (+ m), scales by FCVT inline) and applied with FMLA by
 *   element c[t, f]. Loop per row f, 4 tokens (64 multiply-adds): F32 25 instructions = 0.39 [24], Q4_0 45 = 0.70
 *   [50] (the dequantization is 25 of them). Float tails past a multiple of 16 take a scalar loop in ref's order.
 *
 * Attention over the F16 cache (kernels.h):
 *   - Scores: the keys are stored in blocks of 16 slots transposed (SP_KBLK), so for each d one LDP (32 bytes) and 4
 *     FCVTL(2) give the d-values of 16 slots (4 vectors, lanes = slots), applied to each query of the tile by FMLA by
 *     element (q[m][d..d+3] is one vector loaded per 4 d): an accumulator lane is one slot's score, one fused chain
 *     over d in order from 0 (the D tail the same FMLA, one d at a time), then * scale. Tiles: up to 4 queries x 1
 *     key block; a single query takes 2 blocks (8 independent chains).
 *       Body per d, 4 queries x 16 slots = 64 multiply-adds: 1 LDP + 4 FCVTL(2) + 16 FMLA + 1/4 LDR q per query =
 *       22 instructions = 0.34 per multiply-add; loop 103 per 4 d = 0.40 [95: 0.37].
 *       One query x 2 blocks (32 multiply-adds): body 18.25 = 0.57 (the conversion is most of it without FP16
 *       arithmetic); loop 77 per 4 d = 0.60 [80: 0.63].
 *   - Weighted sums: lanes are output elements (32 per tile: 8 vectors; 16, 8, 4 for D's tail); each value row is
 *     loaded (one LD1 of 64 bytes) and converted (8 FCVTL(2)) once per tile of 2 queries and applied to each query's
 *     accumulators by FMLA by element, skipped where that query's p is 0 (a branch; clang may select instead: the
 *     same bits), so an inf in a masked row adds nothing; every output element is one fused chain over j in order.
 *       Body per row j, 2 queries x 32 elements = 64 multiply-adds: 1 + 8 + 2 x (LDR s, FCMP, B.EQ, 8 FMLA) = 31
 *       instructions = 0.48 per multiply-add; loop (2 rows per iteration) 68 per 2 rows = 0.53 [70: 0.55]. One query:
 *       body 20 / 32 = 0.63; loop 46 per 2 rows = 0.72 [50: 0.78].
 *   Every element depends on its own operands only (never on M, n, the tile or its place in the tile).
 * Vectors: exp by x = n ln2 + r, |r| <= ln2/2, Taylor to r^7 (FMLA), times 2^n as two exact power-of-2 factors (so it
 *   underflows gradually down to x = -104, as expf does; worst error seen 0.61 ulp, silu_mul's 1.7 ulp); exp_sum sums
 *   min(e, 1) * 2^36 rounded to nearest even by FCVTL to float64 + FCVTNS to int64 lanes (exact, order-free), NaN
 *   flagged per lane, -inf slots exactly 0 (and never NaN, as ref). silu(z) = z * (z < 0 ? e : 1) / (1 + e),
 *   e = exp(-|z|). f32_to_f16 / round_f16 by FCVTN / FCVTL (nearest even; subnormals, overflow and NaN as
 *   sp_f32_to_f16). max_f32 and first_above 8 / 16 lanes per step, exactly as ref (a maximum of 0 takes the sign of the
 *   first zero, as ref's strict > does). Tails go through zero- or -inf-padded vectors, so every element takes the same
 *   instructions.
 * Packed weight layouts are not implemented in this tier (packed_size / pack / matmul_packed / accum_packed NULL).
 */
#include "../tiers.h"

#include <arm_neon.h>
#include <math.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define SP_PRAGMA(x) _Pragma(#x)
#if defined(__clang__) /* the tile loops (constant trip counts once inlined) unrolled fully: arrays stay in registers */
#  define UNROLL SP_PRAGMA(clang loop unroll(full))
#  define UNROLL2 SP_PRAGMA(clang loop unroll_count(2))
#else
#  define UNROLL SP_PRAGMA(GCC unroll 16)
#  define UNROLL2 SP_PRAGMA(GCC unroll 2)
#endif
/* Each tile shape (tokens, rows, vectors) is its own small static function (the *_FN macros below) calling the
 * always-inline tile with constants: a switch over shapes then calls distinct functions, which no compiler merges
 * into one call with a variable shape before inlining (clang's early CFG simplification would, and the tile's
 * arrays would then live in memory). */
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

enum { RG = 4, TT = 4, KC = 64, TC = 64 }; /* rows per group, tokens per tile, blocks per K chunk, tokens per pass */

ALWAYS_INLINE float32x4_t cvt_lo(uint16x8_t h) { return vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h))); }
ALWAYS_INLINE float32x4_t cvt_hi(uint16x8_t h) { return vcvt_high_f32_f16(vreinterpretq_f16_u16(h)); }
ALWAYS_INLINE float32x4_t cvt4(uint16x4_t h) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }
/* One half to float by FCVT (exact, the value of sp_f16_to_f32), inline: no call in the loops. */
ALWAYS_INLINE float f16_1(sp_f16 h) {
    float16_t v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

/* ---- activations and small vectors --------------------------------------------------------------------------- */

static void quantize_q8a_neon(sp_block_q8a *y, const float *x, int64_t k) {
    for (int64_t i = 0; i < k / SP_QK; i++, x += SP_QK) {
        float32x4_t v[8];
        float32x4_t mx = vdupq_n_f32(0.0f);
        UNROLL for (int j = 0; j < 8; j++) {
            v[j] = vld1q_f32(x + 4 * j);
            mx = vmaxnmq_f32(mx, vabsq_f32(v[j])); /* fmaxf: a NaN never wins */
        }
        const float d = vmaxnmvq_f32(mx) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int32x4_t q[8];
        int32x4_t sum = vdupq_n_s32(0);
        UNROLL for (int j = 0; j < 8; j++) {
            q[j] = vcvtnq_s32_f32(vmulq_n_f32(v[j], id)); /* nearest even, as nearbyintf */
            sum = vaddq_s32(sum, q[j]);
        }
        int16x8_t h[4];
        UNROLL for (int j = 0; j < 4; j++) h[j] = vmovn_high_s32(vmovn_s32(q[2 * j]), q[2 * j + 1]);
        vst1q_s8(y[i].qs, vmovn_high_s16(vmovn_s16(h[0]), h[1])); /* XTN: the (int8_t) cast */
        vst1q_s8(y[i].qs + 16, vmovn_high_s16(vmovn_s16(h[2]), h[3]));
        y[i].d = sp_f16_round(d);
        y[i].s = sp_f16_round(d * (float)vaddvq_s32(sum));
    }
}

static float dot_f32_neon(const float *a, const float *b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_f32_neon(float *y, float a, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
        vst1q_f32(y + i + 4, vfmaq_n_f32(vld1q_f32(y + i + 4), vld1q_f32(x + i + 4), a));
    }
    for (; i < n; i++) y[i] += a * x[i];
}

static void f32_to_f16_neon(sp_f16 *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float16x8_t h = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(x + i)), vld1q_f32(x + i + 4));
        vst1q_u16(y + i, vreinterpretq_u16_f16(h));
    }
    if (i < n) { /* the tail through a padded vector: the same conversion */
        float b[8] = {0};
        uint16_t h[8];
        memcpy(b, x + i, (size_t)(n - i) * sizeof *b);
        vst1q_u16(h, vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(b)), vld1q_f32(b + 4))));
        memcpy(y + i, h, (size_t)(n - i) * sizeof *h);
    }
}

ALWAYS_INLINE float32x4_t round_f16_4(float32x4_t v) { return vcvt_f32_f16(vcvt_f16_f32(v)); }

static void round_f16_neon(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, round_f16_4(vld1q_f32(x + i)));
    if (i < n) {
        float b[4] = {0};
        memcpy(b, x + i, (size_t)(n - i) * sizeof *b);
        vst1q_f32(b, round_f16_4(vld1q_f32(b)));
        memcpy(x + i, b, (size_t)(n - i) * sizeof *b);
    }
}

static float max_f32_neon(const float *x, int64_t n, bool *bad) {
    const float32x4_t inf = vdupq_n_f32(INFINITY);
    float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0;
    uint32x4_t b = vdupq_n_u32(0);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t a = vld1q_f32(x + i), c = vld1q_f32(x + i + 4);
        b = vorrq_u32(b, vmvnq_u32(vandq_u32(vcltq_f32(a, inf), vcltq_f32(c, inf)))); /* NaN or +inf */
        m0 = vmaxq_f32(m0, a);
        m1 = vmaxq_f32(m1, c);
    }
    float mx = vmaxvq_f32(vmaxq_f32(m0, m1));
    if (vmaxvq_u32(b)) *bad = true;
    for (; i < n; i++) {
        if (!(x[i] < INFINITY)) *bad = true;
        else if (x[i] > mx) mx = x[i];
    }
    if (mx == 0.0f) /* ref's strict > keeps the first zero's sign; FMAX prefers +0 */
        for (i = 0; i < n; i++)
            if (x[i] == 0.0f) {
                mx = x[i];
                break;
            }
    return mx;
}

static int64_t first_above_neon(const float *x, int64_t n, float t) {
    const float32x4_t vt = vdupq_n_f32(t);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { /* four vectors per test: the common case is no hit at all */
        const uint32x4_t m = vorrq_u32(vorrq_u32(vcgtq_f32(vld1q_f32(x + i), vt), vcgtq_f32(vld1q_f32(x + i + 4), vt)),
                                       vorrq_u32(vcgtq_f32(vld1q_f32(x + i + 8), vt),
                                                 vcgtq_f32(vld1q_f32(x + i + 12), vt)));
        if (vmaxvq_u32(m)) break;
    }
    for (; i < n; i++)
        if (x[i] > t) return i;
    return n;
}

/* exp(x): x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to r^7 (truncation below 1e-8 relative),
 * times 2^n as 2^(n>>1) * 2^(n - (n>>1)), both normal, so the product rounds once (gradual underflow down to
 * x = -104, where expf is 0 too). x is clamped to [-104, 89] (89 gives inf); NaN stays NaN. */
ALWAYS_INLINE float32x4_t exp_neon(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-104.0f)), vdupq_n_f32(89.0f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693145751953125f)); /* ln2 high bits */
    r = vfmsq_f32(r, n, vdupq_n_f32(1.428606765330187e-06f));         /* ln2 low bits */
    float32x4_t p = vdupq_n_f32(1.0f / 5040);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 720), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t ni = vcvtq_s32_f32(n), n1 = vshrq_n_s32(ni, 1), n2 = vsubq_s32(ni, n1); /* each in [-75, 64] */
    const int32x4_t bias = vdupq_n_s32(127);
    const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
    const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, bias), 23));
    return vmulq_f32(vmulq_f32(p, s1), s2);
}

/* One vector of exp_sum: e (stored by the caller), the NaN flags and the int64 terms added to acc. */
ALWAYS_INLINE float32x4_t exp_sum4(float32x4_t v, float32x4_t vmx, uint32x4_t *nan, int64x2_t *acc) {
    const float32x4_t d = vsubq_f32(v, vmx);
    const uint32x4_t live = vmvnq_u32(vceqq_f32(v, vdupq_n_f32(-INFINITY))); /* -inf: masked slot, exactly 0 */
    const uint32x4_t bad = vandq_u32(live, vmvnq_u32(vceqq_f32(d, d)));      /* NaN in: NaN out, as expf gives */
    float32x4_t e = vreinterpretq_f32_u32(vandq_u32(live, vreinterpretq_u32_f32(exp_neon(d))));
    e = vbslq_f32(bad, d, e);
    *nan = vorrq_u32(*nan, bad);
    const float32x4_t s = vmulq_n_f32(vminq_f32(e, vdupq_n_f32(1.0f)), 0x1p36f); /* exact: a power of 2 */
    *acc = vaddq_s64(*acc, vcvtnq_s64_f64(vcvt_f64_f32(vget_low_f32(s))));   /* nearest even, as llrintf */
    *acc = vaddq_s64(*acc, vcvtnq_s64_f64(vcvt_high_f64_f32(s)));
    return e;
}

static float exp_sum_neon(float *x, int64_t n, float mx) {
    const float32x4_t vmx = vdupq_n_f32(mx);
    int64x2_t acc = vdupq_n_s64(0); /* the sum in units of 2^-36 (kernels.h) */
    uint32x4_t nan = vdupq_n_u32(0);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, exp_sum4(vld1q_f32(x + i), vmx, &nan, &acc));
    if (i < n) { /* padding lanes are -inf: they add 0 */
        float b[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
        memcpy(b, x + i, (size_t)(n - i) * sizeof *b);
        vst1q_f32(b, exp_sum4(vld1q_f32(b), vmx, &nan, &acc));
        memcpy(x + i, b, (size_t)(n - i) * sizeof *b);
    }
    if (vmaxvq_u32(nan)) return NAN;
    return (float)((double)vaddvq_s64(acc) * 0x1p-36);
}

/* silu(z) * f with e = exp(-|z|) <= 1: sigmoid is 1 / (1 + e) for z >= 0 and e / (1 + e) below. */
ALWAYS_INLINE float32x4_t silu4(float32x4_t z, float32x4_t f) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    const float32x4_t e = exp_neon(vnegq_f32(vabsq_f32(z)));
    const uint32x4_t neg = vcltq_f32(z, vdupq_n_f32(0.0f));
    const float32x4_t sig = vdivq_f32(vbslq_f32(neg, e, one), vaddq_f32(one, e));
    return vmulq_f32(vmulq_f32(z, sig), f);
}

static void silu_mul_neon(float *x, const float *m, float s, int64_t n) {
    const float32x4_t vs = vdupq_n_f32(s);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, silu4(vld1q_f32(x + i), m ? vld1q_f32(m + i) : vs));
    if (i < n) {
        float b[4] = {0}, f[4] = {s, s, s, s};
        memcpy(b, x + i, (size_t)(n - i) * sizeof *b);
        if (m) memcpy(f, m + i, (size_t)(n - i) * sizeof *f);
        vst1q_f32(b, silu4(vld1q_f32(b), vld1q_f32(f)));
        memcpy(x + i, b, (size_t)(n - i) * sizeof *b);
    }
}

/* ---- attention over the F16 cache (the method at the top) ------------------------------------------------------ */

/* The 16 slots' values of one d of a key block: 4 vectors. */
ALWAYS_INLINE void krow(float32x4_t kv[4], const sp_f16 *p) {
    const uint16x8_t h0 = vld1q_u16(p), h1 = vld1q_u16(p + 8); /* one LDP */
    kv[0] = cvt_lo(h0);
    kv[1] = cvt_hi(h0);
    kv[2] = cvt_lo(h1);
    kv[3] = cvt_hi(h1);
}

/* acc[(m KB + b) 4 + u] += kv(b)[u] * qv[m][L] for the d whose key rows start at kb[b] + off. */
#define SCORES_STEP(L, off)                                                                                    \
    UNROLL for (int b = 0; b < KB; b++) {                                                                      \
        float32x4_t kv[4];                                                                                     \
        krow(kv, kb[b] + (off));                                                                               \
        UNROLL for (int m = 0; m < NT; m++)                                                                    \
            UNROLL for (int u = 0; u < 4; u++)                                                                 \
                acc[(m * KB + b) * 4 + u] = vfmaq_laneq_f32(acc[(m * KB + b) * 4 + u], kv[u], qv[m], L);       \
    }

/* NT queries x KB key blocks (blocks past the valid nkb repeat block 0 and are not stored; the last stored block
 * keeps `last` lanes). */
ALWAYS_INLINE void scores_tile(const float *q, int64_t ldq, const sp_f16 *k, int64_t D, int nkb, int last,
                               float scale, float *out, int64_t ldo, int NT, int KB) {
    const sp_f16 *kb[2];
    UNROLL for (int b = 0; b < KB; b++) kb[b] = k + (b < nkb ? b : 0) * SP_KBLK * D;
    float32x4_t acc[16];
    UNROLL for (int i = 0; i < 4 * NT * KB; i++) acc[i] = vdupq_n_f32(0.0f);
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
        float32x4_t qv[4];
        UNROLL for (int m = 0; m < NT; m++) qv[m] = vld1q_f32(q + m * ldq + d);
        SCORES_STEP(0, d * SP_KBLK)
        SCORES_STEP(1, (d + 1) * SP_KBLK)
        SCORES_STEP(2, (d + 2) * SP_KBLK)
        SCORES_STEP(3, (d + 3) * SP_KBLK)
    }
    for (; d < D; d++) { /* the same fused step, one d at a time */
        float32x4_t qv[4];
        UNROLL for (int m = 0; m < NT; m++) qv[m] = vld1q_dup_f32(q + m * ldq + d);
        SCORES_STEP(0, d * SP_KBLK)
    }
    UNROLL for (int m = 0; m < NT; m++)
        UNROLL for (int b = 0; b < KB; b++) {
            if (b >= nkb) continue;
            float *o = out + m * ldo + b * SP_KBLK;
            const float32x4_t *a = &acc[(m * KB + b) * 4];
            if (b < nkb - 1 || last == SP_KBLK) {
                UNROLL for (int u = 0; u < 4; u++) vst1q_f32(o + 4 * u, vmulq_n_f32(a[u], scale));
            } else {
                float buf[SP_KBLK];
                UNROLL for (int u = 0; u < 4; u++) vst1q_f32(buf + 4 * u, vmulq_n_f32(a[u], scale));
                memcpy(o, buf, (size_t)last * sizeof *buf);
            }
        }
}

#define SCORES_FN(nt, kb)                                                                                      \
    static void scores_##nt##x##kb(const float *q, int64_t ldq, const sp_f16 *k, int64_t D, int nkb, int last,    \
                                   float scale, float *out, int64_t ldo) {                                         \
        scores_tile(q, ldq, k, D, nkb, last, scale, out, ldo, nt, kb);                                             \
    }
SCORES_FN(1, 2)
SCORES_FN(1, 1)
SCORES_FN(2, 1)
SCORES_FN(3, 1)
SCORES_FN(4, 1)

#define SCORES_CASE(nt, kb) \
    case nt: scores_##nt##x##kb(qt, ldq, kt, D, nkb, last, scale, ot, ldo); break;

static void attn_scores_f16_neon(const float *q, int64_t ldq, int64_t M, const sp_f16 *k, int64_t n, int64_t D,
                                 float scale, float *out, int64_t ldo) {
    const int64_t nblk = (n + SP_KBLK - 1) / SP_KBLK;
    const int KB = M == 1 ? 2 : 1, MT = KB == 2 ? 1 : 4; /* one query: 2 blocks, 8 independent chains */
    for (int64_t b = 0; b < nblk; b += KB) {
        const int nkb = (int)SP_MIN_I(KB, nblk - b), last = (int)SP_MIN_I(SP_KBLK, n - (b + nkb - 1) * SP_KBLK);
        const sp_f16 *kt = k + b * SP_KBLK * D;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int nt = (int)SP_MIN_I(MT, M - m0);
            const float *qt = q + m0 * ldq;
            float *ot = out + m0 * ldo + b * SP_KBLK;
            if (KB == 2) {
                scores_1x2(qt, ldq, kt, D, nkb, last, scale, ot, ldo);
            } else {
                switch (nt) { SCORES_CASE(1, 1) SCORES_CASE(2, 1) SCORES_CASE(3, 1) default: SCORES_CASE(4, 1) }
            }
        }
    }
}

/* NU vectors (4 NU elements) of one value row from src; FULL: all 4 NU present, else the first w, the rest 0. */
ALWAYS_INLINE void vrow(float32x4_t vj[8], const sp_f16 *src, int64_t w, int NU, bool FULL) {
    uint16_t buf[32];
    const uint16_t *s = src;
    if (!FULL) {
        memset(buf, 0, sizeof buf);
        memcpy(buf, src, (size_t)w * sizeof *buf);
        s = buf;
    }
    if (NU == 8) {
        const uint16x8x4_t h = vld1q_u16_x4(s);
        UNROLL for (int i = 0; i < 4; i++) {
            vj[2 * i] = cvt_lo(h.val[i]);
            vj[2 * i + 1] = cvt_hi(h.val[i]);
        }
    } else if (NU == 4) {
        const uint16x8x2_t h = vld1q_u16_x2(s);
        UNROLL for (int i = 0; i < 2; i++) {
            vj[2 * i] = cvt_lo(h.val[i]);
            vj[2 * i + 1] = cvt_hi(h.val[i]);
        }
    } else if (NU == 2) {
        const uint16x8_t h = vld1q_u16(s);
        vj[0] = cvt_lo(h), vj[1] = cvt_hi(h);
    } else {
        vj[0] = cvt4(vld1_u16(s));
    }
}

/* NT queries x output elements [0, w) (w <= 4 NU) of out, all n rows in order. */
ALWAYS_INLINE void sum_tile(float *out, int64_t ldo, const float *p, int64_t ldp, const sp_f16 *v, int64_t ld,
                            int64_t n, int64_t w, int NT, int NU, bool FULL) {
    float32x4_t acc[16];
    UNROLL for (int m = 0; m < NT; m++) {
        float buf[32] = {0};
        const float *src = out + m * ldo;
        if (!FULL) memcpy(buf, src, (size_t)w * sizeof *buf), src = buf;
        UNROLL for (int u = 0; u < NU; u++) acc[m * NU + u] = vld1q_f32(src + 4 * u);
    }
    UNROLL2 for (int64_t j = 0; j < n; j++) {
        float32x4_t vj[8];
        vrow(vj, v + j * ld, w, NU, FULL);
        UNROLL for (int m = 0; m < NT; m++) {
            const float a = p[m * ldp + j];
            if (a == 0.0f) continue; /* the row adds nothing, even if it holds inf */
            UNROLL for (int u = 0; u < NU; u++)
                acc[m * NU + u] = vfmaq_n_f32(acc[m * NU + u], vj[u], a);
        }
    }
    UNROLL for (int m = 0; m < NT; m++) {
        if (FULL) {
            UNROLL for (int u = 0; u < NU; u++) vst1q_f32(out + m * ldo + 4 * u, acc[m * NU + u]);
        } else {
            float buf[32];
            UNROLL for (int u = 0; u < NU; u++) vst1q_f32(buf + 4 * u, acc[m * NU + u]);
            memcpy(out + m * ldo, buf, (size_t)w * sizeof *buf);
        }
    }
}

#define SUM_FN(nt, nu, full)                                                                                   \
    static void sum_##nt##x##nu##_##full(float *out, int64_t ldo, const float *p, int64_t ldp, const sp_f16 *v,    \
                                         int64_t ld, int64_t n, int64_t w) {                                       \
        sum_tile(out, ldo, p, ldp, v, ld, n, w, nt, nu, full);                                                     \
    }
SUM_FN(1, 8, 1)
SUM_FN(2, 8, 1)
SUM_FN(1, 4, 1)
SUM_FN(2, 4, 1)
SUM_FN(3, 4, 1)
SUM_FN(4, 4, 1)
SUM_FN(1, 2, 1)
SUM_FN(2, 2, 1)
SUM_FN(3, 2, 1)
SUM_FN(4, 2, 1)
SUM_FN(1, 1, 1)
SUM_FN(2, 1, 1)
SUM_FN(3, 1, 1)
SUM_FN(4, 1, 1)
SUM_FN(1, 8, 0)
SUM_FN(1, 4, 0)
SUM_FN(1, 2, 0)
SUM_FN(1, 1, 0)

#define SUM_CASE(nt, nu) \
    case nt: sum_##nt##x##nu##_1(ot, ldo, pt, ldp, v + i0, ld, n, w); break;

static void attn_sum_f16_neon(float *out, int64_t ldo, const float *p, int64_t ldp, int64_t M, const sp_f16 *v,
                              int64_t ld, int64_t n, int64_t D) {
    for (int64_t i0 = 0; i0 < D; i0 += 32) {
        const int64_t w = SP_MIN_I(32, D - i0);
        const int nu = w > 16 ? 8 : w > 8 ? 4 : w > 4 ? 2 : 1;
        const bool full = w == 4 * nu;
        const int MT = nu == 8 ? 2 : 4;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int nt = (int)SP_MIN_I(MT, M - m0);
            float *ot = out + m0 * ldo + i0;
            const float *pt = p + m0 * ldp;
            if (!full) { /* a ragged tail (D not a multiple of 8): padded copies, one query at a time */
                for (int m = 0; m < nt; m++) {
                    float *om = ot + m * ldo;
                    const float *pm = pt + m * ldp;
                    switch (nu) {
                    case 8: sum_1x8_0(om, ldo, pm, ldp, v + i0, ld, n, w); break;
                    case 4: sum_1x4_0(om, ldo, pm, ldp, v + i0, ld, n, w); break;
                    case 2: sum_1x2_0(om, ldo, pm, ldp, v + i0, ld, n, w); break;
                    default: sum_1x1_0(om, ldo, pm, ldp, v + i0, ld, n, w); break;
                    }
                }
            } else if (nu == 8) {
                switch (nt) { SUM_CASE(1, 8) default: SUM_CASE(2, 8) }
            } else if (nu == 4) {
                switch (nt) { SUM_CASE(1, 4) SUM_CASE(2, 4) SUM_CASE(3, 4) default: SUM_CASE(4, 4) }
            } else if (nu == 2) {
                switch (nt) { SUM_CASE(1, 2) SUM_CASE(2, 2) SUM_CASE(3, 2) default: SUM_CASE(4, 2) }
            } else {
                switch (nt) { SUM_CASE(1, 1) SUM_CASE(2, 1) SUM_CASE(3, 1) default: SUM_CASE(4, 1) }
            }
        }
    }
}

/* ---- quantized matmuls ----------------------------------------------------------------------------------------- */

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;

typedef struct {
    int8_t q[RG][SP_QK]; /* row l's 32 weights: Q4_0 q - 8, Q4_1 q (0..15), Q8_0 q */
    float d[RG];         /* d_w of row l */
    float m[RG];         /* m_w of row l (Q4_1) */
} wblk;

ALWAYS_INLINE size_t wblock_bytes(wkind kind) {
    return kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1) : sizeof(sp_block_q8_0);
}

/* Blocks [b0, b0 + n) of the 4 rows at p[] into out[0, n). */
ALWAYS_INLINE void unpack_group(wblk *out, wkind kind, const uint8_t *const p[RG], int64_t b0, int n) {
    const size_t bs = wblock_bytes(kind), qoff = kind == W_Q4_1 ? 4 : 2;
    for (int i = 0; i < n; i++) {
        const size_t off = (size_t)(b0 + i) * bs;
        wblk *o = &out[i];
        uint16_t dh[RG], mh[RG];
        UNROLL for (int l = 0; l < RG; l++) {
            const uint8_t *blk = p[l] + off;
            memcpy(&dh[l], blk, 2);
            if (kind == W_Q8_0) {
                vst1q_s8(o->q[l], vld1q_s8((const int8_t *)blk + qoff));
                vst1q_s8(o->q[l] + 16, vld1q_s8((const int8_t *)blk + qoff + 16));
            } else {
                const uint8x16_t v = vld1q_u8(blk + qoff);
                int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
                int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                if (kind == W_Q4_0) lo = vsubq_s8(lo, vdupq_n_s8(8)), hi = vsubq_s8(hi, vdupq_n_s8(8));
                vst1q_s8(o->q[l], lo);
                vst1q_s8(o->q[l] + 16, hi);
                if (kind == W_Q4_1) memcpy(&mh[l], blk + 2, 2);
            }
        }
        vst1q_f32(o->d, cvt4(vld1_u16(dh)));
        if (kind == W_Q4_1) vst1q_f32(o->m, cvt4(vld1_u16(mh)));
    }
}

/* Lane l: the block's exact integer dot product of row l (weights w[2l], w[2l+1]) with x0:x1. */
ALWAYS_INLINE int32x4_t isum_q4(const int8x16_t w[2 * RG], int8x16_t x0, int8x16_t x1) {
    int16x8_t p[RG]; /* 4 products per lane: |.| <= 4 * 15 * 128 */
    UNROLL for (int l = 0; l < RG; l++) {
        int16x8_t a = vmull_s8(vget_low_s8(w[2 * l]), vget_low_s8(x0));
        a = vmlal_high_s8(a, w[2 * l], x0);
        a = vmlal_s8(a, vget_low_s8(w[2 * l + 1]), vget_low_s8(x1));
        p[l] = vmlal_high_s8(a, w[2 * l + 1], x1);
    }
    /* ADDP: [r0 x4 | r1 x4], [r2 x4 | r3 x4] (8 products per lane), then [r0 r0 r1 r1 r2 r2 r3 r3] (16 products per
     * lane, <= 30720), SADDLP: [r0 r1 r2 r3] in int32 */
    return vpaddlq_s16(vpaddq_s16(vpaddq_s16(p[0], p[1]), vpaddq_s16(p[2], p[3])));
}

ALWAYS_INLINE int32x4_t isum_q8(const int8x16_t w[2 * RG], int8x16_t x0, int8x16_t x1, bool wide) {
    int32x4_t s[RG];
    UNROLL for (int l = 0; l < RG; l++) {
        if (!wide) { /* 2 products per int16 lane: <= 2 * 128 * 127 with no -128 activation */
            int16x8_t a = vmull_s8(vget_low_s8(w[2 * l]), vget_low_s8(x0));
            a = vmlal_high_s8(a, w[2 * l], x0);
            int16x8_t b = vmull_s8(vget_low_s8(w[2 * l + 1]), vget_low_s8(x1));
            b = vmlal_high_s8(b, w[2 * l + 1], x1);
            s[l] = vpadalq_s16(vpaddlq_s16(a), b);
        } else { /* one product per int16 lane: exact for any int8 */
            int32x4_t a = vpaddlq_s16(vmull_s8(vget_low_s8(w[2 * l]), vget_low_s8(x0)));
            a = vpadalq_s16(a, vmull_high_s8(w[2 * l], x0));
            a = vpadalq_s16(a, vmull_s8(vget_low_s8(w[2 * l + 1]), vget_low_s8(x1)));
            s[l] = vpadalq_s16(a, vmull_high_s8(w[2 * l + 1], x1));
        }
    }
    return vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
}

/* acc[t] (lanes = the group's rows) over blocks [0, n) of the chunk for NT tokens; y: rows of tokens t0.. */
ALWAYS_INLINE void tile_q(float *y, int64_t ldy, int nr, bool first, const wblk *wb, int n,
                          const sp_block_q8a *x /* row t0, block b0 */, int64_t nb, wkind kind, bool wide, int NT) {
    float32x4_t acc[TT];
    UNROLL for (int t = 0; t < NT; t++) {
        if (first) {
            acc[t] = vdupq_n_f32(0.0f);
        } else if (nr == RG) {
            acc[t] = vld1q_f32(y + t * ldy);
        } else {
            float buf[RG] = {0};
            memcpy(buf, y + t * ldy, (size_t)nr * sizeof *buf);
            acc[t] = vld1q_f32(buf);
        }
    }
    for (int i = 0; i < n; i++) {
        const wblk *o = &wb[i];
        int8x16_t w[2 * RG];
        UNROLL for (int l = 0; l < RG; l++) w[2 * l] = vld1q_s8(o->q[l]), w[2 * l + 1] = vld1q_s8(o->q[l] + 16);
        const float32x4_t dw = vld1q_f32(o->d);
        const float32x4_t mw = kind == W_Q4_1 ? vld1q_f32(o->m) : dw;
        UNROLL for (int t = 0; t < NT; t++) {
            const sp_block_q8a *xb = x + t * nb + i;
            const int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);
            const float32x2_t ds = vld1_f32(&xb->d); /* d_x, s_x */
            const int32x4_t is = kind == W_Q8_0 ? isum_q8(w, x0, x1, wide) : isum_q4(w, x0, x1);
            acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(is), vmulq_lane_f32(dw, ds, 0));
            if (kind == W_Q4_1) acc[t] = vfmaq_lane_f32(acc[t], mw, ds, 1);
        }
    }
    UNROLL for (int t = 0; t < NT; t++) {
        if (nr == RG) {
            vst1q_f32(y + t * ldy, acc[t]);
        } else {
            float buf[RG];
            vst1q_f32(buf, acc[t]);
            memcpy(y + t * ldy, buf, (size_t)nr * sizeof *buf);
        }
    }
}

#define TILE_Q_FN(name, kind, wide, nt)                                                                        \
    static void tile_##name##_##nt(float *y, int64_t ldy, int nr, bool first, const wblk *wb, int n,               \
                                   const sp_block_q8a *x, int64_t nb) {                                            \
        tile_q(y, ldy, nr, first, wb, n, x, nb, kind, wide, nt);                                                   \
    }
#define TILE_Q_FNS(name, kind, wide)                                                                           \
    TILE_Q_FN(name, kind, wide, 1) TILE_Q_FN(name, kind, wide, 2) TILE_Q_FN(name, kind, wide, 3)               \
    TILE_Q_FN(name, kind, wide, 4)
TILE_Q_FNS(q4_0, W_Q4_0, false)
TILE_Q_FNS(q4_1, W_Q4_1, false)
TILE_Q_FNS(q8_0, W_Q8_0, false)
TILE_Q_FNS(q8_0w, W_Q8_0, true)
/* the tile function of this kind for nt tokens (a constant choice once matmul_q_kind is inlined) */
#define TILE_Q(nt) \
    (kind == W_Q4_0 ? tile_q4_0_##nt : kind == W_Q4_1 ? tile_q4_1_##nt : wide ? tile_q8_0w_##nt : tile_q8_0_##nt)

/* Whether some activation byte is -128 (possible only for blocks of tiny amax): Q8_0 then multiplies exactly with
 * one product per int16 lane. */
static bool any_q8_min(const sp_block_q8a *x, int64_t nblk) {
    int8x16_t mn = vdupq_n_s8(127);
    for (int64_t b = 0; b < nblk; b++) mn = vminq_s8(mn, vminq_s8(vld1q_s8(x[b].qs), vld1q_s8(x[b].qs + 16)));
    return vminvq_s8(mn) == -128;
}

ALWAYS_INLINE void matmul_q_kind(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0,
                                 int64_t r1, int64_t T, wkind kind, bool wide) {
    const int64_t nb = K / SP_QK;
    const size_t row_bytes = (size_t)nb * wblock_bytes(kind);
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    _Alignas(16) wblk wb[KC];                         /* one row group's unpacked chunk of blocks */
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int n = (int)SP_MIN_I(KC, nb - b0);
            for (int64_t rg = r0; rg < r1; rg += RG) {
                const int nr = (int)SP_MIN_I(RG, r1 - rg);
                const uint8_t *p[RG];
                for (int l = 0; l < RG; l++) /* rows past r1 repeat the last one */
                    p[l] = (const uint8_t *)w + (size_t)(rg + (l < nr ? l : nr - 1)) * row_bytes;
                unpack_group(wb, kind, p, b0, n);
                for (int64_t t0 = ts; t0 < ts + nts; t0 += TT) {
                    const int nt = (int)SP_MIN_I(TT, ts + nts - t0);
                    float *yt = y + t0 * ldy + rg;
                    const sp_block_q8a *xt = x + t0 * nb + b0;
                    const bool first = b0 == 0;
                    switch (nt) {
                    case 1: TILE_Q(1)(yt, ldy, nr, first, wb, n, xt, nb); break;
                    case 2: TILE_Q(2)(yt, ldy, nr, first, wb, n, xt, nb); break;
                    case 3: TILE_Q(3)(yt, ldy, nr, first, wb, n, xt, nb); break;
                    default: TILE_Q(4)(yt, ldy, nr, first, wb, n, xt, nb); break;
                    }
                }
            }
        }
    }
}

static void matmul_q4_0_neon(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                             int64_t T) {
    matmul_q_kind(y, ldy, w, x, K, r0, r1, T, W_Q4_0, false);
}
static void matmul_q4_1_neon(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                             int64_t T) {
    matmul_q_kind(y, ldy, w, x, K, r0, r1, T, W_Q4_1, false);
}
static void matmul_q8_0_wide(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                             int64_t T) {
    matmul_q_kind(y, ldy, w, x, K, r0, r1, T, W_Q8_0, true);
}
static void matmul_q8_0_neon(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                             int64_t T) {
    if (any_q8_min((const sp_block_q8a *)x, T * (K / SP_QK)))
        matmul_q8_0_wide(y, ldy, w, x, K, r0, r1, T);
    else
        matmul_q_kind(y, ldy, w, x, K, r0, r1, T, W_Q8_0, false);
}

/* ---- float matmuls --------------------------------------------------------------------------------------------- */

typedef enum { W_F32, W_F16, W_BF16 } fkind;

ALWAYS_INLINE float32x4_t load_w4(const uint8_t *row, int64_t k, fkind kind) {
    if (kind == W_F32) return vld1q_f32((const float *)row + k);
    const uint16x4_t h = vld1_u16((const uint16_t *)row + k);
    if (kind == W_F16) return cvt4(h);
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

ALWAYS_INLINE float load_w1(const uint8_t *row, int64_t k, fkind kind) {
    if (kind == W_F32) return ((const float *)row)[k];
    if (kind == W_F16) return sp_f16_to_f32(((const sp_f16 *)row)[k]);
    return sp_bf16_to_f32(((const sp_bf16 *)row)[k]);
}

/* 4 weight rows (wr[]) x NT tokens: y[t*ldy + l] = W[l] . x[t] for l < nr. */
ALWAYS_INLINE void tile_f(float *y, int64_t ldy, int nr, const uint8_t *const wr[RG], const float *x, int64_t K,
                          fkind kind, int NT) {
    float32x4_t acc[RG][TT];
    UNROLL for (int r = 0; r < RG; r++) UNROLL for (int t = 0; t < NT; t++) acc[r][t] = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        float32x4_t wv[RG];
        UNROLL for (int r = 0; r < RG; r++) wv[r] = load_w4(wr[r], k, kind);
        UNROLL for (int t = 0; t < NT; t++) {
            const float32x4_t xv = vld1q_f32(x + t * K + k);
            UNROLL for (int r = 0; r < RG; r++) acc[r][t] = vfmaq_f32(acc[r][t], wv[r], xv);
        }
    }
    if (k < K) { /* the K tail through zero-padded vectors */
        const int left = (int)(K - k);
        float32x4_t wv[RG];
        UNROLL for (int r = 0; r < RG; r++) {
            float b[4] = {0};
            for (int e = 0; e < left; e++) b[e] = load_w1(wr[r], k + e, kind);
            wv[r] = vld1q_f32(b);
        }
        UNROLL for (int t = 0; t < NT; t++) {
            float b[4] = {0};
            memcpy(b, x + t * K + k, (size_t)left * sizeof *b);
            const float32x4_t xv = vld1q_f32(b);
            UNROLL for (int r = 0; r < RG; r++) acc[r][t] = vfmaq_f32(acc[r][t], wv[r], xv);
        }
    }
    UNROLL for (int t = 0; t < NT; t++) {
        const float32x4_t s = vpaddq_f32(vpaddq_f32(acc[0][t], acc[1][t]), vpaddq_f32(acc[2][t], acc[3][t]));
        if (nr == RG) {
            vst1q_f32(y + t * ldy, s);
        } else {
            float buf[RG];
            vst1q_f32(buf, s);
            memcpy(y + t * ldy, buf, (size_t)nr * sizeof *buf);
        }
    }
}

#define TILE_F_FN(name, kind, nt)                                                                              \
    static void tile_##name##_##nt(float *y, int64_t ldy, int nr, const uint8_t *const wr[RG], const float *x,      \
                                   int64_t K) {                                                                    \
        tile_f(y, ldy, nr, wr, x, K, kind, nt);                                                                    \
    }
#define TILE_F_FNS(name, kind) \
    TILE_F_FN(name, kind, 1) TILE_F_FN(name, kind, 2) TILE_F_FN(name, kind, 3) TILE_F_FN(name, kind, 4)
TILE_F_FNS(f32, W_F32)
TILE_F_FNS(f16, W_F16)
TILE_F_FNS(bf16, W_BF16)
#define TILE_F(nt) (kind == W_F32 ? tile_f32_##nt : kind == W_F16 ? tile_f16_##nt : tile_bf16_##nt)

ALWAYS_INLINE void matmul_f(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, fkind kind) {
    const size_t row_bytes = (size_t)K * (kind == W_F32 ? 4 : 2);
    const float *x = (const float *)xv; /* [T, K] */
    for (int64_t rg = r0; rg < r1; rg += RG) {
        const int nr = (int)SP_MIN_I(RG, r1 - rg);
        const uint8_t *wr[RG];
        for (int l = 0; l < RG; l++) wr[l] = (const uint8_t *)w + (size_t)(rg + (l < nr ? l : nr - 1)) * row_bytes;
        for (int64_t t0 = 0; t0 < T; t0 += TT) {
            const int nt = (int)SP_MIN_I(TT, T - t0);
            float *yt = y + t0 * ldy + rg;
            const float *xt = x + t0 * K;
            switch (nt) {
            case 1: TILE_F(1)(yt, ldy, nr, wr, xt, K); break;
            case 2: TILE_F(2)(yt, ldy, nr, wr, xt, K); break;
            case 3: TILE_F(3)(yt, ldy, nr, wr, xt, K); break;
            default: TILE_F(4)(yt, ldy, nr, wr, xt, K); break;
            }
        }
    }
}

static void matmul_f32_neon(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                            int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_F32);
}
static void matmul_f16_neon(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                            int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_F16);
}
static void matmul_bf16_neon(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, int64_t r1,
                             int64_t T) {
    matmul_f(y, ldy, w, x, K, r0, r1, T, W_BF16);
}

/* ---- accum: y[idx[t]] += c[t] @ D (kernels/accum.c; the method at the top) -------------------------------------- */

typedef enum { A_F32, A_F16, A_BF16, A_Q4_0, A_Q4_1, A_Q8_0 } akind;
enum { AP = 16, ATT = 4 }; /* elements per column piece, tokens per accum tile */

/* int8 x 16 -> 4 float vectors. */
ALWAYS_INLINE void widen16(float32x4_t f[4], int8x16_t s) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(s)), hi = vmovl_high_s8(s);
    f[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    f[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
    f[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    f[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

/* w[0..3] = elements [j0, j0 + 16) of a row (j0 a multiple of 16). */
ALWAYS_INLINE void load_piece(float32x4_t w[4], const uint8_t *row, int64_t j0, akind kind) {
    switch (kind) {
    case A_F32: {
        const float32x4x4_t v = vld1q_f32_x4((const float *)row + j0);
        UNROLL for (int i = 0; i < 4; i++) w[i] = v.val[i];
        break;
    }
    case A_F16:
    case A_BF16: {
        const uint16x8x2_t h = vld1q_u16_x2((const uint16_t *)row + j0);
        UNROLL for (int i = 0; i < 2; i++) {
            if (kind == A_F16) {
                w[2 * i] = cvt_lo(h.val[i]), w[2 * i + 1] = cvt_hi(h.val[i]);
            } else {
                w[2 * i] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h.val[i]), 16));
                w[2 * i + 1] = vreinterpretq_f32_u32(vshll_high_n_u16(h.val[i], 16));
            }
        }
        break;
    }
    case A_Q4_0:
    case A_Q4_1: {
        const bool q41 = kind == A_Q4_1;
        const int64_t b = j0 / SP_QK;
        const uint8_t *qs = q41 ? ((const sp_block_q4_1 *)row)[b].qs : ((const sp_block_q4_0 *)row)[b].qs;
        const sp_f16 dh = q41 ? ((const sp_block_q4_1 *)row)[b].d : ((const sp_block_q4_0 *)row)[b].d;
        const uint8x16_t v = vld1q_u8(qs);
        const uint8x16_t nib = (j0 / 16) & 1 ? vshrq_n_u8(v, 4) : vandq_u8(v, vdupq_n_u8(15)); /* elements 16.. high */
        float32x4_t f[4];
        widen16(f, q41 ? vreinterpretq_s8_u8(nib) : vsubq_s8(vreinterpretq_s8_u8(nib), vdupq_n_s8(8)));
        const float d = f16_1(dh);
        if (q41) {
            const float32x4_t mn = vdupq_n_f32(f16_1(((const sp_block_q4_1 *)row)[b].m));
            UNROLL for (int i = 0; i < 4; i++) w[i] = vfmaq_n_f32(mn, f[i], d);
        } else {
            UNROLL for (int i = 0; i < 4; i++) w[i] = vmulq_n_f32(f[i], d);
        }
        break;
    }
    case A_Q8_0: {
        const sp_block_q8_0 *blk = (const sp_block_q8_0 *)row + j0 / SP_QK;
        float32x4_t f[4];
        widen16(f, vld1q_s8(blk->qs + (j0 % SP_QK)));
        const float d = f16_1(blk->d);
        UNROLL for (int i = 0; i < 4; i++) w[i] = vmulq_n_f32(f[i], d);
        break;
    }
    }
}

ALWAYS_INLINE void accum_tile(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,
                              const uint8_t *d, size_t row_bytes, int64_t F, int64_t j0, akind kind, int NT) {
    float *yr[ATT];
    float32x4_t acc[ATT][4];
    UNROLL for (int t = 0; t < NT; t++) {
        yr[t] = y + (idx ? idx[t] : t) * ldy + j0;
        UNROLL for (int i = 0; i < 4; i++) acc[t][i] = vld1q_f32(yr[t] + 4 * i);
    }
    for (int64_t f = 0; f < F; f++) {
        float32x4_t w[4];
        load_piece(w, d + (size_t)f * row_bytes, j0, kind);
        UNROLL for (int t = 0; t < NT; t++) {
            const float a = c[t * ldc + f];
            UNROLL for (int i = 0; i < 4; i++) acc[t][i] = vfmaq_n_f32(acc[t][i], w[i], a);
        }
    }
    UNROLL for (int t = 0; t < NT; t++) UNROLL for (int i = 0; i < 4; i++) vst1q_f32(yr[t] + 4 * i, acc[t][i]);
}

#define ACCUM_TILE_FN(name, kind, nt)                                                                          \
    static void atile_##name##_##nt(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,        \
                                    const uint8_t *d, size_t row_bytes, int64_t F, int64_t j0) {                   \
        accum_tile(y, ldy, idx, c, ldc, d, row_bytes, F, j0, kind, nt);                                            \
    }
#define ACCUM_TILE_FNS(name, kind)                                                                             \
    ACCUM_TILE_FN(name, kind, 1) ACCUM_TILE_FN(name, kind, 2) ACCUM_TILE_FN(name, kind, 3)                     \
    ACCUM_TILE_FN(name, kind, 4)
ACCUM_TILE_FNS(f32, A_F32)
ACCUM_TILE_FNS(f16, A_F16)
ACCUM_TILE_FNS(bf16, A_BF16)
ACCUM_TILE_FNS(q4_0, A_Q4_0)
ACCUM_TILE_FNS(q4_1, A_Q4_1)
ACCUM_TILE_FNS(q8_0, A_Q8_0)
#define ACCUM_TILE(nt)                                                                                         \
    (kind == A_F32 ? atile_f32_##nt : kind == A_F16 ? atile_f16_##nt : kind == A_BF16 ? atile_bf16_##nt          \
     : kind == A_Q4_0 ? atile_q4_0_##nt : kind == A_Q4_1 ? atile_q4_1_##nt : atile_q8_0_##nt)

ALWAYS_INLINE void accum_a(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc, const void *dv,
                           int64_t F, int64_t H, int64_t T, akind kind, sp_type type) {
    const size_t row_bytes = sp_row_size(type, H);
    const uint8_t *d = (const uint8_t *)dv;
    const int64_t Hf = H / AP * AP; /* full pieces; float types may have a tail */
    for (int64_t j0 = 0; j0 < Hf; j0 += AP)
        for (int64_t t0 = 0; t0 < T; t0 += ATT) {
            const int nt = (int)SP_MIN_I(ATT, T - t0);
            float *yt = idx ? y : y + t0 * ldy;
            const int32_t *it = idx ? idx + t0 : NULL;
            const float *ct = c + t0 * ldc;
            switch (nt) {
            case 1: ACCUM_TILE(1)(yt, ldy, it, ct, ldc, d, row_bytes, F, j0); break;
            case 2: ACCUM_TILE(2)(yt, ldy, it, ct, ldc, d, row_bytes, F, j0); break;
            case 3: ACCUM_TILE(3)(yt, ldy, it, ct, ldc, d, row_bytes, F, j0); break;
            default: ACCUM_TILE(4)(yt, ldy, it, ct, ldc, d, row_bytes, F, j0); break;
            }
        }
    if (Hf < H) /* float tail: the reference's order */
        for (int64_t f = 0; f < F; f++) {
            const uint8_t *row = d + (size_t)f * row_bytes;
            for (int64_t t = 0; t < T; t++) {
                float *yt = y + (idx ? idx[t] : t) * ldy;
                const float a = c[t * ldc + f];
                for (int64_t j = Hf; j < H; j++) {
                    const float wj = kind == A_F32 ? ((const float *)row)[j]
                                     : kind == A_F16 ? sp_f16_to_f32(((const sp_f16 *)row)[j])
                                                     : sp_bf16_to_f32(((const sp_bf16 *)row)[j]);
                    yt[j] += a * wj;
                }
            }
        }
}

#define ACCUM_NEON(name, kind, type)                                                                            \
    static void accum_##name##_neon(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc,      \
                                    const void *d, int64_t F, int64_t H, int64_t T) {                            \
        accum_a(y, ldy, idx, c, ldc, d, F, H, T, kind, type);                                                    \
    }
ACCUM_NEON(f32, A_F32, SP_TYPE_F32)
ACCUM_NEON(f16, A_F16, SP_TYPE_F16)
ACCUM_NEON(bf16, A_BF16, SP_TYPE_BF16)
ACCUM_NEON(q4_0, A_Q4_0, SP_TYPE_Q4_0)
ACCUM_NEON(q4_1, A_Q4_1, SP_TYPE_Q4_1)
ACCUM_NEON(q8_0, A_Q8_0, SP_TYPE_Q8_0)

void sp_kernels_fill_neon(sp_kernels *k) {
    k->quantize_q8a = quantize_q8a_neon;
    k->matmul[SP_TYPE_Q4_0] = matmul_q4_0_neon;
    k->matmul[SP_TYPE_Q4_1] = matmul_q4_1_neon;
    k->matmul[SP_TYPE_Q8_0] = matmul_q8_0_neon;
    k->matmul[SP_TYPE_F32] = matmul_f32_neon;
    k->matmul[SP_TYPE_F16] = matmul_f16_neon;
    k->matmul[SP_TYPE_BF16] = matmul_bf16_neon;
    k->accum[SP_TYPE_F32] = accum_f32_neon;
    k->accum[SP_TYPE_F16] = accum_f16_neon;
    k->accum[SP_TYPE_BF16] = accum_bf16_neon;
    k->accum[SP_TYPE_Q4_0] = accum_q4_0_neon;
    k->accum[SP_TYPE_Q4_1] = accum_q4_1_neon;
    k->accum[SP_TYPE_Q8_0] = accum_q8_0_neon;
    k->dot_f32 = dot_f32_neon;
    k->axpy_f32 = axpy_f32_neon;
    k->attn_scores_f16 = attn_scores_f16_neon;
    k->attn_sum_f16 = attn_sum_f16_neon;
    k->f32_to_f16 = f32_to_f16_neon;
    k->round_f16 = round_f16_neon;
    k->exp_sum = exp_sum_neon;
    k->silu_mul = silu_mul_neon;
    k->first_above = first_above_neon;
    k->max_f32 = max_f32_neon;
}
