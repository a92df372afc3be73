/* model.c: loading a model from a validated GGUF: hyperparameters, vocabulary and weight views.
 *
 * Everything the forward pass relies on is checked here, so that a file whose metadata lies (a layer count that
 * disagrees with its tensors, shapes that disagree with the config) is rejected with a message, never run. */
#include "model.h"
#include "vulkan/vk.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static sp_status get_u32_as_i32(const sp_gguf *g, const char *key, int32_t *out, int32_t lo, int32_t hi) {
    uint32_t v;
    sp_status s = sp_gguf_get_u32(g, key, &v);
    if (s != SP_OK) return s;
    if ((int64_t)v < lo || (int64_t)v > hi)
        return sp_fail(SP_ERR_BAD_FORMAT, "metadata '%s' = %u is out of range [%d, %d]", key, v, lo, hi);
    *out = (int32_t)v;
    return SP_OK;
}

/* Find a weight named `name` with shape ne = [k, n, n2] and a type the kernels support; bound as a matrix of n*n2
 * rows of k elements. */
static sp_status bind_tensor(const sp_gguf *g, const char *name, int64_t k, int64_t n, int64_t n2, sp_tensor *out) {
    const sp_gguf_tensor *t = sp_gguf_find_tensor(g, name);
    if (!t) return sp_fail(SP_ERR_BAD_FORMAT, "tensor '%s' is missing", name);
    if (t->ne[0] != k || t->ne[1] != n || t->ne[2] != n2 || t->ne[3] != 1)
        return sp_fail(SP_ERR_BAD_FORMAT,
                       "tensor '%s' has shape [%lld, %lld, %lld, %lld] but the config implies [%lld, %lld, %lld]",
                       name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3],
                       (long long)k, (long long)n, (long long)n2);
    sp_type_traits tr = sp_type_traits_of(t->type);
    if (!tr.supported)
        return sp_fail(SP_ERR_UNSUPPORTED, "tensor '%s' has type %s (%u), which this runtime does not implement", name,
                       tr.name ? tr.name : "unknown", (unsigned)t->type);
    out->type = t->type;
    out->k = k;
    out->n = n * n2;
    out->row_size = sp_row_size(t->type, k);
    out->data = t->data;
    out->head_rows = n2 > 1 ? n : 0;
    return SP_OK;
}

/* A 2-D (or 1-D when n == 1) weight [n, k]. */
static sp_status bind_matrix(const sp_gguf *g, const char *name, int64_t k, int64_t n, sp_tensor *out) {
    return bind_tensor(g, name, k, n, 1, out);
}

/* A norm weight: F32 vector of length n. */
static sp_status bind_norm(const sp_gguf *g, const char *name, int64_t n, const float **out) {
    sp_tensor t;
    sp_status s = bind_matrix(g, name, n, 1, &t);
    if (s != SP_OK) return s;
    if (t.type != SP_TYPE_F32) return sp_fail(SP_ERR_UNSUPPORTED, "norm tensor '%s' must be F32", name);
    *out = (const float *)t.data;
    return SP_OK;
}

