/* ffn_blockffn.c: PLACEHOLDER until the sparse expert FFN lands; the loader does not accept blockffn models yet, so
 * this is never reached. */
#include "forward.h"

void sp_ffn_blockffn(const fwd_ctx *c, int il, int ith, int nth) { (void)c, (void)il, (void)ith, (void)nth; }
