/* vk_weights.c: a model's weights on a device, in the GPU layout of shaders/common.glsl: each quantized block's
 * quants and scale split into a words array and a float32 scales array (GGUF's 18- and 34-byte blocks are not
 * 4-byte aligned; the split makes every shader load an aligned word), F16 and F32 as they are. Made once per model
 * and device, by the first session there, and freed with the model. */
#include "vk.h"

#include <stdlib.h>
#include <string.h>

static pthread_mutex_t weights_lock = PTHREAD_MUTEX_INITIALIZER;

bool sp_vk_gpu_type(sp_type t) {
    return t == SP_TYPE_F32 || t == SP_TYPE_F16 || t == SP_TYPE_Q4_0 || t == SP_TYPE_Q4_1 || t == SP_TYPE_Q8_0;
}

/* The GPU layout of n rows of k elements of type t from src (GGUF layout) into dst (words); d_off/m_off set. */
size_t sp_vk_layout_words(sp_type t, int64_t n, int64_t k, uint32_t *d_off, uint32_t *m_off) {
    const size_t nb = (size_t)(n * k / SP_QK); /* offsets wrap past 2^32 words: upload() refuses those sizes */
    switch (t) {
    case SP_TYPE_F32: *d_off = *m_off = 0; return (size_t)(n * k);
    case SP_TYPE_F16: *d_off = *m_off = 0; return (size_t)(n * k + 1) / 2;
    case SP_TYPE_Q8_0: *d_off = *m_off = (uint32_t)(nb * 8); return nb * 9;
    case SP_TYPE_Q4_0: *d_off = *m_off = (uint32_t)(nb * 4); return nb * 5;
    default: /* Q4_1 */ *d_off = (uint32_t)(nb * 4); *m_off = (uint32_t)(nb * 5); return nb * 6;
    }
}

void sp_vk_to_layout(sp_type t, const void *src, int64_t n, int64_t k, uint32_t *dst, uint32_t d_off, uint32_t m_off) {
    const size_t nb = (size_t)(n * k / SP_QK);
    float *d = (float *)(dst + d_off), *m = (float *)(dst + m_off);
    if (t == SP_TYPE_F32 || t == SP_TYPE_F16) {
        memcpy(dst, src, (size_t)(n * k) * (t == SP_TYPE_F32 ? 4 : 2));
    } else if (t == SP_TYPE_Q8_0) {
        const sp_block_q8_0 *b = src;
        for (size_t i = 0; i < nb; i++) {
            memcpy(dst + i * 8, b[i].qs, 32);
            d[i] = sp_f16_to_f32(b[i].d);
        }
    } else if (t == SP_TYPE_Q4_0) {
        const sp_block_q4_0 *b = src;
        for (size_t i = 0; i < nb; i++) {
            memcpy(dst + i * 4, b[i].qs, 16);
            d[i] = sp_f16_to_f32(b[i].d);
        }
    } else {
        const sp_block_q4_1 *b = src;
        for (size_t i = 0; i < nb; i++) {
            memcpy(dst + i * 4, b[i].qs, 16);
            d[i] = sp_f16_to_f32(b[i].d);
            m[i] = sp_f16_to_f32(b[i].m);
        }
    }
}

/* Upload a weight (a 2-D tensor, or a norm vector as one F32 row of k). */
static sp_status upload(sp_vk_dev *dv, sp_vk_tensor *out, sp_type t, const void *data, int64_t n, int64_t k,
                        const char *what) {
    if (!sp_vk_gpu_type(t))
        return sp_fail(SP_ERR_UNSUPPORTED, "%s: tensor type %d has no GPU kernel (F32, F16, Q4_0, Q4_1, Q8_0 do)", what, (int)t);
    if (t != SP_TYPE_F32 && k % SP_QK)
        return sp_fail(SP_ERR_UNSUPPORTED, "%s: rows of %lld elements; the GPU kernels need a multiple of 32", what,
                       (long long)k);
    out->type = t;
    out->n = n;
    out->k = k;
    const size_t words = sp_vk_layout_words(t, n, k, &out->d_off, &out->m_off);
    if (words > UINT32_MAX) /* the shaders index words with 32-bit integers */
        return sp_fail(SP_ERR_UNSUPPORTED, "%s: %zu words is over the GPU kernels' 32-bit index range", what, words);
    uint32_t *host = malloc(words * 4 + 4);
    if (!host) return sp_fail(SP_ERR_NO_MEMORY, "out of memory converting %s for the GPU", what);
    sp_vk_to_layout(t, data, n, k, host, out->d_off, out->m_off);
    sp_status st = sp_vk_buf_new(dv, words * 4, false, &out->b);
    if (st == SP_OK) st = sp_vk_upload(dv, &out->b, 0, host, words * 4);
    free(host);
    return st;
}

static sp_status upload_tensor(sp_vk_dev *dv, sp_vk_tensor *out, const sp_tensor *w, const char *what) {
    return upload(dv, out, w->type, w->data, w->n, w->k, what);
}

