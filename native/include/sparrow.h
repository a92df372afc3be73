/*
 * sparrow.h: the public C API of libsparrow, an on-device runtime for sparse mixture-of-experts language models.
 *
 * Shape legend used in comments: T = tokens in a batch/chunk, V = vocabulary size, H = hidden size.
 *
 * Conventions
 *  - Every function that can fail returns sp_status; on failure sp_last_error() (thread-local) says why.
 *  - The library never aborts or exits on bad input.
 *  - sp_model is immutable after loading (weights are mmap'd) and may be shared by many sessions and threads.
 *  - sp_session holds the per-user state: KV cache, scratch buffers and thread pool. One thread at a time per session:
 *    sp_eval, sp_session_truncate and sp_session_keep called while another thread is inside one of them on the same
 *    session fail with SP_ERR_INVALID_ARG ("in use by another thread") instead of racing. Freeing a model or session
 *    while another thread still uses it is the host's to prevent (the Python binding does).
 *  - Params structs are passed by value; get defaults from sp_*_default_params() and change what you need.
 */
#ifndef SPARROW_H
#define SPARROW_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPARROW_VERSION_MAJOR 0
#define SPARROW_VERSION_MINOR 1
#define SPARROW_VERSION_PATCH 0
#define SPARROW_VERSION_STRING "0.1.0"

#if defined(_WIN32)
#  define SP_API __declspec(dllexport)
#else
#  define SP_API __attribute__((visibility("default")))
#endif

typedef enum sp_status {
    SP_OK = 0,
    SP_ERR_INVALID_ARG = 1,   /* a bad argument from the caller (NULL, out of range, wrong size) */
    SP_ERR_IO = 2,            /* the file could not be opened, mapped or read */
    SP_ERR_BAD_FORMAT = 3,    /* the file is not a valid GGUF, or its contents are inconsistent */
    SP_ERR_UNSUPPORTED = 4,   /* valid, but uses an architecture, tensor type or feature not implemented */
    SP_ERR_NO_MEMORY = 5,     /* an allocation failed */
    SP_ERR_CONTEXT_FULL = 6,  /* the KV cache has no room for the requested positions */
    SP_ERR_INTERNAL = 7,
} sp_status;

typedef struct sp_model sp_model;     /* immutable weights + vocabulary, shareable */
typedef struct sp_session sp_session; /* KV cache + scratch + threads for one conversation */

/* ---- library ---- */
SP_API const char *sp_version(void);                 /* "MAJOR.MINOR.PATCH" */
SP_API const char *sp_last_error(void);              /* message of the last failure on this thread, "" if none */
SP_API const char *sp_status_string(sp_status s);    /* "SP_ERR_BAD_FORMAT" etc. */
SP_API const char *sp_cpu_features(void);            /* e.g. "avx2 fma f16c avx512f avx512bw avx512vnni" */
/* the tier chosen at run time: "ref", "avx2", "avx512", "amx", "neon", "dotprod" or "i8mm" (SPARROW_KERNEL_TIER=NAME
 * forces one this CPU runs; SPARROW_FORCE_SCALAR=1 forces "ref") */
SP_API const char *sp_kernel_tier(void);

/* ---- model ---- */
typedef struct sp_model_params {
    bool use_mmap;     /* map the file (default true); false reads it into memory */
    bool vocab_only;   /* load only metadata + tokenizer, no weights (default false) */
    bool repack;       /* default true: copy the quantized matmul weights (attention, dense FFN, LM head) once at load
                          into the kernel tier's interleaved layout, which its matmuls read faster; the file pages of
                          the copied tensors are then released, so memory use stays about the same. Same results
                          either way (bit-identical); false keeps every weight as a view into the file. */
} sp_model_params;

SP_API sp_model_params sp_model_default_params(void);
/* The GGUF architectures (general.architecture) sp_model_load implements: a NULL-terminated list of static strings,
 * e.g. {"llama", "blockffn", NULL}. Loading the weights of another architecture fails with SP_ERR_UNSUPPORTED
 * (a vocab_only load reads any). Hosts route other architectures elsewhere by this list. */
