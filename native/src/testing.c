/* testing.c: the hooks of testing.h, for the binding's `testing` submodule (tests and benchmarks). Each checks its
 * arguments like a public call (a status and a message, never a crash on a bad shape) and then calls the internal
 * function it exposes: a kernel tier's table entry, the FFN block alone, synthetic routing, the GGUF reader, the
 * vocabulary.
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, F = expert width, H = hidden,
 * E = experts, R = rows of an accumulated output, D = head dimension, ld = row stride of cached F16 rows.
 */
#include "testing.h"

#include "common.h"
#include "forward.h"
#include "gguf.h"
#include "kernels/kernels.h"
#include "sampler.h"
#include "vocab.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- argument checks shared by the kernel hooks ---- */

static sp_status tier_of(const char *tier, const sp_kernels **out) {
    *out = sp_kernels_for_tier(tier);
    if (!*out) return sp_fail(SP_ERR_UNSUPPORTED, "kernel tier '%s' is not available on this CPU", tier ? tier : "(null)");
    return SP_OK;
}

static sp_status type_of(uint32_t type, sp_type *out) {
    if (!sp_type_traits_of(type).supported) return sp_fail(SP_ERR_UNSUPPORTED, "tensor type %u", type);
    *out = (sp_type)type;
    return SP_OK;
}

/* W[N, K] as raw rows of ty: K a whole number of blocks and w_size exactly N rows. */
static sp_status check_weights(sp_type ty, size_t w_size, int64_t N, int64_t K) {
    if (N < 0 || K < 0 || K % sp_type_traits_of(ty).block_size || (int64_t)w_size != N * (int64_t)sp_row_size(ty, K))
        return sp_fail(SP_ERR_INVALID_ARG, "weight bytes do not match N x K");
    return SP_OK;
}

/* The activation input a matmul of weight type ty takes: x[T, K] itself, or its rows quantized to q8a blocks in
 * *owned (malloc'd, the caller frees it). */
static sp_status activations(const sp_kernels *kt, sp_type ty, const float *x, int64_t T, int64_t K, const void **data,
                             sp_block_q8a **owned) {
    *data = x;
    *owned = NULL;
    if (!sp_type_traits_of(ty).act_q8) return SP_OK;
    if (K % SP_QK) return sp_fail(SP_ERR_INVALID_ARG, "K must be a multiple of 32");
    sp_block_q8a *q = malloc((size_t)(T * K / SP_QK + 1) * sizeof *q);
    if (!q) return sp_fail(SP_ERR_NO_MEMORY, "activations: out of memory");
    for (int64_t t = 0; t < T; t++) kt->quantize_q8a(q + t * (K / SP_QK), x + t * K, K);
    *data = q;
    *owned = q;
    return SP_OK;
}

/* A 64-byte aligned buffer of at least `size` bytes (never 0; free with free()), or NULL. */
static void *alloc64(size_t size) { return aligned_alloc(64, (size / 64 + 1) * 64); }

/* A 64-byte aligned copy of W[N, K] in tier kt's packed layout in *out (free with free()), *size its bytes. */
static sp_status pack_aligned(const sp_kernels *kt, sp_type ty, const void *w, size_t w_size, int64_t N, int64_t K,
                              void **out, size_t *size) {
    *out = NULL;
    *size = kt->packed_size[ty] ? kt->packed_size[ty](N, K) : 0;
    if (!*size) return sp_fail(SP_ERR_UNSUPPORTED, "this tier does not pack this type/shape");
    sp_status st = check_weights(ty, w_size, N, K);
    if (st != SP_OK) return st;
    if (!(*out = alloc64(*size))) return sp_fail(SP_ERR_NO_MEMORY, "pack: out of memory");
    kt->pack[ty](*out, w, N, K);
    return SP_OK;
}

/* ---- kernel tiers, types, (de)quantization ---- */

int32_t sp_testing_tiers(const char **names, int32_t capacity) {
    static const char *const all[] = {"ref", "avx2", "avx512", "amx", "neon", "dotprod", "i8mm"};
    int32_t n = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (sp_kernels_for_tier(all[i]) && n < capacity) names[n++] = all[i];
    return n;
}

