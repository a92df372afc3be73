/* arm/dotprod.c: the Armv8.2 dot-product tier (SDOT), compiled with -march=armv8.2-a+dotprod and chosen at run time
 * by dispatch.c when HWCAP says asimddp. It starts from the neon tier's table (dispatch.c) and replaces only the
 * quantized matmuls (Q4_0, Q4_1, Q8_0 weights x sp_block_q8a activations), packed and unpacked.
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, nb = K/32 blocks per row.
 *
 * Method: weights stationary, a row group of RG = 4 consecutive weight rows, one row per int32 lane.
 *   - Per block b the group's quants are 4 (Q4) or 8 (Q8_0) vectors of 16 bytes; vector j holds in lane l the 4 bytes
 *     of row l that multiply activation bytes 4j..4j+3 (Q4: the nibble bytes qs[4j..4j+3], whose low nibbles are
 *     elements 4j..4j+3 and high nibbles elements 16+4j..16+4j+3). One vdotq_laneq_s32(acc, w_j, x, j) then
 *     multiplies 4 rows x 4 bytes by the token's 4 bytes (selected by lane from one 16-byte activation register):
 *     8 SDOTs give the exact int32 block dot products of 4 rows with one token.
 *   - Q4_0 quants are stored XOR 0x88 (nibble q ^ 8, i.e. the signed 4-bit value q - 8): v << 4 and v & 0xf0 are then
 *     the signed bytes 16 (q - 8) of the low and high elements, so isum16 = 16 isum exactly (|isum16| < 2^20) and
 *     vcvtq_n_f32_s32(isum16, 4) is float(isum) exactly: no -8 sum(q_x) correction. Q4_1: v & 0x0f and v >> 4
 *     (0..15, signed bytes). Q8_0: the signed bytes as they are. All products are signed x signed (SDOT).
 *   - acc[t] (4 rows) = fma(float(isum), d_w * d_x, acc[t]), then fma(m_w, s_x, acc[t]) for Q4_1, block after block in
 *     order for each of up to TT = 8 tokens of a tile (the float accumulators stay in registers). Every output
 *     element's float operations are the same sequence whatever the tiling, chunking or packing, so matmul_packed
 *     and matmul give the same bits; against ref they differ by summation order only (integer sums are exact).
 *   - Loop order: passes of TC = 32 tokens > chunks of KC = 16 blocks (a group's chunk is <= 2.3 KB, the pass's
 *     activations 20 KB: both stay in L1) > row groups > token tiles > blocks; y accumulates across chunks. Each
 *     weight byte is read from memory once per pass and applied to all its tokens.
 * Packed layout (packed_size / pack / matmul_packed, pack_rows = RG = 4; made at model load): W[N, K] = G = ceil(N/4)
 * groups of sp_packed_group_bytes(type, K, 4) bytes (kernels/pack.c's row-interleaved layout with RG = 4, Q8_0 signed)
 * except that Q4_0 quant bytes are stored XOR 0x88 and rows past N repeat row N-1 (computed, never stored):
 *   quants  [nb][NQ][4] dwords   NQ = 4 (Q4) / 8 (Q8_0): dword (b, j, l) = bytes 4j..4j+3 of row 4g+l's block b
 *   d       [nb][4] f16          block scales;   m [nb][4] f16 block mins (Q4_1 only);   zero padding to 64 bytes.
 *   The kernel reads a group front to back (two streams: the quants and the scales). The unpacked matmul builds the
 *   same bytes for a group's chunk in a stack buffer (a 4 x 4 dword transpose: 4 TRN1/TRN2 .4s + 4 TRN1/TRN2 .2d per
 *   16 bytes of 4 rows) and runs the same tile code on it.
 * Instructions per multiply-add (counted in the disassembly of the block loop, packed weights, GCC 12 -O2): per block
 * (32 elements) and token, 4 rows x 32 = 128 multiply-adds take 8 SDOT + 2 loads of the activation quants + 1 load of
 * (d_x, s_x) + 1 MOV (zeroed int32 accumulator) + 1 SCVTF + 1 FMUL (d_w d_x) + 1 FMLA = 15 (+ 1 FMLA for Q4_1's
 * m_w s_x); per block and row group, shared by the tile's tokens: the quant loads (2 LDP for Q4, 8 loads for Q8_0),
 * 8 nibble ops (Q4: SHL/AND or AND/USHR), 1 load + 1 FCVTL of the scales (+ 2 for the mins), 3 of loop control.
 *   8-token tile (1024 multiply-adds per iteration): Q4_0 141 instructions = 0.138 per multiply-add (64 SDOT; GCC
 *   keeps 3 of the 8 float accumulators on the stack: 6 of the 141), Q8_0 133 = 0.130, Q4_1 168 = 0.164;
 *   1 token (decode, 128 per iteration): Q4_0 30 = 0.23, Q8_0 28 = 0.22, Q4_1 35 = 0.27.
 * SDOTs are 8/128 = 1/16 instruction per multiply-add (16 multiply-adds each) in every case.
 */
