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
 * sp_block_q8a quants of one block, copied once per pass and K chunk into aligned rows of 32 bytes (pack_a: the
 * 40-byte strided blocks load into a tile markedly slower) and read by every row group. TDPBSUD gives
 * C[t][r] = sum_k a[t][k] * w[r][k] in int32, exactly the sum the avx512 kernel accumulates with vpdpbusd; adding the
 * same activation correction (-8 * sum q_x for Q4_0, -128 * sum q_x for Q8_0, none for Q4_1) and applying the same
 * float epilogue in the same order (acc[t] = fma(float(isum), d_w * d_x, acc[t]), then for Q4_1
 * acc[t] = fma(m_w, s_x, acc[t]), blocks in order, y stored between K chunks) makes every output bit-identical to the
 * avx512 tier -- so a token's logits do not depend on the batch size or on which path ran.
 *
 * Loop order as in avx512.c's matmul_p: passes of <= 64 tokens > K chunks of <= 64 blocks > row groups > token tiles
 * (16 tokens here; all tiles of a call have min(T, 16) rows, a last partial tile's extra rows are zero and ignored).
 * Within a tile the C of blocks i+2, i+3 is computed and stored while blocks i, i+1 go through the epilogue, on two
 * sets of tiles (C, A, B = tiles 0/2/4 and 1/3/5). The tile multiply overlaps the vector epilogue, but on this CPU
 * the tile loads and stores do not: a (row group, block, tile) costs ~10 ns of them whatever its token count. Each
 * call loads its tile configuration and releases the tiles at the end. Calls with fewer tokens than
 * SP_AMX_MIN_T_Q8 / _Q4 (below) go to the avx512 kernels, which do a few tokens cheaper.
 */
#include "../tiers.h"

#include <immintrin.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define SP_MIN_I(a, b) ((a) < (b) ? (a) : (b))

enum { RG = 16, KC = 64, TC = 64, AT = 16 }; /* rows per group, blocks per K chunk, tokens per pass, tokens per tile */

/* Fewest tokens for which a call uses the tiles, by weight type. Each (row group, block, 16-token tile) costs a
 * fixed ~10 ns of tile loads and stores, which do not overlap the vector epilogue, whatever the tile's token count;
 * the epilogue is ~0.8 ns per token against ~2 ns per token for vpdpbusd. Measured on a Sapphire-Rapids-class Xeon
 * (KVM, 2 threads), SmolLM2-135M: single-threaded with the weights in cache (bench_device/bench_kernels.py --cold-mb 0)
 * Q8_0 breaks even at T = 6-8 and Q4_1 at T = 8-12, but streaming the weights from memory Q4 gains nothing below
 * T ~ 32 (its nibbles go through a scratch copy: the whole forward pass with the amx tier was 3-7% slower at
 * T = 12-24 and 3-10% faster at T = 32-64), while the Q8_0 vocabulary head (49152 x 576) is 1.3-1.5x faster from
 * T = 12 (about even at 8: a forward pass with all logits was 0-3% slower there). */
#ifndef SP_AMX_MIN_T_Q8
#  define SP_AMX_MIN_T_Q8 12
#endif
#ifndef SP_AMX_MIN_T_Q4
#  define SP_AMX_MIN_T_Q4 32
#endif

typedef enum { W_Q4_0, W_Q4_1, W_Q8_0 } wkind;
typedef union { float s; int32_t corr; } xterm; /* a token's block term: s_x (Q4_1) or its correction (Q4_0, Q8_0) */

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;
static_assert(sizeof(tilecfg) == 64, "LDTILECFG operand");

static sp_matmul_fn g_fallback[SP_TYPE_COUNT]; /* the avx512 tier's matmul_packed, below the type's threshold */

/* Tiles 0/1: C (rows x 16 int32), 2/3: A (rows tokens x 32 bytes), 4/5: B (8 x 64 bytes), two of each so that
 * consecutive blocks (even: 0/2/4, odd: 1/3/5) do not wait for each other. rows = min(T, 16) for the whole call. */
static void load_tile_config(int rows) {
    _Alignas(64) tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 2; i++) {
        c.rows[i] = (uint8_t)rows, c.colsb[i] = 64;
        c.rows[2 + i] = (uint8_t)rows, c.colsb[2 + i] = 32;
        c.rows[4 + i] = 8, c.colsb[4 + i] = 64;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(c)); /* GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes */
}

