/* vk_forward.c: a device session (its KV cache and activations on the GPU) and its forward pass, recorded into one
 * command buffer and submitted once per sp_eval.
 *
 * Shape legend: T = tokens in the batch, B = n_batch, H = n_embd, D = head_dim, NH / NKV = heads / kv heads,
 * QD = NH*D, KVD = NKV*D, F = n_ff, E = experts, FE = expert width, V = vocabulary, C = n_ctx, L = layers,
 * P = tokens cached before the batch.
 *
 * The pass mirrors forward.c step for step (the shader names in brackets):
 *   host: embeddings x[t] (dequantized rows x embed_scale) and the RoPE cos/sin table, as forward.c computes them,
 *         into the host-visible io buffer; copied to x on the device
 *   per layer: xn = rmsnorm(x) [rmsnorm]; q, k, v = W xn [matmul]; rotate q, k [rope]; k, v into the F16 cache at
 *         slots P.. [kv_store]; attn = attention over the cache, tree mask or causal [attention];
 *         multi-head latent attention instead (attn_mla.c's absorbed form): cq = W_qa xn, kv = W_kva xn [matmul];
 *         rotate kv's rope key, normalise cq and kv's latent [rope, rmsnorm]; cache the latent c and the rope key
 *         [kv_store]; q = W_qb cq, rotate each head's rope part; q_lat = W_UK[h] q_nope[h] per head [matmul]; o_lat =
 *         the heads' attention over the latent cache [attention_mla]; attn = W_UV[h] o_lat[h] per head [matmul];
 *         x += residual_scale * Wo attn [matmul, accumulating]; xn = rmsnorm(x)
 *         dense FFN: gate, up [matmul]; gate = silu(gate) up [swiglu]; x += residual_scale * Wdown gate [matmul]
 *         BlockFFN: r = router xn [matmul] -> relu + norm, the batch's union of experts [router]; the union's up
 *         halves [expert_up] and down halves added to x [expert_down]; experts out of the union are not read
 *   head: xn = rmsnorm(x rows asked for) * logit_scale; logits = output xn [matmul], into io
 * with a compute barrier between dependent steps. The router's scores of every layer stay in io, so the session's
 * sparsity counters are updated on the host after the pass, as on the CPU. Numerics: weights dequantized to float
 * (the CPU quantizes activations to 8 bits for the quantized types), float accumulation in another order: logits
 * agree within the NMSE bound tests/test_vulkan.py states, not bit for bit. */
#include "vk.h"

#include "../forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct sp_vk_session {
    sp_vk_model *w;
    sp_vk_dev *d;
    VkCommandPool pool;
    VkCommandBuffer cb;
    VkFence fence;
    sp_vk_buf kc, vc;          /* [L, C, KD] / [L, C, VD] F16 (two per word): GQA keys / values (KD = VD = KVD);
                                  MLA latents c / rope keys (KD = KL, VD = DR) */
    sp_vk_buf x, xn, q, k, v, attn, gate, up, hexp, used;
    sp_vk_buf cq, qlat, olat;  /* MLA: [B, QL], [B, NH, KL] each; k holds kv_a's rows [B, KL + DR] */
    sp_vk_buf io;              /* host visible: the inputs and outputs below */
    size_t io_x, io_cs, io_mask, io_router, io_logits; /* byte offsets in io */
    size_t kc_layer_bytes, vc_layer_bytes; /* C * KD * 2, C * VD * 2 */
};

/* ---- checks (also without Vulkan: device.c) ---- */

