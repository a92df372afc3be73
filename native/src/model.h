/* model.h: the immutable model (weights as views into the mapped GGUF) and the per-user session.
 *
 * Shape legend: T = tokens in the batch, H = n_embd, L = layers, D = head_dim, NH = heads, NKV = kv heads,
 * F = n_ff, V = vocabulary, C = n_ctx (KV cache slots), S = slots visible to a token (cached + in batch).
 * A weight W[N, K] has K = ne[0] contiguous elements per row (the reduction axis) and N = ne[1] rows. */
#ifndef SP_MODEL_H
#define SP_MODEL_H

#include "gguf.h"
#include "threadpool.h"
#include "vocab.h"

#include <stdatomic.h>

typedef struct sp_tensor {
    sp_type type;
    int64_t k;           /* ne[0]: row length (reduction axis) */
    int64_t n;           /* ne[1]: number of rows */
    size_t row_size;     /* bytes per row */
    const void *data;    /* [n, k] in `type`, into the mapping */
    const void *packed;  /* the same weight in the kernel tier's packed layout (kernels.h), or NULL: matmuls read
                            this when set; `data` stays valid (the file pages may have been released) */
} sp_tensor;

/* The architectures the loader implements; model.c's tables (names, loaders) hold one entry per kind. */
typedef enum sp_arch { SP_ARCH_LLAMA = 0, SP_ARCH_BLOCKFFN = 1, SP_ARCH_COUNT } sp_arch;
typedef enum sp_router_norm { SP_ROUTER_NORM_NONE = 0, SP_ROUTER_NORM_RMS = 1, SP_ROUTER_NORM_SUM = 2 } sp_router_norm;

typedef struct sp_layer {
    const float *attn_norm;  /* [H] */
    sp_tensor wq;            /* [NH*D, H] */
    sp_tensor wk;            /* [NKV*D, H] */
    sp_tensor wv;            /* [NKV*D, H] */
    sp_tensor wo;            /* [H, NH*D] */
    const float *ffn_norm;   /* [H] */
    sp_tensor w_gate;        /* [F, H] */
    sp_tensor w_up;          /* [F, H] */
    sp_tensor w_down;        /* [H, F] */
    /* blockffn only (docs/gguf-blockffn.md): E = experts, FE = expert width */
    sp_tensor router;              /* [E, H] F32 */
    const float *router_norm;      /* [E] (rms norm only, else NULL) */
    sp_tensor experts;             /* [E * 2FE, H]: expert e = rows [2FE e, 2FE e + FE) up, then FE rows down^T */
    const uint8_t *experts_up_packed; /* or NULL: expert e's up rows in the kernel tier's packed layout, at
                                         experts_up_packed + e * experts_up_stride (load-time repacking) */
    size_t experts_up_stride;
} sp_layer;

typedef struct sp_hparams {
    int32_t n_vocab, n_ctx_train, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, n_rot;
    float norm_eps, rope_base;
    float embed_scale, residual_scale, logit_scale; /* MiniCPM scaling; 1 for llama */
    /* blockffn only */
    int32_t n_expert, expert_width;
    sp_router_norm router_norm;
    float router_norm_eps, router_norm_scale;
} sp_hparams;

struct sp_model {
    sp_arch arch;
    sp_gguf *gguf;
    sp_vocab *vocab;
    sp_hparams hp;
    sp_model_info info;
    char arch_name[32];
    char name[128];
    bool has_weights;
    bool act_q8;              /* some weight takes quantized activations (sp_block_q8a) */
    sp_tensor tok_embd;       /* [V, H] */
    const float *out_norm;    /* [H] */
    sp_tensor output;         /* [V, H]; the embedding matrix when tied */
    sp_layer *layers;         /* [L] */
    void *packed;             /* one buffer holding every sp_tensor.packed (NULL when nothing is packed) */
    size_t packed_bytes;
};

