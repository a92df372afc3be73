/* arm/i8mm.c: the i8mm kernel tier (in progress). */
#include "../tiers.h"

void sp_kernels_fill_i8mm(sp_kernels *k) { (void)k; }
