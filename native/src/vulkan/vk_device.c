/* vk_device.c: the Vulkan loader (opened at run time, so a build with the backend has no link-time dependency on
 * it), the instance, the device list, logical devices with their compute pipelines, buffers and submissions; and
 * the public device calls of sparrow.h.
 *
 * Everything is created on first use and kept until the process ends: models and sessions on a device share its
 * logical device and pipelines. The validation layer, when SPARROW_VULKAN_VALIDATION=1, reports through a debug
 * messenger that counts errors and warnings (sp_device_validation_errors). */
#include "vk.h"

#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vk_shaders.h" /* generated at build time: the SPIR-V of every pipeline (CMakeLists.txt) */

sp_vk_fns sp_vk;

const char *const sp_vk_pipe_names[SP_VK_PIPE_COUNT] = {
    "matmul_f32", "matmul_f16", "matmul_q4_0", "matmul_q4_1", "matmul_q8_0", "up_f32", "up_f16", "up_q4_0",
    "up_q4_1", "up_q8_0", "down_f32", "down_f16", "down_q4_0", "down_q4_1", "down_q8_0", "rmsnorm", "rope",
    "kv_store", "attention", "swiglu", "router", "attention_mla"};

enum { MAX_DEVICES = 16 };

static struct {
    pthread_once_t once;
    sp_status status;    /* of the one initialisation */
    char error[512];     /* its message, repeated to every caller on failure */
    void *lib;
    PFN_vkGetInstanceProcAddr gipa;
    VkInstance instance;
    VkDebugUtilsMessengerEXT messenger;
    int32_t n_devices;
    sp_vk_dev devices[MAX_DEVICES];
    pthread_mutex_t lock; /* logical device creation */
} g = {.once = PTHREAD_ONCE_INIT, .lock = PTHREAD_MUTEX_INITIALIZER};

static _Atomic int64_t n_val_errors, n_val_warnings;
static pthread_mutex_t val_lock = PTHREAD_MUTEX_INITIALIZER;
static char val_last[1024];

const char *sp_vk_result_str(VkResult r) {
    switch (r) {
    case VK_SUCCESS: return "VK_SUCCESS";
    case VK_ERROR_OUT_OF_HOST_MEMORY: return "VK_ERROR_OUT_OF_HOST_MEMORY";
    case VK_ERROR_OUT_OF_DEVICE_MEMORY: return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
    case VK_ERROR_INITIALIZATION_FAILED: return "VK_ERROR_INITIALIZATION_FAILED";
    case VK_ERROR_DEVICE_LOST: return "VK_ERROR_DEVICE_LOST";
    case VK_ERROR_LAYER_NOT_PRESENT: return "VK_ERROR_LAYER_NOT_PRESENT";
    case VK_ERROR_EXTENSION_NOT_PRESENT: return "VK_ERROR_EXTENSION_NOT_PRESENT";
    case VK_ERROR_FEATURE_NOT_PRESENT: return "VK_ERROR_FEATURE_NOT_PRESENT";
    case VK_ERROR_INCOMPATIBLE_DRIVER: return "VK_ERROR_INCOMPATIBLE_DRIVER";
    case VK_ERROR_TOO_MANY_OBJECTS: return "VK_ERROR_TOO_MANY_OBJECTS";
    case VK_TIMEOUT: return "VK_TIMEOUT";
    default: return "a Vulkan error";
    }
}

static VKAPI_ATTR VkBool32 VKAPI_CALL on_validation(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                   VkDebugUtilsMessageTypeFlagsEXT types,
                                                   const VkDebugUtilsMessengerCallbackDataEXT *data, void *user) {
    const bool error = severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    if (!error && !(severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT)) return VK_FALSE;
    atomic_fetch_add(error ? &n_val_errors : &n_val_warnings, 1);
    pthread_mutex_lock(&val_lock);
    snprintf(val_last, sizeof val_last, "%s", data && data->pMessage ? data->pMessage : "");
    pthread_mutex_unlock(&val_lock);
    return VK_FALSE;
}