/* The llama-style hyperparameters under `arch.` (llama, and blockffn, which shares them). */
static sp_status load_llama_hparams(const sp_gguf *g, const char *arch, sp_hparams *hp, sp_attn_kind *attn) {
    sp_status s;
    *attn = SP_ATTN_GQA;
    char key[96];
#define KEY(suffix) (snprintf(key, sizeof key, "%s.%s", arch, suffix), key)
#define REQ(suffix, field, lo, hi) if ((s = get_u32_as_i32(g, KEY(suffix), &hp->field, lo, hi)) != SP_OK) return s
    REQ("embedding_length", n_embd, 1, 1 << 16);
    REQ("block_count", n_layer, 1, 4096);
    REQ("attention.head_count", n_head, 1, 4096);
    hp->n_ff = 0;
    if (strcmp(arch, "blockffn") == 0) { /* informational there (E x F), checked by the blockffn loader */
        if (sp_gguf_find(g, KEY("feed_forward_length"))) REQ("feed_forward_length", n_ff, 1, 1 << 24);
    } else {
        REQ("feed_forward_length", n_ff, 1, 1 << 20);
    }
    hp->n_head_kv = hp->n_head;
    if (sp_gguf_find(g, KEY("attention.head_count_kv"))) REQ("attention.head_count_kv", n_head_kv, 1, hp->n_head);
    if (hp->n_head % hp->n_head_kv)
        return sp_fail(SP_ERR_BAD_FORMAT, "head_count %d is not a multiple of head_count_kv %d", hp->n_head,
                       hp->n_head_kv);
    if (hp->n_embd % hp->n_head)
        return sp_fail(SP_ERR_BAD_FORMAT, "embedding_length %d is not a multiple of head_count %d", hp->n_embd,
                       hp->n_head);
    hp->head_dim = hp->n_embd / hp->n_head;
    /* the attention kind: absent or "gqa" = grouped-query; "mla" = multi-head latent (blockffn only) */
    sp_gguf_str akind;
    if (sp_gguf_find(g, KEY("attention.type"))) {
        if ((s = sp_gguf_get_str(g, key, &akind)) != SP_OK) return s;
        if (sp_gguf_str_eq(akind, "mla") && strcmp(arch, "blockffn") == 0) *attn = SP_ATTN_MLA;
        else if (!sp_gguf_str_eq(akind, "gqa"))
            return sp_fail(SP_ERR_UNSUPPORTED, "%s '%.*s' is not implemented for architecture %s (it implements gqa%s)",
                           key, (int)SP_MIN(akind.len, 64), akind.data, arch,
                           strcmp(arch, "blockffn") == 0 ? " and mla" : "");
    }
    /* RoPE covers the head (GQA) or the rope part of each head (MLA: its own dimension, checked with the ranks) */
    hp->n_rot = hp->head_dim;
    if (sp_gguf_find(g, KEY("rope.dimension_count")))
        REQ("rope.dimension_count", n_rot, 2, *attn == SP_ATTN_MLA ? 4096 : hp->head_dim);
    if (hp->n_rot % 2) return sp_fail(SP_ERR_BAD_FORMAT, "rope.dimension_count %d must be even", hp->n_rot);
    if (*attn == SP_ATTN_MLA && hp->n_head_kv != hp->n_head)
        return sp_fail(SP_ERR_BAD_FORMAT, "an MLA model has head_count_kv = head_count (%d), got %d", hp->n_head,
                       hp->n_head_kv);
    hp->kv_k_dim = hp->kv_v_dim = hp->n_head_kv * hp->head_dim;
    hp->n_ctx_train = 2048;
    if (sp_gguf_find(g, KEY("context_length"))) REQ("context_length", n_ctx_train, 1, 1 << 24);
#undef REQ
    hp->embed_scale = hp->residual_scale = hp->logit_scale = 1.0f;
    hp->norm_eps = 1e-5f;
    if (sp_gguf_find(g, KEY("attention.layer_norm_rms_epsilon")) &&
        (s = sp_gguf_get_f32(g, key, &hp->norm_eps)) != SP_OK)
        return s;
    hp->rope_base = 10000.0f;
    if (sp_gguf_find(g, KEY("rope.freq_base")) && (s = sp_gguf_get_f32(g, key, &hp->rope_base)) != SP_OK) return s;
    if (!(hp->norm_eps > 0 && hp->norm_eps < 1))
        return sp_fail(SP_ERR_BAD_FORMAT, "layer_norm_rms_epsilon %g is not in (0, 1)", hp->norm_eps);
    if (!(hp->rope_base > 0 && hp->rope_base < 1e12f))
        return sp_fail(SP_ERR_BAD_FORMAT, "rope.freq_base %g is not a positive finite number", hp->rope_base);
    /* Nothing is unsupported silently: scaled RoPE variants change the math. */
    sp_gguf_str st;
    if (sp_gguf_get_str(g, KEY("rope.scaling.type"), &st) == SP_OK && !sp_gguf_str_eq(st, "none"))
        return sp_fail(SP_ERR_UNSUPPORTED, "RoPE scaling '%.*s' is not implemented", (int)st.len, st.data);
    uint32_t vocab_size;
    if (sp_gguf_get_u32(g, KEY("vocab_size"), &vocab_size) == SP_OK && (int64_t)vocab_size != hp->n_vocab)
        return sp_fail(SP_ERR_BAD_FORMAT, "%s disagrees with the %d tokens of the vocabulary (it says %u)", key,
                       hp->n_vocab, vocab_size);
#undef KEY
    sp_clear_error();
    return SP_OK;
}

/* A required finite f32 `blockffn.<suffix>` (or `def` when absent and def is not NaN). */
static sp_status get_f32_finite(const sp_gguf *g, const char *suffix, float def, float *out) {
    char key[96];
    snprintf(key, sizeof key, "blockffn.%s", suffix);
    if (!sp_gguf_find(g, key) && def == def) {
        *out = def;
        return SP_OK;
    }
    sp_status s = sp_gguf_get_f32(g, key, out);
    if (s != SP_OK) return s;
    if (!isfinite(*out)) return sp_fail(SP_ERR_BAD_FORMAT, "metadata '%s' = %g is not a finite number", key, *out);
    return SP_OK;
}

