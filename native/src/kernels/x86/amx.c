/* x86/amx.c: the "amx" tier: the avx512 tier with its packed quantized matmuls (Q4_0, Q4_1, Q8_0) done on AMX-INT8
 * tiles when a call has enough tokens. Compiled with the avx512 flags plus -mamx-tile -mamx-int8 (native/CMakeLists.txt,
 * only where the compiler has them); dispatch.c offers the tier only on CPUs with AMX-TILE + AMX-INT8 whose OS saves
 * the tile state (XCR0 bits 17-18) and grants this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+).
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, nb = K/32 blocks per row.
 *
 * The packed layout (kernels/pack.c, RG = 16, the avx512 tier's) is already the AMX "B" operand: for a row group and
 * block, vector j (64 bytes) holds in its 4-byte lane r row r's weights for activation bytes 4j..4j+3, which is B's
 * VNNI form for K = 32, N = 16 (K/4 = 8 rows of 16 x 4 bytes). Q8_0 blocks (512 bytes, stored as q+128) load as B
 * directly; Q4_0/Q4_1 blocks (256 bytes of nibble pairs) are split into the 8 rows low nibbles j = 0..3 (k 4j..),
 * high nibbles (k 16+4j..) into a scratch copy of the row group's K chunk first. The "A" operand is up to 16 tokens'
 * sp_block_q8a quants of one block (32 signed bytes per row, row stride nb * 40 bytes: straight from the activation
 * buffer). TDPBSUD gives C[t][r] = sum_k a[t][k] * w[r][k] in int32, exactly the sum the avx512 kernel accumulates with
 * vpdpbusd; adding the same activation correction (-8 * sum q_x for Q4_0, -128 * sum q_x for Q8_0, none for Q4_1) and
 * applying the same float epilogue in the same order (acc[t] = fma(float(isum), d_w * d_x, acc[t]), then for Q4_1
 * acc[t] = fma(m_w, s_x, acc[t]), blocks in order, y stored between K chunks) makes every output bit-identical to the
 * avx512 tier -- so a token's logits do not depend on the batch size or on which path ran.
 *
 * Loop order as in avx512.c's matmul_p: passes of <= 64 tokens > K chunks of <= 64 blocks > row groups > token tiles
 * (16 tokens here). Within a tile the C of block i+1 is computed and stored before block i's epilogue runs, so the
 * tile unit and the vector units overlap. Each call loads its tile configuration (tiles 0-2: C, A, B for 16-token
 * tiles; 3-4: C, A for the T % 16 remainder) and releases the tiles at the end. Calls with T < SP_AMX_MIN_T go to the
 * avx512 kernels (for one or two tokens vpdpbusd does the same work without the tile round trip through memory).
 */
#include "../tiers.h"

#include <immintrin.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

enum { RG = 16, KC = 64, TC = 64, AT = 16 }; /* rows per group, blocks per K chunk, tokens per pass, tokens per tile */

/* Fewest tokens for which a call uses the tiles (measured on a Sapphire-Rapids-class Xeon, SmolLM2-135M shapes). */
#ifndef SP_AMX_MIN_T
#  define SP_AMX_MIN_T 4
#endif

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;
static_assert(sizeof(tilecfg) == 64, "LDTILECFG operand");

static sp_matmul_fn g_fallback[SP_TYPE_COUNT]; /* the avx512 tier's matmul_packed, for T < SP_AMX_MIN_T */

/* Tiles 0/1/2: C (16 x 16 int32), A (16 tokens x 32 bytes), B (8 x 64 bytes); 3/4: C and A of rem tokens. */
static void load_tile_config(int rem) {
    _Alignas(64) tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = AT, c.colsb[0] = 64;
    c.rows[1] = AT, c.colsb[1] = 32;
    c.rows[2] = 8, c.colsb[2] = 64;
    if (rem) {
        c.rows[3] = (uint8_t)rem, c.colsb[3] = 64;
        c.rows[4] = (uint8_t)rem, c.colsb[4] = 32;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(c)); /* GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes */
}

/* GCC 12's tile load/store intrinsics are asm statements without memory operands: a compiler barrier on each side
 * keeps the scratch stores before the loads and the epilogue's loads after the stores. */