sp_status sp_vk_session_check(const sp_model *m, const sp_session_params *p) {
    const sp_hparams *hp = &m->hp;
    if (p->n_seq != 1)
        return sp_fail(SP_ERR_UNSUPPORTED, "a GPU session runs one sequence (n_seq 1), got n_seq %d", p->n_seq);
    if (p->kv_type != SP_KV_F16) return sp_fail(SP_ERR_UNSUPPORTED, "a GPU session's KV cache is F16");
    if (m->attn == SP_ATTN_MLA) {
        if (hp->kv_lora > 512 || hp->kv_lora % 2 || hp->n_rot > 256 || hp->n_rot % 2)
            return sp_fail(SP_ERR_UNSUPPORTED, "kv_lora_rank %d / rope dims %d: the GPU latent attention takes even "
                           "sizes up to 512 / 256", hp->kv_lora, hp->n_rot);
        if (hp->q_lora % SP_QK || hp->kv_lora % SP_QK || hp->qk_nope % SP_QK || (hp->n_head * hp->v_dim) % SP_QK)
            return sp_fail(SP_ERR_UNSUPPORTED, "the GPU kernels need q/kv latent ranks, nope dims and heads x value "
                           "dims that are multiples of 32 (%d, %d, %d, %d)", hp->q_lora, hp->kv_lora, hp->qk_nope,
                           hp->n_head * hp->v_dim);
    } else if (hp->head_dim > 256 || hp->head_dim % 2 || hp->n_rot % 2 || hp->n_rot > hp->head_dim) {
        return sp_fail(SP_ERR_UNSUPPORTED, "head_dim %d / n_rot %d: the GPU attention takes an even head_dim <= 256",
                       hp->head_dim, hp->n_rot);
    }
    if (hp->n_embd % SP_QK || (hp->n_ff && hp->n_ff % SP_QK) || (hp->n_head * hp->head_dim) % SP_QK)
        return sp_fail(SP_ERR_UNSUPPORTED, "the GPU kernels need widths that are multiples of 32");
    /* the shaders index with 32-bit integers: a layer's cache, the batch's expert hidden units */
    const uint64_t row = (uint64_t)(m->attn == SP_ATTN_MLA ? SP_MAX(hp->kv_lora, hp->n_rot) : hp->n_head_kv * hp->head_dim);
    if ((uint64_t)p->n_ctx * row > UINT32_MAX ||
        (uint64_t)p->n_batch * (uint64_t)SP_MAX(hp->n_expert, 1) * (uint64_t)SP_MAX(hp->expert_width, 1) > UINT32_MAX)
        return sp_fail(SP_ERR_UNSUPPORTED, "n_ctx %d (or n_batch %d) is over the GPU kernels' 32-bit index range for "
                       "this model", p->n_ctx, p->n_batch);
    const int32_t n_dev = sp_device_count();
    if (p->device > n_dev)
        return sp_fail(SP_ERR_INVALID_ARG, "device %d does not exist: %d GPU device(s)%s%s", p->device, n_dev,
                       n_dev ? "" : ": ", n_dev ? "" : sp_last_error());
    return SP_OK;
}

/* ---- session ---- */

void sp_vk_session_free(sp_vk_session *g) {
    if (!g) return;
    sp_vk_dev *d = g->d;
    sp_vk_buf *bufs[] = {&g->kc, &g->vc, &g->x, &g->xn, &g->q, &g->k, &g->v, &g->attn, &g->gate, &g->up,
                         &g->hexp, &g->used, &g->cq, &g->qlat, &g->olat, &g->io};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) sp_vk_buf_free(d, bufs[i]);
    if (g->fence) sp_vk.vkDestroyFence(d->dev, g->fence, NULL);
    if (g->pool) sp_vk.vkDestroyCommandPool(d->dev, g->pool, NULL);
    free(g);
}