/* An optional string `blockffn.<suffix>` that must equal `want` (the only value implemented). */
static sp_status check_str(const sp_gguf *g, const char *suffix, const char *want) {
    char key[96];
    snprintf(key, sizeof key, "blockffn.%s", suffix);
    sp_gguf_str v;
    if (!sp_gguf_find(g, key)) return SP_OK;
    sp_status s = sp_gguf_get_str(g, key, &v);
    if (s != SP_OK) return s;
    if (!sp_gguf_str_eq(v, want))
        return sp_fail(SP_ERR_UNSUPPORTED, "metadata '%s' is '%.*s'; only '%s' is implemented", key, (int)v.len, v.data,
                       want);
    return SP_OK;
}

/* BlockFFN (docs/gguf-blockffn.md): the llama keys under blockffn.*, plus experts, router norm and MiniCPM scales. */
/* Multi-head latent attention (docs/gguf-blockffn.md, MLA): the ranks and head dims; the KV cache holds one latent
 * row (KL + DR) per token and layer. */
static sp_status load_mla_hparams(const sp_gguf *g, sp_hparams *hp) {
    sp_status s;
    int32_t key_length = 0;
    if ((s = get_u32_as_i32(g, "blockffn.attention.q_lora_rank", &hp->q_lora, 1, 1 << 16)) != SP_OK) return s;
    if ((s = get_u32_as_i32(g, "blockffn.attention.kv_lora_rank", &hp->kv_lora, 1, 1 << 16)) != SP_OK) return s;
    if ((s = get_u32_as_i32(g, "blockffn.attention.key_length", &key_length, 2, 1 << 16)) != SP_OK) return s;
    if ((s = get_u32_as_i32(g, "blockffn.attention.value_length", &hp->v_dim, 1, 1 << 16)) != SP_OK) return s;
    if (key_length <= hp->n_rot)
        return sp_fail(SP_ERR_BAD_FORMAT, "blockffn.attention.key_length %d must exceed rope.dimension_count %d (the "
                       "nope part of a head is their difference)", key_length, hp->n_rot);
    hp->qk_nope = key_length - hp->n_rot;
    if ((s = get_f32_finite(g, "attention.lora_norm_epsilon", NAN, &hp->lora_eps)) != SP_OK) return s;
    if (!(hp->lora_eps > 0 && hp->lora_eps < 1))
        return sp_fail(SP_ERR_BAD_FORMAT, "blockffn.attention.lora_norm_epsilon %g is not in (0, 1)", hp->lora_eps);
    hp->kv_k_dim = hp->kv_lora; /* the latent c */
    hp->kv_v_dim = hp->n_rot;   /* the rotated rope key (not a value: the values are the latent) */
    return SP_OK;
}

static sp_status load_blockffn_hparams(const sp_gguf *g, sp_hparams *hp, sp_attn_kind attn) {
    sp_status s;
    const int32_t n_ff_meta = hp->n_ff;
    if ((s = get_u32_as_i32(g, "blockffn.expert_count", &hp->n_expert, 1, 1 << 16)) != SP_OK) return s;
    if ((s = get_u32_as_i32(g, "blockffn.expert_width", &hp->expert_width, 1, 1 << 20)) != SP_OK) return s;
    hp->n_ff = hp->n_expert * hp->expert_width;
    if (n_ff_meta && n_ff_meta != hp->n_ff)
        return sp_fail(SP_ERR_BAD_FORMAT, "blockffn.feed_forward_length %d disagrees with expert_count x expert_width "
                       "= %d x %d", n_ff_meta, hp->n_expert, hp->expert_width);
    if (attn == SP_ATTN_GQA && hp->n_rot != hp->head_dim)
        return sp_fail(SP_ERR_BAD_FORMAT, "blockffn.rope.dimension_count %d must equal the head dimension %d",
                       hp->n_rot, hp->head_dim);
    if (attn == SP_ATTN_MLA && (s = load_mla_hparams(g, hp)) != SP_OK) return s;
    if ((s = check_str(g, "router_activation", "relu")) != SP_OK) return s;
    if ((s = check_str(g, "expert_activation", "silu")) != SP_OK) return s;
    hp->router_norm = SP_ROUTER_NORM_SUM; /* absent key: the MiniCPMConfig default */
    sp_gguf_str kind;
    if (sp_gguf_find(g, "blockffn.router_norm")) {
        if ((s = sp_gguf_get_str(g, "blockffn.router_norm", &kind)) != SP_OK) return s;
        if (sp_gguf_str_eq(kind, "rms")) hp->router_norm = SP_ROUTER_NORM_RMS;
        else if (sp_gguf_str_eq(kind, "sum")) hp->router_norm = SP_ROUTER_NORM_SUM;
        else if (sp_gguf_str_eq(kind, "none")) hp->router_norm = SP_ROUTER_NORM_NONE;
        else return sp_fail(SP_ERR_BAD_FORMAT, "blockffn.router_norm '%.*s' is not one of rms, sum, none",
                            (int)kind.len, kind.data);
    }
    const float eps_def = hp->router_norm == SP_ROUTER_NORM_RMS ? hp->norm_eps
                          : hp->router_norm == SP_ROUTER_NORM_SUM ? 1e-5f : 0.0f;
    if ((s = get_f32_finite(g, "router_norm_eps", eps_def, &hp->router_norm_eps)) != SP_OK) return s;
    if ((s = get_f32_finite(g, "router_norm_scale", 1.0f, &hp->router_norm_scale)) != SP_OK) return s;
    if (hp->router_norm_eps < 0 || (hp->router_norm == SP_ROUTER_NORM_RMS && hp->router_norm_eps <= 0))
        return sp_fail(SP_ERR_BAD_FORMAT, "blockffn.router_norm_eps %g is not positive", hp->router_norm_eps);
    if ((s = get_f32_finite(g, "embedding_scale", NAN, &hp->embed_scale)) != SP_OK) return s;
    if ((s = get_f32_finite(g, "residual_scale", NAN, &hp->residual_scale)) != SP_OK) return s;
    if ((s = get_f32_finite(g, "logit_scale", NAN, &hp->logit_scale)) != SP_OK) return s;
    sp_clear_error();
    return SP_OK;
}