SP_API const char *const *sp_supported_architectures(void);
/* path must name a regular file (a FIFO, device or directory fails with SP_ERR_IO, without blocking or reading). */
SP_API sp_status sp_model_load(const char *path, sp_model_params params, sp_model **out);
SP_API void sp_model_free(sp_model *model);          /* NULL is allowed; frees nothing a session still uses: free sessions first */

typedef struct sp_model_info {
    const char *architecture; /* "llama", "blockffn", ... */
    const char *name;         /* general.name or "" */
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;           /* H */
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_ff;
    int32_t bos_token;        /* -1 if none */
    int32_t eos_token;        /* -1 if none */
    int32_t eot_token;        /* end of turn (e.g. <|im_end|>), -1 if none */
    bool add_bos;             /* whether tokenization should prepend BOS by default */
    uint64_t n_params;
    uint64_t weight_bytes;    /* bytes of all tensor data */
} sp_model_info;

SP_API sp_status sp_model_get_info(const sp_model *model, sp_model_info *out);
/* A metadata string value (e.g. "tokenizer.chat_template"); *out points into the model, valid while it lives. */
SP_API sp_status sp_model_meta_str(const sp_model *model, const char *key, const char **out, size_t *len);

/* ---- tokenizer ---- */
/* Tokenize len bytes of UTF-8 text into tokens[0..capacity). *n_out receives the number of tokens; when it exceeds
 * capacity, SP_ERR_INVALID_ARG is returned, nothing beyond capacity is written, and *n_out tells the size needed.
 * add_special prepends BOS when the vocabulary asks for it; parse_special turns special-token text ("<|im_start|>")
 * into its single id instead of tokenizing the characters. */
SP_API sp_status sp_tokenize(const sp_model *model, const char *text, size_t len, bool add_special, bool parse_special,
                             int32_t *tokens, size_t capacity, size_t *n_out);
/* Bytes of one token's text (raw bytes, may be a partial UTF-8 sequence). Special/control tokens give their text only
 * when render_special is true, otherwise "". *len receives the length needed; nothing is written past capacity. */
SP_API sp_status sp_token_to_piece(const sp_model *model, int32_t token, bool render_special, char *buf,
                                   size_t capacity, size_t *len);
SP_API bool sp_token_is_eog(const sp_model *model, int32_t token); /* end of generation: eos, eot, ... */

/* ---- session ---- */
/* How a sparse-expert (BlockFFN) FFN runs a batch of T tokens. All give the same outputs up to float summation
 * order; they differ in the expert weights they read. Ignored by dense models. The Python binding exports this enum
 * (_sparrow.FfnMode); runtime.native names its values "auto", "dense", "token", "chunk". */
typedef enum sp_ffn_mode {
    SP_FFN_AUTO = 0,          /* the fastest for the batch (currently SP_FFN_SPARSE_CHUNK) */
    SP_FFN_DENSE = 1,         /* every expert for every token, inactive ones multiplied by their zero score (baseline) */
    SP_FFN_SPARSE_TOKEN = 2,  /* per token, only that token's active experts (an expert used by k tokens is read k times) */
    SP_FFN_SPARSE_CHUNK = 3,  /* the union of the batch's active experts, each read once and applied to exactly the
                                 tokens that use it */
} sp_ffn_mode;

/* Element type of the KV cache. F16 (the default, as llama.cpp's) halves its memory and the bytes attention reads;
 * F32 keeps what the model computed unrounded (twice the memory), for checking against float references. F32 is
 * implemented for multi-head latent attention; a grouped-query model refuses it (SP_ERR_UNSUPPORTED). */
typedef enum sp_kv_type { SP_KV_F16 = 0, SP_KV_F32 = 1 } sp_kv_type;

typedef struct sp_session_params {
    int32_t n_ctx;      /* KV cache capacity in tokens (default 2048; 0 = model's training context) */
    int32_t n_batch;    /* max tokens per sp_eval call (default 64) */
    int32_t n_threads;  /* worker threads incl. the caller (default: physical cores) */
    sp_ffn_mode ffn_mode; /* sparse-expert FFN execution (default SP_FFN_AUTO) */
    sp_kv_type kv_type;   /* KV cache element type (default SP_KV_F16) */
    int32_t n_seq;        /* independent sequences, each with its own n_ctx cache slots (default 1; 1..256). Their
                             tokens share one forward pass (sp_batch.seq): the weights are read once for all of them. */
    int32_t device;       /* where the forward passes run: 0 the CPU (default); k = 1..sp_device_count() GPU device k
                             (Vulkan; see "devices" below): the model's weights go to the device once, the KV cache
                             lives there, and each sp_eval is one submission. Device sessions take n_seq 1 and an
                             F16 cache (else SP_ERR_UNSUPPORTED); n_threads and ffn_mode do not apply. */
} sp_session_params;