sp_status sp_vk_session_new(sp_session *ses, sp_vk_session **out) {
    *out = NULL;
    const sp_model *m = ses->model;
    const sp_hparams *hp = &m->hp;
    const int64_t B = ses->params.n_batch, C = ses->params.n_ctx, H = hp->n_embd, L = hp->n_layer;
    const bool mla = m->attn == SP_ATTN_MLA;
    const int64_t NH = hp->n_head, KVD = (int64_t)hp->n_head_kv * hp->head_dim;
    const int64_t KL = mla ? hp->kv_lora : 0, DR = hp->n_rot, DK = mla ? hp->qk_nope + DR : 0;
    const int64_t QD = mla ? NH * DK : NH * hp->head_dim, OD = mla ? NH * hp->v_dim : QD;
    const int64_t KD = mla ? KL : KVD, VD = mla ? DR : KVD; /* cache row widths */
    const int64_t F = SP_MAX(hp->n_ff, 1), E = SP_MAX(hp->n_expert, 1), FE = SP_MAX(hp->expert_width, 1);
    sp_vk_model *w;
    sp_status st = sp_vk_model_get(m, ses->params.device, &w);
    if (st != SP_OK) return st;
    sp_vk_session *g = calloc(1, sizeof *g);
    if (!g) return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    g->w = w;
    g->d = w->d;
    sp_vk_dev *d = g->d;
    VkCommandPoolCreateInfo pci = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                   .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                   .queueFamilyIndex = d->queue_family};
    VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    if (sp_vk.vkCreateCommandPool(d->dev, &pci, NULL, &g->pool) != VK_SUCCESS ||
        sp_vk.vkCreateFence(d->dev, &fci, NULL, &g->fence) != VK_SUCCESS) {
        sp_vk_session_free(g);
        return sp_fail(SP_ERR_NO_MEMORY, "could not create a command pool on %s", d->info.name);
    }
    VkCommandBufferAllocateInfo cai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, .commandPool = g->pool,
                                       .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY, .commandBufferCount = 1};
    if (sp_vk.vkAllocateCommandBuffers(d->dev, &cai, &g->cb) != VK_SUCCESS) {
        sp_vk_session_free(g);
        return sp_fail(SP_ERR_NO_MEMORY, "could not allocate a command buffer on %s", d->info.name);
    }
    g->kc_layer_bytes = (size_t)(C * KD * 2);
    g->vc_layer_bytes = (size_t)(C * VD * 2);
    const size_t f4 = sizeof(float);
    struct { sp_vk_buf *b; uint64_t bytes; } dev[] = {
        {&g->kc, (uint64_t)L * g->kc_layer_bytes}, {&g->vc, (uint64_t)L * g->vc_layer_bytes},
        {&g->x, B * H * f4}, {&g->xn, B * H * f4}, {&g->q, B * QD * f4}, {&g->k, B * (mla ? KL + DR : KVD) * f4},
        {&g->v, B * KVD * f4}, {&g->attn, B * OD * f4}, {&g->gate, B * F * f4}, {&g->up, B * F * f4},
        {&g->hexp, B * E * FE * f4}, {&g->used, E * 4}, {&g->cq, B * SP_MAX(hp->q_lora, 1) * f4},
        {&g->qlat, B * NH * SP_MAX(KL, 1) * f4}, {&g->olat, B * NH * SP_MAX(KL, 1) * f4}};
    for (size_t i = 0; i < sizeof dev / sizeof *dev && st == SP_OK; i++) st = sp_vk_buf_new(d, dev[i].bytes, false, dev[i].b);
    /* io: x [B, H], cs [B, n_rot], mask [B * B bytes], router [L, B, E], logits [B, V] */
    size_t off = 0;
    g->io_x = off, off += (size_t)(B * H) * f4;
    g->io_cs = off, off += (size_t)(B * hp->n_rot) * f4;
    g->io_mask = off, off += ((size_t)(B * B) + 3) / 4 * 4;
    g->io_router = off, off += (size_t)(hp->n_expert ? L * B * E : 0) * f4;
    g->io_logits = off, off += (size_t)(B * hp->n_vocab) * f4;
    if (st == SP_OK) st = sp_vk_buf_new(d, off, true, &g->io);
    if (st != SP_OK) {
        sp_vk_session_free(g);
        return st;
    }
    *out = g;
    return SP_OK;
}

/* ---- recording ---- */

static void barrier(VkCommandBuffer cb) {
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                          .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT,
                          .dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                                           VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    sp_vk.vkCmdPipelineBarrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                               VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL,
                               0, NULL);
}

static void dispatch(sp_vk_session *g, sp_vk_pipe p, const sp_vk_pc *pc, uint32_t x, uint32_t y, uint32_t z) {
    sp_vk.vkCmdBindPipeline(g->cb, VK_PIPELINE_BIND_POINT_COMPUTE, g->d->pipes[p]);
    sp_vk.vkCmdPushConstants(g->cb, g->d->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof *pc, pc);
    sp_vk.vkCmdDispatch(g->cb, x, y, z);
}

