/* types.c: the tensor-type traits table, f16/bf16 conversions and reference (de)quantization of rows.
 *
 * Everything here matches ggml and the `gguf` Python package (gguf/quants.py) bit for bit:
 *   f16:  IEEE half, round to nearest even (numpy astype(float16)), overflow -> inf, subnormals kept.
 *   bf16: ggml_compute_fp32_to_bf16: NaN forced quiet, otherwise round to nearest even.
 *   Q8_0: d = amax/127, id = 1/d (0 if d == 0), q = round-half-away(x*id); d stored as f16.
 *   Q4_0: m = the element of largest |x| (first one), d = m/-8, q = min(15, trunc(x*id + 8.5)); x ~= (q-8)*d.
 *   Q4_1: d = (max-min)/15, q = min(15, trunc((x-min)*id + 0.5)); x ~= q*d + min (d, min stored as f16).
 * All arithmetic is float32 in the order numpy does it; no fused multiply-add may change a rounding, hence the
 * contraction pragmas (GCC's -ffp-contract=fast default would otherwise fuse x*id + 8.5f on FMA targets).
 */
#if defined(__clang__)
#  pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#  pragma GCC optimize("fp-contract=off")
#endif

#include "kernels.h"

#include <math.h>
#include <string.h>

#define SP_MIN_F(a, b) ((a) < (b) ? (a) : (b))

/* ---- traits table: ggml type ids; block sizes from gguf.GGML_QUANT_SIZES ---------------------------------- */

#define T_(id, nm, bs, ts, sup, q8) [id] = {nm, bs, ts, sup, q8}
static const sp_type_traits k_traits[SP_TYPE_COUNT] = {
    T_(0, "F32", 1, 4, true, false),
    T_(1, "F16", 1, 2, true, false),
    T_(2, "Q4_0", 32, 18, true, true),
    T_(3, "Q4_1", 32, 20, true, true),
    T_(4, "Q4_2", 0, 0, false, false), /* removed from ggml */
    T_(5, "Q4_3", 0, 0, false, false), /* removed from ggml */
    T_(6, "Q5_0", 32, 22, false, false),
    T_(7, "Q5_1", 32, 24, false, false),
    T_(8, "Q8_0", 32, 34, true, true),
    T_(9, "Q8_1", 32, 40, false, false),
    T_(10, "Q2_K", 256, 84, false, false),
    T_(11, "Q3_K", 256, 110, false, false),
    T_(12, "Q4_K", 256, 144, false, false),
    T_(13, "Q5_K", 256, 176, false, false),
    T_(14, "Q6_K", 256, 210, false, false),
    T_(15, "Q8_K", 256, 292, false, false),
    T_(16, "IQ2_XXS", 256, 66, false, false),
    T_(17, "IQ2_XS", 256, 74, false, false),
    T_(18, "IQ3_XXS", 256, 98, false, false),
    T_(19, "IQ1_S", 256, 50, false, false),
    T_(20, "IQ4_NL", 32, 18, false, false),
    T_(21, "IQ3_S", 256, 110, false, false),
    T_(22, "IQ2_S", 256, 82, false, false),
    T_(23, "IQ4_XS", 256, 136, false, false),
    T_(24, "I8", 1, 1, false, false),
    T_(25, "I16", 1, 2, false, false),
    T_(26, "I32", 1, 4, false, false),
    T_(27, "I64", 1, 8, false, false),
    T_(28, "F64", 1, 8, false, false),
    T_(29, "IQ1_M", 256, 56, false, false),
    T_(30, "BF16", 1, 2, true, false),
    T_(31, "Q4_0_4_4", 0, 0, false, false), /* removed from ggml (repacked layouts) */
    T_(32, "Q4_0_4_8", 0, 0, false, false),
    T_(33, "Q4_0_8_8", 0, 0, false, false),
    T_(34, "TQ1_0", 256, 54, false, false),
    T_(35, "TQ2_0", 256, 66, false, false),
    T_(36, "IQ4_NL_4_4", 0, 0, false, false), /* removed from ggml */
    T_(37, "IQ4_NL_4_8", 0, 0, false, false),
    T_(38, "IQ4_NL_8_8", 0, 0, false, false),
    T_(39, "MXFP4", 32, 17, false, false),
};
#undef T_