SP_API sp_session_params sp_session_default_params(void);
SP_API sp_status sp_session_new(const sp_model *model, sp_session_params params, sp_session **out);
SP_API void sp_session_free(sp_session *session);

/* The memory a session allocates: its KV cache (F16 keys and values: 2 x layers x n_ctx x kv heads x head_dim x 2
 * bytes; multi-head latent attention caches only the latent and the rope key: layers x n_ctx x (kv_lora_rank +
 * qk_rope_head_dim) x 2 bytes, x 4 bytes with SP_KV_F32), scratch for n_batch tokens and n_threads threads, statistics, and the session record. Not counted: the
 * thread pool's bookkeeping (a few hundred bytes) and its workers' stacks (reserved by the OS, barely touched). */
typedef struct sp_session_memory {
    int32_t n_ctx;          /* KV cache capacity in tokens (an n_ctx of 0 resolved to the model's training context) */
    size_t kv_cache_bytes;  /* the KV cache */
    size_t total_bytes;     /* everything: KV cache, scratch, statistics, the session record */
} sp_session_memory;

/* A device session (sp_session_params.device > 0) keeps its KV cache on the GPU: kv_cache_bytes is that cache
 * (F16 keys and values), total_bytes what the host allocates (scratch, statistics; not the cache). */
/* What sp_session_new(model, params) would allocate, without allocating it: the same sizing code, so it is exact.
 * Fails like sp_session_new on bad params or a vocab_only model. The model's weights are not included. */
SP_API sp_status sp_session_memory_estimate(const sp_model *model, sp_session_params params, sp_session_memory *out);
/* What this session allocated when it was created (equal to the estimate for its params). */
SP_API sp_status sp_session_get_memory(const sp_session *session, sp_session_memory *out);

/* A batch of T tokens evaluated in one forward pass.
 *  tokens[T], pos[T]: token ids and their positions. Their KV entries go to cache slots n_past .. n_past+T-1 in order.
 *  mask: NULL for the usual causal mask (token i sees every cached slot and batch tokens 0..i).
 *        Otherwise a [T, T] row-major byte matrix: mask[i*T + j] != 0 means token i may attend to batch token j
 *        (a tree mask for speculative verification); token i always sees all slots cached before the batch.
 *  logits: NULL, or [T, V] floats to fill (all T rows), or when logits_last_only only the last token's row [V].
 *  seq: NULL (every token belongs to sequence 0), or [T] sequence ids < n_seq. A sequence's tokens are one
 *       contiguous run of the batch (each sequence at most once); everything above then holds per run: its tokens go
 *       to that sequence's slots after its own n_past, default positions count from it, and a token attends only to
 *       its sequence's cached slots and the batch tokens of its own run (the mask's entries between runs are
 *       ignored). Tokens of different sequences never see each other. logits_last_only then fills [R, V]: the last
 *       token of each of the batch's R runs, in batch order. */
typedef struct sp_batch {
    const int32_t *tokens;  /* [T] */
    const int32_t *pos;     /* [T]; NULL = n_past, n_past+1, ... */
    const uint8_t *mask;    /* [T, T] or NULL */
    int32_t n_tokens;       /* T, 1 .. n_batch */
    float *logits;          /* [T, V] or [V] or NULL */
    bool logits_last_only;
    const int32_t *seq;     /* [T] or NULL (all sequence 0) */
} sp_batch;

SP_API sp_status sp_eval(sp_session *session, const sp_batch *batch);
SP_API int32_t sp_session_n_past(const sp_session *session);   /* tokens in the KV cache */
SP_API int32_t sp_session_n_ctx(const sp_session *session);
/* Keep only the first n tokens of the KV cache (rollback). n > n_past is an error. */
SP_API sp_status sp_session_truncate(sp_session *session, int32_t n);
/* Keep cache slots idx[0..n) (strictly increasing, each < n_past) in that order as slots 0..n, dropping the rest:
 * the accepted path of a verified draft tree. */