static bool has_layer(PFN_vkEnumerateInstanceLayerProperties enumerate, const char *name) {
    uint32_t n = 0;
    if (enumerate(&n, NULL) != VK_SUCCESS || n == 0) return false;
    VkLayerProperties *props = calloc(n, sizeof *props);
    bool found = false;
    if (props && enumerate(&n, props) == VK_SUCCESS)
        for (uint32_t i = 0; i < n; i++) found |= strcmp(props[i].layerName, name) == 0;
    free(props);
    return found;
}

static const char *kind_name(VkPhysicalDeviceType t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated";
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual";
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return "cpu";
    default: return "other";
    }
}

/* Whether a physical device can run the backend (Vulkan 1.2, buffer device addresses, a compute queue); its info. */
static bool usable(VkPhysicalDevice pd, sp_vk_dev *d) {
    VkPhysicalDeviceProperties p;
    sp_vk.vkGetPhysicalDeviceProperties(pd, &p);
    if (p.apiVersion < VK_API_VERSION_1_2) return false;
    VkPhysicalDeviceVulkan12Features f12 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
    VkPhysicalDeviceFeatures2 f = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &f12};
    sp_vk.vkGetPhysicalDeviceFeatures2(pd, &f);
    if (!f12.bufferDeviceAddress) return false;
    uint32_t nq = 0;
    sp_vk.vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[16];
    nq = nq > 16 ? 16 : nq;
    sp_vk.vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    uint32_t family = UINT32_MAX;
    for (uint32_t i = 0; i < nq && family == UINT32_MAX; i++)
        if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) family = i;
    if (family == UINT32_MAX) return false;
    VkPhysicalDeviceSubgroupProperties sub = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceDriverProperties drv = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES, .pNext = &sub};
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, .pNext = &drv};
    sp_vk.vkGetPhysicalDeviceProperties2(pd, &p2);
    /* the matmuls reduce a row over a subgroup (subgroupAdd), its live invocations counted by a ballot */
    if (!(sub.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) ||
        !(sub.supportedOperations & VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) ||
        !(sub.supportedOperations & VK_SUBGROUP_FEATURE_BALLOT_BIT) || sub.subgroupSize == 0)
        return false;
    memset(d, 0, sizeof *d);
    d->rows_per_group = sub.subgroupSize >= 64 ? 1 : 64 / sub.subgroupSize;
    d->phys = pd;
    d->queue_family = family;
    d->max_groups_x = p.limits.maxComputeWorkGroupCount[0];
    sp_vk.vkGetPhysicalDeviceMemoryProperties(pd, &d->mem);
    snprintf(d->info.name, sizeof d->info.name, "%s", p.deviceName);
    snprintf(d->info.kind, sizeof d->info.kind, "%s", kind_name(p.deviceType));
    snprintf(d->info.api, sizeof d->info.api, "vulkan");
    snprintf(d->info.api_version, sizeof d->info.api_version, "%u.%u.%u", VK_API_VERSION_MAJOR(p.apiVersion),
             VK_API_VERSION_MINOR(p.apiVersion), VK_API_VERSION_PATCH(p.apiVersion));
    snprintf(d->info.driver, sizeof d->info.driver, "%.63s", drv.driverName);
    for (uint32_t i = 0; i < d->mem.memoryHeapCount; i++)
        if (d->mem.memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT && d->mem.memoryHeaps[i].size > d->info.memory_bytes)
            d->info.memory_bytes = d->mem.memoryHeaps[i].size;
    pthread_mutex_init(&d->queue_lock, NULL);
    return true;
}

