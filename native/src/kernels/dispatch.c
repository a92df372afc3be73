/* PLACEHOLDER: being written (kernels). */
#include "kernels.h"
#include <string.h>
sp_type_traits sp_type_traits_of(uint32_t type) { sp_type_traits t; memset(&t, 0, sizeof t); return t; }
size_t sp_row_size(sp_type type, int64_t k) { return 0; }
const sp_kernels *sp_kernels_get(void) { return NULL; }
const sp_kernels *sp_kernels_for_tier(const char *tier) { return NULL; }
const char *sp_cpu_feature_string(void) { return ""; }
float sp_f16_to_f32(sp_f16 h) { return 0; }
sp_f16 sp_f32_to_f16(float f) { return 0; }
float sp_bf16_to_f32(sp_bf16 h) { return 0; }
sp_bf16 sp_f32_to_bf16(float f) { return 0; }
bool sp_dequantize_row(sp_type type, const void *src, float *dst, int64_t k) { return false; }
bool sp_quantize_row(sp_type type, const float *src, void *dst, int64_t k) { return false; }
