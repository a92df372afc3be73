/* arm/i8mm.c: the Armv8.6 int8 matrix-multiply tier (SMMLA), compiled with -march=armv8.6-a+dotprod+i8mm and chosen
 * at run time by dispatch.c when HWCAP2 says i8mm. It starts from the dotprod tier's table (dispatch.c) and replaces
 * only the quantized matmuls (Q4_0, Q4_1, Q8_0 weights x sp_block_q8a activations), packed and unpacked.
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, nb = K/32 blocks per row.
 *
 * Method: vmmlaq_s32(acc, a, b) (SMMLA) adds to the 2 x 2 int32 acc = [a0.b0, a0.b1, a1.b0, a1.b1] the products of
 * a = 2 rows x 8 int8 and b = 2 columns x 8 int8: 32 multiply-adds per instruction, twice SDOT's 16.
 *   - Weights stationary, a row group of RG = 4 consecutive weight rows as 2 row pairs (rows 0,1 and 2,3). Per block
 *     the group's quants are 4 (Q4) or 8 (Q8_0) vectors of 16 bytes; each holds 8 bytes of one row of a pair followed
 *     by the same 8 bytes of the other row (the 8-byte interleave of llama.cpp's 4 x 8 repacking), so it is the a
 *     operand of a 2 x 8 chunk of elements for both rows. Q4: vector (pair p, half h) = bytes qs[8h..8h+7] of rows
 *     2p, 2p+1: its low nibbles are elements 8h..8h+7 (chunk h), its high nibbles 16+8h..16+8h+7 (chunk 2+h).
 *   - Activations: the tokens are taken in pairs (t, t+1); for each pass and K chunk the pairs' blocks are
 *     interleaved once into a stack buffer (`xpair`: chunk k = [q_t[8k..8k+7], q_t+1[8k..8k+7]] by ZIP1/ZIP2 .2d,
 *     d = [d_t, d_t+1, d_t, d_t+1], s likewise), the b operands. An odd last token is paired with a zero block whose
 *     results are not stored, so T = 1 (decode) runs at SDOT's rate of useful work.
 *   - Per block, row pair and token pair: 4 SMMLA give the exact int32 block sums [r0 t0, r0 t1, r1 t0, r1 t1].
 *     Q4_0 quants are stored XOR 0x88 (nibble q ^ 8 = the signed 4-bit q - 8), so v << 4 and v & 0xf0 are the
 *     signed bytes 16 (q - 8) and vcvtq_n_f32_s32(isum16, 4) is float(isum) exactly (no -8 sum(q_x) correction).
 *     Q4_1: v & 0x0f, v >> 4 (0..15). Q8_0: signed bytes as they are. Signed x signed throughout (SMMLA).
 *   - acc (same 2 x 2 lane order) = fma(float(isum), d_w * d_x, acc), then fma(m_w, s_x, acc) for Q4_1, with
 *     d_w = [d_r0, d_r0, d_r1, d_r1] (ZIP1/ZIP2 of the group's 4 scales); block after block in order, for up to TT = 8
 *     tokens (4 pairs, 8 accumulators) per tile; at the store UZP1/UZP2 give each token's 4 rows. Every output
 *     element's float operations are the same sequence whatever the tiling, chunking or packing: matmul_packed gives
 *     the unpacked matmul's bits; against ref only the summation order differs (integer block sums are exact).
 *   - Loop order: passes of TC = 32 tokens > chunks of KC = 16 blocks (activation buffer 24 KB, a group's chunk
 *     <= 2.3 KB: L1) > row groups > token tiles > blocks; y accumulates across chunks.
 * Packed layout (packed_size / pack / matmul_packed, pack_rows = RG = 4; made at model load): W[N, K] = G = ceil(N/4)
 * groups of sp_packed_group_bytes(type, K, 4) bytes (the same sizes as kernels/pack.c with RG = 4, not its byte order);
 * group g (rows 4g..4g+3, rows past N repeating row N-1: computed, never stored):
 *   quants  [nb][NV][16] bytes   NV = 4 (Q4): vector 2p+h = qs[8h..8h+7] of row 4g+2p, then of row 4g+2p+1 (Q4_0 XOR
 *                                0x88); NV = 8 (Q8_0): vector 4p+k = qs[8k..8k+7] of row 4g+2p, then of row 4g+2p+1
 *   d       [nb][4] f16          block scales;   m [nb][4] f16 block mins (Q4_1 only);   zero padding to 64 bytes.
 *   The kernel reads a group front to back (the quants and the scales streams). The unpacked matmul builds the same
 *   bytes for a group's chunk in a stack buffer (ZIP1/ZIP2 .2d of two rows' 16-byte halves) and runs the same tiles.
 * Instructions per multiply-add (counted in the disassembly of the block loop, packed weights, GCC 12 -O2): per block
 * (32 elements) and token pair, 4 rows x 2 tokens x 32 = 256 multiply-adds take 8 SMMLA + 4 loads of the interleaved
 * activations + 1 load of d_x + 2 MOV (zeroed int32 accumulators) + 2 SCVTF + 2 FMUL (d_w d_x) + 2 FMLA = 21 (+ 1 load
 * of s_x and 2 FMLA for Q4_1's m_w s_x); per block and row group, shared by the tile's pairs: the quant loads (2 LDP
 * for Q4, 4 for Q8_0), 8 nibble ops (Q4), 1 load + 1 FCVTL + 2 ZIP of the scales (+ 4 for the mins), 4 of loop control.
 *   8-token tile (4 pairs, 1024 multiply-adds per iteration, no spills): Q4_0 101 instructions = 0.099 per
 *   multiply-add (32 SMMLA), Q8_0 95 = 0.093, Q4_1 117 = 0.114;
 *   1 token (decode: one pair, half of each SMMLA's work wasted, 128 useful per iteration): Q4_0 37 = 0.29,
 *   Q8_0 33 = 0.26, Q4_1 45 = 0.35 (the dotprod tier: 0.23 / 0.22 / 0.27; decode is bound by weight bandwidth).
 * SMMLAs are 8/256 = 1/32 instruction per multiply-add (32 each) for token pairs, 1/16 per useful one for 1 token.
 */