static void init_once(void) {
#define FAIL(st, ...) do { g.status = (st); snprintf(g.error, sizeof g.error, __VA_ARGS__); return; } while (0)
    const char *libs[] = {"libvulkan.so.1", "libvulkan.so"};
    for (size_t i = 0; i < sizeof libs / sizeof *libs && !g.lib; i++) g.lib = dlopen(libs[i], RTLD_NOW | RTLD_LOCAL);
    if (!g.lib) FAIL(SP_ERR_UNSUPPORTED, "no Vulkan loader (libvulkan.so.1) on this system: GPU devices unavailable");
    g.gipa = (PFN_vkGetInstanceProcAddr)dlsym(g.lib, "vkGetInstanceProcAddr");
    if (!g.gipa) FAIL(SP_ERR_UNSUPPORTED, "the Vulkan loader has no vkGetInstanceProcAddr");
    PFN_vkCreateInstance create = (PFN_vkCreateInstance)g.gipa(NULL, "vkCreateInstance");
    PFN_vkEnumerateInstanceLayerProperties layers =
        (PFN_vkEnumerateInstanceLayerProperties)g.gipa(NULL, "vkEnumerateInstanceLayerProperties");
    if (!create || !layers) FAIL(SP_ERR_UNSUPPORTED, "the Vulkan loader lacks vkCreateInstance");
    const char *val = getenv("SPARROW_VULKAN_VALIDATION");
    const bool validate = val && strcmp(val, "1") == 0;
    const char *layer = "VK_LAYER_KHRONOS_validation", *ext = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
    if (validate && !has_layer(layers, layer))
        FAIL(SP_ERR_UNSUPPORTED, "SPARROW_VULKAN_VALIDATION=1 but the Khronos validation layer is not installed "
             "(Debian: vulkan-validationlayers)");
    VkApplicationInfo app = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO, .pApplicationName = "sparrow",
                             .pEngineName = "sparrow", .apiVersion = VK_API_VERSION_1_2};
    VkDebugUtilsMessengerCreateInfoEXT mci = {
        .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
        .messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                       VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        .pfnUserCallback = on_validation};
    VkInstanceCreateInfo ici = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pApplicationInfo = &app,
                                .pNext = validate ? &mci : NULL, .enabledLayerCount = validate ? 1 : 0,
                                .ppEnabledLayerNames = &layer, .enabledExtensionCount = validate ? 1 : 0,
                                .ppEnabledExtensionNames = &ext};
    VkResult r = create(&ici, NULL, &g.instance);
    if (r != VK_SUCCESS) FAIL(SP_ERR_UNSUPPORTED, "vkCreateInstance failed (%s): no usable Vulkan driver", sp_vk_result_str(r));