static sp_vk_pipe by_type(sp_vk_pipe f32, sp_type t) {
    switch (t) {
    case SP_TYPE_F16: return f32 + 1;
    case SP_TYPE_Q4_0: return f32 + 2;
    case SP_TYPE_Q4_1: return f32 + 3;
    case SP_TYPE_Q8_0: return f32 + 4;
    default: return f32;
    }
}

static inline uint32_t div_up(int64_t a, int64_t b) { return (uint32_t)((a + b - 1) / b); }

/* Workgroups of 64 for n invocations of a shader that strides over the grid (rope, kv_store, swiglu): capped at the
 * device's limit, the shader loops over the rest. */
static inline uint32_t grid(const sp_vk_session *g, int64_t n) {
    return (uint32_t)SP_MAX(1, SP_MIN((int64_t)div_up(n, 64), (int64_t)g->d->max_groups_x));
}

/* Y[t, r] (= or += alpha *) W[row0 + r] . X[t] for T tokens and N rows (N < 0: all of W's). */
static void matmul_rows(sp_vk_session *g, const sp_vk_tensor *W, int64_t row0, int64_t N, uint64_t X, int64_t ldx,
                        uint64_t Y, int64_t ldy, int64_t T, bool accumulate, float alpha) {
    N = N < 0 ? W->n : N;
    if (N <= 0 || T <= 0) return;
    sp_vk_pc pc = {.a = {W->b.addr, X, Y},
                   .u = {(uint32_t)W->k, (uint32_t)N, (uint32_t)T, (uint32_t)ldx, (uint32_t)ldy, W->d_off, W->m_off,
                         accumulate, g->d->rows_per_group, (uint32_t)row0},
                   .f = {alpha}};
    const int64_t groups = div_up(N, g->d->rows_per_group);
    const uint32_t gx = (uint32_t)SP_MIN(groups, (int64_t)g->d->max_groups_x);
    dispatch(g, by_type(SP_VK_MATMUL_F32, W->type), &pc, gx, div_up(groups, gx), 1);
}

static void matmul(sp_vk_session *g, const sp_vk_tensor *W, uint64_t X, int64_t ldx, uint64_t Y, int64_t ldy,
                   int64_t T, bool accumulate, float alpha) {
    matmul_rows(g, W, 0, -1, X, ldx, Y, ldy, T, accumulate, alpha);
}

/* Y[t] = rmsnorm(X[t][:H]) * post * w for T rows of stride ld (0: H). */
static void rmsnorm(sp_vk_session *g, uint64_t X, uint64_t Y, const sp_vk_tensor *w, int64_t T, int64_t H, int64_t ld,
                    float eps, float post) {
    sp_vk_pc pc = {.a = {X, Y, w->b.addr}, .u = {(uint32_t)H, (uint32_t)ld}, .f = {eps, post}};
    dispatch(g, SP_VK_RMSNORM, &pc, (uint32_t)T, 1, 1);
}

static void rope(sp_vk_session *g, uint64_t X, int64_t T, int64_t heads, int64_t ldx, int64_t D, int64_t n_rot) {
    sp_vk_pc pc = {.a = {X, g->io.addr + g->io_cs},
                   .u = {(uint32_t)T, (uint32_t)heads, (uint32_t)ldx, (uint32_t)D, (uint32_t)n_rot}};
    dispatch(g, SP_VK_ROPE, &pc, grid(g, T * heads * (n_rot / 2)), 1, 1);
}

