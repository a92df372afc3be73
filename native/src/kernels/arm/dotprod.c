/* arm/dotprod.c: the dotprod kernel tier (in progress). */
#include "../tiers.h"

void sp_kernels_fill_dotprod(sp_kernels *k) { (void)k; }