sp_type_traits sp_type_traits_of(uint32_t type) {
    if (type >= SP_TYPE_COUNT) {
        sp_type_traits z;
        memset(&z, 0, sizeof z);
        return z;
    }
    return k_traits[type];
}

size_t sp_row_size(sp_type type, int64_t k) {
    sp_type_traits t = sp_type_traits_of((uint32_t)type);
    if (t.block_size <= 0 || k < 0) return 0;
    return (size_t)(k / t.block_size) * t.type_size;
}

/* ---- scalar conversions -------------------------------------------------------------------------------------- */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float sp_f16_to_f32(sp_f16 h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in float */
        float v = (float)man * 5.9604644775390625e-08f;
        return bits_f32(f32_bits(v) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13)); /* inf / NaN (payload kept) */
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

sp_f16 sp_f32_to_f16(float f) {
    const uint32_t x = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (sp_f16)(sign | 0x7e00 | ((ax >> 13) & 0x3ff)); /* NaN: quiet, payload top bits */
    if (ax >= 0x477ff000u) return (sp_f16)(sign | 0x7c00);                        /* rounds past 65504: inf */
    if (ax >= 0x38800000u) {                                                       /* normal half */
        const uint32_t a = ax - (112u << 23);
        return (sp_f16)(sign | ((a + 0xfffu + ((a >> 13) & 1)) >> 13));
    }
    /* subnormal half (or zero): value = m * 2^(e-150); in units of 2^-24 that is m >> (126-e), rounded to even */
    const uint32_t e = ax >> 23;
    if (e < 102) return (sp_f16)sign;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u, s = 126 - e; /* s in [14, 24] */
    uint32_t h = m >> s;
    const uint32_t rem = m & ((1u << s) - 1), half = 1u << (s - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return (sp_f16)(sign | h);
}

float sp_bf16_to_f32(sp_bf16 h) { return bits_f32((uint32_t)h << 16); }

sp_bf16 sp_f32_to_bf16(float f) {
    uint32_t n = f32_bits(f);
    if ((n & 0x7fffffffu) > 0x7f800000u) return (sp_bf16)((n >> 16) | 64); /* NaN: force quiet */
    return (sp_bf16)(((uint64_t)n + 0x7fffu + ((n >> 16) & 1)) >> 16);
}

/* ---- reference block (de)quantization ------------------------------------------------------------------------ */

/* np_roundf in gguf/quants.py: round half away from zero, in float32 */
static inline float round_away(float v) {
    float a = fabsf(v), fl = floorf(a);
    float b = fl + floorf(2.0f * (a - fl));
    return v < 0 ? -b : (v > 0 ? b : 0.0f * v);
}

static void quantize_q8_0(const float *x, sp_block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += SP_QK) {
        float amax = 0.0f;
        for (int j = 0; j < SP_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = sp_f32_to_f16(d);
        for (int j = 0; j < SP_QK; j++) y[i].qs[j] = (int8_t)round_away(x[j] * id);
    }
}

static void quantize_q4_0(const float *x, sp_block_q4_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += SP_QK) {
        float amax = fabsf(x[0]), max = x[0]; /* max: the first element of largest magnitude, with its sign */
        for (int j = 1; j < SP_QK; j++)
            if (fabsf(x[j]) > amax) amax = fabsf(x[j]), max = x[j];
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = sp_f32_to_f16(d);
        for (int j = 0; j < SP_QK / 2; j++) {
            const float a = truncf(x[j] * id + 8.5f), b = truncf(x[j + 16] * id + 8.5f);
            const uint8_t qa = (uint8_t)SP_MIN_F(a, 15.0f), qb = (uint8_t)SP_MIN_F(b, 15.0f);
            y[i].qs[j] = (uint8_t)(qa | (qb << 4));
        }
    }
}