#define SP_VK_LOAD(name)                                                                                           \
    sp_vk.name = (PFN_##name)g.gipa(g.instance, #name);                                                            \
    if (!sp_vk.name) FAIL(SP_ERR_UNSUPPORTED, "the Vulkan loader lacks " #name " (Vulkan 1.2 is needed)");
    SP_VK_FUNCS(SP_VK_LOAD)
#undef SP_VK_LOAD
    if (validate) {
        PFN_vkCreateDebugUtilsMessengerEXT cm =
            (PFN_vkCreateDebugUtilsMessengerEXT)g.gipa(g.instance, "vkCreateDebugUtilsMessengerEXT");
        if (!cm || cm(g.instance, &mci, NULL, &g.messenger) != VK_SUCCESS)
            FAIL(SP_ERR_UNSUPPORTED, "the validation layer's debug messenger could not be created");
    }
    uint32_t n = 0;
    if (sp_vk.vkEnumeratePhysicalDevices(g.instance, &n, NULL) != VK_SUCCESS) n = 0;
    VkPhysicalDevice pds[MAX_DEVICES];
    n = n > MAX_DEVICES ? MAX_DEVICES : n;
    if (n && sp_vk.vkEnumeratePhysicalDevices(g.instance, &n, pds) < 0) n = 0;
    for (uint32_t i = 0; i < n; i++)
        if (usable(pds[i], &g.devices[g.n_devices])) g.n_devices++;
    g.status = SP_OK;
    if (g.n_devices == 0) snprintf(g.error, sizeof g.error, "no Vulkan 1.2 device with buffer device addresses");
#undef FAIL
}

sp_status sp_vk_init(void) {
    pthread_once(&g.once, init_once);
    return g.status == SP_OK ? SP_OK : sp_fail(g.status, "%s", g.error);
}

/* The compute pipelines of a new logical device. */
static sp_status make_pipelines(sp_vk_dev *d) {
    VkPushConstantRange range = {.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .size = sizeof(sp_vk_pc)};
    VkPipelineLayoutCreateInfo lci = {.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                                      .pushConstantRangeCount = 1, .pPushConstantRanges = &range};
    VkResult r = sp_vk.vkCreatePipelineLayout(d->dev, &lci, NULL, &d->layout);
    if (r != VK_SUCCESS) return sp_fail(SP_ERR_INTERNAL, "vkCreatePipelineLayout failed (%s)", sp_vk_result_str(r));
    for (int i = 0; i < SP_VK_PIPE_COUNT; i++) {
        VkShaderModuleCreateInfo sci = {.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                        .codeSize = sp_vk_spirv[i].size, .pCode = sp_vk_spirv[i].code};
        VkShaderModule mod;
        r = sp_vk.vkCreateShaderModule(d->dev, &sci, NULL, &mod);
        if (r != VK_SUCCESS)
            return sp_fail(SP_ERR_INTERNAL, "vkCreateShaderModule(%s) failed (%s)", sp_vk_spirv[i].name, sp_vk_result_str(r));
        VkComputePipelineCreateInfo pci = {
            .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO, .layout = d->layout,
            .stage = {.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO, .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                      .module = mod, .pName = "main"}};
        r = sp_vk.vkCreateComputePipelines(d->dev, VK_NULL_HANDLE, 1, &pci, NULL, &d->pipes[i]);
        sp_vk.vkDestroyShaderModule(d->dev, mod, NULL);
        if (r != VK_SUCCESS)
            return sp_fail(SP_ERR_INTERNAL, "vkCreateComputePipelines(%s) failed (%s)", sp_vk_spirv[i].name, sp_vk_result_str(r));
    }
    return SP_OK;
}

static sp_status open_device(sp_vk_dev *d) {
    const float prio = 1.0f;
    VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                   .queueFamilyIndex = d->queue_family, .queueCount = 1, .pQueuePriorities = &prio};
    VkPhysicalDeviceVulkan12Features f12 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES,
                                            .bufferDeviceAddress = VK_TRUE};
    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, .pNext = &f12, .queueCreateInfoCount = 1,
                              .pQueueCreateInfos = &qci};
    VkResult r = sp_vk.vkCreateDevice(d->phys, &dci, NULL, &d->dev);
    if (r != VK_SUCCESS) {
        d->dev = VK_NULL_HANDLE;
        return sp_fail(SP_ERR_UNSUPPORTED, "vkCreateDevice(%s) failed (%s)", d->info.name, sp_vk_result_str(r));
    }
    sp_vk.vkGetDeviceQueue(d->dev, d->queue_family, 0, &d->queue);
    sp_status st = make_pipelines(d);
    if (st != SP_OK) {
        for (int i = 0; i < SP_VK_PIPE_COUNT; i++)
            if (d->pipes[i]) sp_vk.vkDestroyPipeline(d->dev, d->pipes[i], NULL);
        if (d->layout) sp_vk.vkDestroyPipelineLayout(d->dev, d->layout, NULL);
        sp_vk.vkDestroyDevice(d->dev, NULL);
        memset(d->pipes, 0, sizeof d->pipes);
        d->layout = VK_NULL_HANDLE;
        d->dev = VK_NULL_HANDLE;
    }
    return st;
}

sp_status sp_vk_device(int32_t device, sp_vk_dev **out) {
    sp_status st = sp_vk_init();
    if (st != SP_OK) return st;
    if (device < 1 || device > g.n_devices)
        return sp_fail(SP_ERR_INVALID_ARG, "device %d does not exist: %d GPU device(s)%s%s", device, g.n_devices,
                       g.n_devices ? "" : ": ", g.n_devices ? "" : g.error);
    sp_vk_dev *d = &g.devices[device - 1];
    pthread_mutex_lock(&g.lock);
    st = d->dev ? SP_OK : open_device(d);
    pthread_mutex_unlock(&g.lock);
    *out = st == SP_OK ? d : NULL;
    return st;
}

static int32_t memory_type(const sp_vk_dev *d, uint32_t bits, VkMemoryPropertyFlags need) {
    for (uint32_t i = 0; i < d->mem.memoryTypeCount; i++)
        if ((bits & (1u << i)) && (d->mem.memoryTypes[i].propertyFlags & need) == need) return (int32_t)i;
    return -1;
}