/* Grouped-query attention of layer il: xn -> attn [T, NH*D]; the batch's keys and values into the cache. */
static void attention_gqa(sp_vk_session *g, const sp_session *ses, const sp_batch *b, int64_t il, int64_t P) {
    const sp_hparams *hp = &ses->model->hp;
    const sp_vk_layer *l = &g->w->layers[il];
    const int64_t T = b->n_tokens, H = hp->n_embd, D = hp->head_dim, NH = hp->n_head, NKV = hp->n_head_kv;
    const int64_t QD = NH * D, KVD = NKV * D;
    const uint64_t kc = g->kc.addr + (uint64_t)il * g->kc_layer_bytes, vc = g->vc.addr + (uint64_t)il * g->vc_layer_bytes;
    matmul(g, &l->wq, g->xn.addr, H, g->q.addr, QD, T, false, 1.0f);
    matmul(g, &l->wk, g->xn.addr, H, g->k.addr, KVD, T, false, 1.0f);
    matmul(g, &l->wv, g->xn.addr, H, g->v.addr, KVD, T, false, 1.0f);
    barrier(g->cb);
    rope(g, g->q.addr, T, NH, QD, D, hp->n_rot);
    rope(g, g->k.addr, T, NKV, KVD, D, hp->n_rot);
    barrier(g->cb);
    sp_vk_pc kv = {.a = {g->k.addr, g->v.addr, kc, vc},
                   .u = {(uint32_t)T, (uint32_t)KVD, (uint32_t)P, (uint32_t)KVD, (uint32_t)KVD, (uint32_t)KVD}};
    dispatch(g, SP_VK_KV_STORE, &kv, grid(g, T * KVD / 2), 1, 1);
    barrier(g->cb);
    sp_vk_pc at = {.a = {g->q.addr, kc, vc, g->attn.addr, g->io.addr + g->io_mask},
                   .u = {(uint32_t)T, (uint32_t)P, (uint32_t)D, (uint32_t)QD, (uint32_t)KVD, (uint32_t)(NH / NKV),
                         b->mask != NULL},
                   .f = {1.0f / sqrtf((float)D)}};
    dispatch(g, SP_VK_ATTENTION, &at, (uint32_t)NH, (uint32_t)T, 1);
}

/* Multi-head latent attention of layer il (attn_mla.c's absorbed form): xn -> attn [T, NH*DV]; the batch's latents
 * and rope keys into the cache. */
static void attention_mla(sp_vk_session *g, const sp_session *ses, const sp_batch *b, int64_t il, int64_t P) {
    const sp_hparams *hp = &ses->model->hp;
    const sp_vk_layer *l = &g->w->layers[il];
    const int64_t T = b->n_tokens, H = hp->n_embd, NH = hp->n_head, QL = hp->q_lora, KL = hp->kv_lora;
    const int64_t DN = hp->qk_nope, DR = hp->n_rot, DK = DN + DR, KR = KL + DR, DV = hp->v_dim;
    const uint64_t kc = g->kc.addr + (uint64_t)il * g->kc_layer_bytes, vc = g->vc.addr + (uint64_t)il * g->vc_layer_bytes;
    const uint64_t mask = g->io.addr + g->io_mask;
    matmul(g, &l->wq_a, g->xn.addr, H, g->cq.addr, QL, T, false, 1.0f);   /* cq */
    matmul(g, &l->wkv_a, g->xn.addr, H, g->k.addr, KR, T, false, 1.0f);   /* [c; k_pe] */
    barrier(g->cb);
    rope(g, g->k.addr + (uint64_t)KL * 4, T, 1, KR, 0, DR);              /* the shared rope key */
    rmsnorm(g, g->cq.addr, g->cq.addr, &l->q_a_norm, T, QL, 0, hp->lora_eps, 1.0f);
    rmsnorm(g, g->k.addr, g->k.addr, &l->kv_a_norm, T, KL, KR, hp->lora_eps, 1.0f);
    barrier(g->cb);
    sp_vk_pc kv = {.a = {g->k.addr, g->k.addr + (uint64_t)KL * 4, kc, vc},
                   .u = {(uint32_t)T, (uint32_t)KL, (uint32_t)P, (uint32_t)DR, (uint32_t)KR, (uint32_t)KR}};
    dispatch(g, SP_VK_KV_STORE, &kv, grid(g, T * SP_MAX(KL, DR) / 2), 1, 1);
    matmul(g, &l->wq_b, g->cq.addr, QL, g->q.addr, NH * DK, T, false, 1.0f); /* q [T, NH, DK] */
    barrier(g->cb);
    rope(g, g->q.addr + (uint64_t)DN * 4, T, NH, NH * DK, DK, DR);        /* each head's rope part */
    barrier(g->cb);
    for (int64_t h = 0; h < NH; h++) /* absorb W_UK: q_lat[t, h] = k_b[h] q_nope[t, h] */
        matmul_rows(g, &l->wk_b, h * KL, KL, g->q.addr + (uint64_t)(h * DK) * 4, NH * DK,
                    g->qlat.addr + (uint64_t)(h * KL) * 4, NH * KL, T, false, 1.0f);
    barrier(g->cb);
    sp_vk_pc at = {.a = {g->qlat.addr, g->q.addr, kc, vc, g->olat.addr},
                   .u = {(uint32_t)T, (uint32_t)P, (uint32_t)KL, (uint32_t)DR, (uint32_t)DN, (uint32_t)NH,
                         b->mask != NULL, (uint32_t)mask, (uint32_t)(mask >> 32)},
                   .f = {1.0f / sqrtf((float)DK)}};
    dispatch(g, SP_VK_ATTENTION_MLA, &at, (uint32_t)NH, (uint32_t)T, 1);
    barrier(g->cb);
    for (int64_t h = 0; h < NH; h++) /* apply W_UV: attn[t, h] = v_b[h] o_lat[t, h] */
        matmul_rows(g, &l->wv_b, h * DV, DV, g->olat.addr + (uint64_t)(h * KL) * 4, NH * KL,
                    g->attn.addr + (uint64_t)(h * DV) * 4, NH * DV, T, false, 1.0f);
}