/* Embeddings, output head and each layer's attention + norms: shared by llama and blockffn. */
static sp_status load_common_weights(sp_model *m) {
    const sp_gguf *g = m->gguf;
    const sp_hparams *hp = &m->hp;
    const int64_t H = hp->n_embd, V = hp->n_vocab;
    const int64_t QD = (int64_t)hp->n_head * hp->head_dim, KVD = (int64_t)hp->n_head_kv * hp->head_dim;
    sp_status s;
    if ((s = bind_matrix(g, "token_embd.weight", H, V, &m->tok_embd)) != SP_OK) return s;
    if ((s = bind_norm(g, "output_norm.weight", H, &m->out_norm)) != SP_OK) return s;
    if (sp_gguf_find_tensor(g, "output.weight")) {
        if ((s = bind_matrix(g, "output.weight", H, V, &m->output)) != SP_OK) return s;
    } else {
        m->output = m->tok_embd; /* tied embeddings */
    }
    m->act_q8 |= sp_type_traits_of(m->output.type).act_q8;
    /* The layer count must agree with the tensors: no blk.L.* beyond the last layer. */
    char name[96];
    snprintf(name, sizeof name, "blk.%d.attn_norm.weight", hp->n_layer);
    if (sp_gguf_find_tensor(g, name))
        return sp_fail(SP_ERR_BAD_FORMAT, "block_count is %d but the file has tensors for layer %d", hp->n_layer,
                       hp->n_layer);
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return sp_fail(SP_ERR_NO_MEMORY, "out of memory for %d layers", hp->n_layer);
    for (int il = 0; il < hp->n_layer; il++) {
        sp_layer *l = &m->layers[il];
#define MAT(field, suffix, k, n)                                               \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);             \
    if ((s = bind_matrix(g, name, k, n, &l->field)) != SP_OK) return s;
#define NORM(field, suffix)                                                    \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);             \
    if ((s = bind_norm(g, name, H, &l->field)) != SP_OK) return s;
#define VEC(field, suffix, n)                                                  \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);             \
    if ((s = bind_norm(g, name, n, &l->field)) != SP_OK) return s;
#define HEADS(field, suffix, k, n)                                             \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);             \
    if ((s = bind_tensor(g, name, k, n, hp->n_head, &l->field)) != SP_OK) return s;
        l->attn = m->attn;
        l->ffn = hp->n_expert > 0 ? SP_FFN_KIND_EXPERTS : SP_FFN_KIND_DENSE;
        NORM(attn_norm, "attn_norm");
        if (l->attn == SP_ATTN_MLA) {
            const int64_t QL = hp->q_lora, KL = hp->kv_lora, DR = hp->n_rot, DN = hp->qk_nope, DV = hp->v_dim;
            MAT(wq_a, "attn_q_a", H, QL);
            VEC(q_a_norm, "attn_q_a_norm", QL);
            MAT(wq_b, "attn_q_b", QL, hp->n_head * (DN + DR));
            l->wq_b.head_rows = DN + DR; /* each head's query rows, computed by the thread that owns the head */
            MAT(wkv_a, "attn_kv_a_mqa", H, KL + DR);
            VEC(kv_a_norm, "attn_kv_a_norm", KL);
            HEADS(wk_b, "attn_k_b", DN, KL);
            HEADS(wv_b, "attn_v_b", KL, DV);
            MAT(wo, "attn_output", hp->n_head * DV, H);
        } else {
            MAT(wq, "attn_q", H, QD);
            MAT(wk, "attn_k", H, KVD);
            MAT(wv, "attn_v", H, KVD);
            MAT(wo, "attn_output", QD, H);
        }
        NORM(ffn_norm, "ffn_norm");
#undef MAT
#undef NORM
#undef VEC
#undef HEADS
        /* inputs quantized for the whole model (c->q8): the normed residual and the attention output; MLA's inner
         * matmuls (wq_b, wk_b, wv_b) quantize their own inputs when their type asks for it (forward.c) */
        const sp_tensor *mats[] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->wq_a, &l->wkv_a};
        for (size_t i = 0; i < sizeof mats / sizeof *mats; i++)
            if (mats[i]->data) m->act_q8 |= sp_type_traits_of(mats[i]->type).act_q8;
    }
    return SP_OK;
}