#include "../tiers.h"

#include <arm_neon.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

enum { RG = 4, TT = 8, KC = 16, TC = 32 }; /* rows per group, tokens per tile, blocks per K chunk, tokens per pass */

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;

/* One block of a token pair (t, t+1), interleaved for SMMLA's b operand. */
typedef struct {
    int8_t q[4][16]; /* chunk k: q_t[8k..8k+7], q_t+1[8k..8k+7] */
    float d[4];      /* d_t, d_t+1, d_t, d_t+1 */
    float s[4];      /* s_t, s_t+1, s_t, s_t+1 */
} xpair;

static inline size_t quant_bytes(wkind kind) { return kind == W_Q8_0 ? 8 * 16 : 4 * 16; } /* per (group, block) */
static inline size_t block_bytes(wkind kind) {
    return kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1) : sizeof(sp_block_q8_0);
}
static inline sp_type type_of_kind(wkind kind) {
    return kind == W_Q4_0 ? SP_TYPE_Q4_0 : kind == W_Q4_1 ? SP_TYPE_Q4_1 : SP_TYPE_Q8_0;
}

static inline uint8x16_t zip1_64(uint8x16_t a, uint8x16_t b) {
    return vreinterpretq_u8_u64(vzip1q_u64(vreinterpretq_u64_u8(a), vreinterpretq_u64_u8(b)));
}
static inline uint8x16_t zip2_64(uint8x16_t a, uint8x16_t b) {
    return vreinterpretq_u8_u64(vzip2q_u64(vreinterpretq_u64_u8(a), vreinterpretq_u64_u8(b)));
}

/* Blocks [b0, b0+n) of the 4 GGUF rows p[0..3] in the packed layout: quants to q ([n][NV][16] bytes), scales to d and
 * mins to m ([n][4] f16 each). */
ALWAYS_INLINE void convert_group(uint8_t *q, sp_f16 *d, sp_f16 *m, const uint8_t *const p[RG], int64_t b0, int64_t n,
                                 wkind kind) {
    const size_t bs = block_bytes(kind), qb = quant_bytes(kind), qoff = kind == W_Q4_1 ? 4 : 2;
    const uint8x16_t x88 = vdupq_n_u8(kind == W_Q4_0 ? 0x88 : 0);
    for (int64_t i = 0; i < n; i++) {
        const size_t off = (size_t)(b0 + i) * bs + qoff;
        uint8_t *qi = q + (size_t)i * qb;
        for (int pr = 0; pr < 2; pr++) {
            const uint8_t *a = p[2 * pr] + off, *b = p[2 * pr + 1] + off;
            if (kind == W_Q8_0) {
                const uint8x16_t al = vld1q_u8(a), ah = vld1q_u8(a + 16), bl = vld1q_u8(b), bh = vld1q_u8(b + 16);
                uint8_t *o = qi + 64 * pr;
                vst1q_u8(o, zip1_64(al, bl));
                vst1q_u8(o + 16, zip2_64(al, bl));
                vst1q_u8(o + 32, zip1_64(ah, bh));
                vst1q_u8(o + 48, zip2_64(ah, bh));
            } else {
                const uint8x16_t av = vld1q_u8(a), bv = vld1q_u8(b);
                uint8_t *o = qi + 32 * pr;
                vst1q_u8(o, veorq_u8(zip1_64(av, bv), x88));
                vst1q_u8(o + 16, veorq_u8(zip2_64(av, bv), x88));
            }
        }
        for (int l = 0; l < RG; l++) {
            memcpy(&d[i * RG + l], p[l] + (size_t)(b0 + i) * bs, 2);
            if (kind == W_Q4_1) memcpy(&m[i * RG + l], p[l] + (size_t)(b0 + i) * bs + 2, 2);
        }
    }
}

