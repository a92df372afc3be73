/* arm/neon.c: the neon kernel tier (in progress). */
#include "../tiers.h"

void sp_kernels_fill_neon(sp_kernels *k) { (void)k; }