#include "../tiers.h"

#include <arm_neon.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

enum { RG = 4, TT = 8, KC = 16, TC = 32 }; /* rows per group, tokens per tile, blocks per K chunk, tokens per pass */

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;

static inline size_t quant_bytes(wkind kind) { return kind == W_Q8_0 ? 8 * 16 : 4 * 16; } /* per (group, block) */
static inline size_t block_bytes(wkind kind) {
    return kind == W_Q4_0 ? sizeof(sp_block_q4_0) : kind == W_Q4_1 ? sizeof(sp_block_q4_1) : sizeof(sp_block_q8_0);
}
static inline sp_type type_of_kind(wkind kind) {
    return kind == W_Q4_0 ? SP_TYPE_Q4_0 : kind == W_Q4_1 ? SP_TYPE_Q4_1 : SP_TYPE_Q8_0;
}

/* out[j] lane l = dword j of the 16 bytes at p[l] (a 4 x 4 dword transpose). */
ALWAYS_INLINE void transpose4x4(uint8x16_t out[4], const uint8_t *p0, const uint8_t *p1, const uint8_t *p2,
                                const uint8_t *p3) {
    const uint32x4_t a = vreinterpretq_u32_u8(vld1q_u8(p0)), b = vreinterpretq_u32_u8(vld1q_u8(p1));
    const uint32x4_t c = vreinterpretq_u32_u8(vld1q_u8(p2)), d = vreinterpretq_u32_u8(vld1q_u8(p3));
    const uint64x2_t t0 = vreinterpretq_u64_u32(vtrn1q_u32(a, b)); /* a0 b0 a2 b2 */
    const uint64x2_t t1 = vreinterpretq_u64_u32(vtrn2q_u32(a, b)); /* a1 b1 a3 b3 */
    const uint64x2_t t2 = vreinterpretq_u64_u32(vtrn1q_u32(c, d)); /* c0 d0 c2 d2 */
    const uint64x2_t t3 = vreinterpretq_u64_u32(vtrn2q_u32(c, d)); /* c1 d1 c3 d3 */
    out[0] = vreinterpretq_u8_u64(vtrn1q_u64(t0, t2));
    out[1] = vreinterpretq_u8_u64(vtrn1q_u64(t1, t3));
    out[2] = vreinterpretq_u8_u64(vtrn2q_u64(t0, t2));
    out[3] = vreinterpretq_u8_u64(vtrn2q_u64(t1, t3));
}

/* Blocks [b0, b0+n) of the 4 GGUF rows p[0..3] in the packed layout: quants to q ([n][NQ][4] dwords), scales to d and
 * mins to m ([n][4] f16 each). */