sp_status sp_vk_buf_new(sp_vk_dev *d, VkDeviceSize size, bool host_visible, sp_vk_buf *out) {
    memset(out, 0, sizeof *out);
    size = size ? (size + 15) & ~(VkDeviceSize)15 : 16;
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = size,
                              .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_DST_BIT | VK_BUFFER_USAGE_SHADER_DEVICE_ADDRESS_BIT,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VkResult r = sp_vk.vkCreateBuffer(d->dev, &bci, NULL, &out->buf);
    if (r != VK_SUCCESS) return sp_fail(SP_ERR_NO_MEMORY, "vkCreateBuffer(%llu bytes) failed (%s)",
                                        (unsigned long long)size, sp_vk_result_str(r));
    VkMemoryRequirements req;
    sp_vk.vkGetBufferMemoryRequirements(d->dev, out->buf, &req);
    const VkMemoryPropertyFlags host = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    int32_t type = host_visible ? memory_type(d, req.memoryTypeBits, host)
                                : memory_type(d, req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    if (type < 0) type = memory_type(d, req.memoryTypeBits, host_visible ? host : 0);
    if (type < 0) {
        sp_vk.vkDestroyBuffer(d->dev, out->buf, NULL);
        out->buf = VK_NULL_HANDLE;
        return sp_fail(SP_ERR_UNSUPPORTED, "no Vulkan memory type fits a %s buffer", host_visible ? "host-visible" : "device");
    }
    VkMemoryAllocateFlagsInfo flags = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_FLAGS_INFO,
                                       .flags = VK_MEMORY_ALLOCATE_DEVICE_ADDRESS_BIT};
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .pNext = &flags,
                                .allocationSize = req.size, .memoryTypeIndex = (uint32_t)type};
    r = sp_vk.vkAllocateMemory(d->dev, &mai, NULL, &out->mem);
    if (r != VK_SUCCESS) {
        sp_vk.vkDestroyBuffer(d->dev, out->buf, NULL);
        memset(out, 0, sizeof *out);
        return sp_fail(SP_ERR_NO_MEMORY, "out of GPU memory: %llu bytes on %s (%s)", (unsigned long long)size,
                       d->info.name, sp_vk_result_str(r));
    }
    r = sp_vk.vkBindBufferMemory(d->dev, out->buf, out->mem, 0);
    /* mapped when the host can write it without flushes (coherent): host-visible buffers always, device buffers when
     * their memory allows (integrated GPUs, lavapipe); others take uploads through a staging copy */
    const VkMemoryPropertyFlags flags_of = d->mem.memoryTypes[type].propertyFlags;
    if (r == VK_SUCCESS && (flags_of & host) == host &&
        (host_visible || !getenv("SPARROW_VULKAN_STAGING")) && /* testing: force the staging path */
        sp_vk.vkMapMemory(d->dev, out->mem, 0, VK_WHOLE_SIZE, 0, &out->map) != VK_SUCCESS)
        out->map = NULL;
    if (r != VK_SUCCESS || (host_visible && !out->map)) {
        sp_vk_buf_free(d, out);
        return sp_fail(SP_ERR_NO_MEMORY, "could not %s a %llu-byte buffer on %s (%s)", r != VK_SUCCESS ? "bind" : "map",
                       (unsigned long long)size, d->info.name, sp_vk_result_str(r));
    }
    VkBufferDeviceAddressInfo ai = {.sType = VK_STRUCTURE_TYPE_BUFFER_DEVICE_ADDRESS_INFO, .buffer = out->buf};
    out->addr = sp_vk.vkGetBufferDeviceAddress(d->dev, &ai);
    out->size = size;
    return SP_OK;
}

void sp_vk_buf_free(sp_vk_dev *d, sp_vk_buf *b) {
    if (!b || !b->buf) return;
    if (b->map) sp_vk.vkUnmapMemory(d->dev, b->mem);
    sp_vk.vkDestroyBuffer(d->dev, b->buf, NULL);
    sp_vk.vkFreeMemory(d->dev, b->mem, NULL);
    memset(b, 0, sizeof *b);
}

sp_status sp_vk_submit_wait(sp_vk_dev *d, VkCommandBuffer cb, VkFence fence) {
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &cb};
    sp_vk.vkResetFences(d->dev, 1, &fence);
    pthread_mutex_lock(&d->queue_lock);
    VkResult r = sp_vk.vkQueueSubmit(d->queue, 1, &si, fence);
    pthread_mutex_unlock(&d->queue_lock);
    if (r == VK_SUCCESS) r = sp_vk.vkWaitForFences(d->dev, 1, &fence, VK_TRUE, UINT64_MAX);
    return r == VK_SUCCESS ? SP_OK : sp_fail(SP_ERR_INTERNAL, "GPU submission failed on %s (%s)", d->info.name,
                                             sp_vk_result_str(r));
}