sp_status sp_testing_row_size(uint32_t type, int64_t k, size_t *out) {
    sp_type ty = SP_TYPE_F32;
    sp_status st = type_of(type, &ty);
    if (st == SP_OK) *out = sp_row_size(ty, k);
    return st;
}

sp_status sp_testing_quantize(uint32_t type, const float *x, int64_t k, void *out) {
    sp_type ty = SP_TYPE_F32;
    sp_status st = type_of(type, &ty);
    if (st != SP_OK) return st;
    if (k < 0 || k % sp_type_traits_of(ty).block_size) return sp_fail(SP_ERR_INVALID_ARG, "length not a block multiple");
    if (!sp_quantize_row(ty, x, out, k)) return sp_fail(SP_ERR_UNSUPPORTED, "quantize");
    return SP_OK;
}

sp_status sp_testing_dequantize(uint32_t type, const void *data, size_t size, int64_t k, float *out) {
    sp_type ty = SP_TYPE_F32;
    sp_status st = type_of(type, &ty);
    if (st != SP_OK) return st;
    if (k < 0 || k % sp_type_traits_of(ty).block_size || sp_row_size(ty, k) != size)
        return sp_fail(SP_ERR_INVALID_ARG, "data size does not match k");
    if (!sp_dequantize_row(ty, data, out, k)) return sp_fail(SP_ERR_UNSUPPORTED, "dequantize");
    return SP_OK;
}

size_t sp_testing_q8a_size(int64_t k) {
    return k < 0 || k % SP_QK ? 0 : (size_t)(k / SP_QK) * sizeof(sp_block_q8a);
}

sp_status sp_testing_quantize_q8a(const char *tier, const float *x, int64_t k, void *out) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st != SP_OK) return st;
    if (k < 0 || k % SP_QK) return sp_fail(SP_ERR_INVALID_ARG, "length must be a multiple of 32");
    kt->quantize_q8a(out, x, k);
    return SP_OK;
}

/* ---- matmul, accum, packing ---- */

sp_status sp_testing_matmul(const char *tier, uint32_t type, const void *w, size_t w_size, int64_t N, const float *x,
                            int64_t T, int64_t K, float *y) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st == SP_OK) st = check_weights(ty, w_size, N, K);
    if (st != SP_OK) return st;
    if (!kt->matmul[ty]) return sp_fail(SP_ERR_UNSUPPORTED, "no matmul for this type");
    const void *xin;
    sp_block_q8a *owned;
    if ((st = activations(kt, ty, x, T, K, &xin, &owned)) != SP_OK) return st;
    kt->matmul[ty](y, N, w, xin, K, 0, N, T);
    free(owned);
    return SP_OK;
}

sp_status sp_testing_accum(const char *tier, uint32_t type, const void *d, size_t d_size, int64_t F, int64_t H,
                           const float *c, int64_t T, int64_t ldc, float *y, int64_t R, const int32_t *idx) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st != SP_OK) return st;
    if (F < 0 || H < 0 || H % sp_type_traits_of(ty).block_size || (int64_t)d_size != F * (int64_t)sp_row_size(ty, H) ||
        ldc < F || (!idx && R < T))
        return sp_fail(SP_ERR_INVALID_ARG, "shapes do not match");
    for (int64_t t = 0; idx && t < T; t++)
        if (idx[t] < 0 || idx[t] >= R) return sp_fail(SP_ERR_INVALID_ARG, "idx out of range");
    if (!kt->accum[ty]) return sp_fail(SP_ERR_UNSUPPORTED, "no accum for this type");
    kt->accum[ty](y, H, idx, c, ldc, d, F, H, T);
    return SP_OK;
}