static sp_status load_llama_weights(sp_model *m) {
    const sp_gguf *g = m->gguf;
    const sp_hparams *hp = &m->hp;
    const int64_t H = hp->n_embd, F = hp->n_ff, QD = (int64_t)hp->n_head * hp->head_dim;
    sp_status s;
    char name[96];
    if ((s = load_common_weights(m)) != SP_OK) return s;
    for (int il = 0; il < hp->n_layer; il++) {
        sp_layer *l = &m->layers[il];
#define MAT(field, suffix, k, n)                                               \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);             \
    if ((s = bind_matrix(g, name, k, n, &l->field)) != SP_OK) return s;
        MAT(w_gate, "ffn_gate", H, F);
        MAT(w_up, "ffn_up", H, F);
        MAT(w_down, "ffn_down", F, H);
#undef MAT
        const sp_tensor *mats[] = {&l->w_gate, &l->w_up, &l->w_down};
        for (size_t i = 0; i < sizeof mats / sizeof *mats; i++) m->act_q8 |= sp_type_traits_of(mats[i]->type).act_q8;
    }
    /* quantized activations are in 32-element blocks */
    if ((H % SP_QK || F % SP_QK || QD % SP_QK) && m->act_q8)
        return sp_fail(SP_ERR_BAD_FORMAT, "quantized weights need dimensions that are multiples of 32");
    return SP_OK;
}

/* BlockFFN per-layer FFN tensors (docs/gguf-blockffn.md): router [E, H] F32, router norm [E] iff rms, experts
 * [E, 2FE, H] (expert e = FE up rows then FE rows of down^T). The file must hold exactly the expected tensors. */
static sp_status load_blockffn_weights(sp_model *m) {
    const sp_gguf *g = m->gguf;
    const sp_hparams *hp = &m->hp;
    const int64_t H = hp->n_embd, E = hp->n_expert, FE = hp->expert_width;
    const bool rms = hp->router_norm == SP_ROUTER_NORM_RMS;
    sp_status s;
    char name[96];
    if ((s = load_common_weights(m)) != SP_OK) return s;
    for (int il = 0; il < hp->n_layer; il++) {
        sp_layer *l = &m->layers[il];
        snprintf(name, sizeof name, "blk.%d.ffn_router.weight", il);
        if ((s = bind_matrix(g, name, H, E, &l->router)) != SP_OK) return s;
        if (l->router.type != SP_TYPE_F32)
            return sp_fail(SP_ERR_UNSUPPORTED, "router tensor '%s' must be F32", name);
        snprintf(name, sizeof name, "blk.%d.ffn_router_norm.weight", il);
        if (rms) {
            if ((s = bind_norm(g, name, E, &l->router_norm)) != SP_OK) return s;
        } else if (sp_gguf_find_tensor(g, name)) {
            return sp_fail(SP_ERR_BAD_FORMAT, "tensor '%s' is present but blockffn.router_norm is not 'rms'", name);
        }
        snprintf(name, sizeof name, "blk.%d.ffn_experts.weight", il);
        if ((s = bind_tensor(g, name, H, 2 * FE, E, &l->experts)) != SP_OK) return s;
        if (sp_type_traits_of(l->experts.type).act_q8) m->act_q8 = true;
    }
    if (H % SP_QK && m->act_q8)
        return sp_fail(SP_ERR_BAD_FORMAT, "quantized weights need an embedding_length that is a multiple of 32");
    /* per layer: attn_norm, the attention's matrices and norms (GQA: q, k, v, output; MLA: q_a, q_a_norm, q_b,
     * kv_a_mqa, kv_a_norm, k_b, v_b, output), ffn_norm, router, experts, and the router norm iff rms */
    const uint64_t attn_tensors = m->attn == SP_ATTN_MLA ? 8 : 4;
    const uint64_t want = 2 + (m->output.data != m->tok_embd.data) + (uint64_t)hp->n_layer * (4 + attn_tensors + rms);
    if (m->gguf->n_tensors != want)
        return sp_fail(SP_ERR_BAD_FORMAT, "the file has %llu tensors but a blockffn model with these hyperparameters "
                       "has %llu: unexpected tensors", (unsigned long long)m->gguf->n_tensors,
                       (unsigned long long)want);
    return SP_OK;
}

