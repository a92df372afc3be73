/* kernels_check.c: every kernel tier this CPU can run against "ref", from C, for builds that cannot run the Python
 * tests (an aarch64 build under qemu: tests/test_arm.py runs it with -cpu cortex-a53, neoverse-n1 and max). The same
 * bounds as tests/test_kernels.py:
 *   - quantize_q8a, f32 -> f16, round_f16, first_above, max_f32: bit for bit;
 *   - matmul and accum (every weight type, packed layouts too): |y - y_ref| <= 1e-5 (|W| @ |x|) + 1e-5 elementwise
 *     (each block's integer dot product is exact in every tier; only float summation order differs); a packed matmul
 *     equals the tier's own unpacked one bit for bit; accum_packed_i8 (int8 activations) within kernels.h's bound;
 *   - attention scores and sums: within float32 summation error of ref, and every element bit for bit what the same
 *     kernel gives for its query alone (a token's attention does not depend on the batch);
 *   - exp_sum, silu_mul: within 4 and 8 float32 ulp of the float64 function; exp_sum's sum order-free.
 *
 *   kernels_check            prints one line per tier, exit 0 when everything holds, 1 with the first failure
 *
 * Built by CMake with -DSPARROW_CHECKS=ON (linked with the static library, whose testing.h hooks it calls). */
#include "sparrow.h"
#include "testing.h"

#include "check.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_BF16 = 30 };
static const uint32_t TYPES[] = {T_F32, T_F16, T_BF16, T_Q4_0, T_Q4_1, T_Q8_0};
static const char *TYPE_NAMES[] = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"};

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float rnd(void) { /* uniform in [-1, 1) */
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (float)(g_rng >> 40) / (float)(1 << 23) - 1.0f;
}
static float gauss(void) { return (rnd() + rnd() + rnd()) * 1.2f; }

static int g_failures;
#define EXPECT(cond, ...)                                                                                    \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "FAIL [%s] ", tier);                                                              \
            fprintf(stderr, __VA_ARGS__);                                                                    \
            fprintf(stderr, "\n");                                                                           \
            if (++g_failures >= 20) exit(1);                                                                 \
        }                                                                                                    \
    } while (0)

static float *fvec(size_t n) {
    float *p = calloc(n ? n : 1, sizeof *p);
    CHECK(p);
    return p;
}

/* Raw rows of W[N, K] in `type` from gaussian floats; *wf = the dequantized values (what the kernels multiply). */
static uint8_t *weights(uint32_t type, int64_t N, int64_t K, float **wf, size_t *size) {
    size_t row = 0;
    CHECK(sp_testing_row_size(type, K, &row) == SP_OK);
    uint8_t *w = malloc(row * (size_t)N);
    float *x = fvec((size_t)K), *f = fvec((size_t)(N * K));
    CHECK(w);
    for (int64_t r = 0; r < N; r++) {
        for (int64_t i = 0; i < K; i++) x[i] = gauss();
        CHECK(sp_testing_quantize(type, x, K, w + (size_t)r * row) == SP_OK);
        CHECK(sp_testing_dequantize(type, w + (size_t)r * row, row, K, f + r * K) == SP_OK);
    }
    free(x);
    *wf = f;
    *size = row * (size_t)N;
    return w;
}

/* |y - y_ref| <= 1e-5 * bound + 1e-5 elementwise; bound[i] = sum of |products| of element i. */
static bool close_to(const float *y, const float *y_ref, const float *bound, size_t n, size_t *where) {
    for (size_t i = 0; i < n; i++)
        if (!(fabsf(y[i] - y_ref[i]) <= 1e-5f * bound[i] + 1e-5f)) {
            *where = i;
            return false;
        }
    return true;
}