/* GCC 12's tile load/store intrinsics are asm statements without memory operands: a compiler barrier on each side
 * keeps the scratch stores before the loads and the epilogue's loads after the stores. */
#define SP_MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

/* cbuf = C of one block (a: the A tile's rows of 32 bytes; b: the block's 8 x 64 B rows), on the even or odd set. */
ALWAYS_INLINE void block_c(int32_t *cbuf, const void *a, const void *b, int odd) {
    SP_MEMORY_BARRIER();
    if (!odd) {
        _tile_loadd(2, a, 32);
        _tile_loadd(4, b, 64);
        _tile_zero(0);
        _tile_dpbsud(0, 2, 4);
        _tile_stored(0, cbuf, 64);
    } else {
        _tile_loadd(3, a, 32);
        _tile_loadd(5, b, 64);
        _tile_zero(1);
        _tile_dpbsud(1, 3, 5);
        _tile_stored(1, cbuf, 64);
    }
    SP_MEMORY_BARRIER();
}

/* One tile of NT tokens against n blocks of a row group: y[t, 16 lanes] (+)= ..., as avx512.c's tile_p. xa: the
 * tile's activation quants, 512 bytes per block (pack_a). C of blocks i+2, i+3 is computed while blocks i, i+1 go
 * through the epilogue (4 buffers). */
ALWAYS_INLINE void tile_amx(float *y, int64_t ldy, __mmask16 mask, bool first, const uint8_t *wq, const sp_f16 *dw,
                            const sp_f16 *mw, int n, const int8_t *xa, const float *xd, const xterm *xc,
                            const uint8_t *pf, wkind kind, int NT) {
    _Alignas(64) int32_t cbuf[4][AT * 16];
    __m512 acc[AT];
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) acc[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, y + t * ldy);
    block_c(cbuf[0], xa, wq, 0);
    if (n > 1) block_c(cbuf[1], xa + 512, wq + 512, 1);
    for (int i = 0; i < n; i += 2) {
        if (pf) { /* the same blocks of the next row group */
            _Pragma("GCC unroll 16")
            for (size_t c = 0; c < 1024; c += 64) _mm_prefetch((const char *)pf + (size_t)i * 512 + c, _MM_HINT_T0);
        }
        if (i + 2 < n) block_c(cbuf[(i + 2) & 3], xa + (size_t)(i + 2) * 512, wq + (size_t)(i + 2) * 512, 0);
        if (i + 3 < n) block_c(cbuf[(i + 3) & 3], xa + (size_t)(i + 3) * 512, wq + (size_t)(i + 3) * 512, 1);
        for (int j = i; j < SP_MIN_I(i + 2, n); j++) {
            const int32_t *c = cbuf[j & 3];
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dw + 16 * j)));
            _Pragma("GCC unroll 16")
            for (int t = 0; t < NT; t++) {
                __m512i is = _mm512_load_si512((const void *)(c + 16 * t));
                if (kind != W_Q4_1) is = _mm512_add_epi32(is, _mm512_set1_epi32(xc[j * AT + t].corr));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(d, _mm512_set1_ps(xd[j * AT + t])),
                                         acc[t]);
            }
            if (kind == W_Q4_1) {
                const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mw + 16 * j)));
                _Pragma("GCC unroll 16")
                for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xc[j * AT + t].s), acc[t]);
            }
        }
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ldy, mask, acc[t]);
}

/* The epilogue's per-(token, block) operands of nt tokens (a pass) and blocks [b0, b0+n), token-tile major so that a
 * tile's 16 tokens of block i are adjacent: tab[(u / 16) * KC * 16 + i * 16 + u % 16] for token u. xd = d_x, xc = s_x
 * (Q4_1) or -off * sum(q_x) (off = 8 for Q4_0, 128 for Q8_0: avx512.c's act_corrections). */