/* ---- the architectures the loader implements: one entry per sp_arch in each table ---- */

static sp_status load_llama(sp_model *m) {
    sp_status s = load_llama_hparams(m->gguf, "llama", &m->hp, &m->attn);
    return s != SP_OK ? s : load_llama_weights(m);
}

static sp_status load_blockffn(sp_model *m) {
    sp_status s;
    if ((s = load_llama_hparams(m->gguf, "blockffn", &m->hp, &m->attn)) != SP_OK) return s;
    if ((s = load_blockffn_hparams(m->gguf, &m->hp, m->attn)) != SP_OK) return s;
    return load_blockffn_weights(m);
}

/* general.architecture of each kind (NULL-terminated: sp_supported_architectures returns it) and its loader
 * (hyperparameters and weights). */
static const char *const ARCH_NAMES[SP_ARCH_COUNT + 1] = {[SP_ARCH_LLAMA] = "llama", [SP_ARCH_BLOCKFFN] = "blockffn"};
static sp_status (*const ARCH_LOAD[SP_ARCH_COUNT])(sp_model *m) = {[SP_ARCH_LLAMA] = load_llama,
                                                                   [SP_ARCH_BLOCKFFN] = load_blockffn};

const char *const *sp_supported_architectures(void) { return ARCH_NAMES; }

/* Bytes of t in the tier's packed layout (0: not packed); a per-head weight is packed head by head. */
static size_t packed_bytes(const sp_kernels *k, const sp_tensor *t) {
    if (!t->data || !k->packed_size[t->type]) return 0;
    if (!t->head_rows) return k->packed_size[t->type](t->n, t->k);
    return k->packed_size[t->type](t->head_rows, t->k) * (size_t)(t->n / t->head_rows);
}

/* Repack (kernels.h pack) every dense matmul weight whose type the kernel tier packs -- attention (MLA's per-head
 * weights head by head), dense FFN, LM head (a copy when tied: the embedding lookup keeps reading the file's rows) --
 * into one buffer, 2 MB aligned when large (transparent huge pages: fewer TLB misses on the weight stream). Then the
 * file pages lying wholly inside tensors that are only read packed are released (MADV_DONTNEED: a private read-only
 * file mapping reloads them from the file if ever touched again), one tensor at a time, so peak memory stays near the
 * file size. The kernels table must be the one sp_forward uses (sp_kernels_get). BlockFFN experts: the up half of
 * every expert (FE rows, read by a matmul) is packed as its own block, so the decode step streams it as fast as a
 * dense weight; the down half follows it in the tier's "down" streaming layout (kernels.h pack_down) where the tier
 * has one, else stays a view of the file (the accumulate kernel reads it row by row). */