#define SP_MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

/* C of one block for NT tokens (a: the first token's block quants, stride sa; b: the block's 8 x 64 B rows). */
ALWAYS_INLINE void block_c(int32_t *cbuf, const void *a, size_t sa, const void *b, int NT) {
    SP_MEMORY_BARRIER();
    if (NT == AT) {
        _tile_loadd(1, a, sa);
        _tile_loadd(2, b, 64);
        _tile_zero(0);
        _tile_dpbsud(0, 1, 2);
        _tile_stored(0, cbuf, 64);
    } else {
        _tile_loadd(4, a, sa);
        _tile_loadd(2, b, 64);
        _tile_zero(3);
        _tile_dpbsud(3, 4, 2);
        _tile_stored(3, cbuf, 64);
    }
    SP_MEMORY_BARRIER();
}

/* One tile of NT tokens against n blocks of a row group: y[t, 16 lanes] (+)= ..., as avx512.c's tile_p. */
ALWAYS_INLINE void tile_amx(float *y, int64_t ldy, __mmask16 mask, bool first, const uint8_t *wq, const sp_f16 *dw,
                            const sp_f16 *mw, int n, const sp_block_q8a *x /* row t0, block b0 */, int64_t nb,
                            const int32_t *corr, const uint8_t *pf, size_t pf_stride, wkind kind, int NT) {
    _Alignas(64) int32_t cbuf[2][AT * 16];
    const size_t sa = (size_t)nb * sizeof(sp_block_q8a);
    __m512 acc[AT];
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) acc[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, y + t * ldy);
    block_c(cbuf[0], x[0].qs, sa, wq, NT);
    for (int i = 0; i < n; i++) {
        if (pf) { /* the same block of the next row group */
            _Pragma("GCC unroll 16")
            for (size_t c = 0; c < 512; c += 64) _mm_prefetch((const char *)pf + i * pf_stride + c, _MM_HINT_T0);
        }
        if (i + 1 < n) block_c(cbuf[(i + 1) & 1], x[i + 1].qs, sa, wq + (size_t)(i + 1) * 512, NT);
        const int32_t *c = cbuf[i & 1];
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dw + 16 * i)));
        _Pragma("GCC unroll 16")
        for (int t = 0; t < NT; t++) {
            __m512i is = _mm512_load_si512((const void *)(c + 16 * t));
            if (kind != W_Q4_1) is = _mm512_add_epi32(is, _mm512_set1_epi32(corr[t * KC + i]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(d, _mm512_set1_ps(x[t * nb + i].d)),
                                     acc[t]);
        }
        if (kind == W_Q4_1) {
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mw + 16 * i)));
            _Pragma("GCC unroll 16")
            for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[t * nb + i].s), acc[t]);
        }
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ldy, mask, acc[t]);
}

/* corr[t*KC + i] = -off * sum(q_x[t, b0+i]) (as avx512.c's act_corrections). */
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

/* Q4 nibble pairs of n blocks (256 bytes each) -> B rows (512 bytes each): low nibbles, then high nibbles. */
static inline void unpack_q4(uint8_t *dst, const uint8_t *q, int n, const uint8_t *pf) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    for (int i = 0; i < n; i++) {
        if (pf) {
            _mm_prefetch((const char *)pf + 256 * i, _MM_HINT_T0);
            _mm_prefetch((const char *)pf + 256 * i + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)pf + 256 * i + 128, _MM_HINT_T0);
            _mm_prefetch((const char *)pf + 256 * i + 192, _MM_HINT_T0);
        }
        _Pragma("GCC unroll 4")
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_load_si512((const void *)(q + 256 * i + 64 * j));
            _mm512_store_si512((void *)(dst + 512 * i + 64 * j), _mm512_and_si512(v, lo4));
            _mm512_store_si512((void *)(dst + 512 * i + 256 + 64 * j), _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4));
        }
    }
}

