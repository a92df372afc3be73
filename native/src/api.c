/* api.c: library-level queries of the public API (version, CPU features, kernel tier). */
#include "common.h"
#include "kernels/kernels.h"

const char *sp_version(void) { return SPARROW_VERSION_STRING; }
const char *sp_cpu_features(void) { return sp_cpu_feature_string(); }

const char *sp_kernel_tier(void) {
    const sp_kernels *k = sp_kernels_get();
    return k ? k->tier : "";
}
