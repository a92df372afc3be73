/* vk_testing.c: testing.h's hooks into the Vulkan backend: one shader run on host arrays, and the GPU weight layout,
 * so tests/test_vulkan.py checks every shader against the CPU's _ref kernels and numpy. */
#include "vk.h"

#include "../kernels/kernels.h"
#include "../testing.h"

#include <stdlib.h>
#include <string.h>

sp_status sp_testing_vk_run(int32_t device, const char *pipe, void *const *bufs, const size_t *bytes, int32_t n_bufs,
                            const uint32_t *u, const float *f, const uint32_t *groups) {
    sp_clear_error();
    if (!pipe || (n_bufs && (!bufs || !bytes)) || !u || !f || !groups || n_bufs < 0 || n_bufs > 5)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_testing_vk_run: bad arguments");
    int p = 0;
    while (p < SP_VK_PIPE_COUNT && strcmp(sp_vk_pipe_names[p], pipe) != 0) p++;
    if (p == SP_VK_PIPE_COUNT) return sp_fail(SP_ERR_INVALID_ARG, "no pipeline named '%s'", pipe);
    sp_vk_dev *d;
    sp_status st = sp_vk_device(device, &d);
    if (st != SP_OK) return st;
    sp_vk_buf b[5] = {0};
    sp_vk_pc pc = {0};
    memcpy(pc.u, u, sizeof pc.u);
    memcpy(pc.f, f, sizeof pc.f);
    for (int32_t i = 0; i < n_bufs && st == SP_OK; i++) {
        st = sp_vk_buf_new(d, bytes[i], true, &b[i]);
        if (st == SP_OK) {
            memcpy(b[i].map, bufs[i], bytes[i]);
            pc.a[i] = b[i].addr;
        }
    }
    sp_vk_oneshot os;
    if (st == SP_OK && (st = sp_vk_oneshot_begin(d, &os)) == SP_OK) {
        sp_vk.vkCmdBindPipeline(os.cb, VK_PIPELINE_BIND_POINT_COMPUTE, d->pipes[p]);
        sp_vk.vkCmdPushConstants(os.cb, d->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof pc, &pc);
        sp_vk.vkCmdDispatch(os.cb, groups[0], groups[1], groups[2]);
        VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT,
                              .dstAccessMask = VK_ACCESS_HOST_READ_BIT};
        sp_vk.vkCmdPipelineBarrier(os.cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0,
                                   NULL, 0, NULL);
        st = sp_vk_oneshot_end(d, &os, true);
    }
    for (int32_t i = 0; i < n_bufs; i++) {
        if (st == SP_OK) memcpy(bufs[i], b[i].map, bytes[i]);
        sp_vk_buf_free(d, &b[i]);
    }
    return st;
}

sp_status sp_testing_vk_layout(uint32_t type, const void *w, size_t w_size, int64_t N, int64_t K, uint32_t *out,
                               size_t *n_words, uint32_t *d_off, uint32_t *m_off) {
    sp_clear_error();
    if (type >= SP_TYPE_COUNT || !sp_vk_gpu_type((sp_type)type))
        return sp_fail(SP_ERR_UNSUPPORTED, "type %u has no GPU layout", type);
    if (N < 1 || K < 1 || K % SP_QK || !n_words || !d_off || !m_off)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_testing_vk_layout: bad shape or NULL output");
    const size_t need = (size_t)N * sp_row_size((sp_type)type, K);
    if (!w || w_size != need) return sp_fail(SP_ERR_INVALID_ARG, "W is %zu bytes, %zu expected", w_size, need);
    *n_words = sp_vk_layout_words((sp_type)type, N, K, d_off, m_off);
    if (out) sp_vk_to_layout((sp_type)type, w, N, K, out, *d_off, *m_off);
    return SP_OK;
}

sp_status sp_testing_vk_rows_per_group(int32_t device, uint32_t *out) {
    sp_clear_error();
    sp_vk_dev *d;
    sp_status st = sp_vk_device(device, &d);
    if (st == SP_OK) *out = d->rows_per_group;
    return st;
}