SP_API sp_status sp_session_keep(sp_session *session, const int32_t *idx, int32_t n);
/* The same for sequence seq of a multi-sequence session (sp_session_params.n_seq); the calls above are seq 0's.
 * sp_session_seq_n_past gives -1 for a seq out of range; truncating to 0 frees the sequence for a new one. */
SP_API int32_t sp_session_seq_n_past(const sp_session *session, int32_t seq);
SP_API sp_status sp_session_seq_truncate(sp_session *session, int32_t seq, int32_t n);
SP_API sp_status sp_session_seq_keep(sp_session *session, int32_t seq, const int32_t *idx, int32_t n);

/* ---- sparsity statistics (models with sparse experts) ---- */
#define SP_CLS_MAX 16
/* Counted over the tokens evaluated since the session was created or sp_session_reset_sparsity(), in evaluation
 * order across sp_eval calls (rolled-back tokens included: they were computed). */
typedef struct sp_sparsity_stats {
    int32_t n_expert;              /* E; 0 for a model without sparse experts (then nothing else is set) */
    int64_t n_tokens;              /* tokens evaluated */
    double tls;                    /* token-level sparsity: fraction of (token, expert) pairs with score 0 */
    double cls[SP_CLS_MAX + 1];    /* cls[k], k = 2..16: chunk-level sparsity, the fraction of (chunk, expert) pairs
                                      where the expert is off for all k tokens of the chunk; chunks are consecutive,
                                      non-overlapping runs of k evaluated tokens; NaN before the first full chunk.
                                      cls[1] = tls, cls[0] unused (0) */
    double expert_bytes_per_token; /* expert weight bytes read per evaluated token (depends on sp_ffn_mode and T) */
    double dense_bytes_per_token;  /* bytes per token if every expert were read for every token */
} sp_sparsity_stats;

/* layer in [0, n_layer) for one layer's statistics, -1 for all layers together (pairs and bytes summed). */
SP_API sp_status sp_session_get_sparsity(const sp_session *session, int32_t layer, sp_sparsity_stats *out);
SP_API void sp_session_reset_sparsity(sp_session *session);

/* ---- where sp_eval's time goes ----
 * Wall time of each phase of the forward pass, summed over sp_eval calls since the session was created or
 * sp_session_reset_timings(). Phases end at the barriers where all threads meet, so the parts add up to the pass. */
typedef struct sp_timings {
    int64_t n_evals;       /* sp_eval calls that ran a forward pass */
    int64_t n_tokens;      /* tokens they evaluated */
    double embed_s;        /* token embeddings and RoPE tables */
    double attention_s;    /* norms, q/k/v/o projections, RoPE, KV cache writes, attention, residual */
    double ffn_s;          /* FFN blocks (BlockFFN: router, expert selection, experts) */
    double head_s;         /* final norm and LM head (only rows whose logits were asked for) */
    /* BlockFFN layers' part of ffn_s by phase (thread 0's clock, each phase ending at a barrier but the two shares) */
    double ffn_router_s;   /* router matmul */
    double ffn_plan_s;     /* scores -> task list, sparsity counters (thread 0 alone) */
    double ffn_experts_s;  /* the expert units, until the last thread is done; of it, thread 0's own time in: */
    double ffn_up_s;       /*   the up matmuls and r * silu */
    double ffn_down_s;     /*   accumulating the down halves */
    double ffn_reduce_s;   /* summing the threads' partial outputs */
} sp_timings;
SP_API sp_status sp_session_get_timings(const sp_session *session, sp_timings *out);
SP_API void sp_session_reset_timings(sp_session *session);

/* ---- devices (GPUs through Vulkan) ----
 * A build with the Vulkan backend (CMake SPARROW_VULKAN, on where glslc and the Vulkan headers are found) loads the
 * Vulkan loader (libvulkan.so.1) at run time, when first asked: a build with it still runs, CPU only, where no
 * loader or no device exists. Devices are the Vulkan 1.2 devices with buffer device addresses and a compute queue,
 * numbered from 1 in the loader's order (0 is the CPU in sp_session_params.device). SPARROW_VULKAN_VALIDATION=1
 * turns the Khronos validation layer on (it must be installed) and counts what it reports. */