/* Scratch for one forward pass of up to B = n_batch tokens; allocated once per session. */
typedef struct sp_scratch {
    float *x;        /* [B, H] residual stream */
    float *xn;       /* [B, H] normalised input of a block */
    float *q;        /* [B, NH*D] */
    float *k;        /* [B, NKV*D] keys of the batch before they go to the F16 cache */
    float *v;        /* [B, NKV*D] values likewise */
    float *attn;     /* [B, NH*D] attention output */
    float *tmp;      /* [B, H] block output before the residual add */
    float *gate;     /* [B, F] */
    float *up;       /* [B, F] */
    void *xq;        /* [B, max(H, F, NH*D)] activations quantized to sp_block_q8a rows */
    float *scores;   /* [n_threads, C + B] attention scores, one row per thread */
    float *rope_cs;  /* [B, n_rot] cos/sin pairs for the batch positions */
    /* blockffn only (ffn_blockffn.c); E = experts, FE = expert width, NT = n_threads */
    float *router;           /* [B, E] router scores after ReLU and norm */
    const float *router_set; /* testing: [T, E] scores used instead of the router's (NULL: compute them) */
    struct sp_ffn_task *tasks; /* [B * E] work list of one layer: an expert and the tokens it is applied to */
    int32_t *task_tok;       /* [B * E] token indices of the tasks' token lists */
    int32_t n_tasks;
    void *xg;                /* [NT, B, max(H q8a row, H floats)] per-thread gathered activation rows */
    float *hbuf;             /* [NT, B, FE] per-thread expert hidden units h = r * silu(U x) */
    float *ypart;            /* [NT - 1, B, H] per-thread partial FFN outputs (thread 0 uses tmp) */
} sp_scratch;

/* Sparsity counters of a session since the last reset (ffn_blockffn.c updates them on each forward pass). */
enum { SP_CLS_RING = 16 }; /* recent activation masks kept per layer: CLS-k for k <= 16 */
typedef struct sp_sparsity_acc {
    int32_t words;           /* W = ceil(E / 64) mask words per token */
    uint64_t *ring;          /* [L, SP_CLS_RING, W] activation bitmasks of each layer's most recent tokens */
    int64_t *n_seen;         /* [L] tokens seen per layer (ring position = n_seen % SP_CLS_RING) */
    int64_t *n_active;       /* [L] active (token, expert) pairs */
    int64_t *cls_inactive;   /* [L, SP_CLS_RING + 1] inactive (chunk, expert) pairs for chunks of k tokens */
    int64_t *cls_chunks;     /* [L, SP_CLS_RING + 1] complete chunks of k tokens */
    uint64_t *bytes;         /* [L] expert weight bytes read */
} sp_sparsity_acc;

/* Synthetic routing (routing_synth.c, testing/benchmarks): replaces every BlockFFN layer's router scores with a
 * deterministic pattern keyed by (layer, position). A = experts per position, U = experts used by any k consecutive
 * positions. */
typedef struct sp_synth_routing {
    bool on;
    int32_t n_active;  /* A = round((1 - TLS) E) */
    int32_t n_union;   /* U = round((1 - CLS-k) E), A <= U <= E */
    int32_t k;         /* chunk length the CLS is stated for, >= 2 */
    uint64_t seed;
    int32_t *ring;     /* [L, E] each layer's expert order; position p uses ring[(start(p) + i) % E], i < A */
} sp_synth_routing;

struct sp_session {
    const sp_model *model;
    sp_session_params params;
    int32_t n_past;
    sp_f16 *k_cache; /* [L, C, NKV*D] keys after RoPE, F16 */
    sp_f16 *v_cache; /* [L, C, NKV*D] values, F16 */
    sp_scratch s;
    sp_sparsity_acc sparsity;
    sp_synth_routing synth;
    sp_timings times; /* written by pool thread 0 only, between barriers */
    sp_session_memory memory; /* what sp_session_new allocated (session.c sizes it) */
    sp_pool *pool;
    _Atomic int busy; /* 1 while a thread is inside sp_eval / truncate / keep: a second thread is refused */
};

/* Forward pass over one batch (validated by the caller). Never allocates. */
void sp_forward(sp_session *ses, const sp_batch *batch);

#endif
