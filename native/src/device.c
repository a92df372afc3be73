/* device.c: the GPU device calls of a build without the Vulkan backend (CMake SPARROW_VULKAN off): no devices, and a
 * device session is refused with a message saying how to get one. A build with it has these in vulkan/. */
#include "model.h"
#include "testing.h"
#include "vulkan/vk.h"

#include <stdio.h>

#ifndef SP_HAVE_VULKAN
static const char *no_backend = "this libsparrow was built without the Vulkan backend (CMake -DSPARROW_VULKAN=ON, "
                                "with glslc and the Vulkan headers installed): no GPU devices";

int32_t sp_device_count(void) {
    sp_clear_error();
    sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend);
    return 0;
}

sp_status sp_device_get_info(int32_t device, sp_device_info *out) {
    sp_clear_error();
    return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend);
}

bool sp_device_backend_built(void) { return false; }

int64_t sp_device_validation_errors(int64_t *warnings, char *msg, size_t capacity) {
    if (warnings) *warnings = 0;
    if (msg && capacity) msg[0] = 0;
    return 0;
}

sp_status sp_vk_session_check(const sp_model *m, const sp_session_params *p) {
    return sp_fail(SP_ERR_UNSUPPORTED, "device %d: %s", p->device, no_backend);
}
sp_status sp_vk_session_new(sp_session *ses, sp_vk_session **out) { return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend); }
void sp_vk_session_free(sp_vk_session *g) {}
sp_status sp_vk_forward(sp_session *ses, const sp_batch *b) { return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend); }
sp_status sp_vk_keep(sp_session *ses, const int32_t *idx, int32_t n) { return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend); }
void sp_vk_model_release(sp_model *m) {}

sp_status sp_testing_vk_run(int32_t device, const char *pipe, void *const *bufs, const size_t *bytes, int32_t n_bufs,
                            const uint32_t *u, const float *f, const uint32_t *groups) {
    return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend);
}
sp_status sp_testing_vk_layout(uint32_t type, const void *w, size_t w_size, int64_t N, int64_t K, uint32_t *out,
                               size_t *n_words, uint32_t *d_off, uint32_t *m_off) {
    return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend);
}
sp_status sp_testing_vk_rows_per_group(int32_t device, uint32_t *out) { return sp_fail(SP_ERR_UNSUPPORTED, "%s", no_backend); }
#endif