typedef struct sp_device_info {
    char name[256];          /* e.g. "llvmpipe (LLVM 15.0.6, 256 bits)", "Adreno (TM) 740" */
    char kind[16];           /* "integrated", "discrete", "virtual", "cpu" (a software device such as lavapipe), "other" */
    char api[16];            /* "vulkan" */
    char api_version[16];    /* the device's Vulkan version, "1.3.230" */
    char driver[64];         /* the driver's name, e.g. "llvmpipe" */
    uint64_t memory_bytes;   /* its largest device-local memory heap */
} sp_device_info;
/* Usable GPU devices (0 without the Vulkan backend, loader or device; sp_last_error() then says which). */
SP_API int32_t sp_device_count(void);
SP_API sp_status sp_device_get_info(int32_t device, sp_device_info *out); /* device 1..sp_device_count() */
SP_API bool sp_device_backend_built(void);   /* whether this build has the Vulkan backend */
/* Messages of severity error (and, in *warnings, warning) the validation layer reported since the process started;
 * 0 unless SPARROW_VULKAN_VALIDATION=1. The last one is copied into msg (capacity bytes, NUL-terminated) when given. */
SP_API int64_t sp_device_validation_errors(int64_t *warnings, char *msg, size_t capacity);

/* ---- sampler ---- */
/* The defaults below are sp_sampler_default_params()'s; the Python binding reports them (sampler_default_params) and
 * runtime.SamplerParams takes its defaults from there. */
typedef struct sp_sampler_params {
    float temperature;        /* <= 0: greedy (default 0.8) */
    int32_t top_k;            /* <= 0: off (default 40) */
    float top_p;              /* in (0, 1]; 1: off (default 0.95) */
    float min_p;              /* in [0, 1); 0: off (default 0.05) */
    float repeat_penalty;     /* 1: off (default 1.0) */
    int32_t repeat_last_n;    /* how many recent tokens the penalty looks at (default 64) */
    uint64_t seed;            /* default 0xC0FFEE */
} sp_sampler_params;

typedef struct sp_sampler sp_sampler;
SP_API sp_sampler_params sp_sampler_default_params(void);
SP_API sp_status sp_sampler_new(sp_sampler_params params, int32_t n_vocab, sp_sampler **out);
SP_API void sp_sampler_free(sp_sampler *sampler);
/* Choose a token from logits[V]; the logits are not modified. */
SP_API sp_status sp_sampler_sample(sp_sampler *sampler, const float *logits, int32_t *token_out);
/* The distribution sp_sampler_sample draws from for these logits: its n_out tokens of non-zero probability, as ids
 * and probabilities (summing to 1, in no particular order). cap: room in ids and probs (n_vocab always suffices).
 * Speculative sampling checks draft tokens against this without touching the other V - n_out tokens. */
SP_API sp_status sp_sampler_candidates(sp_sampler *sampler, const float *logits, int32_t cap, int32_t *ids,
                                       float *probs, int32_t *n_out);
/* Tell the sampler a token was added to the context (feeds the repetition penalty). */
SP_API void sp_sampler_accept(sp_sampler *sampler, int32_t token);
SP_API void sp_sampler_reset(sp_sampler *sampler);  /* forget history, reseed */

/* The indices of the k largest of x[0..n), largest first; equal values: the lower index first (NaNs give valid
 * indices in an unspecified order). 1 <= k <= min(n, SP_TOP_K_MAX). No allocation: cheap enough for every row of a
 * verification pass's logits (Token Recycling refreshes its candidate lists this way). */
#define SP_TOP_K_MAX 256
SP_API sp_status sp_top_k(const float *x, int32_t n, int32_t k, int32_t *idx_out);