static void check_quantize(const char *tier) {
    for (int64_t k = 32; k <= 1024; k *= 2) {
        float *x = fvec((size_t)k);
        for (int64_t i = 0; i < k; i++) x[i] = gauss() * (i % 7 == 0 ? 30.0f : 1.0f);
        if (k == 64) memset(x, 0, 32 * sizeof *x); /* an all-zero block */
        const size_t n = sp_testing_q8a_size(k);
        uint8_t *a = malloc(n), *b = malloc(n);
        CHECK(a && b);
        CHECK(sp_testing_quantize_q8a(tier, x, k, a) == SP_OK);
        CHECK(sp_testing_quantize_q8a("ref", x, k, b) == SP_OK);
        EXPECT(!memcmp(a, b, n), "quantize_q8a k=%lld differs from ref", (long long)k);
        free(x), free(a), free(b);
    }
}

static void check_matmul(const char *tier) {
    /* {N, K}: K = 37 (float types only: a tail past the vectors) and 2240 (over 2048: several K chunks) */
    static const int64_t SHAPES[][2] = {{1, 32}, {17, 64}, {40, 96}, {33, 576}, {64, 160}, {7, 37}, {5, 2240}};
    /* 11-12, 31-32: either side of the amx tier's thresholds (Q8_0, Q4); 13, 15-17, 33, 64: its 16-token tiles and a
     * last partial one; 70: more than one pass of 64 tokens */
    static const int64_t TS[] = {1, 2, 3, 5, 8, 11, 12, 13, 15, 16, 17, 31, 32, 33, 64, 70};
    int32_t pack_rows = 0;
    CHECK(sp_testing_pack_rows(tier, &pack_rows) == SP_OK);
    for (size_t ti = 0; ti < sizeof TYPES / sizeof TYPES[0]; ti++)
        for (size_t si = 0; si < sizeof SHAPES / sizeof SHAPES[0]; si++) {
            const uint32_t type = TYPES[ti];
            const int64_t N = SHAPES[si][0], K = SHAPES[si][1];
            if (K % 32 && type != T_F32 && type != T_F16 && type != T_BF16) continue; /* whole quant blocks only */
            float *wf = NULL;
            size_t wsize = 0;
            uint8_t *w = weights(type, N, K, &wf, &wsize);
            size_t psize = 0;
            CHECK(sp_testing_packed_size(tier, type, N, K, &psize) == SP_OK);
            uint8_t *packed = psize ? malloc(psize) : NULL;
            for (size_t tt = 0; tt < sizeof TS / sizeof TS[0]; tt++) {
                const int64_t T = TS[tt];
                float *x = fvec((size_t)(T * K)), *y = fvec((size_t)(T * N)), *yr = fvec((size_t)(T * N));
                float *bound = fvec((size_t)(T * N));
                for (int64_t i = 0; i < T * K; i++) x[i] = gauss();
                CHECK(sp_testing_matmul(tier, type, w, wsize, N, x, T, K, y) == SP_OK);
                CHECK(sp_testing_matmul("ref", type, w, wsize, N, x, T, K, yr) == SP_OK);
                for (int64_t t = 0; t < T; t++)
                    for (int64_t r = 0; r < N; r++) {
                        double s = 0;
                        for (int64_t i = 0; i < K; i++) s += fabs((double)wf[r * K + i] * x[t * K + i]);
                        bound[t * N + r] = (float)s;
                    }
                size_t at = 0;
                EXPECT(close_to(y, yr, bound, (size_t)(T * N), &at), "matmul %s N=%lld K=%lld T=%lld: y[%zu] %g, ref %g",
                       TYPE_NAMES[ti], (long long)N, (long long)K, (long long)T, at, y[at], yr[at]);
                if (psize) { /* the packed copy gives the unpacked kernel's bits, whole and by row-group ranges */
                    float *yp = fvec((size_t)(T * N));
                    CHECK(sp_testing_matmul_packed(tier, type, w, wsize, N, x, T, K, 0, -1, yp) == SP_OK);
                    EXPECT(!memcmp(yp, y, (size_t)(T * N) * sizeof *y), "matmul_packed %s N=%lld K=%lld T=%lld differs "
                           "from the unpacked kernel", TYPE_NAMES[ti], (long long)N, (long long)K, (long long)T);
                    if (!strcmp(tier, "amx")) { /* the tiles' int32 sums and the float epilogue are avx512's */
                        float *ya = fvec((size_t)(T * N));
                        CHECK(sp_testing_matmul_packed("avx512", type, w, wsize, N, x, T, K, 0, -1, ya) == SP_OK);
                        EXPECT(!memcmp(yp, ya, (size_t)(T * N) * sizeof *y), "matmul_packed %s N=%lld K=%lld "
                               "T=%lld differs from avx512's", TYPE_NAMES[ti], (long long)N, (long long)K, (long long)T);
                        free(ya);
                    }
                    if (pack_rows > 0 && N > pack_rows) {
                        CHECK(sp_testing_matmul_packed(tier, type, w, wsize, N, x, T, K, pack_rows, N, yp) == SP_OK);
                        for (int64_t t = 0; t < T; t++)
                            EXPECT(!memcmp(yp + t * N + pack_rows, y + t * N + pack_rows,
                                           (size_t)(N - pack_rows) * sizeof *y),
                                   "matmul_packed %s rows %d.. differ", TYPE_NAMES[ti], pack_rows);
                    }
                    free(yp);
                }
                free(x), free(y), free(yr), free(bound);
            }
            free(packed), free(w), free(wf);
        }
}