/* xp[pp*KC + i] = token pair pp (tokens 2pp, 2pp+1 of x, the second absent when 2pp+1 == nt) at block b0+i. */
static void interleave_x(xpair *xp, const sp_block_q8a *x, int64_t nb, int64_t nt, int64_t b0, int64_t n) {
    for (int64_t pp = 0; 2 * pp < nt; pp++)
        for (int64_t i = 0; i < n; i++) {
            const sp_block_q8a *a = x + 2 * pp * nb + b0 + i;
            const sp_block_q8a *b = 2 * pp + 1 < nt ? a + nb : NULL;
            const uint8x16_t al = vld1q_u8((const uint8_t *)a->qs), ah = vld1q_u8((const uint8_t *)a->qs + 16);
            const uint8x16_t bl = b ? vld1q_u8((const uint8_t *)b->qs) : vdupq_n_u8(0);
            const uint8x16_t bh = b ? vld1q_u8((const uint8_t *)b->qs + 16) : vdupq_n_u8(0);
            xpair *o = &xp[pp * KC + i];
            vst1q_u8((uint8_t *)o->q[0], zip1_64(al, bl));
            vst1q_u8((uint8_t *)o->q[1], zip2_64(al, bl));
            vst1q_u8((uint8_t *)o->q[2], zip1_64(ah, bh));
            vst1q_u8((uint8_t *)o->q[3], zip2_64(ah, bh));
            const float db = b ? b->d : 0.0f, sb = b ? b->s : 0.0f;
            o->d[0] = o->d[2] = a->d, o->d[1] = o->d[3] = db;
            o->s[0] = o->s[2] = a->s, o->s[1] = o->s[3] = sb;
        }
}

static inline float32x4_t load_rows(const float *y, int nr) {
    if (nr == RG) return vld1q_f32(y);
    float t[RG] = {0};
    memcpy(t, y, (size_t)nr * sizeof *t);
    return vld1q_f32(t);
}

static inline void store_rows(float *y, float32x4_t v, int nr) {
    if (nr == RG) {
        vst1q_f32(y, v);
        return;
    }
    float t[RG];
    vst1q_f32(t, v);
    memcpy(y, t, (size_t)nr * sizeof *t);
}