/* ---- generator: the decode loop, with speculative decoding, inside the library ----
 * A generator runs generation over one session: prompt tokens in (sp_generator_start), tokens out, pulled one at a
 * time (sp_generate_next) or pushed to a callback that may stop it (sp_generate). It owns a sampler and, optionally, a
 * drafter; with a drafter each step verifies the drafted tokens (a chain, or a tree: ancestor mask and depth
 * positions) in one sp_eval and keeps only the accepted path in the KV cache (sp_session_truncate / sp_session_keep).
 * Greedy output is exactly plain greedy decoding's (sp_sampler_sample after each single-token sp_eval); sampled output
 * has exactly the sampler's distribution (speculative sampling by recursive rejection: at a node, each drafted child
 * token c is accepted with its probability under the sampler's distribution, with the repetition history of the path
 * so far, renormalised over what earlier rejected siblings left; when none is, the token is drawn from the rest).
 * Without a drafter and with the same seed, the tokens are exactly plain sampling's.
 * The generator allocates everything at creation; a step allocates nothing. It owns the session's KV cache while it
 * generates (and the draft session's, for a draft model): a call that finds the cache changed by someone else fails
 * (start again). One thread at a time per generator (a second is refused with SP_ERR_INVALID_ARG, "in use by another
 * thread"). Free it before its sessions. */
typedef enum sp_drafter_kind {
    SP_DRAFTER_NONE = 0,           /* plain decoding: one token per forward pass */
    SP_DRAFTER_PROMPT_LOOKUP = 1,  /* the continuation of the latest earlier occurrence of the context's last n tokens,
                                      n from ngram down to min_ngram, up to draft_k tokens (a chain) */
    SP_DRAFTER_RECYCLING = 2,      /* Token Recycling (Luo et al. 2024): for each token the recycling_k tokens the model
                                      ranked highest after it when last verified (an adjacency matrix [V, recycling_k],
                                      learned from every verified row, kept across generations, saved and loaded with
                                      sp_generator_save_drafter / _load_drafter); the draft tree grows breadth-first
                                      from the last token, a node at depth d getting branching[d] children (the last
                                      entry repeats), up to max_nodes nodes */
    SP_DRAFTER_HYBRID = 3,         /* prompt lookup's chain (draft_k tokens) first, then the recycling tree merged into
                                      it where both propose the same token under the same parent */
    SP_DRAFTER_DRAFT_MODEL = 4,    /* draft_session's model (same vocabulary) drafts a chain of draft_k tokens, each
                                      its own argmax; its session follows the context (only unseen tokens evaluated) */
    SP_DRAFTER_ADAPTIVE = 5,       /* the hybrid, its tree pruned each step by the planner, behind a gate that drafts
                                      only where drafting has measured faster than plain decoding on this device and
                                      runs plain decoding steps elsewhere (probing again now and then): speculation
                                      that never makes decoding slower. Token Recycling also learns from plain steps
                                      (every learn_every-th, and every one whose token it has no candidates for). */
} sp_drafter_kind;

#define SP_GEN_MAX_STOP 8        /* stop strings per generator */
#define SP_GEN_MAX_STOP_LEN 64   /* bytes per stop string */
#define SP_GEN_MAX_DEPTH 16      /* entries of branching[] */
#define SP_GEN_MAX_RECYCLING_K 32

typedef struct sp_generator_params {
    sp_sampler_params sampler;   /* default sp_sampler_default_params(); temperature <= 0: greedy */
    int32_t max_tokens;          /* tokens per generation, >= 0 (default 128) */
    bool stop_at_eog;            /* end at an end-of-generation token, which is not returned (default true) */
    sp_drafter_kind drafter;     /* default SP_DRAFTER_NONE */
    int32_t ngram, min_ngram;    /* prompt lookup: 1 <= min_ngram <= ngram <= 16 (default 3, 2) */
    int32_t draft_k;             /* prompt lookup, hybrid (its lookup chain), draft model: tokens drafted per step,
                                    1..n_batch - 1 (default 4) */
    int32_t recycling_k;         /* recycling, hybrid: candidates kept per token, 1..SP_GEN_MAX_RECYCLING_K (default 8) */
    int32_t n_branching;         /* entries of branching[], 1..SP_GEN_MAX_DEPTH (default 1) */
    int32_t branching[SP_GEN_MAX_DEPTH]; /* children per node by depth, each 1..recycling_k (default {1}: a chain) */
    int32_t max_nodes;           /* recycling, hybrid: nodes of the recycling tree, 1..n_batch - 1 (default 4); the
                                    hybrid's whole tree is capped at n_batch - 1 */
    bool plan;                   /* recycling, hybrid: prune each step's tree with the sparsity-aware planner, which
                                    learns per-node acceptance and the step's cost (per token and per expert byte) on
                                    this device and keeps the part maximising tokens per second (default false;
                                    always on for adaptive) */
    int32_t probe_every;         /* adaptive: plain steps before a probe after drafting paid (default 16), */
    int32_t max_probe_every;     /* ... its cap, doubled to after drafting did not pay (default 256), */
    int32_t learn_every;         /* ... Token Recycling learns from every learn_every-th plain step (default 4) */
    sp_session *draft_session;   /* draft model: a session of a model with the target's vocabulary (not the target's
                                    session); it must outlive the generator and is used by it alone */
    int32_t n_stop;              /* stop strings in stop[], 0..SP_GEN_MAX_STOP (default 0) */
    const char *stop[SP_GEN_MAX_STOP]; /* NUL-terminated, 1..SP_GEN_MAX_STOP_LEN bytes each, copied at creation.
                                      Generation ends after the token whose text completes one (that token is
                                      returned: the text holds the stop string; the app trims it). Token text as
                                      sp_token_to_piece with render_special = false. */
} sp_generator_params;

