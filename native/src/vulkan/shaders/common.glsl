/* common.glsl: what every Sparrow compute shader shares (vulkan/vk_forward.c records them).
 *
 * No descriptor sets: buffers are passed as device addresses (Vulkan 1.2 bufferDeviceAddress) in the push constants,
 * as uvec2 so that no shader needs 64-bit integers (many mobile GPUs lack shaderInt64). The push constant block is
 * the same for every shader and matches vk_forward.c's sp_vk_pc: a[0..4] addresses, u[0..11] integers, f[0..3]
 * floats (104 bytes of the 128 every Vulkan device offers). Each shader's header says what it reads from each.
 *
 * Weights in the GPU layout (vk_weights.c): one buffer per tensor, 32-bit words. Quantized types keep the GGUF's
 * element order but split each block's quants from its scales: qs words first (Q8_0: 8 words per block, 4 int8 each;
 * Q4_0/Q4_1: 4 words per block, byte j holds element j in its low nibble and j + 16 in its high one), then the
 * scales d as float32 from word u_d, then (Q4_1) the minimums m from word u_m. F16: pairs of halves per word; F32:
 * one float per word. Rows are K elements, K a multiple of 32 for every type. */
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_buffer_reference_uvec2 : require

layout(buffer_reference, std430, buffer_reference_align = 4) buffer FBuf { float v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) buffer UBuf { uint v[]; };

layout(push_constant, std430) uniform PC {
    uvec2 a[5];
    uint u[12];
    float f[4];
} pc;

#define TYPE_F32 0
#define TYPE_F16 1
#define TYPE_Q4_0 2
#define TYPE_Q4_1 3
#define TYPE_Q8_0 8

/* Block b (of 32 elements) of weight row r into w[32]; nb = blocks per row, d_off/m_off: word offsets of the scales
 * and minimums. TYPE is set per shader variant at build time. */
void dequant_block(UBuf W, uint r, uint b, uint nb, uint d_off, uint m_off, out float w[32]) {
    const uint blk = r * nb + b;
#if TYPE == TYPE_F32
    for (uint i = 0; i < 32; i++) w[i] = uintBitsToFloat(W.v[blk * 32 + i]);
#elif TYPE == TYPE_F16
    for (uint i = 0; i < 16; i++) {
        const vec2 h = unpackHalf2x16(W.v[blk * 16 + i]);
        w[2 * i] = h.x;
        w[2 * i + 1] = h.y;
    }
#elif TYPE == TYPE_Q8_0
    const float d = uintBitsToFloat(W.v[d_off + blk]);
    for (uint i = 0; i < 8; i++) {
        const int q = int(W.v[blk * 8 + i]);
        for (int k = 0; k < 4; k++) w[4 * i + k] = float(bitfieldExtract(q, 8 * k, 8)) * d;
    }
#else /* Q4_0, Q4_1 */
    const float d = uintBitsToFloat(W.v[d_off + blk]);
#if TYPE == TYPE_Q4_1
    const float m = uintBitsToFloat(W.v[m_off + blk]);
#endif
    for (uint i = 0; i < 4; i++) {
        const uint q = W.v[blk * 4 + i];
        for (uint k = 0; k < 4; k++) {
            const uint lo = bitfieldExtract(q, int(8 * k), 4), hi = bitfieldExtract(q, int(8 * k + 4), 4);
#if TYPE == TYPE_Q4_0
            w[4 * i + k] = (float(lo) - 8.0) * d;
            w[16 + 4 * i + k] = (float(hi) - 8.0) * d;
#else
            w[4 * i + k] = float(lo) * d + m;
            w[16 + 4 * i + k] = float(hi) * d + m;
#endif
        }
    }
#endif
}

/* Element c of weight row r (K elements per row). */
float dequant_one(UBuf W, uint r, uint c, uint K, uint d_off, uint m_off) {
    const uint nb = K / 32, blk = r * nb + c / 32, j = c % 32;
#if TYPE == TYPE_F32
    return uintBitsToFloat(W.v[r * K + c]);
#elif TYPE == TYPE_F16
    const vec2 h = unpackHalf2x16(W.v[(r * K + c) / 2]);
    return (c & 1u) == 0u ? h.x : h.y;
#elif TYPE == TYPE_Q8_0
    const int q = int(W.v[blk * 8 + j / 4]);
    return float(bitfieldExtract(q, int(8 * (j % 4)), 8)) * uintBitsToFloat(W.v[d_off + blk]);
#else
    const uint jj = j % 16, q = bitfieldExtract(W.v[blk * 4 + jj / 4], int(8 * (jj % 4) + (j >= 16 ? 4 : 0)), 4);
#if TYPE == TYPE_Q4_0
    return (float(q) - 8.0) * uintBitsToFloat(W.v[d_off + blk]);
#else
    return float(q) * uintBitsToFloat(W.v[d_off + blk]) + uintBitsToFloat(W.v[m_off + blk]);
#endif
#endif
}