ALWAYS_INLINE void matmul_amx(float *y, int64_t ldy, const void *w, const void *xv, int64_t K, int64_t r0, int64_t r1,
                              int64_t T, wkind kind) {
    const sp_type type = kind == W_Q4_0 ? SP_TYPE_Q4_0 : kind == W_Q4_1 ? SP_TYPE_Q4_1 : SP_TYPE_Q8_0;
    const size_t qb = kind == W_Q8_0 ? 512 : 256;
    const int64_t nb = K / SP_QK;
    const size_t gbytes = sp_packed_group_bytes(type, K, RG);
    const sp_block_q8a *x = (const sp_block_q8a *)xv; /* [T, nb] */
    int32_t corr[TC * KC];                            /* [TC][KC] activation corrections for one pass and chunk */
    _Alignas(64) uint8_t scratch[KC * 512];          /* a Q4 group's chunk as B rows */
    load_tile_config((int)(T % AT));
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
                const uint8_t *pf = rg + RG < r1 ? q + gbytes : NULL; /* the next group's chunk */
                const uint8_t *wq = q;
                if (kind != W_Q8_0) {
                    unpack_q4(scratch, q, n, pf);
                    wq = scratch;
                    pf = NULL;
                }
                for (int64_t t0 = ts; t0 < ts + nts; t0 += AT) {
                    const int nt = (int)SP_MIN_I(AT, ts + nts - t0);
                    float *yt = y + t0 * ldy + rg;
                    const sp_block_q8a *xt = x + t0 * nb + b0;
                    const int32_t *ct = corr + (t0 - ts) * KC;
                    const bool first = b0 == 0;
                    const uint8_t *p = t0 == ts ? pf : NULL;
#define SP_AMX_CASE(NT)                                                                                             \
    case NT: tile_amx(yt, ldy, mask, first, wq, dw, mw, n, xt, nb, ct, p, qb, kind, NT); break;
                    switch (nt) { /* constant NT: token loops unroll, accumulators stay in registers */
                        SP_AMX_CASE(1) SP_AMX_CASE(2) SP_AMX_CASE(3) SP_AMX_CASE(4) SP_AMX_CASE(5) SP_AMX_CASE(6)
                        SP_AMX_CASE(7) SP_AMX_CASE(8) SP_AMX_CASE(9) SP_AMX_CASE(10) SP_AMX_CASE(11) SP_AMX_CASE(12)
                        SP_AMX_CASE(13) SP_AMX_CASE(14) SP_AMX_CASE(15)
                    default: tile_amx(yt, ldy, mask, first, wq, dw, mw, n, xt, nb, ct, p, qb, kind, AT); break;
                    }
#undef SP_AMX_CASE
                }
            }
        }
    }
    _tile_release();
}

#define MATMUL_AMX(name, kind, type)                                                                            \
    static void matmul_packed_##name##_amx(float *y, int64_t ldy, const void *w, const void *x, int64_t K,        \
                                           int64_t r0, int64_t r1, int64_t T) {                                  \
        if (T < SP_AMX_MIN_T) g_fallback[type](y, ldy, w, x, K, r0, r1, T);                                      \
        else matmul_amx(y, ldy, w, x, K, r0, r1, T, kind);                                                       \
    }
MATMUL_AMX(q4_0, W_Q4_0, SP_TYPE_Q4_0)
MATMUL_AMX(q4_1, W_Q4_1, SP_TYPE_Q4_1)
MATMUL_AMX(q8_0, W_Q8_0, SP_TYPE_Q8_0)

/* k holds the avx512 tier: its packed layout stays (RG = 16), the packed Q4_0/Q4_1/Q8_0 matmuls take the tiles. */
void sp_kernels_fill_amx(sp_kernels *k) {
    g_fallback[SP_TYPE_Q4_0] = k->matmul_packed[SP_TYPE_Q4_0];
    g_fallback[SP_TYPE_Q4_1] = k->matmul_packed[SP_TYPE_Q4_1];
    g_fallback[SP_TYPE_Q8_0] = k->matmul_packed[SP_TYPE_Q8_0];
    k->matmul_packed[SP_TYPE_Q4_0] = matmul_packed_q4_0_amx;
    k->matmul_packed[SP_TYPE_Q4_1] = matmul_packed_q4_1_amx;
    k->matmul_packed[SP_TYPE_Q8_0] = matmul_packed_q8_0_amx;
}
