/* vk.h: the Vulkan backend's parts, shared by its files (vk_device.c: loader, instance, devices, buffers, pipelines;
 * vk_weights.c: a model's weights on a device; vk_forward.c: a session's cache and forward pass) and the calls the
 * rest of the library makes into it (device.c, session.c, model.c). Built only with SP_HAVE_VULKAN (CMake
 * SPARROW_VULKAN); device.c answers for a build without it. */
#ifndef SP_VK_H
#define SP_VK_H

#include "model.h"

#ifdef SP_HAVE_VULKAN
#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <pthread.h>

/* The Vulkan functions the backend calls, loaded from libvulkan at run time (vk_device.c). */
#define SP_VK_FUNCS(X)                                                                                              \
    X(vkDestroyInstance) X(vkEnumeratePhysicalDevices) X(vkGetPhysicalDeviceProperties)                             \
    X(vkGetPhysicalDeviceProperties2) X(vkGetPhysicalDeviceFeatures2)                                               \
    X(vkGetPhysicalDeviceQueueFamilyProperties) X(vkGetPhysicalDeviceMemoryProperties) X(vkCreateDevice)            \
    X(vkDestroyDevice) X(vkGetDeviceQueue) X(vkCreateBuffer) X(vkDestroyBuffer) X(vkGetBufferMemoryRequirements)     \
    X(vkAllocateMemory) X(vkFreeMemory) X(vkBindBufferMemory) X(vkMapMemory) X(vkUnmapMemory)                      \
    X(vkGetBufferDeviceAddress) X(vkCreateShaderModule) X(vkDestroyShaderModule) X(vkCreatePipelineLayout)          \
    X(vkDestroyPipelineLayout) X(vkCreateComputePipelines) X(vkDestroyPipeline) X(vkCreateCommandPool)              \
    X(vkDestroyCommandPool) X(vkAllocateCommandBuffers) X(vkResetCommandBuffer) X(vkBeginCommandBuffer)             \
    X(vkEndCommandBuffer) X(vkCmdBindPipeline) X(vkCmdPushConstants) X(vkCmdDispatch) X(vkCmdPipelineBarrier)       \
    X(vkCmdCopyBuffer) X(vkCmdFillBuffer) X(vkQueueSubmit) X(vkCreateFence) X(vkDestroyFence) X(vkWaitForFences)   \
    X(vkResetFences) X(vkDeviceWaitIdle)

typedef struct sp_vk_fns {
#define SP_VK_DECL(name) PFN_##name name;
    SP_VK_FUNCS(SP_VK_DECL)
#undef SP_VK_DECL
} sp_vk_fns;
extern sp_vk_fns sp_vk; /* valid once sp_vk_init() succeeded */

/* The compute pipelines, one per shader variant (vulkan/shaders; TYPE variants by weight type). */
typedef enum sp_vk_pipe {
    SP_VK_MATMUL_F32, SP_VK_MATMUL_F16, SP_VK_MATMUL_Q4_0, SP_VK_MATMUL_Q4_1, SP_VK_MATMUL_Q8_0,
    SP_VK_UP_F32, SP_VK_UP_F16, SP_VK_UP_Q4_0, SP_VK_UP_Q4_1, SP_VK_UP_Q8_0,
    SP_VK_DOWN_F32, SP_VK_DOWN_F16, SP_VK_DOWN_Q4_0, SP_VK_DOWN_Q4_1, SP_VK_DOWN_Q8_0,
    SP_VK_RMSNORM, SP_VK_ROPE, SP_VK_KV_STORE, SP_VK_ATTENTION, SP_VK_SWIGLU, SP_VK_ROUTER, SP_VK_ATTENTION_MLA,
    SP_VK_PIPE_COUNT
} sp_vk_pipe;

/* The push constants of every shader (shaders/common.glsl's PC block). */
typedef struct sp_vk_pc {
    uint64_t a[5];
    uint32_t u[12];
    float f[4];
} sp_vk_pc;

/* A buffer with its own memory; addr is its device address, map its host mapping when the memory is host visible. */
typedef struct sp_vk_buf {
    VkBuffer buf;
    VkDeviceMemory mem;
    VkDeviceAddress addr;
    VkDeviceSize size;
    void *map;
} sp_vk_buf;

/* A logical device (created on first use, kept until the process ends: sessions and models share it). */
typedef struct sp_vk_dev {
    VkPhysicalDevice phys;
    sp_device_info info;
    uint32_t queue_family;
    VkDevice dev;          /* VK_NULL_HANDLE until first used */
    VkQueue queue;
    pthread_mutex_t queue_lock; /* vkQueueSubmit needs the queue to itself */
    VkPhysicalDeviceMemoryProperties mem;
    VkPipelineLayout layout;
    VkPipeline pipes[SP_VK_PIPE_COUNT];
    uint32_t max_groups_x;
    uint32_t rows_per_group; /* matmul rows per workgroup of 64: one per subgroup */
} sp_vk_dev;