/* accum_packed_i8's bound over ref (kernels.h), [R, H]: sum over 16-row groups g and column blocks b of
 * max_f |c[t, f] d[f, b]| / 254 * sum_f |q[f, j] - 8|, from the dequantized Q4_0 rows df [F, H] (a reference-quantized
 * block holds its largest |value| as q = 0, so |d| = max_j |df| / 8 and |q - 8| = |df| / |d|). */
static float *i8_bound(const float *df, const float *c, int64_t ldc, const int32_t *idx, int64_t F, int64_t H,
                       int64_t T, int64_t R) {
    float *out = fvec((size_t)(R * H));
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < F; g += 16)
            for (int64_t j0 = 0; j0 < H; j0 += 32) {
                double amax = 0, d[16] = {0};
                for (int64_t f = g; f < F && f < g + 16; f++) {
                    for (int64_t j = j0; j < j0 + 32; j++) d[f - g] = fmax(d[f - g], fabs((double)df[f * H + j]) / 8);
                    amax = fmax(amax, fabs((double)c[t * ldc + f]) * d[f - g]);
                }
                for (int64_t j = j0; j < j0 + 32; j++) {
                    double s = 0;
                    for (int64_t f = g; f < F && f < g + 16; f++)
                        if (d[f - g] > 0) s += fabs((double)df[f * H + j]) / d[f - g];
                    out[idx[t] * H + j] += (float)(amax / 254 * s * (1 + 1e-6));
                }
            }
    return out;
}