sp_status sp_testing_accum_packed(const char *tier, uint32_t type, const void *d, size_t d_size, int64_t F, int64_t H,
                                  const float *c, int64_t T, int64_t ldc, float *y, int64_t R, const int32_t *idx,
                                  int64_t f0, int64_t f1, bool i8) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st != SP_OK) return st;
    if (f1 < 0) f1 = F;
    if (F < 0 || H < 0 || H % sp_type_traits_of(ty).block_size || (int64_t)d_size != F * (int64_t)sp_row_size(ty, H) ||
        ldc < F || (!idx && R < T) || f0 < 0 || f0 > f1 || f1 > F || f0 % 16)
        return sp_fail(SP_ERR_INVALID_ARG, "shapes do not match");
    for (int64_t t = 0; idx && t < T; t++)
        if (idx[t] < 0 || idx[t] >= R) return sp_fail(SP_ERR_INVALID_ARG, "idx out of range");
    const size_t size = kt->packed_down_size[ty] ? kt->packed_down_size[ty](F, H) : 0;
    const sp_accum_fn accum = i8 ? kt->accum_packed_i8[ty] : kt->accum_packed[ty];
    if (!size || !accum) return sp_fail(SP_ERR_UNSUPPORTED, "this tier does not pack this type");
    void *p = alloc64(size);
    if (!p) return sp_fail(SP_ERR_NO_MEMORY, "pack: out of memory");
    (i8 ? kt->pack_down_i8 : kt->pack_down)[ty](p, d, F, H);
    accum(y, H, idx, c + f0, ldc, (const uint8_t *)p + kt->packed_down_size[ty](f0, H), f1 - f0, H, T);
    free(p);
    return SP_OK;
}

sp_status sp_testing_pack_rows(const char *tier, int32_t *out) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) *out = kt->pack_rows;
    return st;
}

sp_status sp_testing_packed_size(const char *tier, uint32_t type, int64_t N, int64_t K, size_t *out) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st == SP_OK) *out = kt->packed_size[ty] ? kt->packed_size[ty](N, K) : 0;
    return st;
}

sp_status sp_testing_pack(const char *tier, uint32_t type, const void *w, size_t w_size, int64_t N, int64_t K,
                          void *out) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st != SP_OK) return st;
    void *p;
    size_t size;
    if ((st = pack_aligned(kt, ty, w, w_size, N, K, &p, &size)) != SP_OK) return st;
    memcpy(out, p, size);
    free(p);
    return SP_OK;
}

sp_status sp_testing_matmul_packed(const char *tier, uint32_t type, const void *w, size_t w_size, int64_t N,
                                   const float *x, int64_t T, int64_t K, int64_t r0, int64_t r1, float *y) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st != SP_OK) return st;
    if (r1 < 0) r1 = N;
    if (r0 < 0 || r0 > r1 || r1 > N || r0 % kt->pack_rows || (r1 != N && r1 % kt->pack_rows))
        return sp_fail(SP_ERR_INVALID_ARG, "rows must be group multiples within [0, N]");
    void *p;
    size_t size;
    if ((st = pack_aligned(kt, ty, w, w_size, N, K, &p, &size)) != SP_OK) return st;
    const void *xin;
    sp_block_q8a *owned;
    if ((st = activations(kt, ty, x, T, K, &xin, &owned)) != SP_OK) {
        free(p);
        return st;
    }
    memset(y, 0, (size_t)(T * N) * sizeof *y);
    kt->matmul_packed[ty](y, N, p, xin, K, r0, r1, T);
    free(owned);
    free(p);
    return SP_OK;
}