/* Why a generation ended (SP_GEN_RUNNING while it has not). */
typedef enum sp_gen_stop {
    SP_GEN_RUNNING = 0,
    SP_GEN_EOG = 1,           /* an end-of-generation token (not returned) */
    SP_GEN_MAX_TOKENS = 2,    /* max_tokens returned */
    SP_GEN_STOP_STRING = 3,   /* the text returned so far ends with a stop string */
    SP_GEN_CONTEXT_FULL = 4,  /* the KV cache has no room for another token */
    SP_GEN_CALLBACK = 5,      /* sp_generate's callback returned false */
} sp_gen_stop;

typedef struct sp_generator_stats {
    int64_t steps;       /* forward passes after the prompt (one per step: plain, or verifying a draft) */
    int64_t drafted;     /* draft tokens verified */
    int64_t accepted;    /* draft tokens accepted */
    int64_t tokens;      /* tokens returned */
    int64_t prompt_tokens; /* prompt tokens evaluated (a prefix reused from the cache is not counted) */
    double eval_s;       /* wall time in sp_eval for the steps */
    double loop_s;       /* wall time of the steps outside sp_eval: drafting, sampling, acceptance, rollback */
    double draft_eval_s; /* of loop_s: the draft model's sp_eval calls (draft model drafter) */
    int64_t plain_steps; /* of steps: those the adaptive drafter's gate ran plain (no draft) */
    /* the planner (plan, adaptive): steps planned, candidate nodes proposed and kept over them, and its cost model
     * of a step: cost_step_s + cost_token_s x tokens + cost_expert_byte_s x expert bytes read (as of now) */
    int64_t plan_steps, plan_candidates, plan_kept;
    double cost_step_s, cost_token_s, cost_expert_byte_s;
    /* the gate (adaptive) per arm, 0: no suffix match, 1: a short one, 2: the text repeating itself: drafting now,
     * episodes of drafting started (probes), and those that ran faster than plain decoding (as of now) */
    bool gate_drafting[3];
    int64_t gate_probes[3], gate_paid[3];
} sp_generator_stats;

typedef struct sp_generator sp_generator;
/* Called with each token as it is generated; return false to stop (SP_GEN_CALLBACK). */
typedef bool (*sp_token_callback)(int32_t token, void *user_data);

SP_API sp_generator_params sp_generator_default_params(void);
/* The defaults with a drafter and its tuned settings (measured on SmolLM2-135M, 2 threads): prompt lookup 3..2-grams,
 * 4 tokens; recycling a chain of 4 (k 8); hybrid and adaptive a lookup chain of 8 and a (4, 2, 2, 1) recycling tree of
 * 24 nodes, pruned by the planner; a draft model 4 tokens. Fit for sessions with the default n_batch (64). */
SP_API sp_generator_params sp_generator_default_params_for(sp_drafter_kind drafter);
/* The session must outlive the generator. Fails (nothing allocated) on NULL arguments or bad params. */
SP_API sp_status sp_generator_new(sp_session *session, const sp_generator_params *params, sp_generator **out);
SP_API void sp_generator_free(sp_generator *gen);  /* NULL is allowed */
/* Begin a generation: the cache keeps the longest prefix of the prompt this generator left there (never the last
 * prompt token) and the rest of the prompt but its last token is evaluated; the sampler restarts from its seed and
 * sees the prompt (repetition penalty). n_prompt >= 1; a prompt longer than n_ctx fails with SP_ERR_CONTEXT_FULL. */
