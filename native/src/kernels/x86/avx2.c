/* x86/avx2.c: AVX2 + FMA + F16C kernels (in progress: entries not set here come from ref). */
#include "../tiers.h"

#include <immintrin.h>

void sp_kernels_fill_avx2(sp_kernels *k) { (void)k; }