static void record(sp_vk_session *g, sp_session *ses, const sp_batch *b, int64_t P) {
    const sp_model *m = ses->model;
    const sp_hparams *hp = &m->hp;
    const int64_t T = b->n_tokens, H = hp->n_embd, F = hp->n_ff, E = hp->n_expert, FE = hp->expert_width;
    const int64_t B = ses->params.n_batch;
    const float rs = hp->residual_scale;
    VkCommandBuffer cb = g->cb;
    barrier(cb); /* the previous pass's (or keep's) writes come before this pass reads */
    VkBufferCopy cp = {.srcOffset = g->io_x, .dstOffset = 0, .size = (VkDeviceSize)(T * H * 4)};
    sp_vk.vkCmdCopyBuffer(cb, g->io.buf, g->x.buf, 1, &cp);
    barrier(cb);
    for (int64_t il = 0; il < hp->n_layer; il++) {
        const sp_vk_layer *l = &g->w->layers[il];
        rmsnorm(g, g->x.addr, g->xn.addr, &l->attn_norm, T, H, 0, hp->norm_eps, 1.0f);
        barrier(cb);
        if (m->layers[il].attn == SP_ATTN_MLA) attention_mla(g, ses, b, il, P);
        else attention_gqa(g, ses, b, il, P);
        barrier(cb);
        matmul(g, &l->wo, g->attn.addr, l->wo.k, g->x.addr, H, T, true, rs);
        barrier(cb);
        rmsnorm(g, g->x.addr, g->xn.addr, &l->ffn_norm, T, H, 0, hp->norm_eps, 1.0f);
        barrier(cb);
        if (m->layers[il].ffn == SP_FFN_KIND_EXPERTS) {
            const uint64_t r = g->io.addr + g->io_router + (uint64_t)(il * B * E * 4);
            matmul(g, &l->router, g->xn.addr, H, r, E, T, false, 1.0f);
            barrier(cb);
            sp_vk_pc ro = {.a = {r, l->router_norm.b.addr ? l->router_norm.b.addr : r, g->used.addr},
                           .u = {(uint32_t)T, (uint32_t)E, (uint32_t)hp->router_norm},
                           .f = {hp->router_norm_eps, hp->router_norm_scale}};
            dispatch(g, SP_VK_ROUTER, &ro, 1, 1, 1);
            barrier(cb);
            const sp_vk_tensor *X = &l->experts;
            sp_vk_pc up = {.a = {X->b.addr, g->xn.addr, r, g->used.addr, g->hexp.addr},
                           .u = {(uint32_t)H, (uint32_t)T, (uint32_t)E, (uint32_t)FE, 0, X->d_off, X->m_off, 0,
                                 g->d->rows_per_group}};
            dispatch(g, by_type(SP_VK_UP_F32, X->type), &up, div_up(FE, g->d->rows_per_group), (uint32_t)E, 1);
            barrier(cb);
            sp_vk_pc dn = {.a = {X->b.addr, g->hexp.addr, g->used.addr, g->x.addr},
                           .u = {(uint32_t)H, (uint32_t)T, (uint32_t)E, (uint32_t)FE, 0, X->d_off, X->m_off},
                           .f = {rs}};
            dispatch(g, by_type(SP_VK_DOWN_F32, X->type), &dn, div_up(H, 64), 1, 1);
        } else {
            matmul(g, &l->w_gate, g->xn.addr, H, g->gate.addr, F, T, false, 1.0f);
            matmul(g, &l->w_up, g->xn.addr, H, g->up.addr, F, T, false, 1.0f);
            barrier(cb);
            sp_vk_pc sw = {.a = {g->gate.addr, g->up.addr}, .u = {(uint32_t)(T * F)}};
            dispatch(g, SP_VK_SWIGLU, &sw, grid(g, T * F), 1, 1);
            barrier(cb);
            matmul(g, &l->w_down, g->gate.addr, F, g->x.addr, H, T, true, rs);
        }
        barrier(cb);
    }
    if (b->logits) {
        const int64_t first = b->logits_last_only ? T - 1 : 0, n_out = T - first;
        rmsnorm(g, g->x.addr + (uint64_t)(first * H * 4), g->xn.addr, &g->w->out_norm, n_out, H, 0, hp->norm_eps,
                hp->logit_scale);
        barrier(cb);
        matmul(g, &g->w->output, g->xn.addr, H, g->io.addr + g->io_logits, hp->n_vocab, n_out, false, 1.0f);
    }
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT,
                          .dstAccessMask = VK_ACCESS_HOST_READ_BIT};
    sp_vk.vkCmdPipelineBarrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, NULL,
                               0, NULL);
}