sp_status sp_testing_matmul_time(const char *tier, uint32_t type, bool packed, const void *w, size_t w_size,
                                 int64_t N, const float *x, int64_t T, int64_t K, int32_t copies, int32_t reps,
                                 double *seconds) {
    const sp_kernels *kt = NULL;
    sp_type ty = SP_TYPE_F32;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) st = type_of(type, &ty);
    if (st == SP_OK) st = check_weights(ty, w_size, N, K);
    if (st != SP_OK) return st;
    if (reps < 1 || copies < 1) return sp_fail(SP_ERR_INVALID_ARG, "reps/copies < 1");
    sp_matmul_fn fn = packed ? kt->matmul_packed[ty] : kt->matmul[ty];
    if (!fn) return sp_fail(SP_ERR_UNSUPPORTED, "no matmul for this type");
    void *p = NULL; /* the packed copy of W, when packed */
    size_t size = w_size;
    if (packed && (st = pack_aligned(kt, ty, w, w_size, N, K, &p, &size)) != SP_OK) return st;
    const void *xin;
    sp_block_q8a *owned = NULL;
    const size_t stride = (size + 4095) / 4096 * 4096;
    uint8_t *base = alloc64(stride * (size_t)copies);
    float *y = malloc((size_t)(T * N + 1) * sizeof *y);
    if (!base || !y) st = sp_fail(SP_ERR_NO_MEMORY, "matmul_time: out of memory");
    if (st == SP_OK) st = activations(kt, ty, x, T, K, &xin, &owned);
    if (st == SP_OK) {
        for (int32_t c = 0; c < copies; c++) memcpy(base + stride * (size_t)c, p ? p : w, size);
        for (int32_t c = 0; c < copies; c++) fn(y, N, base + stride * (size_t)c, xin, K, 0, N, T); /* warm-up */
        for (int32_t i = 0; i < reps; i++) {
            const double t0 = sp_now_s();
            fn(y, N, base + stride * (size_t)(i % copies), xin, K, 0, N, T);
            seconds[i] = sp_now_s() - t0;
        }
    }
    free(owned);
    free(y);
    free(base);
    free(p);
    return st;
}

/* ---- attention of one kv head, timed ---- */

sp_status sp_testing_attn_time(const char *tier, int64_t G, int64_t T, int64_t n, int64_t D, int32_t reps,
                               double *seconds) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st != SP_OK) return st;
    if (G < 1 || T < 1 || n < 0 || D < 1 || reps < 1 || G * T > 4096 || n + T > (1 << 20) || D > 1024)
        return sp_fail(SP_ERR_INVALID_ARG, "attn_time: bad shape");
    const int64_t S = n + T, M = G * T, nblk = (S + SP_KBLK - 1) / SP_KBLK;
    sp_f16 *k = alloc64((size_t)(nblk * SP_KBLK * D) * sizeof *k), *v = alloc64((size_t)(S * D) * sizeof *v);
    float *q = alloc64((size_t)(M * D) * sizeof *q), *sc = alloc64((size_t)(M * S) * sizeof *sc);
    float *out = alloc64((size_t)(M * D) * sizeof *out), *inv = alloc64((size_t)M * sizeof *inv);
    if (!k || !v || !q || !sc || !out || !inv) st = sp_fail(SP_ERR_NO_MEMORY, "attn_time: out of memory");
    if (st == SP_OK) {
        uint64_t x = 88172645463325252ull;
        for (int64_t i = 0; i < nblk * SP_KBLK * D; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            k[i] = sp_f32_to_f16((float)(x >> 40) / (float)(1 << 24) - 0.5f);
            if (i < S * D) v[i] = k[i];
        }
        for (int64_t i = 0; i < M * D; i++) q[i] = sp_f16_to_f32(k[(i * 7) % (S * D)]);
        const float scale = 1.0f / sqrtf((float)D);
        for (int32_t r = -1; r < reps; r++) { /* r = -1: warm-up */
            const double t0 = sp_now_s();
            /* as forward.c's attention() for one kv head: scores of all M queries, each row's causal softmax, then
             * each token's G rows' weighted sum and normalisation */
            kt->attn_scores_f16(q, D, M, k, S, D, scale, sc, S);
            for (int64_t m = 0; m < M; m++) {
                float *row = sc + m * S;
                const int64_t seen = n + m / G + 1;
                for (int64_t j = seen; j < S; j++) row[j] = -INFINITY;
                bool bad = false;
                const float sum = kt->exp_sum(row, S, kt->max_f32(row, S, &bad));
                inv[m] = sum > 0 ? 1.0f / sum : 0.0f;
            }
            memset(out, 0, (size_t)(M * D) * sizeof *out);
            for (int64_t t = 0; t < T; t++) {
                kt->attn_sum_f16(out + t * G * D, D, sc + t * G * S, S, G, v, D, n + t + 1, D);
                for (int64_t i = 0; i < G * D; i++) out[t * G * D + i] *= inv[t * G + i / D];
            }
            if (r >= 0) seconds[r] = sp_now_s() - t0;
        }
    }
    free(k), free(v), free(q), free(sc), free(out), free(inv);
    return st;
}