ALWAYS_INLINE void convert_group(uint8_t *q, sp_f16 *d, sp_f16 *m, const uint8_t *const p[RG], int64_t b0, int64_t n,
                                 wkind kind) {
    const size_t bs = block_bytes(kind), qb = quant_bytes(kind), qoff = kind == W_Q4_1 ? 4 : 2;
    const uint8x16_t x88 = vdupq_n_u8(kind == W_Q4_0 ? 0x88 : 0);
    for (int64_t i = 0; i < n; i++) {
        const size_t off = (size_t)(b0 + i) * bs;
        uint8_t *qi = q + (size_t)i * qb;
        for (int h = 0; h < (kind == W_Q8_0 ? 2 : 1); h++) {
            uint8x16_t v[4];
            transpose4x4(v, p[0] + off + qoff + 16 * h, p[1] + off + qoff + 16 * h, p[2] + off + qoff + 16 * h,
                         p[3] + off + qoff + 16 * h);
            for (int j = 0; j < 4; j++) vst1q_u8(qi + 64 * h + 16 * j, veorq_u8(v[j], x88));
        }
        for (int l = 0; l < RG; l++) {
            memcpy(&d[i * RG + l], p[l] + off, 2);
            if (kind == W_Q4_1) memcpy(&m[i * RG + l], p[l] + off + 2, 2);
        }
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

/* One tile of NT tokens against n packed blocks of a row group: y[t, rows 0..nr-1] (+)= ... */
ALWAYS_INLINE void tile_q(float *y, int64_t ldy, int nr, bool first, const uint8_t *q, const sp_f16 *dw,
                          const sp_f16 *mw, int64_t n, const sp_block_q8a *x /* token t0, block b0 */, int64_t nb,
                          wkind kind, int NT) {
    const size_t qb = quant_bytes(kind);
    float32x4_t acc[TT];
    _Pragma("GCC unroll 8")
    for (int t = 0; t < NT; t++) acc[t] = first ? vdupq_n_f32(0.0f) : load_rows(y + t * ldy, nr);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *qi = q + (size_t)i * qb;
        int8x16_t w[8];
        if (kind == W_Q8_0) {
            _Pragma("GCC unroll 8")
            for (int j = 0; j < 8; j++) w[j] = vld1q_s8((const int8_t *)qi + 16 * j);
        } else {
            _Pragma("GCC unroll 4")
            for (int j = 0; j < 4; j++) {
                const uint8x16_t v = vld1q_u8(qi + 16 * j);
                if (kind == W_Q4_0) { /* 16 (q - 8) from the stored q ^ 8 nibbles */
                    w[j] = vreinterpretq_s8_u8(vshlq_n_u8(v, 4));
                    w[4 + j] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0xf0)));
                } else {
                    w[j] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
                    w[4 + j] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                }
            }
        }
        const float32x4_t d = load_f16x4(dw + RG * i);
        float32x4_t m = d;
        if (kind == W_Q4_1) m = load_f16x4(mw + RG * i);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            const sp_block_q8a *xb = x + t * nb + i;
            const int8x16_t xl = vld1q_s8(xb->qs), xh = vld1q_s8(xb->qs + 16);
            int32x4_t is = vdupq_n_s32(0);
            is = vdotq_laneq_s32(is, w[0], xl, 0);
            is = vdotq_laneq_s32(is, w[1], xl, 1);
            is = vdotq_laneq_s32(is, w[2], xl, 2);
            is = vdotq_laneq_s32(is, w[3], xl, 3);
            is = vdotq_laneq_s32(is, w[4], xh, 0);
            is = vdotq_laneq_s32(is, w[5], xh, 1);
            is = vdotq_laneq_s32(is, w[6], xh, 2);
            is = vdotq_laneq_s32(is, w[7], xh, 3);
            const float32x2_t ds = vld1_f32(&xb->d); /* d_x, s_x */
            const float32x4_t f = kind == W_Q4_0 ? vcvtq_n_f32_s32(is, 4) : vcvtq_f32_s32(is); /* exact */
            acc[t] = vfmaq_f32(acc[t], f, vmulq_lane_f32(d, ds, 0));
            if (kind == W_Q4_1) acc[t] = vfmaq_lane_f32(acc[t], m, ds, 1);
        }
    }
    _Pragma("GCC unroll 8")
    for (int t = 0; t < NT; t++) store_rows(y + t * ldy, acc[t], nr);
}

/* matmul (packed = false: w is GGUF rows, each group's chunk is converted into a stack buffer) and matmul_packed
 * (packed = true: w is the packed layout, r0 a multiple of RG). */
ALWAYS_INLINE void matmul_q(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                            int64_t T, wkind kind, bool packed) {
    const int64_t nb = K / SP_QK;
    const size_t qb = quant_bytes(kind), row_bytes = (size_t)nb * block_bytes(kind);
    const size_t gbytes = packed ? sp_packed_group_bytes(type_of_kind(kind), K, RG) : 0;
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    _Alignas(64) uint8_t bq[KC * 8 * 16];             /* one group's converted chunk (unpacked weights) */
    sp_f16 bd[KC * RG], bm[KC * RG];
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int64_t n = SP_MIN_I(KC, nb - b0);
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
                for (int64_t t0 = ts; t0 < ts + nts; t0 += TT) {
                    const int nt = (int)SP_MIN_I(TT, ts + nts - t0);
                    float *yt = y + t0 * ldy + rg;
                    const sp_block_q8a *xt = x + t0 * nb + b0;
                    const bool first = b0 == 0;
                    switch (nt) { /* constant NT: token loops unroll, accumulators stay in registers */
                    case 1: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 1); break;
                    case 2: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 2); break;
                    case 3: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 3); break;
                    case 4: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 4); break;
                    case 5: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 5); break;
                    case 6: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 6); break;
                    case 7: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 7); break;
                    default: tile_q(yt, ldy, nr, first, q, dw, mw, n, xt, nb, kind, 8); break;
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

#define DOTPROD_KERNELS(name, kind, type)                                                                       \
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
DOTPROD_KERNELS(q4_0, W_Q4_0, SP_TYPE_Q4_0)
DOTPROD_KERNELS(q4_1, W_Q4_1, SP_TYPE_Q4_1)
DOTPROD_KERNELS(q8_0, W_Q8_0, SP_TYPE_Q8_0)

void sp_kernels_fill_dotprod(sp_kernels *k) {
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