sp_status sp_vk_forward(sp_session *ses, const sp_batch *b) {
    sp_vk_session *g = ses->gpu;
    const sp_model *m = ses->model;
    const sp_hparams *hp = &m->hp;
    const int64_t T = b->n_tokens, H = hp->n_embd, P = ses->s.runs[0].P;
    const double t_start = sp_now_s();
    /* inputs: embeddings, the RoPE table (forward.c's code and order, so the angles are the same), the mask */
    float *x = (float *)((uint8_t *)g->io.map + g->io_x), *cs = (float *)((uint8_t *)g->io.map + g->io_cs);
    const float theta_scale = powf(hp->rope_base, -2.0f / (float)hp->n_rot);
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *row = (const uint8_t *)m->tok_embd.data + (size_t)b->tokens[t] * m->tok_embd.row_size;
        sp_dequantize_row(m->tok_embd.type, row, x + t * H, H);
        if (hp->embed_scale != 1.0f)
            for (int64_t i = 0; i < H; i++) x[t * H + i] *= hp->embed_scale;
        float theta = (float)ses->s.tpos[t];
        for (int i = 0; i < hp->n_rot; i += 2) {
            cs[t * hp->n_rot + i] = cosf(theta);
            cs[t * hp->n_rot + i + 1] = sinf(theta);
            theta *= theta_scale;
        }
    }
    if (b->mask) memcpy((uint8_t *)g->io.map + g->io_mask, b->mask, (size_t)(T * T));
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    sp_vk.vkResetCommandBuffer(g->cb, 0);
    sp_vk.vkBeginCommandBuffer(g->cb, &bi);
    record(g, ses, b, P);
    VkResult r = sp_vk.vkEndCommandBuffer(g->cb);
    if (r != VK_SUCCESS) return sp_fail(SP_ERR_INTERNAL, "recording the GPU pass failed (%s)", sp_vk_result_str(r));
    sp_status st = sp_vk_submit_wait(g->d, g->cb, g->fence);
    if (st != SP_OK) return st;
    if (b->logits) {
        const int64_t n_out = b->logits_last_only ? 1 : T;
        memcpy(b->logits, (uint8_t *)g->io.map + g->io_logits, (size_t)(n_out * hp->n_vocab) * sizeof(float));
    }
    if (hp->n_expert > 0) { /* the sparsity counters from the router scores, and the union's expert bytes */
        const int64_t E = hp->n_expert, B = ses->params.n_batch;
        for (int64_t il = 0; il < hp->n_layer; il++) {
            const float *rr = (const float *)((uint8_t *)g->io.map + g->io_router) + il * B * E;
            int64_t n_used = 0;
            for (int64_t e = 0; e < E; e++)
                for (int64_t t = 0; t < T; t++)
                    if (rr[t * E + e] != 0.0f) {
                        n_used++;
                        break;
                    }
            const uint64_t slab = 2 * (uint64_t)hp->expert_width * m->layers[il].experts.row_size;
            sp_ffn_count_sparsity(ses, (int)il, rr, T, slab * (uint64_t)n_used);
        }
    }
    ses->times.n_evals++;
    ses->times.n_tokens += T;
    ses->times.head_s += sp_now_s() - t_start; /* the whole pass: the device's phases are not timed apart */
    return SP_OK;
}

