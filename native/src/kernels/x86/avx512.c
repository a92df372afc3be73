/* x86/avx512.c: AVX-512 (F, BW, VL, DQ, VNNI) kernels (in progress: entries not set here come from ref). */
#include "../tiers.h"

#include <immintrin.h>

void sp_kernels_fill_avx512(sp_kernels *k) { (void)k; }