static void free_model(sp_vk_model *vm, int32_t n_layer) {
    if (!vm) return;
    if (vm->layers)
        for (int32_t il = 0; il < n_layer; il++) {
            sp_vk_tensor *ts = (sp_vk_tensor *)&vm->layers[il];
            for (size_t i = 0; i < sizeof(sp_vk_layer) / sizeof(sp_vk_tensor); i++) sp_vk_buf_free(vm->d, &ts[i].b);
        }
    sp_vk_buf_free(vm->d, &vm->out_norm.b);
    sp_vk_buf_free(vm->d, &vm->output.b);
    free(vm->layers);
    free(vm);
}

static sp_status make_model(const sp_model *m, int32_t device, sp_vk_model **out) {
    sp_vk_dev *dv;
    sp_status st = sp_vk_device(device, &dv);
    if (st != SP_OK) return st;
    const sp_hparams *hp = &m->hp;
    sp_vk_model *vm = calloc(1, sizeof *vm);
    if (vm) vm->layers = calloc((size_t)hp->n_layer, sizeof *vm->layers);
    if (!vm || !vm->layers) {
        free(vm);
        return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    }
    vm->device = device;
    vm->d = dv;
    const int64_t H = hp->n_embd;
    for (int32_t il = 0; il < hp->n_layer && st == SP_OK; il++) {
        const sp_layer *l = &m->layers[il];
        sp_vk_layer *g = &vm->layers[il];
        st = upload(dv, &g->attn_norm, SP_TYPE_F32, l->attn_norm, 1, H, "attn_norm");
        if (st == SP_OK) st = upload(dv, &g->ffn_norm, SP_TYPE_F32, l->ffn_norm, 1, H, "ffn_norm");
        if (l->attn == SP_ATTN_MLA) {
            if (st == SP_OK) st = upload_tensor(dv, &g->wq_a, &l->wq_a, "attn_q_a");
            if (st == SP_OK) st = upload(dv, &g->q_a_norm, SP_TYPE_F32, l->q_a_norm, 1, hp->q_lora, "attn_q_a_norm");
            if (st == SP_OK) st = upload_tensor(dv, &g->wq_b, &l->wq_b, "attn_q_b");
            if (st == SP_OK) st = upload_tensor(dv, &g->wkv_a, &l->wkv_a, "attn_kv_a_mqa");
            if (st == SP_OK) st = upload(dv, &g->kv_a_norm, SP_TYPE_F32, l->kv_a_norm, 1, hp->kv_lora, "attn_kv_a_norm");
            if (st == SP_OK) st = upload_tensor(dv, &g->wk_b, &l->wk_b, "attn_k_b");
            if (st == SP_OK) st = upload_tensor(dv, &g->wv_b, &l->wv_b, "attn_v_b");
        } else {
            if (st == SP_OK) st = upload_tensor(dv, &g->wq, &l->wq, "attn_q");
            if (st == SP_OK) st = upload_tensor(dv, &g->wk, &l->wk, "attn_k");
            if (st == SP_OK) st = upload_tensor(dv, &g->wv, &l->wv, "attn_v");
        }
        if (st == SP_OK) st = upload_tensor(dv, &g->wo, &l->wo, "attn_output");
        if (st != SP_OK) break;
        if (l->ffn == SP_FFN_KIND_EXPERTS) {
            st = upload_tensor(dv, &g->router, &l->router, "ffn_router");
            if (st == SP_OK && l->router_norm)
                st = upload(dv, &g->router_norm, SP_TYPE_F32, l->router_norm, 1, hp->n_expert, "router_norm");
            if (st == SP_OK) st = upload_tensor(dv, &g->experts, &l->experts, "ffn_experts");
        } else {
            st = upload_tensor(dv, &g->w_gate, &l->w_gate, "ffn_gate");
            if (st == SP_OK) st = upload_tensor(dv, &g->w_up, &l->w_up, "ffn_up");
            if (st == SP_OK) st = upload_tensor(dv, &g->w_down, &l->w_down, "ffn_down");
        }
    }
    if (st == SP_OK) st = upload(dv, &vm->out_norm, SP_TYPE_F32, m->out_norm, 1, H, "output_norm");
    if (st == SP_OK) st = upload_tensor(dv, &vm->output, &m->output, "output");
    if (st != SP_OK) {
        free_model(vm, hp->n_layer);
        return st;
    }
    *out = vm;
    return SP_OK;
}

sp_status sp_vk_model_get(const sp_model *m, int32_t device, sp_vk_model **out) {
    pthread_mutex_lock(&weights_lock);
    sp_vk_model *vm = m->vk;
    while (vm && vm->device != device) vm = vm->next;
    sp_status st = SP_OK;
    if (!vm && (st = make_model(m, device, &vm)) == SP_OK) {
        vm->next = m->vk;
        ((sp_model *)m)->vk = vm; /* the model's one mutable field, under weights_lock */
    }
    pthread_mutex_unlock(&weights_lock);
    *out = st == SP_OK ? vm : NULL;
    return st;
}

void sp_vk_model_release(sp_model *m) {
    pthread_mutex_lock(&weights_lock);
    for (sp_vk_model *vm = m->vk, *next; vm; vm = next) {
        next = vm->next;
        free_model(vm, m->hp.n_layer);
    }
    m->vk = NULL;
    pthread_mutex_unlock(&weights_lock);
}