/* ---- vector kernels of the F16 KV cache ---- */

sp_status sp_testing_dot_f32(const char *tier, const float *a, const float *b, int64_t n, float *out) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) *out = kt->dot_f32(a, b, n);
    return st;
}

sp_status sp_testing_attn_scores_f16(const char *tier, const float *q, int64_t M, int64_t D, const uint16_t *rows,
                                     int64_t n, float scale, float *out) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st != SP_OK) return st;
    if (M < 0 || D < 1 || n < 0) return sp_fail(SP_ERR_INVALID_ARG, "bad shape");
    const int64_t nblk = (n + SP_KBLK - 1) / SP_KBLK;
    sp_f16 *k = malloc((size_t)(nblk ? nblk : 1) * SP_KBLK * (size_t)D * sizeof *k);
    if (!k) return sp_fail(SP_ERR_NO_MEMORY, "no memory for the key blocks");
    for (int64_t j = 0; j < nblk * SP_KBLK; j++)
        for (int64_t d = 0; d < D; d++)
            k[(j / SP_KBLK) * SP_KBLK * D + d * SP_KBLK + j % SP_KBLK] = j < n ? rows[j * D + d] : 0x7e00; /* NaN */
    kt->attn_scores_f16(q, D, M, k, n, D, scale, out, n);
    free(k);
    return SP_OK;
}

sp_status sp_testing_attn_sum_f16(const char *tier, float *out, int64_t M, int64_t D, const float *p,
                                  const uint16_t *rows, int64_t ld, int64_t n) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st != SP_OK) return st;
    if (M < 0 || D < 0 || n < 0 || D > ld) return sp_fail(SP_ERR_INVALID_ARG, "bad shape");
    kt->attn_sum_f16(out, D, p, n, M, rows, ld, n, D);
    return SP_OK;
}

sp_status sp_testing_f32_to_f16(const char *tier, uint16_t *y, const float *x, int64_t n) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) kt->f32_to_f16(y, x, n);
    return st;
}

sp_status sp_testing_first_above(const char *tier, const float *x, int64_t n, float t, int64_t *out) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) *out = kt->first_above(x, n, t);
    return st;
}

sp_status sp_testing_round_f16(const char *tier, float *x, int64_t n) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) kt->round_f16(x, n);
    return st;
}

sp_status sp_testing_max_f32(const char *tier, const float *x, int64_t n, float *mx, bool *bad) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) {
        *bad = false;
        *mx = kt->max_f32(x, n, bad);
    }
    return st;
}

sp_status sp_testing_silu_mul(const char *tier, float *x, const float *m, float s, int64_t n) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) kt->silu_mul(x, m, s, n);
    return st;
}

sp_status sp_testing_exp_sum(const char *tier, float *x, int64_t n, float mx, float *sum) {
    const sp_kernels *kt = NULL;
    sp_status st = tier_of(tier, &kt);
    if (st == SP_OK) *sum = kt->exp_sum(x, n, mx);
    return st;
}

/* ---- one BlockFFN layer's FFN block alone ---- */

int32_t sp_testing_n_expert(const sp_session *ses) { return ses->model->hp.n_expert; }

static sp_status check_xn(const sp_session *ses, const float *xn, int64_t xn_cols) {
    if (xn && xn_cols != ses->model->hp.n_embd) return sp_fail(SP_ERR_INVALID_ARG, "xn must be [T, H]");
    return SP_OK;
}

sp_status sp_testing_ffn_run(sp_session *ses, int32_t il, const float *xn, int64_t xn_cols, const float *r,
                             int64_t r_cols, int32_t T, sp_ffn_mode mode, float *out) {
    sp_clear_error();
    sp_status st = check_xn(ses, xn, xn_cols);
    if (st != SP_OK) return st;
    return sp_ffn_blockffn_run(ses, il, xn, r, r ? r_cols : -1, T, mode, out);
}

