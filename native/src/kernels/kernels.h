/* kernels.h: tensor types, packed quantization blocks and the kernel table.
 *
 * Shape legend: T = tokens (rows of activations), K = reduction length (row length of a weight), N = weight rows.
 *
 * Weights W[N, K] are stored row-major in one of the GGUF tensor types below, byte-compatible with GGUF/ggml.
 * Activations x[T, K] are float32. For quantized weight types the fast path first quantizes each activation row to
 * sp_block_q8a blocks (int8 with a float scale and the block's scaled sum) once per batch; every weight block is then
 * read once and applied to all T activation rows (weights stationary), which is what makes small batches cheap.
 *
 * Tiers: *_ref (portable C, the algorithmic reference, in <type>.c / ref.c), then x86/avx2.c, x86/avx512.c,
 * x86/amx.c (avx512 with AMX-INT8 packed matmuls), and arm/neon.c, arm/dotprod.c, arm/i8mm.c. sp_kernels_get() picks
 * the best tier for this CPU once; SPARROW_FORCE_SCALAR=1 forces "ref", SPARROW_KERNEL_TIER=<name> another tier.
 */
#ifndef SP_KERNELS_H
#define SP_KERNELS_H

#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Tensor types, numbered as ggml/GGUF number them. */
typedef enum sp_type {
    SP_TYPE_F32 = 0,
    SP_TYPE_F16 = 1,
    SP_TYPE_Q4_0 = 2,
    SP_TYPE_Q4_1 = 3,
    SP_TYPE_Q8_0 = 8,
    SP_TYPE_BF16 = 30,
    SP_TYPE_COUNT = 40, /* table size: ggml ids < 40; unsupported ids have block_size 0 */
} sp_type;

#define SP_QK 32 /* elements per block for Q4_0, Q4_1, Q8_0 and the activation blocks */

typedef uint16_t sp_f16;  /* IEEE half bits */

/* Slots per block of a kv head's key cache: a block of 16 slots of head dimension D is stored transposed, [D][16]
 * (d-major), so the attention scores of 16 slots are one vector operation per d (attn_scores_f16). */
#define SP_KBLK 16
typedef uint16_t sp_bf16; /* bfloat16 bits */

typedef struct {
    sp_f16 d;              /* scale */
    uint8_t qs[SP_QK / 2]; /* nibbles: element j in low nibble of qs[j], element j+16 in high nibble; x = (q-8)*d */
} sp_block_q4_0;
static_assert(sizeof(sp_block_q4_0) == 18, "q4_0 block must match GGUF");

typedef struct {
    sp_f16 d;              /* scale */
    sp_f16 m;              /* min */
    uint8_t qs[SP_QK / 2]; /* nibbles as in q4_0; x = q*d + m */
} sp_block_q4_1;
static_assert(sizeof(sp_block_q4_1) == 20, "q4_1 block must match GGUF");

typedef struct {
    sp_f16 d;          /* scale */
    int8_t qs[SP_QK];  /* x = q*d */
} sp_block_q8_0;
static_assert(sizeof(sp_block_q8_0) == 34, "q8_0 block must match GGUF");

/* Activation block (internal, not a file format): x ~= q*d, s = d * sum(q). */
typedef struct {
    float d;
    float s;
    int8_t qs[SP_QK];
} sp_block_q8a;
static_assert(sizeof(sp_block_q8a) == 40, "activation block layout");

typedef struct sp_type_traits {
    const char *name;     /* "Q4_1"; NULL for ids ggml never defined */
    int64_t block_size;   /* elements per block; 0 = unknown/removed id */
    size_t type_size;     /* bytes per block */
    bool supported;       /* this runtime can compute with it */
    bool act_q8;          /* matmul takes sp_block_q8a activations (else float) */
} sp_type_traits;

/* Traits of a ggml type id (any uint32); ids outside the table give a zeroed struct. */
sp_type_traits sp_type_traits_of(uint32_t type);
/* Bytes of one row of k elements (k must be a multiple of the block size). */
size_t sp_row_size(sp_type type, int64_t k);

/* y[t*ldy + r] = dot(W[r, :], x[t, :]) for t in [0, T), r in [r0, r1).
 *  w: W[N, K] in the weight type (row r starts at w + r*row_size(K)).
 *  x: T activation rows, each K floats (float types) or K/32 sp_block_q8a (act_q8 types), contiguous. */
typedef void (*sp_matmul_fn)(float *y, int64_t ldy, const void *w, const void *x, int64_t K,
                             int64_t r0, int64_t r1, int64_t T);