static void check_accum(const char *tier) {
    static const int64_t SHAPES[][2] = {{16, 32}, {48, 96}, {64, 576}, {32, 160}, {13, 64}, {16, 37},
                                        {20, 2240}}; /* F, H */
    static const int64_t TS[] = {1, 3, 8, 11};
    for (size_t ti = 0; ti < sizeof TYPES / sizeof TYPES[0]; ti++)
        for (size_t si = 0; si < sizeof SHAPES / sizeof SHAPES[0]; si++)
            for (size_t tt = 0; tt < sizeof TS / sizeof TS[0]; tt++) {
                const uint32_t type = TYPES[ti];
                const int64_t F = SHAPES[si][0], H = SHAPES[si][1], T = TS[tt], R = T + 3, ldc = F + 5;
                if (H % 32 && type != T_F32 && type != T_F16 && type != T_BF16) continue; /* whole quant blocks */
                float *df = NULL;
                size_t dsize = 0;
                uint8_t *d = weights(type, F, H, &df, &dsize);
                float *c = fvec((size_t)(T * ldc)), *y0 = fvec((size_t)(R * H)), *bound = fvec((size_t)(R * H));
                for (int64_t i = 0; i < T * ldc; i++) c[i] = gauss();
                for (int64_t i = 0; i < R * H; i++) y0[i] = gauss();
                int32_t idx[16];
                for (int64_t t = 0; t < T; t++) idx[t] = (int32_t)((t * 5 + 2) % R); /* distinct rows, any order */
                for (int64_t t = 0; t < T; t++)
                    for (int64_t j = 0; j < H; j++) {
                        double s = fabs((double)y0[idx[t] * H + j]);
                        for (int64_t f = 0; f < F; f++) s += fabs((double)c[t * ldc + f] * df[f * H + j]);
                        bound[idx[t] * H + j] = (float)s;
                    }
                float *y = fvec((size_t)(R * H)), *yr = fvec((size_t)(R * H));
                memcpy(y, y0, (size_t)(R * H) * sizeof *y);
                memcpy(yr, y0, (size_t)(R * H) * sizeof *y);
                CHECK(sp_testing_accum(tier, type, d, dsize, F, H, c, T, ldc, y, R, idx) == SP_OK);
                CHECK(sp_testing_accum("ref", type, d, dsize, F, H, c, T, ldc, yr, R, idx) == SP_OK);
                size_t at = 0;
                EXPECT(close_to(y, yr, bound, (size_t)(R * H), &at), "accum %s F=%lld H=%lld T=%lld: y[%zu] %g, ref %g",
                       TYPE_NAMES[ti], (long long)F, (long long)H, (long long)T, at, y[at], yr[at]);
                memcpy(y, y0, (size_t)(R * H) * sizeof *y);
                sp_status st = sp_testing_accum_packed(tier, type, d, dsize, F, H, c, T, ldc, y, R, idx, 0, -1, false);
                if (st == SP_OK)
                    EXPECT(close_to(y, yr, bound, (size_t)(R * H), &at), "accum_packed %s F=%lld H=%lld T=%lld: y[%zu] "
                           "%g, ref %g", TYPE_NAMES[ti], (long long)F, (long long)H, (long long)T, at, y[at], yr[at]);
                else
                    EXPECT(st == SP_ERR_UNSUPPORTED, "accum_packed %s: %s", TYPE_NAMES[ti], sp_last_error());
                memcpy(y, y0, (size_t)(R * H) * sizeof *y);
                st = sp_testing_accum_packed(tier, type, d, dsize, F, H, c, T, ldc, y, R, idx, 0, -1, true);
                if (st == SP_OK) {
                    CHECK(type == T_Q4_0);
                    float *qb = i8_bound(df, c, ldc, idx, F, H, T, R);
                    for (size_t i = 0; i < (size_t)(R * H); i++) qb[i] += 1e-5f * bound[i] + 1e-5f;
                    at = 0;
                    while (at < (size_t)(R * H) && fabsf(y[at] - yr[at]) <= qb[at]) at++;
                    EXPECT(at == (size_t)(R * H), "accum_packed_i8 F=%lld H=%lld T=%lld: y[%zu] %g, ref %g, bound %g",
                           (long long)F, (long long)H, (long long)T, at, y[at], yr[at], qb[at]);
                    free(qb);
                } else {
                    EXPECT(st == SP_ERR_UNSUPPORTED, "accum_packed_i8 %s: %s", TYPE_NAMES[ti], sp_last_error());
                }
                free(d), free(df), free(c), free(y0), free(bound), free(y), free(yr);
            }
}