static inline float32x4_t load_f16x4(const sp_f16 *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

/* One tile of nt <= 2 NP tokens (NP pairs) against n packed blocks of a row group: y[t, rows 0..nr-1] (+)= ...
 * acc[2p + h] holds rows 2h, 2h+1 x tokens 2p, 2p+1 in SMMLA's order [r t, r t+1, r+1 t, r+1 t+1]. */
ALWAYS_INLINE void tile_q(float *y, int64_t ldy, int nr, int nt, bool first, const uint8_t *q, const sp_f16 *dw,
                          const sp_f16 *mw, int64_t n, const xpair *xp /* pair 0 of the tile, block b0 */, wkind kind,
                          int NP) {
    const size_t qb = quant_bytes(kind);
    float32x4_t acc[2 * TT / 2];
    _Pragma("GCC unroll 4")
    for (int p = 0; p < NP; p++) {
        if (first) {
            acc[2 * p] = acc[2 * p + 1] = vdupq_n_f32(0.0f);
        } else {
            const float32x4_t y0 = load_rows(y + 2 * p * ldy, nr);
            const float32x4_t y1 = 2 * p + 1 < nt ? load_rows(y + (2 * p + 1) * ldy, nr) : vdupq_n_f32(0.0f);
            acc[2 * p] = vzip1q_f32(y0, y1);
            acc[2 * p + 1] = vzip2q_f32(y0, y1);
        }
    }
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *qi = q + (size_t)i * qb;
        int8x16_t w[2][4]; /* [row pair][chunk of 8 elements] */
        if (kind == W_Q8_0) {
            _Pragma("GCC unroll 8")
            for (int j = 0; j < 8; j++) w[j >> 2][j & 3] = vld1q_s8((const int8_t *)qi + 16 * j);
        } else {
            _Pragma("GCC unroll 4")
            for (int j = 0; j < 4; j++) { /* vector 2 pr + h: chunks h (low nibbles) and 2 + h (high nibbles) */
                const uint8x16_t v = vld1q_u8(qi + 16 * j);
                const int pr = j >> 1, h = j & 1;
                if (kind == W_Q4_0) { /* 16 (q - 8) from the stored q ^ 8 nibbles */
                    w[pr][h] = vreinterpretq_s8_u8(vshlq_n_u8(v, 4));
                    w[pr][2 + h] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0xf0)));
                } else {
                    w[pr][h] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
                    w[pr][2 + h] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                }
            }
        }
        const float32x4_t d = load_f16x4(dw + RG * i);
        const float32x4_t d01 = vzip1q_f32(d, d), d23 = vzip2q_f32(d, d); /* d_r0 d_r0 d_r1 d_r1, ... */
        float32x4_t m01 = d01, m23 = d23;
        if (kind == W_Q4_1) {
            const float32x4_t m = load_f16x4(mw + RG * i);
            m01 = vzip1q_f32(m, m), m23 = vzip2q_f32(m, m);
        }
        _Pragma("GCC unroll 4")
        for (int p = 0; p < NP; p++) {
            const xpair *xb = xp + p * KC + i;
            int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
            _Pragma("GCC unroll 4")
            for (int k = 0; k < 4; k++) {
                const int8x16_t xk = vld1q_s8(xb->q[k]);
                s0 = vmmlaq_s32(s0, w[0][k], xk);
                s1 = vmmlaq_s32(s1, w[1][k], xk);
            }
            const float32x4_t dx = vld1q_f32(xb->d);
            const float32x4_t f0 = kind == W_Q4_0 ? vcvtq_n_f32_s32(s0, 4) : vcvtq_f32_s32(s0); /* exact */
            const float32x4_t f1 = kind == W_Q4_0 ? vcvtq_n_f32_s32(s1, 4) : vcvtq_f32_s32(s1);
            acc[2 * p] = vfmaq_f32(acc[2 * p], f0, vmulq_f32(d01, dx));
            acc[2 * p + 1] = vfmaq_f32(acc[2 * p + 1], f1, vmulq_f32(d23, dx));
            if (kind == W_Q4_1) {
                const float32x4_t sx = vld1q_f32(xb->s);
                acc[2 * p] = vfmaq_f32(acc[2 * p], m01, sx);
                acc[2 * p + 1] = vfmaq_f32(acc[2 * p + 1], m23, sx);
            }
        }
    }
    _Pragma("GCC unroll 4")
    for (int p = 0; p < NP; p++) {
        store_rows(y + 2 * p * ldy, vuzp1q_f32(acc[2 * p], acc[2 * p + 1]), nr); /* token 2p: rows 0..3 */
        if (2 * p + 1 < nt) store_rows(y + (2 * p + 1) * ldy, vuzp2q_f32(acc[2 * p], acc[2 * p + 1]), nr);
    }
}

/* matmul (packed = false: w is GGUF rows, each group's chunk is converted into a stack buffer) and matmul_packed
 * (packed = true: w is the packed layout, r0 a multiple of RG). */