static sp_status pack_weights(sp_model *m) {
    const sp_kernels *k = sp_kernels_get();
    enum { PER_LAYER = 12 };
    const int64_t n_max = (int64_t)m->hp.n_layer * PER_LAYER + 1;
    sp_tensor **list = malloc((size_t)n_max * sizeof *list);
    if (!list) return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    int64_t n = 0;
    size_t total = 0;
    list[n++] = &m->output;
    for (int il = 0; il < m->hp.n_layer; il++) {
        sp_layer *l = &m->layers[il];
        sp_tensor *mats[PER_LAYER] = {&l->wq,    &l->wk,   &l->wv,    &l->wo,    &l->w_gate, &l->w_up,
                                      &l->w_down, &l->wq_a, &l->wq_b, &l->wkv_a, &l->wk_b,   &l->wv_b};
        for (int i = 0; i < PER_LAYER; i++) list[n++] = mats[i];
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        const size_t size = packed_bytes(k, list[i]);
        if (size) list[kept++] = list[i], total += size; /* sizes are multiples of 64 */
    }
    const int64_t E = m->hp.n_expert, FE = m->hp.expert_width;
    size_t up_stride = 0, down_size = 0; /* per expert; the same for every layer (one type and shape for all) */
    bool down_i8 = false;
    if (E > 0) {
        const sp_tensor *x0 = &m->layers[0].experts;
        up_stride = x0->data && k->packed_size[x0->type] ? k->packed_size[x0->type](FE, x0->k) : 0;
        for (int il = 0; il < m->hp.n_layer && up_stride; il++)
            if (m->layers[il].experts.type != x0->type || m->layers[il].experts.k != x0->k) up_stride = 0;
        /* the down half too, right after the up half of the same expert, when the tier streams it packed
         * (SPARROW_EXPERT_DOWN_PACK=0 keeps it a view of the file), in the int8 form where the tier has one
         * (SPARROW_EXPERT_DOWN_INT8=0 keeps the float one where the tier has it, else the file view): the
         * benchmark's baselines and the tests' exact comparisons */
        const char *env = getenv("SPARROW_EXPERT_DOWN_PACK"), *env8 = getenv("SPARROW_EXPERT_DOWN_INT8");
        down_i8 = k->accum_packed_i8[x0->type] && !(env8 && env8[0] == '0');
        down_size = up_stride && k->packed_down_size[x0->type] && (down_i8 || k->accum_packed[x0->type]) &&
                            !(env && env[0] == '0')
                        ? k->packed_down_size[x0->type](FE, x0->k) : 0;
        down_i8 = down_i8 && down_size;
        total += (up_stride + down_size) * (size_t)E * (size_t)m->hp.n_layer;
    }
    if (!total) {
        free(list);
        return SP_OK;
    }
    const size_t align = total >= (8u << 20) ? (2u << 20) : 64;
    if (posix_memalign(&m->packed, align, total)) {
        m->packed = NULL;
        free(list);
        return sp_fail(SP_ERR_NO_MEMORY, "out of memory for %zu bytes of packed weights", total);
    }
#ifdef MADV_HUGEPAGE
    if (align > 64) madvise(m->packed, total, MADV_HUGEPAGE); /* a hint; failure is harmless */
#endif
    m->packed_bytes = total;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    size_t off = 0;
    for (int64_t i = 0; i < kept; i++) {
        sp_tensor *t = list[i];
        const size_t size = packed_bytes(k, t);
        t->packed = (uint8_t *)m->packed + off;
        if (t->head_rows) { /* head by head: each its own block */
            t->packed_head = k->packed_size[t->type](t->head_rows, t->k);
            for (int64_t h = 0; h < t->n / t->head_rows; h++)
                k->pack[t->type]((uint8_t *)m->packed + off + (size_t)h * t->packed_head,
                                 (const uint8_t *)t->data + (size_t)(h * t->head_rows) * t->row_size, t->head_rows,
                                 t->k);
        } else {
            k->pack[t->type]((uint8_t *)m->packed + off, t->data, t->n, t->k);
        }
        off += size;
        if (m->gguf->mapped && t->data != m->tok_embd.data) { /* only the packed copy is read from now on */
            const uintptr_t a = ((uintptr_t)t->data + page - 1) & ~(page - 1);
            const uintptr_t b = ((uintptr_t)t->data + (size_t)t->n * t->row_size) & ~(page - 1);
            if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
        }
    }
    for (int il = 0; up_stride && il < m->hp.n_layer; il++) {
        sp_layer *l = &m->layers[il];
        const sp_tensor *X = &l->experts;
        l->experts_up_packed = (uint8_t *)m->packed + off;
        l->experts_up_stride = up_stride + down_size;
        l->experts_down_packed = down_size ? l->experts_up_packed + up_stride : NULL;
        l->experts_down_i8 = down_i8;
        for (int64_t e = 0; e < E; e++) {
            const uint8_t *up = (const uint8_t *)X->data + (size_t)e * 2 * (size_t)FE * X->row_size;
            k->pack[X->type]((uint8_t *)m->packed + off, up, FE, X->k);
            off += up_stride;
            if (down_size) {
                (down_i8 ? k->pack_down_i8 : k->pack_down)[X->type]((uint8_t *)m->packed + off,
                                                                     up + (size_t)FE * X->row_size, FE, X->k);
                off += down_size;
            }
            if (m->gguf->mapped) { /* the up rows (and down rows when packed) are only read packed from now on */
                const uintptr_t a = ((uintptr_t)up + page - 1) & ~(page - 1);
                const uintptr_t b = ((uintptr_t)up + (size_t)(down_size ? 2 : 1) * FE * X->row_size) & ~(page - 1);
                if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
            }
        }
    }
    free(list);
    return SP_OK;
}

sp_model_params sp_model_default_params(void) {
    sp_model_params p = {.use_mmap = true, .vocab_only = false, .repack = true};
    return p;
}

void sp_model_free(sp_model *m) {
    if (!m) return;
    sp_vk_model_release(m);
    free(m->packed);
    free(m->layers);
    sp_vocab_free(m->vocab);
    sp_gguf_close(m->gguf);
    free(m);
}