sp_status sp_vk_upload(sp_vk_dev *d, sp_vk_buf *b, VkDeviceSize offset, const void *src, VkDeviceSize size) {
    if (!size) return SP_OK;
    if (b->map) {
        memcpy((uint8_t *)b->map + offset, src, size);
        return SP_OK;
    }
    sp_vk_buf stage;
    sp_status st = sp_vk_buf_new(d, size, true, &stage);
    if (st != SP_OK) return st;
    memcpy(stage.map, src, size);
    sp_vk_oneshot os;
    st = sp_vk_oneshot_begin(d, &os);
    if (st == SP_OK) {
        VkBufferCopy region = {.srcOffset = 0, .dstOffset = offset, .size = size};
        sp_vk.vkCmdCopyBuffer(os.cb, stage.buf, b->buf, 1, &region);
        st = sp_vk_oneshot_end(d, &os, true);
    }
    sp_vk_buf_free(d, &stage);
    return st;
}

sp_status sp_vk_oneshot_begin(sp_vk_dev *d, sp_vk_oneshot *os) {
    memset(os, 0, sizeof *os);
    VkCommandPoolCreateInfo pci = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, .queueFamilyIndex = d->queue_family};
    VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    if (sp_vk.vkCreateCommandPool(d->dev, &pci, NULL, &os->pool) != VK_SUCCESS ||
        sp_vk.vkCreateFence(d->dev, &fci, NULL, &os->fence) != VK_SUCCESS) {
        sp_vk_oneshot_end(d, os, false);
        return sp_fail(SP_ERR_NO_MEMORY, "could not create a command pool on %s", d->info.name);
    }
    VkCommandBufferAllocateInfo cai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, .commandPool = os->pool,
                                       .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY, .commandBufferCount = 1};
    if (sp_vk.vkAllocateCommandBuffers(d->dev, &cai, &os->cb) != VK_SUCCESS) {
        sp_vk_oneshot_end(d, os, false);
        return sp_fail(SP_ERR_NO_MEMORY, "could not allocate a command buffer on %s", d->info.name);
    }
    sp_vk.vkBeginCommandBuffer(os->cb, &bi);
    return SP_OK;
}

sp_status sp_vk_oneshot_end(sp_vk_dev *d, sp_vk_oneshot *os, bool submit) {
    sp_status st = SP_OK;
    if (submit) {
        sp_vk.vkEndCommandBuffer(os->cb);
        st = sp_vk_submit_wait(d, os->cb, os->fence);
    }
    if (os->fence) sp_vk.vkDestroyFence(d->dev, os->fence, NULL);
    if (os->pool) sp_vk.vkDestroyCommandPool(d->dev, os->pool, NULL); /* frees its command buffer */
    memset(os, 0, sizeof *os);
    return st;
}

/* ---- the public device calls ---- */

int32_t sp_device_count(void) {
    sp_clear_error();
    if (sp_vk_init() != SP_OK) return 0;
    if (g.n_devices == 0) sp_fail(SP_ERR_UNSUPPORTED, "%s", g.error);
    return g.n_devices;
}

sp_status sp_device_get_info(int32_t device, sp_device_info *out) {
    sp_clear_error();
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_device_get_info: out is NULL");
    memset(out, 0, sizeof *out);
    sp_status st = sp_vk_init();
    if (st != SP_OK) return st;
    if (device < 1 || device > g.n_devices)
        return sp_fail(SP_ERR_INVALID_ARG, "device %d does not exist: %d GPU device(s)", device, g.n_devices);
    *out = g.devices[device - 1].info;
    return SP_OK;
}

bool sp_device_backend_built(void) { return true; }

int64_t sp_device_validation_errors(int64_t *warnings, char *msg, size_t capacity) {
    if (warnings) *warnings = atomic_load(&n_val_warnings);
    if (msg && capacity) {
        pthread_mutex_lock(&val_lock);
        snprintf(msg, capacity, "%s", val_last);
        pthread_mutex_unlock(&val_lock);
    }
    return atomic_load(&n_val_errors);
}