sp_status sp_testing_ffn_time(sp_session *ses, const int32_t *layers, int32_t n_layers, const float *xn,
                              int64_t xn_cols, const float *r, int64_t r_cols, int32_t T, sp_ffn_mode mode,
                              int32_t reps, double *seconds) {
    sp_clear_error();
    if (n_layers < 1 || reps < 1 || !r) return sp_fail(SP_ERR_INVALID_ARG, "layers empty, reps < 1 or r not [T, E]");
    sp_status st = check_xn(ses, xn, xn_cols);
    for (int32_t i = 0; i < n_layers && st == SP_OK; i++) /* warm-up; also loads xn into scratch */
        st = sp_ffn_blockffn_run(ses, layers[i], xn, r, r_cols, T, mode, NULL);
    for (int32_t i = 0; i < reps && st == SP_OK; i++) {
        const double t0 = sp_now_s();
        st = sp_ffn_blockffn_run(ses, layers[i % n_layers], NULL, r, r_cols, T, mode, NULL);
        seconds[i] = sp_now_s() - t0;
    }
    return st;
}

/* ---- synthetic routing ---- */

sp_status sp_testing_set_synthetic_routing(sp_session *ses, double tls, double cls, int32_t k, uint64_t seed) {
    const sp_synth_routing_params p = {.tls = tls, .cls = cls, .k = k, .seed = seed};
    return sp_session_set_synthetic_routing(ses, &p);
}

sp_status sp_testing_clear_synthetic_routing(sp_session *ses) { return sp_session_set_synthetic_routing(ses, NULL); }

sp_status sp_testing_synthetic_routing(const sp_session *ses, sp_testing_synth_info *out) {
    const sp_synth_routing *sy = &ses->synth;
    const int32_t E = ses->model->hp.n_expert;
    *out = (sp_testing_synth_info){.on = sy->on, .n_expert = E};
    if (!sy->on) return SP_OK;
    out->n_active = sy->n_active;
    out->n_union = sy->n_union;
    out->k = sy->k;
    out->seed = sy->seed;
    out->tls = 1.0 - sy->n_active / (double)E;
    out->cls = 1.0 - sy->n_union / (double)E;
    return SP_OK;
}

sp_status sp_testing_synthetic_scores(const sp_session *ses, int32_t il, const int64_t *positions, int64_t T,
                                      float *out) {
    if (!ses->synth.on) return sp_fail(SP_ERR_INVALID_ARG, "synthetic routing is off");
    if (il < 0 || il >= ses->model->hp.n_layer) return sp_fail(SP_ERR_INVALID_ARG, "layer out of range");
    for (int64_t t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] > (1 << 24)) return sp_fail(SP_ERR_INVALID_ARG, "position out of range");
    const int64_t E = ses->model->hp.n_expert;
    for (int64_t t = 0; t < T; t++) sp_synth_routing_scores(ses, il, positions[t], out + t * E);
    return SP_OK;
}

sp_status sp_testing_last_router_scores(const sp_session *ses, int32_t n_tokens, float *out) {
    if (ses->model->hp.n_expert == 0) return sp_fail(SP_ERR_INVALID_ARG, "the model has no BlockFFN layers");
    if (n_tokens < 1 || n_tokens > ses->params.n_batch)
        return sp_fail(SP_ERR_INVALID_ARG, "n_tokens must be 1..n_batch");
    if (ses->gpu) return sp_fail(SP_ERR_UNSUPPORTED, "a GPU session keeps its router scores on the device");
    memcpy(out, ses->s.router, (size_t)n_tokens * (size_t)ses->model->hp.n_expert * sizeof *out);
    return SP_OK;
}