sp_status sp_model_load(const char *path, sp_model_params params, sp_model **out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_model_load: out is NULL");
    *out = NULL;
    if (!path) return sp_fail(SP_ERR_INVALID_ARG, "sp_model_load: path is NULL");
    sp_model *m = calloc(1, sizeof *m);
    if (!m) return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    sp_status s = sp_gguf_open(path, params.use_mmap, &m->gguf);
    if (s != SP_OK) goto fail;

    sp_gguf_str arch = {0};
    if ((s = sp_gguf_get_str(m->gguf, "general.architecture", &arch)) != SP_OK) goto fail;
    snprintf(m->arch_name, sizeof m->arch_name, "%.*s", (int)SP_MIN(arch.len, 31), arch.data);
    sp_gguf_str gname;
    if (sp_gguf_get_str(m->gguf, "general.name", &gname) == SP_OK)
        snprintf(m->name, sizeof m->name, "%.*s", (int)SP_MIN(gname.len, 127), gname.data);
    sp_clear_error();

    if ((s = sp_vocab_load(m->gguf, &m->vocab)) != SP_OK) goto fail;
    m->hp.n_vocab = sp_vocab_n_tokens(m->vocab);

    if (!params.vocab_only) {
        int a = 0;
        while (a < SP_ARCH_COUNT && !sp_gguf_str_eq(arch, ARCH_NAMES[a])) a++;
        if (a == SP_ARCH_COUNT) {
            char known[128] = "";
            for (int i = 0; i < SP_ARCH_COUNT; i++)
                snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", i ? ", " : "", ARCH_NAMES[i]);
            s = sp_fail(SP_ERR_UNSUPPORTED, "architecture '%s' is not implemented by the native runtime (it implements "
                        "%s)", m->arch_name, known);
            goto fail;
        }
        m->arch = (sp_arch)a;
        if ((s = ARCH_LOAD[a](m)) != SP_OK) goto fail;
        if (params.repack && (s = pack_weights(m)) != SP_OK) goto fail;
        m->has_weights = true;
    }

    sp_model_info *i = &m->info;
    i->architecture = m->arch_name;
    i->name = m->name;
    i->n_vocab = m->hp.n_vocab;
    i->n_ctx_train = m->hp.n_ctx_train;
    i->n_embd = m->hp.n_embd;
    i->n_layer = m->hp.n_layer;
    i->n_head = m->hp.n_head;
    i->n_head_kv = m->hp.n_head_kv;
    i->n_ff = m->hp.n_ff;
    i->bos_token = sp_vocab_bos(m->vocab);
    i->eos_token = sp_vocab_eos(m->vocab);
    i->eot_token = sp_vocab_eot(m->vocab);
    i->add_bos = sp_vocab_add_bos(m->vocab);
    for (uint64_t t = 0; t < m->gguf->n_tensors; t++) {
        const sp_gguf_tensor *gt = &m->gguf->tensors[t];
        i->n_params += (uint64_t)(gt->ne[0] * gt->ne[1] * gt->ne[2] * gt->ne[3]);
        i->weight_bytes += gt->nbytes;
    }
    *out = m;
    return SP_OK;
fail:
    sp_model_free(m);
    return s;
}

sp_status sp_model_get_info(const sp_model *m, sp_model_info *out) {
    if (!m || !out) return sp_fail(SP_ERR_INVALID_ARG, "sp_model_get_info: NULL argument");
    *out = m->info;
    return SP_OK;
}

sp_status sp_model_meta_str(const sp_model *m, const char *key, const char **out, size_t *len) {
    if (!m || !key || !out || !len) return sp_fail(SP_ERR_INVALID_ARG, "sp_model_meta_str: NULL argument");
    sp_gguf_str s;
    sp_status st = sp_gguf_get_str(m->gguf, key, &s);
    if (st != SP_OK) return st;
    *out = s.data;
    *len = (size_t)s.len;
    return SP_OK;
}

sp_status sp_tokenize(const sp_model *m, const char *text, size_t len, bool add_special, bool parse_special,
                      int32_t *tokens, size_t capacity, size_t *n_out) {
    sp_clear_error();
    if (!m || (!text && len) || !n_out || (!tokens && capacity))
        return sp_fail(SP_ERR_INVALID_ARG, "sp_tokenize: NULL argument");
    return sp_vocab_tokenize(m->vocab, text ? text : "", len, add_special, parse_special, tokens, capacity, n_out);
}

sp_status sp_token_to_piece(const sp_model *m, int32_t token, bool render_special, char *buf, size_t capacity,
                            size_t *len) {
    sp_clear_error();
    if (!m || !len || (!buf && capacity)) return sp_fail(SP_ERR_INVALID_ARG, "sp_token_to_piece: NULL argument");
    return sp_vocab_token_to_piece(m->vocab, token, render_special, buf, capacity, len);
}

bool sp_token_is_eog(const sp_model *m, int32_t token) { return m && sp_vocab_is_eog(m->vocab, token); }
