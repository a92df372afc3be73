/* testing.h: hooks for tests and benchmarks, the only part of libsparrow that the binding's `testing` submodule calls
 * (testing.c). Internal and unstable: not in sparrow.h, not exported from the shared library. Functions only, over
 * the public opaque handles and plain arrays, so that the binding needs no internal struct.
 *
 * Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows, F = expert width, H = hidden,
 * E = experts, R = rows of an accumulated output, D = head dimension, ld = row stride of cached F16 rows.
 *
 * Conventions: every function that can fail returns a status with a message for sp_last_error(). Kernel hooks take a
 * tier by name ("ref", "avx2", "avx512", "amx", "neon"; one this CPU cannot run gives SP_ERR_UNSUPPORTED) and a weight type
 * as its ggml id; weights W[N, K] are raw rows of that type, w_size bytes (checked against N x K). Matmul hooks take
 * float activations x[T, K] and quantize them to the tier's activation blocks themselves when the type needs it.
 */
#ifndef SP_TESTING_H
#define SP_TESTING_H

#include "sparrow.h"

/* ---- kernel tiers, types, (de)quantization ---- */

/* names[0..n) = the tiers this CPU can run, "ref" first; returns n (at most capacity are written). */
int32_t sp_testing_tiers(const char **names, int32_t capacity);
/* Bytes of one row of k elements of `type`. */
sp_status sp_testing_row_size(uint32_t type, int64_t k, size_t *out);
/* out[row_size(type, k)] = x[k] quantized (reference conversion); k a multiple of the type's block size. */
sp_status sp_testing_quantize(uint32_t type, const float *x, int64_t k, void *out);
/* out[k] = data[size] dequantized; size must be row_size(type, k). */
sp_status sp_testing_dequantize(uint32_t type, const void *data, size_t size, int64_t k, float *out);
/* Bytes of one row of k floats as activation blocks (0 when k is not a multiple of 32). */
size_t sp_testing_q8a_size(int64_t k);
/* out[q8a_size(k)] = x[k] quantized to activation blocks by the tier's quantize_q8a. */
sp_status sp_testing_quantize_q8a(const char *tier, const float *x, int64_t k, void *out);

/* ---- matmul, accum, packing ---- */

/* y[T, N] = x[T, K] @ W[N, K]^T with the tier's matmul. */
sp_status sp_testing_matmul(const char *tier, uint32_t type, const void *w, size_t w_size, int64_t N, const float *x,
                            int64_t T, int64_t K, float *y);
/* y[R, H] (in place): y[idx[t]] += c[t, :F] @ D[F, H] with the tier's accum kernel; c has row stride ldc >= F; idx
 * [T] rows of y, each in [0, R), or NULL for rows 0..T-1 (then R >= T). D is raw rows of the type, d_size bytes. */
sp_status sp_testing_accum(const char *tier, uint32_t type, const void *d, size_t d_size, int64_t F, int64_t H,
                           const float *c, int64_t T, int64_t ldc, float *y, int64_t R, const int32_t *idx);
/* sp_testing_accum over rows [f0, f1) of D (f1 < 0: F; f0 a multiple of 16) with D repacked into the tier's "down"
 * layout and its accum_packed kernel, or (i8) the "down int8" layout and accum_packed_i8 (SP_ERR_UNSUPPORTED where the
 * tier has none for the type). */
sp_status sp_testing_accum_packed(const char *tier, uint32_t type, const void *d, size_t d_size, int64_t F, int64_t H,
                                  const float *c, int64_t T, int64_t ldc, float *y, int64_t R, const int32_t *idx,
                                  int64_t f0, int64_t f1, bool i8);
/* Rows per packed row group of the tier (kernels.h: pack_rows). */
sp_status sp_testing_pack_rows(const char *tier, int32_t *out);
/* Bytes of W[N, K] in the tier's packed layout; 0 when the tier does not pack this type/shape. */
sp_status sp_testing_packed_size(const char *tier, uint32_t type, int64_t N, int64_t K, size_t *out);
/* out[packed_size] = W[N, K] packed in the tier's layout (SP_ERR_UNSUPPORTED when it does not pack). */
sp_status sp_testing_pack(const char *tier, uint32_t type, const void *w, size_t w_size, int64_t N, int64_t K,
                          void *out);
/* y[T, N] from the packed copy of W: rows [r0, r1) computed (r1 < 0: N), the others 0. r0 must be a multiple of
 * pack_rows, r1 too unless it is N. */
sp_status sp_testing_matmul_packed(const char *tier, uint32_t type, const void *w, size_t w_size, int64_t N,
                                   const float *x, int64_t T, int64_t K, int64_t r0, int64_t r1, float *y);
/* Benchmark hook: seconds[reps] of single-threaded matmul calls (packed: on the packed copy of W), activations
 * quantized once, untimed. The weight bytes are spread over `copies` page-aligned copies, one per call in turn, so
 * that with enough copies they come from DRAM as in a forward pass; one untimed warm-up call per copy. */
