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
    int64_t head_rows;   /* a per-head weight (MLA's wq_b, wk_b, wv_b: [heads * head_rows, k]), read head by head by
                            the thread that owns the head: each head is packed as its own block of packed_head bytes
                            (head h at packed + h * packed_head); 0: one block */
    size_t packed_head;
} sp_tensor;

/* The architectures the loader implements (general.architecture); model.c's tables (names, loaders) hold one entry
 * per kind. Only the loader looks at it: the forward pass, the session and the statistics go by each layer's
 * attention and FFN kind below, and "has experts" is n_expert > 0. */
typedef enum sp_arch { SP_ARCH_LLAMA = 0, SP_ARCH_BLOCKFFN = 1, SP_ARCH_COUNT } sp_arch;
/* Attention of a layer: grouped-query (llama; K and V cached per kv head) or multi-head latent (docs/gguf-blockffn.md,
 * MLA; one latent row per token cached, attention computed in the absorbed form, forward.c attention_mla). */
typedef enum sp_attn_kind { SP_ATTN_GQA = 0, SP_ATTN_MLA = 1 } sp_attn_kind;
/* FFN of a layer: dense SwiGLU (forward.c) or BlockFFN's ReLU-routed experts (ffn_blockffn.c). */
typedef enum sp_ffn_kind { SP_FFN_KIND_DENSE = 0, SP_FFN_KIND_EXPERTS = 1 } sp_ffn_kind;
typedef enum sp_router_norm { SP_ROUTER_NORM_NONE = 0, SP_ROUTER_NORM_RMS = 1, SP_ROUTER_NORM_SUM = 2 } sp_router_norm;

typedef struct sp_layer {
    sp_attn_kind attn;
    sp_ffn_kind ffn;
    const float *attn_norm;  /* [H] */
    sp_tensor wq;            /* GQA: [NH*D, H] */
    sp_tensor wk;            /* GQA: [NKV*D, H] */
    sp_tensor wv;            /* GQA: [NKV*D, H] */
    sp_tensor wo;            /* [H, NH*D] (MLA: [H, NH*DV]) */
    /* MLA only (docs/gguf-blockffn.md): QL, KL = q / kv latent ranks, DN, DR = nope / rope dims, DK = DN + DR */
    sp_tensor wq_a;          /* [QL, H] */
    const float *q_a_norm;   /* [QL] */
    sp_tensor wq_b;          /* [NH*DK, QL] (each head: DN nope rows, then DR rope rows as adjacent pairs) */
    sp_tensor wkv_a;         /* [KL + DR, H] */
    const float *kv_a_norm;  /* [KL] */
    sp_tensor wk_b;          /* [NH*KL, DN]: head h = rows [KL h, KL h + KL), W_UK[h] transposed */
    sp_tensor wv_b;          /* [NH*DV, KL]: head h = rows [DV h, DV h + DV), W_UV[h] */
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
    const uint8_t *experts_down_packed; /* or NULL: expert e's down rows in the tier's "down" streaming layout
                                           (kernels.h pack_down), at experts_down_packed + e * experts_up_stride:
                                           each expert's packed up and down halves are adjacent, one stream */
    bool experts_down_i8;          /* the down rows are in the "down int8" layout instead (kernels.h pack_down_i8),
                                      read by accum_packed_i8 */
} sp_layer;

typedef struct sp_hparams {
    int32_t n_vocab, n_ctx_train, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, n_rot;
    float norm_eps, rope_base;
    /* MLA only: q_lora QL, kv_lora KL, nope DN, v DV (DR = n_rot); the latent norms' epsilon */
    int32_t q_lora, kv_lora, qk_nope, v_dim;
    float lora_eps;
    /* per token and layer in the KV cache, F16 values: k_cache rows (GQA: keys, NKV*D; MLA: the latent c, KL) and
     * v_cache rows (GQA: values, NKV*D; MLA: the rotated rope key, DR) */
    int32_t kv_k_dim, kv_v_dim;
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
    sp_attn_kind attn;        /* of every layer (a file has one kind) */
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
    struct sp_vk_model *vk;   /* the weights on GPU devices (vulkan/vk_weights.c), made by the first session on each;
                                 the one field that changes after loading, under that file's lock */
};

/* A run of a batch: its tokens [t0, t0 + n) all belong to sequence seq, which held P cached slots before the pass. */
typedef struct sp_run {
    int32_t t0, n, seq, P;
} sp_run;

