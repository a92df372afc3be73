/* pack.c: load-time repacking of quantized weights into the row-interleaved layout of the SIMD matmuls (portable C;
 * each SIMD tier wraps these with its own row-group size RG and documents how its kernel reads the layout).
 *
 * Shape legend: N = weight rows, K = row length, nb = K/32 blocks per row, RG = rows per group, G = ceil(N/RG).
 *
 * Packed W[N, K] of type Q4_0 / Q4_1 / Q8_0 = G row groups, each group_bytes long (a multiple of 64; groups start
 * 64-byte aligned when the buffer does). Group g holds rows gRG .. gRG+RG-1 (rows >= N are zero: scale 0, quants 0):
 *   quants  [nb][NQ][RG] dwords   NQ = 4 (Q4: the 16 nibble bytes qs[4j..4j+3] as in GGUF) or 8 (Q8_0: the 32 bytes
 *                                 qs[4j..4j+3], XOR 0x80 when q8_unsigned, i.e. stored as q+128)
 *                                 dword (b, j, l) = bytes 4j..4j+3 of block b of row gRG+l: one SIMD vector per (b, j)
 *                                 holds what the unpacking kernels obtained by transposing RG rows.
 *   d       [nb][RG] f16          block scales, lane order
 *   m       [nb][RG] f16          block mins (Q4_1 only)
 *   padding to 64 bytes.
 * The bytes are GGUF's, reordered: 18/20/34 bytes per row and block as in the file, plus padding.
 *
 * "Down" layout (accum_packed; Q4_0 rows D[F, H] a BlockFFN expert's down half, nb = H/32, RG = SP_DOWN_RG = 16):
 * G = ceil(F/16) groups of 16 rows, each nb * 288 bytes rounded up to 64; within group g, for b = 0..nb-1 in order:
 *   quants  [16][2] uint64        row gRG+l's block b: qword h (elements 16h .. 16h+15) holds element 16h + i as
 *                                 nibble (i >> 1) of its dword (i & 1), stored q ^ 8 (so that the nibble read as a
 *                                 signed 4-bit number is q - 8); rows >= F zero
 *   d       [16] f16              those blocks' scales (0 for rows >= F)
 * The accumulate kernel visits block column b of all 16 rows while a 32-column tile of y stays in registers, so it
 * reads the group front to back: one sequential stream per expert slice instead of 16 rows read 18 bytes at a time
 * with a row's stride between them. Bytes per row are GGUF's 18 per block, plus padding to 64 per group.
 *
 * "Down int8" layout (accum_packed_i8; same D, same groups of 16 rows, same bytes per group as "down"): group g is
 *   d       [16][nb] f16          row gRG+l's block scales in column order (0 for rows >= F), padded to 64 bytes
 *   quants  [nb][4][16] dwords    block column b, vector k (rows 4k..4k+3 of the group), lane i: byte r holds
 *                                 q[4k+r][32b+i] | q[4k+r][32b+16+i] << 4, q the GGUF nibble (0..15, x = (q-8)*d);
 *                                 rows >= F zero
 * so that v & 15 and (v >> 4) & 15 are the unsigned byte operands of vpdpbusd for columns 32b..32b+15 and
 * 32b+16..32b+31, 4 rows per dword, and one token's 16 products c[f]*d[f, b] for 16 blocks b are one vector per row.
 * 32nb rounded up to 64, plus 256nb, is the "down" layout's group size (288nb rounded up to 64) for every nb.
 */
#include "tiers.h"

#include <string.h>

static int quant_dwords(sp_type type) { return type == SP_TYPE_Q8_0 ? 8 : 4; }

size_t sp_packed_group_bytes(sp_type type, int64_t K, int rg) {
    const int64_t nb = K / SP_QK;
    const size_t scales = (size_t)(type == SP_TYPE_Q4_1 ? 2 : 1) * 2 * (size_t)rg;
    const size_t bytes = (size_t)nb * ((size_t)quant_dwords(type) * 4 * (size_t)rg + scales);
    return (bytes + 63) / 64 * 64;
}

size_t sp_packed_size_rg(sp_type type, int64_t N, int64_t K, int rg) {
    if (type != SP_TYPE_Q4_0 && type != SP_TYPE_Q4_1 && type != SP_TYPE_Q8_0) return 0;
    if (N <= 0 || K <= 0 || K % SP_QK) return 0;
    return (size_t)((N + rg - 1) / rg) * sp_packed_group_bytes(type, K, rg);
}