static void act_tables(float *xd, xterm *xc, const sp_block_q8a *x, int64_t nb, int64_t nt, int64_t b0,
                       int n, wkind kind) {
    const __m256i x80 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    const int off = kind == W_Q4_0 ? 8 : 128;
    for (int64_t u = 0; u < nt; u++)
        for (int i = 0; i < n; i++) {
            const sp_block_q8a *b = &x[u * nb + b0 + i];
            const size_t at = (size_t)(u / AT) * KC * AT + (size_t)i * AT + (size_t)(u % AT);
            xd[at] = b->d;
            if (kind == W_Q4_1) {
                xc[at].s = b->s;
                continue;
            }
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)b->qs), x80);
            const __m256i s = _mm256_sad_epu8(v, zero); /* 4 x sum(q + 128) over 8 bytes */
            const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            const int sum = (int)(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) - 32 * 128;
            xc[at].corr = -off * sum;
        }
}

/* The quants of nt tokens (a pass) and blocks [b0, b0+n) as A tiles: a[((u / 16) * KC + i) * 512 + (u % 16) * 32] for
 * token u, block i -- aligned rows of 32 bytes, which load into a tile faster than the 40-byte strided blocks; the
 * rows of a last partial tile past the pass's tokens are zero. Built once per pass and chunk, read by every row
 * group. */
static void pack_a(int8_t *a, const sp_block_q8a *x, int64_t nb, int64_t nt, int64_t b0, int n, int rows) {
    for (int64_t u = 0; u < nt; u++)
        for (int i = 0; i < n; i++)
            _mm256_store_si256((__m256i *)(a + ((size_t)(u / AT) * KC + (size_t)i) * 512 + (size_t)(u % AT) * 32),
                               _mm256_loadu_si256((const __m256i *)x[u * nb + b0 + i].qs));
    if (nt % AT && rows == AT) /* a partial last tile */
        for (int i = 0; i < n; i++)
            for (int64_t u = nt % AT; u < AT; u++)
                _mm256_store_si256((__m256i *)(a + ((size_t)(nt / AT) * KC + (size_t)i) * 512 + (size_t)u * 32),
                                   _mm256_setzero_si256());
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
    _Alignas(64) float xd[TC * KC]; /* act_tables of one pass and chunk */
    _Alignas(64) xterm xc[TC * KC];
    _Alignas(64) uint8_t scratch[KC * 512]; /* a Q4 group's chunk as B rows */
    _Alignas(64) int8_t abuf[TC / AT * KC * 512]; /* pack_a of one pass and chunk */
    const int rows = (int)SP_MIN_I(T, AT); /* tokens per A tile */
    load_tile_config(rows);
    for (int64_t ts = 0; ts < T; ts += TC) {
        const int64_t nts = SP_MIN_I(TC, T - ts);
        for (int64_t b0 = 0; b0 < nb; b0 += KC) {
            const int n = (int)SP_MIN_I(KC, nb - b0);
            act_tables(xd, xc, x + ts * nb, nb, nts, b0, n, kind);
            pack_a(abuf, x + ts * nb, nb, nts, b0, n, rows);
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
                    const size_t tab = (size_t)(t0 - ts) * KC; /* this tile's tables: (t0 - ts) / 16 * KC * 16 */
                    const bool first = b0 == 0;
                    const uint8_t *p = t0 == ts ? pf : NULL;
                    const int8_t *xa = abuf + tab / AT * 512;
#define SP_AMX_CASE(NT)                                                                                             \
    case NT: tile_amx(yt, ldy, mask, first, wq, dw, mw, n, xa, xd + tab, xc + tab, p, kind, NT); break;
                    switch (nt) { /* constant NT: token loops unroll, accumulators stay in registers */
                        SP_AMX_CASE(1) SP_AMX_CASE(2) SP_AMX_CASE(3) SP_AMX_CASE(4) SP_AMX_CASE(5) SP_AMX_CASE(6)
                        SP_AMX_CASE(7) SP_AMX_CASE(8) SP_AMX_CASE(9) SP_AMX_CASE(10) SP_AMX_CASE(11) SP_AMX_CASE(12)
                        SP_AMX_CASE(13) SP_AMX_CASE(14) SP_AMX_CASE(15)
                    default: tile_amx(yt, ldy, mask, first, wq, dw, mw, n, xa, xd + tab, xc + tab, p, kind, AT); break;
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
        if (T < (kind == W_Q8_0 ? SP_AMX_MIN_T_Q8 : SP_AMX_MIN_T_Q4)) g_fallback[type](y, ldy, w, x, K, r0, r1, T); \
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