static void quantize_q4_1(const float *x, sp_block_q4_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += SP_QK) {
        float min = x[0], max = x[0];
        for (int j = 1; j < SP_QK; j++) min = fminf(min, x[j]), max = fmaxf(max, x[j]);
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = sp_f32_to_f16(d);
        y[i].m = sp_f32_to_f16(min);
        for (int j = 0; j < SP_QK / 2; j++) {
            const float a = truncf((x[j] - min) * id + 0.5f), b = truncf((x[j + 16] - min) * id + 0.5f);
            const uint8_t qa = (uint8_t)SP_MIN_F(a, 15.0f), qb = (uint8_t)SP_MIN_F(b, 15.0f);
            y[i].qs[j] = (uint8_t)(qa | (qb << 4));
        }
    }
}

bool sp_quantize_row(sp_type type, const float *src, void *dst, int64_t k) {
    switch (type) {
    case SP_TYPE_F32: memcpy(dst, src, (size_t)k * 4); return true;
    case SP_TYPE_F16:
        for (int64_t i = 0; i < k; i++) ((sp_f16 *)dst)[i] = sp_f32_to_f16(src[i]);
        return true;
    case SP_TYPE_BF16:
        for (int64_t i = 0; i < k; i++) ((sp_bf16 *)dst)[i] = sp_f32_to_bf16(src[i]);
        return true;
    case SP_TYPE_Q4_0: quantize_q4_0(src, dst, k / SP_QK); return k % SP_QK == 0;
    case SP_TYPE_Q4_1: quantize_q4_1(src, dst, k / SP_QK); return k % SP_QK == 0;
    case SP_TYPE_Q8_0: quantize_q8_0(src, dst, k / SP_QK); return k % SP_QK == 0;
    default: return false;
    }
}

bool sp_dequantize_row(sp_type type, const void *src, float *dst, int64_t k) {
    const int64_t nb = k / SP_QK;
    switch (type) {
    case SP_TYPE_F32: memcpy(dst, src, (size_t)k * 4); return true;
    case SP_TYPE_F16:
        for (int64_t i = 0; i < k; i++) dst[i] = sp_f16_to_f32(((const sp_f16 *)src)[i]);
        return true;
    case SP_TYPE_BF16:
        for (int64_t i = 0; i < k; i++) dst[i] = sp_bf16_to_f32(((const sp_bf16 *)src)[i]);
        return true;
    case SP_TYPE_Q4_0:
        for (int64_t i = 0; i < nb; i++, dst += SP_QK) {
            const sp_block_q4_0 *b = (const sp_block_q4_0 *)src + i;
            const float d = sp_f16_to_f32(b->d);
            for (int j = 0; j < SP_QK / 2; j++) {
                dst[j] = d * (float)((b->qs[j] & 15) - 8);
                dst[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
            }
        }
        return k % SP_QK == 0;
    case SP_TYPE_Q4_1:
        for (int64_t i = 0; i < nb; i++, dst += SP_QK) {
            const sp_block_q4_1 *b = (const sp_block_q4_1 *)src + i;
            const float d = sp_f16_to_f32(b->d), m = sp_f16_to_f32(b->m);
            for (int j = 0; j < SP_QK / 2; j++) {
                dst[j] = d * (float)(b->qs[j] & 15) + m;
                dst[j + 16] = d * (float)(b->qs[j] >> 4) + m;
            }
        }
        return k % SP_QK == 0;
    case SP_TYPE_Q8_0:
        for (int64_t i = 0; i < nb; i++, dst += SP_QK) {
            const sp_block_q8_0 *b = (const sp_block_q8_0 *)src + i;
            const float d = sp_f16_to_f32(b->d);
            for (int j = 0; j < SP_QK; j++) dst[j] = (float)b->qs[j] * d;
        }
        return k % SP_QK == 0;
    default: return false;
    }
}