SP_API sp_status sp_generator_start(sp_generator *gen, const int32_t *prompt, int32_t n_prompt);
/* The next token: SP_OK with *token >= 0 and *stop == SP_GEN_RUNNING, or, once the generation has ended, SP_OK with
 * *token = -1 and *stop the reason (again on every later call). stop may be NULL. */
SP_API sp_status sp_generate_next(sp_generator *gen, int32_t *token, sp_gen_stop *stop);
/* Run the generation to its end, passing each token to cb (NULL: none); *stop (may be NULL) receives the reason. */
SP_API sp_status sp_generate(sp_generator *gen, sp_token_callback cb, void *user_data, sp_gen_stop *stop);
SP_API sp_status sp_generator_get_stats(const sp_generator *gen, sp_generator_stats *out); /* since creation */
SP_API void sp_generator_reset_stats(sp_generator *gen);
/* Every token of the current generation so far (prompt, then generated: also tokens decided in the last step but not
 * yet returned); the KV cache holds the first sp_session_n_past(session) of them. *tokens stays valid until the next
 * call on the generator. Returns the count (0 before the first start or on NULL). */
SP_API int32_t sp_generator_context(const sp_generator *gen, const int32_t **tokens);
/* Token Recycling's adjacency matrix (recycling and hybrid drafters) to / from a file: a NumPy .npy file of int32
 * [n_vocab, recycling_k] (-1: no candidate yet), the format runtime/drafters.py writes. Save writes a temporary file
 * beside path and renames it over path. Load validates everything (format, shape, every id in [-1, n_vocab)) before
 * taking anything: on any error the matrix is left as it was. Other drafters: SP_ERR_INVALID_ARG. */
SP_API sp_status sp_generator_save_drafter(const sp_generator *gen, const char *path);
SP_API sp_status sp_generator_load_drafter(sp_generator *gen, const char *path);

/* ---- benchmarking: memory read bandwidth (the roofline of decoding) ----
 * n_threads threads each read a private buffer of bytes_per_thread bytes (allocated and written by that thread, so
 * its pages are local to it), sequentially with 64-byte vector loads, summing it. All threads start a pass together;
 * a pass's bandwidth is n_threads x bytes_per_thread / (last thread's end - first thread's start). One untimed
 * warm-up pass precedes the timed ones. Every pass's sum is checked against the known contents: a pass that read
 * wrong data fails with SP_ERR_INTERNAL instead of reporting a number. */
#define SP_BANDWIDTH_MAX_REPEATS 64
typedef struct sp_bandwidth_params {
    int32_t n_threads;          /* threads reading at once, 1..256 (default 1) */
    size_t bytes_per_thread;    /* private buffer per thread, rounded down to a multiple of 256; >= 4096 (default 256 MiB) */
    int32_t repeats;            /* timed passes, 1..SP_BANDWIDTH_MAX_REPEATS (default 5) */
    bool pin_threads;           /* pin thread i to the i-th CPU this process may run on (default true); more threads
                                   than those CPUs is an error (they would share CPUs) */
} sp_bandwidth_params;

typedef struct sp_bandwidth_result {
    int32_t n_threads;
    int32_t repeats;
    size_t bytes_per_thread;              /* as used (after rounding) */
    double gb_s[SP_BANDWIDTH_MAX_REPEATS]; /* [repeats] GB/s (1e9 bytes) of each timed pass */
    double gb_s_median, gb_s_min, gb_s_max;
    int32_t n_pinned;                     /* threads whose CPU affinity was set (0 if not asked or not possible) */
    int32_t pin_errno;                    /* 0, or the error of the first failed pin (ENOSYS where the OS has no API) */
} sp_bandwidth_result;

SP_API sp_bandwidth_params sp_bandwidth_default_params(void);
SP_API sp_status sp_bench_read_bandwidth(sp_bandwidth_params params, sp_bandwidth_result *out);

#ifdef __cplusplus
}
#endif
#endif /* SPARROW_H */