void sp_pack_rg(sp_type type, void *dst, const void *src, int64_t N, int64_t K, int rg, bool q8_unsigned) {
    const int64_t nb = K / SP_QK, G = (N + rg - 1) / rg;
    const int nq = quant_dwords(type);
    const size_t bs = sp_row_size(type, SP_QK), row_bytes = (size_t)nb * bs, gbytes = sp_packed_group_bytes(type, K, rg);
    const size_t qoff = type == SP_TYPE_Q4_1 ? 4 : 2;             /* quants after d (and m) in a GGUF block */
    const size_t quant_bytes = (size_t)nb * (size_t)nq * 4 * (size_t)rg;
    const uint32_t flip = type == SP_TYPE_Q8_0 && q8_unsigned ? 0x80808080u : 0;
    for (int64_t g = 0; g < G; g++) {
        uint8_t *base = (uint8_t *)dst + (size_t)g * gbytes;
        memset(base, 0, gbytes);
        uint8_t *quants = base;                                  /* [nb][nq][rg] dwords */
        sp_f16 *d = (sp_f16 *)(base + quant_bytes);              /* [nb][rg] */
        sp_f16 *m = d + nb * rg;                                 /* [nb][rg] (Q4_1) */
        for (int l = 0; l < rg && g * rg + l < N; l++) {
            const uint8_t *row = (const uint8_t *)src + (size_t)(g * rg + l) * row_bytes;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + (size_t)b * bs;
                for (int j = 0; j < nq; j++) {
                    uint32_t v;
                    memcpy(&v, blk + qoff + 4 * j, 4);
                    v ^= flip;
                    memcpy(quants + (((size_t)b * nq + j) * rg + l) * 4, &v, 4);
                }
                memcpy(&d[b * rg + l], blk, 2);
                if (type == SP_TYPE_Q4_1) memcpy(&m[b * rg + l], blk + 2, 2);
            }
        }
    }
}

static size_t down_group_bytes(int64_t H) { return ((size_t)(H / SP_QK) * (SP_DOWN_RG * 18) + 63) / 64 * 64; }

size_t sp_packed_down_size_q4_0(int64_t F, int64_t H) {
    if (F <= 0 || H <= 0 || H % SP_QK) return 0;
    return (size_t)((F + SP_DOWN_RG - 1) / SP_DOWN_RG) * down_group_bytes(H);
}

void sp_pack_down_q4_0(void *dst, const void *src, int64_t F, int64_t H) {
    const int64_t nb = H / SP_QK, G = (F + SP_DOWN_RG - 1) / SP_DOWN_RG;
    const size_t gbytes = down_group_bytes(H), row_bytes = (size_t)nb * sizeof(sp_block_q4_0);
    for (int64_t g = 0; g < G; g++) {
        uint8_t *base = (uint8_t *)dst + (size_t)g * gbytes;
        memset(base, 0, gbytes);
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *col = base + (size_t)b * (SP_DOWN_RG * 18); /* [16][16] quants, then [16] f16 scales */
            for (int l = 0; l < SP_DOWN_RG && g * SP_DOWN_RG + l < F; l++) {
                const sp_block_q4_0 *blk =
                    (const sp_block_q4_0 *)((const uint8_t *)src + (size_t)(g * SP_DOWN_RG + l) * row_bytes) + b;
                for (int h = 0; h < 2; h++) {
                    uint32_t dw[2] = {0, 0};
                    for (int i = 0; i < 16; i++) {
                        const int j = 16 * h + i; /* element j: low nibble of qs[j] or high nibble of qs[j - 16] */
                        const uint32_t q = (uint32_t)(j < 16 ? blk->qs[j] & 0x0f : blk->qs[j - 16] >> 4) ^ 8u;
                        dw[i & 1] |= q << (4 * (i >> 1));
                    }
                    memcpy(col + (size_t)l * 16 + 8 * h, dw, 8);
                }
                memcpy(col + SP_DOWN_RG * 16 + (size_t)l * 2, &blk->d, 2);
            }
        }
    }
}

void sp_pack_down_i8_q4_0(void *dst, const void *src, int64_t F, int64_t H) {
    const int64_t nb = H / SP_QK, G = (F + SP_DOWN_RG - 1) / SP_DOWN_RG;
    const size_t gbytes = down_group_bytes(H), row_bytes = (size_t)nb * sizeof(sp_block_q4_0);
    const size_t sbytes = ((size_t)nb * SP_DOWN_RG * 2 + 63) / 64 * 64; /* the scales, padded */
    for (int64_t g = 0; g < G; g++) {
        uint8_t *base = (uint8_t *)dst + (size_t)g * gbytes;
        memset(base, 0, gbytes);
        sp_f16 *d = (sp_f16 *)base; /* [16][nb] */
        uint8_t *quants = base + sbytes; /* [nb][4][16][4] bytes */
        for (int l = 0; l < SP_DOWN_RG && g * SP_DOWN_RG + l < F; l++) {
            const sp_block_q4_0 *row = (const sp_block_q4_0 *)((const uint8_t *)src + (size_t)(g * SP_DOWN_RG + l) *
                                                                                      row_bytes);
            for (int64_t b = 0; b < nb; b++) {
                d[(int64_t)l * nb + b] = row[b].d;
                uint8_t *v = quants + (size_t)b * 256 + (size_t)(l / 4) * 64 + (size_t)(l % 4); /* lane 0, byte l%4 */
                for (int i = 0; i < 16; i++) /* GGUF: element i in the low nibble of qs[i], i+16 in the high one */
                    v[4 * i] = row[b].qs[i];
            }
        }
    }
}