sp_status sp_vk_keep(sp_session *ses, const int32_t *idx, int32_t n) {
    sp_vk_session *g = ses->gpu;
    const sp_hparams *hp = &ses->model->hp;
    const bool mla = ses->model->attn == SP_ATTN_MLA;
    const VkDeviceSize krow = (VkDeviceSize)(mla ? hp->kv_lora : hp->n_head_kv * hp->head_dim) * 2;
    const VkDeviceSize vrow = (VkDeviceSize)(mla ? hp->n_rot : hp->n_head_kv * hp->head_dim) * 2;
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    VkBufferCopy *regions = malloc((size_t)hp->n_layer * 2 * sizeof *regions), *vregions = regions + hp->n_layer;
    if (!regions) return sp_fail(SP_ERR_NO_MEMORY, "out of memory");
    sp_vk.vkResetCommandBuffer(g->cb, 0);
    sp_vk.vkBeginCommandBuffer(g->cb, &bi);
    barrier(g->cb); /* the last pass's cache writes come before these copies */
    bool any = false;
    /* idx[i] >= i: slot moves in order, each after the one before (a barrier between), never overwrite a slot still
     * to be read; one copy per moved slot covers every layer (disjoint regions) */
    for (int32_t i = 0; i < n; i++) {
        if (idx[i] == i) continue;
        for (int32_t il = 0; il < hp->n_layer; il++) {
            regions[il] = (VkBufferCopy){.srcOffset = il * g->kc_layer_bytes + (VkDeviceSize)idx[i] * krow,
                                         .dstOffset = il * g->kc_layer_bytes + (VkDeviceSize)i * krow, .size = krow};
            vregions[il] = (VkBufferCopy){.srcOffset = il * g->vc_layer_bytes + (VkDeviceSize)idx[i] * vrow,
                                          .dstOffset = il * g->vc_layer_bytes + (VkDeviceSize)i * vrow, .size = vrow};
        }
        if (any) {
            VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT,
                                  .dstAccessMask = VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
            sp_vk.vkCmdPipelineBarrier(g->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb,
                                       0, NULL, 0, NULL);
        }
        sp_vk.vkCmdCopyBuffer(g->cb, g->kc.buf, g->kc.buf, (uint32_t)hp->n_layer, regions);
        sp_vk.vkCmdCopyBuffer(g->cb, g->vc.buf, g->vc.buf, (uint32_t)hp->n_layer, vregions);
        any = true;
    }
    free(regions);
    VkResult r = sp_vk.vkEndCommandBuffer(g->cb);
    if (r != VK_SUCCESS) return sp_fail(SP_ERR_INTERNAL, "recording the GPU cache moves failed (%s)", sp_vk_result_str(r));
    return any ? sp_vk_submit_wait(g->d, g->cb, g->fence) : SP_OK;
}