static void check_attention(const char *tier) {
    static const int64_t CASES[][3] = {{3, 64, 7}, {24, 64, 33}, {5, 48, 5}, {1, 128, 9}, {17, 80, 40}, {9, 8, 70},
                                       {4, 20, 19}, {7, 57, 50}}; /* {M, D, n}: D's tails too */
    for (size_t ci = 0; ci < sizeof CASES / sizeof CASES[0]; ci++) {
        const int64_t M = CASES[ci][0], D = CASES[ci][1], n = CASES[ci][2];
        uint16_t *rows = malloc((size_t)(n * D) * sizeof *rows);
        float *q = fvec((size_t)(M * D)), *rf = fvec((size_t)(n * D));
        CHECK(rows);
        for (int64_t i = 0; i < n * D; i++) rf[i] = gauss() * 2.0f;
        CHECK(sp_testing_f32_to_f16("ref", rows, rf, n * D) == SP_OK);
        CHECK(sp_testing_round_f16("ref", rf, n * D) == SP_OK); /* the values the halves hold */
        for (int64_t i = 0; i < M * D; i++) q[i] = gauss();
        float *s = fvec((size_t)(M * n)), *sr = fvec((size_t)(M * n)), *bound = fvec((size_t)(M * n));
        CHECK(sp_testing_attn_scores_f16(tier, q, M, D, rows, n, 0.125f, s) == SP_OK);
        CHECK(sp_testing_attn_scores_f16("ref", q, M, D, rows, n, 0.125f, sr) == SP_OK);
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < n; j++) {
                double b = 0;
                for (int64_t d = 0; d < D; d++) b += fabs((double)q[m * D + d] * rf[j * D + d]) * 0.125;
                bound[m * n + j] = (float)b;
                float one = 0;
                CHECK(sp_testing_attn_scores_f16(tier, q + m * D, 1, D, rows + j * D, 1, 0.125f, &one) == SP_OK);
                EXPECT(one == s[m * n + j], "attn_scores M=%lld D=%lld n=%lld: element (%lld, %lld) alone differs",
                       (long long)M, (long long)D, (long long)n, (long long)m, (long long)j);
            }
        size_t at = 0;
        EXPECT(close_to(s, sr, bound, (size_t)(M * n), &at), "attn_scores M=%lld D=%lld n=%lld: %g vs ref %g",
               (long long)M, (long long)D, (long long)n, s[at], sr[at]);
        /* weighted sums: every third p is 0 (masked slots, skipped even when the row holds inf) */
        float *p = fvec((size_t)(M * n)), *o = fvec((size_t)(M * D)), *orf = fvec((size_t)(M * D));
        float *ob = fvec((size_t)(M * D));
        for (int64_t i = 0; i < M * n; i++) p[i] = i % 3 == 0 ? 0.0f : (rnd() + 1.0f) * 0.5f;
        if (n > 3) {
            for (int64_t d = 0; d < D; d++) rows[3 * D + d] = 0x7c00; /* +inf, at a slot where every p is 0 */
            for (int64_t m = 0; m < M; m++) p[m * n + 3] = 0.0f;
        }
        for (int64_t i = 0; i < M * D; i++) o[i] = orf[i] = gauss();
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < D; i++) {
                double b = fabs((double)o[m * D + i]);
                for (int64_t j = 0; j < n; j++)
                    if (p[m * n + j] != 0) b += fabs((double)p[m * n + j] * rf[j * D + i]);
                ob[m * D + i] = (float)b;
            }
        float *alone = fvec((size_t)D);
        memcpy(alone, o + (M - 1) * D, (size_t)D * sizeof *o);
        CHECK(sp_testing_attn_sum_f16(tier, o, M, D, p, rows, D, n) == SP_OK);
        CHECK(sp_testing_attn_sum_f16("ref", orf, M, D, p, rows, D, n) == SP_OK);
        EXPECT(close_to(o, orf, ob, (size_t)(M * D), &at), "attn_sum M=%lld D=%lld n=%lld: %g vs ref %g", (long long)M,
               (long long)D, (long long)n, o[at], orf[at]);
        CHECK(sp_testing_attn_sum_f16(tier, alone, 1, D, p + (M - 1) * n, rows, D, n) == SP_OK);
        EXPECT(!memcmp(alone, o + (M - 1) * D, (size_t)D * sizeof *o), "attn_sum M=%lld D=%lld: a query alone differs",
               (long long)M, (long long)D);
        free(rows), free(q), free(rf), free(s), free(sr), free(bound), free(p), free(o), free(orf), free(ob), free(alone);
    }
}