ALWAYS_INLINE void matmul_q(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, wkind kind, bool packed) {
    const int64_t nb = K / SP_QK;
    const size_t qb = quant_bytes(kind), row_bytes = (size_t)nb * block_bytes(kind);
    const size_t gbytes = packed ? sp_packed_group_bytes(type_of_kind(kind), K, RG) : 0;
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    _Alignas(64) xpair xp[TC / 2 * KC];               /* the pass's token pairs for one K chunk */
    _Alignas(64) uint8_t bq[KC * 8 * 16];             /* one group's converted chunk (unpacked weights) */
    sp_f16 bd[KC * RG], bm[KC * RG];
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int64_t n = SP_MIN_I(KC, nb - b0);
            interleave_x(xp, x + ts * nb, nb, nts, b0, n);
            for (int64_t rg = r0; rg < r1; rg += RG) {
                const int nr = (int)SP_MIN_I(RG, r1 - rg);
                const uint8_t *q;
                const sp_f16 *dw, *mw;
                if (packed) {
                    const uint8_t *base = (const uint8_t *)w + (size_t)(rg / RG) * gbytes;
                    const sp_f16 *d0 = (const sp_f16 *)(base + (size_t)nb * qb);
                    q = base + (size_t)b0 * qb;
                    dw = d0 + b0 * RG;
                    mw = d0 + nb * RG + b0 * RG;
                } else {
                    const uint8_t *p[RG];
                    for (int l = 0; l < RG; l++)
                        p[l] = (const uint8_t *)w + (size_t)(rg + (l < nr ? l : nr - 1)) * row_bytes;
                    convert_group(bq, bd, bm, p, b0, n, kind);
                    q = bq, dw = bd, mw = bm;
                }
                for (int64_t t0 = 0; t0 < nts; t0 += TT) {
                    const int nt = (int)SP_MIN_I(TT, nts - t0);
                    float *yt = y + (ts + t0) * ldy + rg;
                    const xpair *xt = xp + t0 / 2 * KC;
                    const bool first = b0 == 0;
                    switch ((nt + 1) / 2) { /* constant NP: pair loops unroll, accumulators stay in registers */
                    case 1: tile_q(yt, ldy, nr, nt, first, q, dw, mw, n, xt, kind, 1); break;
                    case 2: tile_q(yt, ldy, nr, nt, first, q, dw, mw, n, xt, kind, 2); break;
                    case 3: tile_q(yt, ldy, nr, nt, first, q, dw, mw, n, xt, kind, 3); break;
                    default: tile_q(yt, ldy, nr, nt, first, q, dw, mw, n, xt, kind, 4); break;
                    }
                }
            }
        }
    }
}

/* The packed layout (top of file): G groups of sp_packed_group_bytes(type, K, RG) bytes. */
static void pack_q(void *dst, const void *src, int64_t N, int64_t K, wkind kind) {
    const int64_t nb = K / SP_QK, G = (N + RG - 1) / RG;
    const size_t qb = quant_bytes(kind), row_bytes = (size_t)nb * block_bytes(kind);
    const size_t gbytes = sp_packed_group_bytes(type_of_kind(kind), K, RG);
    for (int64_t g = 0; g < G; g++) {
        uint8_t *base = (uint8_t *)dst + (size_t)g * gbytes;
        memset(base, 0, gbytes);
        sp_f16 *d = (sp_f16 *)(base + (size_t)nb * qb), *m = d + nb * RG;
        const uint8_t *p[RG];
        for (int l = 0; l < RG; l++) p[l] = (const uint8_t *)src + (size_t)SP_MIN_I(g * RG + l, N - 1) * row_bytes;
        convert_group(base, d, m, p, 0, nb, kind);
    }
}

#define I8MM_KERNELS(name, kind, type)                                                                          \
    static void matmul_##name(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0,        \
                              int64_t r1, int64_t T) {                                                           \
        matmul_q(y, ldy, w, x, K, r0, r1, T, kind, false);                                                       \
    }                                                                                                            \
    static void matmul_packed_##name(float *y, int64_t ldy, const void *w, const void *x, int64_t K, int64_t r0, \
                                     int64_t r1, int64_t T) {                                                    \
        matmul_q(y, ldy, w, x, K, r0, r1, T, kind, true);                                                        \
    }                                                                                                            \
    static size_t packed_size_##name(int64_t N, int64_t K) { return sp_packed_size_rg(type, N, K, RG); }        \
    static void pack_##name(void *dst, const void *src, int64_t N, int64_t K) { pack_q(dst, src, N, K, kind); }
I8MM_KERNELS(q4_0, W_Q4_0, SP_TYPE_Q4_0)
I8MM_KERNELS(q4_1, W_Q4_1, SP_TYPE_Q4_1)
I8MM_KERNELS(q8_0, W_Q8_0, SP_TYPE_Q8_0)

void sp_kernels_fill_i8mm(sp_kernels *k) {
    /* pack_rows is one value for the whole table; the tiers below pack nothing (neon) or only the types set here */
    k->pack_rows = RG;
#define SET(T, name)                                                                                            \
    k->matmul[T] = matmul_##name;                                                                                \
    k->packed_size[T] = packed_size_##name;                                                                      \
    k->pack[T] = pack_##name;                                                                                    \
    k->matmul_packed[T] = matmul_packed_##name;
    SET(SP_TYPE_Q4_0, q4_0)
    SET(SP_TYPE_Q4_1, q4_1)
    SET(SP_TYPE_Q8_0, q8_0)
#undef SET
}