/* Scratch for one forward pass of up to B = n_batch tokens; allocated once per session. */
typedef struct sp_scratch {
    sp_run *runs;    /* [B] the batch's runs of one sequence each, in batch order (session.c fills them) */
    int32_t n_runs;
    int32_t *trun;   /* [B] each token's run */
    int32_t *tpos;   /* [B] each token's position (sp_batch.pos, or its sequence's n_past + its index in the run) */
    float *x;        /* [B, H] residual stream */
    float *xn;       /* [B, H] normalised input of a block */
    float *q;        /* [B, NH*D] (MLA: [B, NH*(DN+DR)]) */
    float *qg;       /* GQA: [NKV, B*G, D] the rotated queries at F16 precision, grouped by kv head (G = NH/NKV) */
    float *k;        /* [B, NKV*D] keys of the batch before they go to the F16 cache */
    float *v;        /* [B, NKV*D] values likewise */
    float *attn;     /* [B, NH*D] attention output */
    float *tmp;      /* [B, H] block output before the residual add */
    float *gate;     /* [B, F] */
    float *up;       /* [B, F] */
    void *xq;        /* [B, max(H, F, NH*D)] activations quantized to sp_block_q8a rows */
    void *xqf;       /* llama: [B, F] the SwiGLU product quantized to sp_block_q8a rows (the down projection's input) */
    float *scores;   /* GQA: [NKV, TQ*G, C + B] one chunk's scores, then [NKV, TQ*G] 1/sums (TQ = attn_tq); MLA: one
                      * token's [NH, C + B] scores and rope parts */
    float *rope_cs;  /* [B, n_rot] cos/sin pairs for the batch positions */
    /* MLA only (forward.c attention_mla) */
    float *cq;       /* [B, QL] query latent */
    float *qnope;    /* [NH, B, DN] each head's nope query, contiguous per head (a matmul input) */
    float *qlat;     /* [B, NH, KL] absorbed query W_UK^T q_nope */
    float *qpe;      /* [B, NH, DR] rotated rope query */
    float *olat;     /* [NH, B, KL] each head's attention-weighted sum of latents */
    void *xqh;       /* [NH, B] rows of max(DN, KL): a head's q_nope or o_lat quantized to sp_block_q8a (its owner's) */
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
    int32_t *past;   /* [n_seq] cached tokens of each sequence (sp_session_n_past: past[0]) */
    void *k_cache;   /* GQA: F16 keys after RoPE, [L, NKV, n_seq * CB, D, SP_KBLK] (sp_kcache_at); MLA: [L, C, KL] the
                      * latent c in params.kv_type */
    void *v_cache;   /* [L, n_seq * C, kv_v_dim] values (MLA: the rotated rope key k_pe), likewise (sp_vcache_row) */
    size_t kv_elem;  /* bytes per cache value: 2 (F16) or 4 (F32) */
    int32_t attn_tq; /* GQA: tokens per attention chunk (the scores scratch holds one chunk) */
    sp_scratch s;
    sp_sparsity_acc sparsity;
    sp_synth_routing synth;
    sp_timings times; /* written by pool thread 0 only, between barriers */
    sp_session_memory memory; /* what sp_session_new allocated (session.c sizes it) */
    sp_pool *pool;
    struct sp_vk_session *gpu; /* a device session's GPU state (params.device > 0; vulkan/vk_forward.c), else NULL */
    _Atomic int busy; /* 1 while a thread is inside sp_eval / truncate / keep: a second thread is refused */
    uint64_t n_changes; /* calls of sp_eval / truncate / keep so far (written by the claiming thread) */
};

/* The GQA key cache: per layer and kv head, each sequence's C slots padded to CB = ceil(C / SP_KBLK) blocks of SP_KBLK
 * slots (sequence s owns blocks s*CB .. s*CB + CB - 1), each block [D][SP_KBLK] (kernels.h attn_scores_f16). The
 * element index of (layer il, kv head g, slot j of sequence seq, dim d). */
static inline int64_t sp_kcache_blocks(const sp_session *ses) { /* CB */
    return ((int64_t)ses->params.n_ctx + SP_KBLK - 1) / SP_KBLK;
}
static inline size_t sp_kcache_at(const sp_session *ses, int64_t il, int64_t g, int64_t seq, int64_t j, int64_t d) {
    const int64_t NKV = ses->model->hp.n_head_kv, D = ses->model->hp.head_dim, CB = sp_kcache_blocks(ses);
    return (size_t)((((il * NKV + g) * ses->params.n_seq * CB + seq * CB + j / SP_KBLK) * D + d) * SP_KBLK +
                    j % SP_KBLK);
}
/* The cache row of (layer il, slot j of sequence seq): of the value cache (GQA values, MLA rope keys), and for MLA of
 * the latent cache too; in values of the row's width. */
static inline size_t sp_vcache_row(const sp_session *ses, int64_t il, int64_t seq, int64_t j) {
    const int64_t C = ses->params.n_ctx;
    return (size_t)((il * ses->params.n_seq + seq) * C + j);
}

/* Expert weight bytes the session's passes have read so far, all layers (0 for a model without sparse experts). */
double sp_session_expert_bytes(const sp_session *ses);

/* Split batch b into scratch runs (one sequence each), with their tokens' run indices; checks the sequence ids and
 * that each run fits its sequence's context. Fills neither tpos nor anything else. */
sp_status sp_session_plan_runs(sp_session *ses, const sp_batch *b);

/* Forward pass over one batch (validated by the caller, runs and tpos filled). Never allocates. */
void sp_forward(sp_session *ses, const sp_batch *batch);

#endif