sp_status sp_testing_matmul_time(const char *tier, uint32_t type, bool packed, const void *w, size_t w_size,
                                 int64_t N, const float *x, int64_t T, int64_t K, int32_t copies, int32_t reps,
                                 double *seconds);

/* Benchmark hook: seconds[reps] of single-threaded attention for one kv head as the forward pass runs it: T tokens of
 * G query heads each (M = G T queries, head dimension D) after n cached slots, causal: the scores of all M queries
 * in one call, each row's softmax, each token's weighted sum of its visible rows. Random F16 keys and values. */
sp_status sp_testing_attn_time(const char *tier, int64_t G, int64_t T, int64_t n, int64_t D, int32_t reps,
                               double *seconds);

/* ---- vector kernels of the F16 KV cache (b, x, rows, y of f32_to_f16: F16 bits) ---- */

sp_status sp_testing_dot_f32(const char *tier, const float *a, const float *b, int64_t n, float *out);
/* out[M, n] = q[M, D] . rows[j, :D] * scale with rows [n, D] given row by row: the hook lays them out as the key
 * cache does (blocks of SP_KBLK slots, transposed), the padding of the last block NaN (it must not reach out). */
sp_status sp_testing_attn_scores_f16(const char *tier, const float *q, int64_t M, int64_t D, const uint16_t *rows,
                                     int64_t n, float scale, float *out);
/* out[M, D] += sum_j p[m, j] rows[j, :D], p [M, n], rows [n, ld] */
sp_status sp_testing_attn_sum_f16(const char *tier, float *out, int64_t M, int64_t D, const float *p,
                                  const uint16_t *rows, int64_t ld, int64_t n);
/* y[n] = x[n] rounded to F16 */
sp_status sp_testing_f32_to_f16(const char *tier, uint16_t *y, const float *x, int64_t n);
/* x[i] = silu(x[i]) * (m ? m[i] : s) with the tier's kernel. */
sp_status sp_testing_silu_mul(const char *tier, float *x, const float *m, float s, int64_t n);
/* x[j] = exp(x[j] - mx) in place with the tier's softmax kernel; *sum their sum. */
sp_status sp_testing_exp_sum(const char *tier, float *x, int64_t n, float mx, float *sum);
/* *out = the index of the first x[i] > t, or n (the tier's first_above). */
sp_status sp_testing_first_above(const char *tier, const float *x, int64_t n, float t, int64_t *out);
/* x[i] = x[i] rounded to F16 in place (the tier's round_f16). */
sp_status sp_testing_round_f16(const char *tier, float *x, int64_t n);
/* *mx = the largest x[i], *bad = whether some x[i] is NaN or +inf (the tier's max_f32). */
sp_status sp_testing_max_f32(const char *tier, const float *x, int64_t n, float *mx, bool *bad);

/* ---- one BlockFFN layer's FFN block alone (ffn_blockffn.c: sp_ffn_blockffn_run) ---- */

/* E of the session's model: 0 for a model without sparse experts. */
int32_t sp_testing_n_expert(const sp_session *ses);
/* out[T, H] (may be NULL) = layer il's FFN block on xn[T, xn_cols] (xn_cols must be H) in `mode`, before the
 * residual scale, with router scores r[T, r_cols] used as given (NULL: computed from xn; else r_cols must be E).
 * Updates the sparsity counters like a forward pass. */
sp_status sp_testing_ffn_run(sp_session *ses, int32_t il, const float *xn, int64_t xn_cols, const float *r,
                             int64_t r_cols, int32_t T, sp_ffn_mode mode, float *out);
/* Benchmark hook: seconds[reps] per FFN call on layers[(i mod n_layers)] with fixed xn and r (so that, with enough
 * layers, expert weights come from DRAM as in a forward pass), after one warm-up pass over all layers. */
sp_status sp_testing_ffn_time(sp_session *ses, const int32_t *layers, int32_t n_layers, const float *xn,
                              int64_t xn_cols, const float *r, int64_t r_cols, int32_t T, sp_ffn_mode mode,
                              int32_t reps, double *seconds);

/* ---- synthetic routing (routing_synth.c) ---- */

/* The effective setting: A of E experts per position, U of E per any k consecutive positions, exact TLS / CLS-k. */
typedef struct sp_testing_synth_info {
    bool on;
    int32_t n_expert; /* E */
    int32_t n_active; /* A */
    int32_t n_union;  /* U */
    int32_t k;
    uint64_t seed;
    double tls;       /* 1 - A/E */
    double cls;       /* 1 - U/E */
} sp_testing_synth_info;

/* Every BlockFFN layer's router scores replaced by the pattern of this TLS and CLS-k (see forward.h). Bad arguments:
 * a status and message, the setting unchanged. */