/* y[idx[t]*ldy + j] += sum_f c[t*ldc + f] * D[f, j] for t in [0, T), j in [0, H), f in [0, F) (kernels/accum.c).
 *  d: D[F, H] in the weight type (row f starts at d + f*row_size(H)): each row is read once for all T tokens.
 *  idx: [T] rows of y to accumulate into, or NULL for rows 0..T-1. */
typedef void (*sp_accum_fn)(float *y, int64_t ldy, const int32_t *idx, const float *c, int64_t ldc, const void *d,
                            int64_t F, int64_t H, int64_t T);

typedef struct sp_kernels {
    const char *tier;                            /* "ref", "avx2", "avx512", "amx", "neon", "dotprod", "i8mm" */
    void (*quantize_q8a)(sp_block_q8a *y, const float *x, int64_t k); /* one row, k % 32 == 0 */
    sp_matmul_fn matmul[SP_TYPE_COUNT];                 /* by weight type; NULL for unsupported */
    /* Optional load-time repacking of a weight W[N, K] into the tier's own layout (described at the top of its SIMD
     * file), so matmul_packed does no per-call transposition. packed_size == NULL or returning 0: this type/shape is
     * not packed. pack writes packed_size(N, K) bytes to dst (64-byte aligned). matmul_packed has matmul's semantics
     * with w = the packed bytes; r0 must be a multiple of pack_rows, r1 too unless r1 == N. */
    int pack_rows;                                      /* rows per packed row group (16 for avx512, 8 for avx2) */
    size_t (*packed_size[SP_TYPE_COUNT])(int64_t N, int64_t K);
    void (*pack[SP_TYPE_COUNT])(void *dst, const void *src, int64_t N, int64_t K);
    sp_matmul_fn matmul_packed[SP_TYPE_COUNT];
    sp_accum_fn accum[SP_TYPE_COUNT];                   /* by weight type; NULL for unsupported */
    /* Optional load-time repacking of an accumulated weight D[F, H] (a BlockFFN expert's down half) into the tier's
     * streaming layout (kernels/pack.c, "down" layout): groups of 16 rows, each a sequence of column blocks, so
     * accum_packed reads the weight strictly in order. packed_down_size(F, H) is the bytes of rows [0, F) and also
     * the offset of row F's group (F a multiple of 16); 0 = not packed. accum_packed has accum's semantics with
     * d = the packed bytes of a group-aligned row range. */
    size_t (*packed_down_size[SP_TYPE_COUNT])(int64_t F, int64_t H);
    void (*pack_down[SP_TYPE_COUNT])(void *dst, const void *src, int64_t F, int64_t H);
    sp_accum_fn accum_packed[SP_TYPE_COUNT];
    /* Optional int8 form of the same (x86/avx512.c, x86/avx2.c): pack_down_i8 writes packed_down_size(F, H) bytes in the "down
     * int8" layout (kernels/pack.c) and accum_packed_i8 has accum_packed's arguments, but it is not exact in float:
     * for each token t, 16-row group g and column block b the products a[f] = c[t, f] * d[f, b] (d the row's block
     * scale) are quantized to int8 with one scale s = max_f |a[f]| / 127 (q = nearest-even of a * (127 / max)), and
     * y[t, j] += float(sum_f q[f] * (w[f, j] - 8)) * s (w the weight's nibble, D = (w - 8) d), the sum exact in int32,
     * one fused multiply-add per group in order of g. Per token only its own c enters: a token's result does not depend on which tokens share the call.
     * Bound against accum (the ref tier), elementwise:
     *   |y - y_ref| <= sum_g max_f |a[f]| / 254 * sum_f |w[f, j] - 8|  +  1e-5 * (|y| + sum_f |c D|)
     * A group whose max |a| is below 2^-100 counts as 0 (at most 2^-93 more per column and group); a NaN or infinite
     * product makes its 32 columns NaN. */
    void (*pack_down_i8[SP_TYPE_COUNT])(void *dst, const void *src, int64_t F, int64_t H);
    sp_accum_fn accum_packed_i8[SP_TYPE_COUNT];
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    void (*axpy_f32)(float *y, float a, const float *x, int64_t n); /* y += a*x */
    /* Attention over n slots of the F16 cache for M queries at once (query m at q + m*ldq), so the cache is read
     * and converted once for every query that shares it (a kv head's query heads, a batch's tokens):
     *   attn_scores_f16: out[m*ldo + j] = scale * (q_m . k_j) for m < M, j < n, the keys k in the blocked layout
     *     (SP_KBLK below: element d of slot j at k[(j / 16) * 16 * D + d * 16 + j % 16]);
     *   attn_sum_f16: out[m*ldo + i] += sum_j p[m*ldp + j] * v_j[i] for m < M, i < D, the values in rows (v_j at
     *     v + j*ld), over the rows with p != 0.
     * Each score is one chain over d in order (SIMD tiers: s = fma(q[d], k[d], s) from 0; ref: s += q[d]*k[d]), each
     * output element one chain over j in order, rows with p == 0 skipped (they add nothing, even if they hold inf):
     * every element depends on its own operands only -- never on M, n, a split of D or its place in a tile -- so a
     * token's attention is bit-identical whether it is verified in a draft tree or decoded alone. */
    void (*attn_scores_f16)(const float *q, int64_t ldq, int64_t M, const sp_f16 *k, int64_t n, int64_t D,
                            float scale, float *out, int64_t ldo);
    void (*attn_sum_f16)(float *out, int64_t ldo, const float *p, int64_t ldp, int64_t M, const sp_f16 *v,
                         int64_t ld, int64_t n, int64_t D);
    void (*f32_to_f16)(sp_f16 *y, const float *x, int64_t n);
    void (*round_f16)(float *x, int64_t n); /* x[i] = sp_f16_round(x[i]) in place: the query at the cache's precision */
    /* The softmax's exponentials: x[j] = exp(x[j] - mx) for j < n (exactly 0 where x[j] is -inf: masked slots), and
     * their sum, computed exactly in fixed point (each term rounded to a multiple of 2^-36, then 64-bit integer adds: no
     * overflow for any n_ctx) and returned as a float: the sum does not depend on order or on exact zeros anywhere, so a token's attention is
     * bit-identical whether it is verified in a draft tree or decoded alone (greedy speculative decoding equals plain
     * greedy decoding), and it vectorizes. mx >= every x[j] (the row's maximum, so the terms are <= 1 and the sum >= 1
     * when it is among them; the rounding is then < n 2^-37 relative). NaN anywhere gives a NaN sum. The SIMD tiers'
     * exponentials are a polynomial within 4 ulp of exp. */
    float (*exp_sum)(float *x, int64_t n, float mx);
    /* SwiGLU's gate: x[i] = silu(x[i]) * (m ? m[i] : s), silu(z) = z / (1 + exp(-z)) (SIMD tiers: exp by the softmax
     * polynomial, within 8 ulp of the float64 value; +inf stays inf, NaN NaN, -inf gives
     * -inf or NaN). The dense FFN (m = up) and each expert's unit
     * (s = its router weight). */
    void (*silu_mul)(float *x, const float *m, float s, int64_t n);
    /* The index of the first x[i] > t (i < n), or n when there is none (NaN is never above). The top-k scan of
     * Token Recycling's candidate refresh (sampler.c, sp_top_k): once the k kept are large, it skips the rest. */
    int64_t (*first_above)(const float *x, int64_t n, float t);
    /* The largest x[i] (-inf for n = 0; unspecified when *bad), and *bad = true when some x[i] is NaN or +inf (else
     * left as it was): the sampler's one checked pass over the logits. */
    float (*max_f32)(const float *x, int64_t n, bool *bad);
} sp_kernels;

/* The kernel table for this CPU (chosen once, thread-safe). */
const sp_kernels *sp_kernels_get(void);
/* A named tier's table if this CPU can run it, else NULL ("ref" always exists). Entries a tier does not implement
 * are filled from "ref". */
const sp_kernels *sp_kernels_for_tier(const char *tier);
/* Space-separated CPU features detected ("avx2 fma f16c avx512f ..."). */
const char *sp_cpu_feature_string(void);

/* Conversions and reference (de)quantization, matching ggml/gguf-py bit for bit. */
float sp_f16_to_f32(sp_f16 h);
sp_f16 sp_f32_to_f16(float f);
float sp_bf16_to_f32(sp_bf16 h);
sp_bf16 sp_f32_to_bf16(float f);
/* Row conversions: k elements (multiple of the type's block size). Return false for unsupported types. */
bool sp_dequantize_row(sp_type type, const void *src, float *dst, int64_t k);
/* f rounded to the nearest F16 value (as a float). */
static inline float sp_f16_round(float f) { return sp_f16_to_f32(sp_f32_to_f16(f)); }
bool sp_quantize_row(sp_type type, const float *src, void *dst, int64_t k);

#endif