sp_status sp_vk_init(void);                          /* load the loader, create the instance, list devices (once) */
sp_status sp_vk_device(int32_t device, sp_vk_dev **out); /* device 1..count, its logical device created on first use */
/* A buffer of size bytes: host_visible (mapped, coherent) or device local (mapped too where that memory is). */
sp_status sp_vk_buf_new(sp_vk_dev *d, VkDeviceSize size, bool host_visible, sp_vk_buf *out);
void sp_vk_buf_free(sp_vk_dev *d, sp_vk_buf *b);
/* Copy size bytes of src into b at offset: straight into its mapping, or through a staging buffer and a copy. */
sp_status sp_vk_upload(sp_vk_dev *d, sp_vk_buf *b, VkDeviceSize offset, const void *src, VkDeviceSize size);
/* A command buffer recorded once, for work outside a forward pass (uploads, tests): begin opens it recording; end
 * submits it and waits (submit) or only cleans up, and destroys it. */
typedef struct sp_vk_oneshot {
    VkCommandPool pool;
    VkFence fence;
    VkCommandBuffer cb;
} sp_vk_oneshot;
sp_status sp_vk_oneshot_begin(sp_vk_dev *d, sp_vk_oneshot *os);
sp_status sp_vk_oneshot_end(sp_vk_dev *d, sp_vk_oneshot *os, bool submit);
/* Submit a recorded command buffer and wait for it (under the queue's lock). */
sp_status sp_vk_submit_wait(sp_vk_dev *d, VkCommandBuffer cb, VkFence fence);
const char *sp_vk_result_str(VkResult r);

/* A weight on the device (vk_weights.c): the GPU layout of shaders/common.glsl. */
typedef struct sp_vk_tensor {
    sp_vk_buf b;
    sp_type type;
    uint32_t d_off, m_off; /* word offsets of the scales and minimums */
    int64_t n, k;
} sp_vk_tensor;

typedef struct sp_vk_layer {
    sp_vk_tensor attn_norm, ffn_norm, wq, wk, wv, wo, w_gate, w_up, w_down, router, router_norm, experts;
    sp_vk_tensor wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wk_b, wv_b; /* multi-head latent attention */
} sp_vk_layer;

/* A model's weights on one device, made by the first session there and kept until the model is freed. */
typedef struct sp_vk_model {
    int32_t device;
    sp_vk_dev *d;
    sp_vk_layer *layers; /* [L] */
    sp_vk_tensor out_norm, output;
    struct sp_vk_model *next; /* the model's next device */
} sp_vk_model;

sp_status sp_vk_model_get(const sp_model *m, int32_t device, sp_vk_model **out);
/* The GPU layout (vk_weights.c): whether a type has one; its size in words for n rows of k, with the scales' and
 * minimums' word offsets; and the conversion from GGUF rows. */
bool sp_vk_gpu_type(sp_type t);
size_t sp_vk_layout_words(sp_type t, int64_t n, int64_t k, uint32_t *d_off, uint32_t *m_off);
void sp_vk_to_layout(sp_type t, const void *src, int64_t n, int64_t k, uint32_t *dst, uint32_t d_off, uint32_t m_off);
extern const char *const sp_vk_pipe_names[SP_VK_PIPE_COUNT]; /* vk_device.c */
#endif /* SP_HAVE_VULKAN */

/* ---- the calls of the rest of the library (each also defined, refusing or doing nothing, without Vulkan) ---- */
typedef struct sp_vk_session sp_vk_session;
/* Check a model and session params for a device session; then create its device state. */
sp_status sp_vk_session_check(const sp_model *m, const sp_session_params *p);
sp_status sp_vk_session_new(sp_session *ses, sp_vk_session **out);
void sp_vk_session_free(sp_vk_session *g);
/* One forward pass of the batch (runs planned, positions in tpos), logits into b->logits; nothing changes on failure
 * but the device cache slots past n_past, which no one reads. */
sp_status sp_vk_forward(sp_session *ses, const sp_batch *b);
/* sp_session_keep's slot moves in the device cache (idx checked by the caller). */
sp_status sp_vk_keep(sp_session *ses, const int32_t *idx, int32_t n);
void sp_vk_model_release(sp_model *m); /* free the model's device weights (sp_model_free) */

#endif