static void check_vectors(const char *tier) {
    for (int64_t n = 0; n <= 300; n += n < 40 ? 1 : 37) {
        float *x = fvec((size_t)n), *a = fvec((size_t)n), *b = fvec((size_t)n);
        uint16_t *ha = malloc((size_t)(n + 1) * 2), *hb = malloc((size_t)(n + 1) * 2);
        CHECK(ha && hb);
        for (int64_t i = 0; i < n; i++) x[i] = gauss() * (i % 5 == 0 ? 1e4f : 3.0f);
        if (n > 2) x[1] = 1e-7f, x[2] = -65520.0f; /* a subnormal half, an overflow */
        CHECK(sp_testing_f32_to_f16(tier, ha, x, n) == SP_OK);
        CHECK(sp_testing_f32_to_f16("ref", hb, x, n) == SP_OK);
        EXPECT(!memcmp(ha, hb, (size_t)n * 2), "f32_to_f16 n=%lld differs from ref", (long long)n);
        memcpy(a, x, (size_t)n * sizeof *x), memcpy(b, x, (size_t)n * sizeof *x);
        CHECK(sp_testing_round_f16(tier, a, n) == SP_OK);
        CHECK(sp_testing_round_f16("ref", b, n) == SP_OK);
        EXPECT(!memcmp(a, b, (size_t)n * sizeof *a), "round_f16 n=%lld differs from ref", (long long)n);
        /* max and first_above, exact */
        float mx = 0, mxr = 0;
        bool bad = false, badr = false;
        if (n > 4) x[n / 2] = NAN;
        CHECK(sp_testing_max_f32(tier, x, n, &mx, &bad) == SP_OK);
        CHECK(sp_testing_max_f32("ref", x, n, &mxr, &badr) == SP_OK);
        EXPECT(bad == badr && (bad || mx == mxr), "max_f32 n=%lld: %g (bad %d) vs ref %g (bad %d)", (long long)n, mx, bad,
               mxr, badr);
        int64_t fa = -1, far = -2;
        CHECK(sp_testing_first_above(tier, x, n, 2.5f, &fa) == SP_OK);
        CHECK(sp_testing_first_above("ref", x, n, 2.5f, &far) == SP_OK);
        EXPECT(fa == far, "first_above n=%lld: %lld vs ref %lld", (long long)n, (long long)fa, (long long)far);
        /* exp_sum: each value within 4 ulp of exp of the float argument, the sum the exact one of those values in
         * 2^-36 units, and the same bits reversed */
        float top = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            x[i] = gauss() * 8.0f;
            if (i % 4 == 1) x[i] = -INFINITY;
            top = x[i] > top ? x[i] : top;
        }
        if (!(top > -INFINITY)) top = 0;
        memcpy(a, x, (size_t)n * sizeof *x);
        float sum = 0, sum2 = 0;
        CHECK(sp_testing_exp_sum(tier, a, n, top, &sum) == SP_OK);
        double exact = 0;
        for (int64_t i = 0; i < n; i++) {
            const double want = x[i] == -INFINITY ? 0.0 : exp((double)(x[i] - top));
            EXPECT(fabs(a[i] - want) <= 4 * 1.1920929e-7 * want || want < 1e-30, "exp_sum n=%lld: e[%lld] = %g, want %g",
                   (long long)n, (long long)i, a[i], want);
            exact += nearbyint((double)fminf(a[i], 1.0f) * 68719476736.0);
        }
        EXPECT(sum == (float)(exact / 68719476736.0), "exp_sum n=%lld: sum %g, want %g", (long long)n, sum,
               exact / 68719476736.0);
        for (int64_t i = 0; i < n; i++) b[i] = x[n - 1 - i];
        CHECK(sp_testing_exp_sum(tier, b, n, top, &sum2) == SP_OK);
        EXPECT(sum2 == sum, "exp_sum n=%lld: reversed, the sum differs", (long long)n);
        /* a NaN maximum: -inf slots still give exactly 0 (as ref), the others NaN, the sum NaN when there are any */
        memcpy(a, x, (size_t)n * sizeof *x);
        CHECK(sp_testing_exp_sum(tier, a, n, NAN, &sum) == SP_OK);
        bool live = false;
        for (int64_t i = 0; i < n; i++) {
            EXPECT(x[i] == -INFINITY ? a[i] == 0.0f : isnan(a[i]), "exp_sum n=%lld, NaN max: e[%lld] = %g", (long long)n,
                   (long long)i, a[i]);
            live |= x[i] != -INFINITY;
        }
        EXPECT(live ? isnan(sum) : sum == 0.0f, "exp_sum n=%lld, NaN max: sum %g", (long long)n, sum);
        if (n > 2) { /* a NaN score: NaN there and in the sum, the others as before */
            memcpy(a, x, (size_t)n * sizeof *x);
            a[n / 2] = NAN;
            CHECK(sp_testing_exp_sum(tier, a, n, top, &sum) == SP_OK);
            EXPECT(isnan(a[n / 2]) && isnan(sum), "exp_sum n=%lld: a NaN score gives e %g, sum %g", (long long)n,
                   a[n / 2], sum);
        }
        /* silu_mul with a vector and with a scalar factor */
        for (int64_t i = 0; i < n; i++) x[i] = gauss() * 6.0f, b[i] = gauss();
        memcpy(a, x, (size_t)n * sizeof *x);
        CHECK(sp_testing_silu_mul(tier, a, b, 1.0f, n) == SP_OK);
        for (int64_t i = 0; i < n; i++) {
            const double want = (double)x[i] / (1.0 + exp(-(double)x[i])) * b[i];
            EXPECT(fabs(a[i] - want) <= 8 * 1.1920929e-7 * fabs(want) + 1e-30, "silu_mul n=%lld: [%lld] %g, want %g",
                   (long long)n, (long long)i, a[i], want);
        }
        memcpy(a, x, (size_t)n * sizeof *x);
        CHECK(sp_testing_silu_mul(tier, a, NULL, 0.75f, n) == SP_OK);
        for (int64_t i = 0; i < n; i++) {
            const double want = (double)x[i] / (1.0 + exp(-(double)x[i])) * 0.75;
            EXPECT(fabs(a[i] - want) <= 8 * 1.1920929e-7 * fabs(want) + 1e-30, "silu_mul (scalar) n=%lld: [%lld] %g, "
                   "want %g", (long long)n, (long long)i, a[i], want);
        }
        free(x), free(a), free(b), free(ha), free(hb);
    }
}

int main(void) {
    const char *tiers[8];
    const int32_t nt = sp_testing_tiers(tiers, 8);
    printf("cpu features: %s; best tier: %s\n", sp_cpu_features(), sp_kernel_tier());
    for (int32_t i = 0; i < nt; i++) {
        const char *tier = tiers[i];
        const int before = g_failures;
        check_quantize(tier);
        check_matmul(tier);
        check_accum(tier);
        check_attention(tier);
        check_vectors(tier);
        printf("%s: %s\n", tier, g_failures == before ? "ok" : "FAILED");
    }
    return g_failures ? 1 : 0;
}