sp_status sp_testing_fill_cache(sp_session *ses, int32_t n, uint64_t seed) {
    if (n < 0 || n > ses->params.n_ctx) return sp_fail(SP_ERR_INVALID_ARG, "n must be 0..n_ctx (%d)", ses->params.n_ctx);
    if (ses->gpu) return sp_fail(SP_ERR_UNSUPPORTED, "a GPU session's cache is on the device");
    const sp_hparams *hp = &ses->model->hp;
    const int64_t C = ses->params.n_ctx;
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t il = 0; il < hp->n_layer; il++)
        for (int pass = 0; pass < 2; pass++) {
            const int64_t width = pass ? hp->kv_v_dim : hp->kv_k_dim;
            uint8_t *base = (uint8_t *)(pass ? ses->v_cache : ses->k_cache) + (size_t)(il * C * width) * ses->kv_elem;
            for (int64_t i = 0; i < (int64_t)n * width; i++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64 */
                const float v = (float)(x >> 40) / (float)(1 << 24) - 0.5f;
                if (ses->kv_elem == 2) ((sp_f16 *)base)[i] = sp_f32_to_f16(v);
                else ((float *)base)[i] = v;
            }
        }
    ses->past[0] = n;
    return SP_OK;
}

/* ---- sampler ---- */

sp_status sp_testing_sampler_probs(sp_sampler *sampler, const float *logits, float *probs) {
    return sp_sampler_probs(sampler, logits, probs);
}

/* ---- GGUF validator and the tokenizer straight from a file ---- */

sp_status sp_testing_gguf_validate(const char *path, bool use_mmap) {
    sp_gguf *g = NULL;
    sp_status st = sp_gguf_open(path, use_mmap, &g);
    sp_gguf_close(g);
    return st;
}

sp_status sp_testing_gguf_validate_memory(const void *data, size_t size) {
    sp_gguf *g = NULL;
    sp_status st = sp_gguf_open_memory(data, size, &g);
    sp_gguf_close(g);
    return st;
}

sp_status sp_testing_vocab_validate_memory(const void *data, size_t size) {
    sp_gguf *g = NULL;
    sp_vocab *v = NULL;
    sp_status st = sp_gguf_open_memory(data, size, &g);
    if (st == SP_OK) st = sp_vocab_load(g, &v);
    sp_vocab_free(v);
    sp_gguf_close(g);
    return st;
}

struct sp_testing_vocab {
    sp_gguf *g;  /* the mapped file the vocabulary's strings point into */
    sp_vocab *v;
};

sp_status sp_testing_vocab_open(const char *path, sp_testing_vocab **out) {
    *out = NULL;
    sp_testing_vocab *tv = calloc(1, sizeof *tv);
    if (!tv) return sp_fail(SP_ERR_NO_MEMORY, "vocab: out of memory");
    sp_status st = sp_gguf_open(path, true, &tv->g);
    if (st == SP_OK) st = sp_vocab_load(tv->g, &tv->v);
    if (st != SP_OK) {
        sp_testing_vocab_close(tv);
        return st;
    }
    *out = tv;
    return SP_OK;
}

void sp_testing_vocab_close(sp_testing_vocab *tv) {
    if (!tv) return;
    sp_vocab_free(tv->v);
    sp_gguf_close(tv->g);
    free(tv);
}

sp_status sp_testing_vocab_tokenize(const sp_testing_vocab *tv, const char *text, size_t len, bool add_special,
                                    bool parse_special, int32_t *tokens, size_t capacity, size_t *n_out) {
    return sp_vocab_tokenize(tv->v, text, len, add_special, parse_special, tokens, capacity, n_out);
}

sp_status sp_testing_vocab_token_to_piece(const sp_testing_vocab *tv, int32_t token, bool render_special, char *buf,
                                          size_t capacity, size_t *len) {
    return sp_vocab_token_to_piece(tv->v, token, render_special, buf, capacity, len);
}

int32_t sp_testing_vocab_n_tokens(const sp_testing_vocab *tv) { return sp_vocab_n_tokens(tv->v); }
int32_t sp_testing_vocab_bos(const sp_testing_vocab *tv) { return sp_vocab_bos(tv->v); }
int32_t sp_testing_vocab_eos(const sp_testing_vocab *tv) { return sp_vocab_eos(tv->v); }
int32_t sp_testing_vocab_eot(const sp_testing_vocab *tv) { return sp_vocab_eot(tv->v); }
bool sp_testing_vocab_add_bos(const sp_testing_vocab *tv) { return sp_vocab_add_bos(tv->v); }
bool sp_testing_vocab_is_eog(const sp_testing_vocab *tv, int32_t token) { return sp_vocab_is_eog(tv->v, token); }