sp_status sp_testing_set_synthetic_routing(sp_session *ses, double tls, double cls, int32_t k, uint64_t seed);
/* Off: the router's own scores again. */
sp_status sp_testing_clear_synthetic_routing(sp_session *ses);
/* *out = the current setting (out->on false when off). */
sp_status sp_testing_synthetic_routing(const sp_session *ses, sp_testing_synth_info *out);
/* out[T, E] = the synthetic scores of layer il at positions[T] (what a pass uses for tokens at those positions). */
sp_status sp_testing_synthetic_scores(const sp_session *ses, int32_t il, const int64_t *positions, int64_t T,
                                      float *out);
/* out[n_tokens, E] = the router scores the last BlockFFN layer used in the most recent pass (session scratch). */
sp_status sp_testing_last_router_scores(const sp_session *ses, int32_t n_tokens, float *out);

/* Benchmarks of long contexts without a prefill: n_past = n, and the first n slots of every layer's KV cache filled
 * with deterministic pseudo-random F16 values in [-0.5, 0.5) (attention then spreads over all of them). n must be in
 * 0..n_ctx. The cache holds no real tokens afterwards: only the time of later passes means anything. */
sp_status sp_testing_fill_cache(sp_session *ses, int32_t n, uint64_t seed);

/* ---- sampler (sampler.c: sp_sampler_probs) ---- */

/* probs[V] = the distribution sp_sampler_sample() would draw from for logits[V]; draws nothing. */
sp_status sp_testing_sampler_probs(sp_sampler *sampler, const float *logits, float *probs);

/* ---- GGUF validator and the tokenizer straight from a file (gguf.c, vocab.c) ---- */

/* Open and validate a GGUF file (mapped or read) or an image in memory, then close it: the status (and message). */
sp_status sp_testing_gguf_validate(const char *path, bool use_mmap);
sp_status sp_testing_gguf_validate_memory(const void *data, size_t size);
/* Validate a GGUF image in memory and load its vocabulary: the status (and message), for bad-metadata tests. */
sp_status sp_testing_vocab_validate_memory(const void *data, size_t size);

/* A GGUF file's vocabulary with no model load (the file stays mapped while it lives). The functions below have the
 * contracts of vocab.h's (sp_tokenize / sp_token_to_piece in sparrow.h for the two with a capacity). */
typedef struct sp_testing_vocab sp_testing_vocab;
sp_status sp_testing_vocab_open(const char *path, sp_testing_vocab **out);
void sp_testing_vocab_close(sp_testing_vocab *v); /* NULL is allowed */
sp_status sp_testing_vocab_tokenize(const sp_testing_vocab *v, const char *text, size_t len, bool add_special,
                                    bool parse_special, int32_t *tokens, size_t capacity, size_t *n_out);
sp_status sp_testing_vocab_token_to_piece(const sp_testing_vocab *v, int32_t token, bool render_special, char *buf,
                                          size_t capacity, size_t *len);
int32_t sp_testing_vocab_n_tokens(const sp_testing_vocab *v);
int32_t sp_testing_vocab_bos(const sp_testing_vocab *v); /* -1 if none */
int32_t sp_testing_vocab_eos(const sp_testing_vocab *v);
int32_t sp_testing_vocab_eot(const sp_testing_vocab *v);
bool sp_testing_vocab_add_bos(const sp_testing_vocab *v);
bool sp_testing_vocab_is_eog(const sp_testing_vocab *v, int32_t token);

/* ---- the Vulkan backend's shaders, one at a time (vulkan/vk_testing.c; SP_ERR_UNSUPPORTED without the backend) ---- */

/* Run the compute pipeline `pipe` ("matmul_q4_0", "rmsnorm", ... : vulkan/vk.h's sp_vk_pipe names) on GPU device
 * `device` once: bufs[i] (bytes[i] each, i < n_bufs <= 5) are copied into device buffers whose addresses fill the push
 * constants a[i]; u[12] and f[4] the rest (shaders/common.glsl); groups[3] workgroups are dispatched; then every
 * buffer is copied back into bufs[i]. Weights go in the GPU layout (sp_testing_vk_layout). */
sp_status sp_testing_vk_run(int32_t device, const char *pipe, void *const *bufs, const size_t *bytes, int32_t n_bufs,
                            const uint32_t *u, const float *f, const uint32_t *groups);
/* W[N, K] of `type` (raw GGUF rows, w_size bytes) in the GPU layout: out[*n_words] (NULL: only sizes), the word
 * offsets of its scales and minimums. */
sp_status sp_testing_vk_layout(uint32_t type, const void *w, size_t w_size, int64_t N, int64_t K, uint32_t *out,
                               size_t *n_words, uint32_t *d_off, uint32_t *m_off);
/* The matmul rows per workgroup on a device (one per subgroup). */
sp_status sp_testing_vk_rows_per_group(int32_t device, uint32_t *out);

#endif
