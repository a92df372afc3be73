/* dispatch.c: run-time choice of the kernel tier.
 *
 * CPU features are detected once (cpuid + xgetbv: the OS must save the AVX / AVX-512 register state), each tier's
 * table is filled once (starting from "ref"; a SIMD file overwrites the entries it implements), and sp_kernels_get()
 * returns the best tier this CPU can run: on x86 amx (avx512 + AMX-TILE/AMX-INT8, the OS enabling the tile state and
 * granting it to this process: arch_prctl(ARCH_REQ_XCOMP_PERM), asked once here) > avx512 (avx512f+bw+vl+vnni) > avx2
 * (avx2+fma+f16c) > ref; on
 * AArch64 (features from getauxval(AT_HWCAP / AT_HWCAP2), the same bits on Linux and Android) i8mm (Armv8.6 int8
 * matrix multiply) > dotprod (Armv8.2 SDOT/UDOT) > neon (Armv8.0 Advanced SIMD, every AArch64 CPU) > ref. Each ARM
 * tier starts from the one below it and overwrites what it does better.
 * SPARROW_FORCE_SCALAR=1 in the environment makes sp_kernels_get() return "ref" (sp_kernels_for_tier is unaffected,
 * so tests can still compare every tier). SPARROW_KERNEL_TIER=<name> ("avx512", "amx", ...) makes it return that tier
 * for the whole process (forward passes included) when this CPU can run it, and is ignored otherwise (sp_kernel_tier()
 * says which tier runs); SPARROW_FORCE_SCALAR wins over it.
 */
#include "tiers.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(SP_HAVE_X86)
#  include <cpuid.h>
void sp_kernels_fill_avx2(sp_kernels *k);   /* x86/avx2.c */
void sp_kernels_fill_avx512(sp_kernels *k); /* x86/avx512.c */
#  if defined(SP_HAVE_AMX)
void sp_kernels_fill_amx(sp_kernels *k); /* x86/amx.c: over the avx512 table */
#  endif
#  if defined(__linux__)
#    include <sys/syscall.h>
#    include <unistd.h>
#  endif
#endif
#if defined(SP_HAVE_ARM)
#  include <sys/auxv.h>
void sp_kernels_fill_neon(sp_kernels *k);    /* arm/neon.c */
void sp_kernels_fill_dotprod(sp_kernels *k); /* arm/dotprod.c */
void sp_kernels_fill_i8mm(sp_kernels *k);    /* arm/i8mm.c */
#  define SP_HWCAP_ASIMD (1ul << 1)
#  define SP_HWCAP_ASIMDDP (1ul << 20)
#  define SP_HWCAP2_I8MM (1ul << 13)
#endif

typedef struct cpu_features {
    bool avx, avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni, avx512bf16;
    bool amx_tile, amx_int8; /* the CPU has them and the OS saves the tile state (XCR0 bits 17-18) */
    bool amx_granted;        /* Linux gave this process the tile data (ARCH_REQ_XCOMP_PERM) */
    bool neon, dotprod, i8mm;
} cpu_features;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static cpu_features g_cpu;
static char g_feature_string[160];
static sp_kernels g_ref, g_avx2, g_avx512, g_amx, g_neon, g_dotprod, g_i8mm;
static const sp_kernels *g_best;
static const sp_kernels *table_of(const char *tier); /* the table of an available tier, or NULL */

#if defined(SP_HAVE_X86)
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void detect_x86(cpu_features *f) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const bool osxsave = (c >> 27) & 1;
    const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    const bool os_avx = (xcr0 & 0x6) == 0x6;       /* SSE + AVX state */
    const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;  /* + opmask, ZMM_Hi256, Hi16_ZMM */
    f->avx = os_avx && ((c >> 28) & 1);
    f->fma = f->avx && ((c >> 12) & 1);
    f->f16c = f->avx && ((c >> 29) & 1);
    if (__get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    f->avx2 = f->avx && ((b >> 5) & 1);
    f->avx512f = os_avx512 && ((b >> 16) & 1);
    f->avx512dq = f->avx512f && ((b >> 17) & 1);
    f->avx512bw = f->avx512f && ((b >> 30) & 1);
    f->avx512vl = f->avx512f && ((b >> 31) & 1);
    f->avx512vnni = f->avx512f && ((c >> 11) & 1);
    const bool os_amx = (xcr0 & 0x60000) == 0x60000; /* XTILECFG + XTILEDATA */
    f->amx_tile = os_amx && ((d >> 24) & 1);
    f->amx_int8 = f->amx_tile && ((d >> 25) & 1);
    __cpuid_count(7, 1, a, b, c, d);
    f->avx512bf16 = f->avx512f && ((a >> 5) & 1);
#  if defined(SP_HAVE_AMX) && defined(__linux__) && defined(SYS_arch_prctl)
    /* Linux >= 5.16 enables the 8 KiB tile data per process on request: ARCH_REQ_XCOMP_PERM (0x1023) for
     * XFEATURE_XTILEDATA (18); before that (or if refused) a tile instruction would fault, so no amx tier */
    if (f->amx_int8) f->amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#  endif
}
#endif

#if defined(SP_HAVE_ARM)
static void detect_arm(cpu_features *f) {
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    f->neon = (hw & SP_HWCAP_ASIMD) != 0;
    f->dotprod = f->neon && (hw & SP_HWCAP_ASIMDDP) != 0;
    f->i8mm = f->dotprod && (hw2 & SP_HWCAP2_I8MM) != 0;
}
#endif

static bool tier_available(const char *tier) {
    if (!strcmp(tier, "ref")) return true;
#if defined(SP_HAVE_X86)
    const cpu_features *f = &g_cpu;
    if (!strcmp(tier, "avx2")) return f->avx2 && f->fma && f->f16c;
    if (!strcmp(tier, "avx512"))
        return f->avx512f && f->avx512bw && f->avx512vl && f->avx512dq && f->avx512vnni && f->avx2 && f->fma &&
               f->f16c;
#  if defined(SP_HAVE_AMX)
    if (!strcmp(tier, "amx")) return tier_available("avx512") && f->amx_tile && f->amx_int8 && f->amx_granted;
#  endif
#endif
#if defined(SP_HAVE_ARM)
    if (!strcmp(tier, "neon")) return g_cpu.neon;
    if (!strcmp(tier, "dotprod")) return g_cpu.dotprod;
    if (!strcmp(tier, "i8mm")) return g_cpu.i8mm;
#endif
    return false;
}

static void fill_ref(sp_kernels *k) {
    memset(k, 0, sizeof *k);
    k->tier = "ref";
    k->quantize_q8a = sp_quantize_q8a_ref;
    k->matmul[SP_TYPE_F32] = sp_matmul_f32_ref;
    k->matmul[SP_TYPE_F16] = sp_matmul_f16_ref;
    k->matmul[SP_TYPE_BF16] = sp_matmul_bf16_ref;
    k->matmul[SP_TYPE_Q4_0] = sp_matmul_q4_0_ref;
    k->matmul[SP_TYPE_Q4_1] = sp_matmul_q4_1_ref;
    k->matmul[SP_TYPE_Q8_0] = sp_matmul_q8_0_ref;
    k->accum[SP_TYPE_F32] = sp_accum_f32_ref;
    k->accum[SP_TYPE_F16] = sp_accum_f16_ref;
    k->accum[SP_TYPE_BF16] = sp_accum_bf16_ref;
    k->accum[SP_TYPE_Q4_0] = sp_accum_q4_0_ref;
    k->accum[SP_TYPE_Q4_1] = sp_accum_q4_1_ref;
    k->accum[SP_TYPE_Q8_0] = sp_accum_q8_0_ref;
    k->dot_f32 = sp_dot_f32_ref;
    k->axpy_f32 = sp_axpy_f32_ref;
    k->attn_scores_f16 = sp_attn_scores_f16_ref;
    k->attn_sum_f16 = sp_attn_sum_f16_ref;
    k->f32_to_f16 = sp_f32_to_f16_ref;
    k->round_f16 = sp_round_f16_ref;
    k->exp_sum = sp_exp_sum_ref;
    k->silu_mul = sp_silu_mul_ref;
    k->first_above = sp_first_above_ref;
    k->max_f32 = sp_max_f32_ref;
}

static void append_feature(const char *name, bool on) {
    if (!on) return;
    size_t n = strlen(g_feature_string);
    snprintf(g_feature_string + n, sizeof g_feature_string - n, "%s%s", n ? " " : "", name);
}

static void init_once(void) {
#if defined(SP_HAVE_X86)
    detect_x86(&g_cpu);
#endif
#if defined(SP_HAVE_ARM)
    detect_arm(&g_cpu);
#endif
    const cpu_features *f = &g_cpu;
    append_feature("avx", f->avx);
    append_feature("avx2", f->avx2);
    append_feature("fma", f->fma);
    append_feature("f16c", f->f16c);
    append_feature("avx512f", f->avx512f);
    append_feature("avx512bw", f->avx512bw);
    append_feature("avx512vl", f->avx512vl);
    append_feature("avx512dq", f->avx512dq);
    append_feature("avx512vnni", f->avx512vnni);
    append_feature("avx512bf16", f->avx512bf16);
    append_feature("amx_tile", f->amx_tile);
    append_feature("amx_int8", f->amx_int8);
    append_feature("neon", f->neon);
    append_feature("dotprod", f->dotprod);
    append_feature("i8mm", f->i8mm);

    fill_ref(&g_ref);
    g_best = &g_ref;
#if defined(SP_HAVE_X86)
    if (tier_available("avx2")) {
        fill_ref(&g_avx2);
        g_avx2.tier = "avx2";
        sp_kernels_fill_avx2(&g_avx2);
        g_best = &g_avx2;
    }
    if (tier_available("avx512")) {
        fill_ref(&g_avx512);
        g_avx512.tier = "avx512";
        sp_kernels_fill_avx512(&g_avx512);
        g_best = &g_avx512;
    }
#  if defined(SP_HAVE_AMX)
    if (tier_available("amx")) {
        g_amx = g_avx512;
        sp_kernels_fill_amx(&g_amx);
        g_amx.tier = "amx";
        g_best = &g_amx;
    }
#  endif
#endif
#if defined(SP_HAVE_ARM)
    if (tier_available("neon")) {
        fill_ref(&g_neon);
        sp_kernels_fill_neon(&g_neon);
        g_neon.tier = "neon";
        g_best = &g_neon;
    }
    if (tier_available("dotprod")) {
        g_dotprod = g_neon;
        sp_kernels_fill_dotprod(&g_dotprod);
        g_dotprod.tier = "dotprod";
        g_best = &g_dotprod;
    }
    if (tier_available("i8mm")) {
        g_i8mm = g_dotprod;
        sp_kernels_fill_i8mm(&g_i8mm);
        g_i8mm.tier = "i8mm";
        g_best = &g_i8mm;
    }
#endif
    const char *tier = getenv("SPARROW_KERNEL_TIER");
    if (tier && tier[0] && tier_available(tier)) g_best = table_of(tier);
    const char *force = getenv("SPARROW_FORCE_SCALAR");
    if (force && force[0] && strcmp(force, "0") != 0) g_best = &g_ref;
}

const sp_kernels *sp_kernels_get(void) {
    pthread_once(&g_once, init_once);
    return g_best;
}

const sp_kernels *sp_kernels_for_tier(const char *tier) {
    pthread_once(&g_once, init_once);
    return table_of(tier);
}

static const sp_kernels *table_of(const char *tier) {
    if (!tier || !tier_available(tier)) return NULL;
    if (!strcmp(tier, "ref")) return &g_ref;
    if (!strcmp(tier, "avx2")) return &g_avx2;
    if (!strcmp(tier, "avx512")) return &g_avx512;
    if (!strcmp(tier, "amx")) return &g_amx;
    if (!strcmp(tier, "neon")) return &g_neon;
    if (!strcmp(tier, "dotprod")) return &g_dotprod;
    if (!strcmp(tier, "i8mm")) return &g_i8mm;
    return NULL;
}

const char *sp_cpu_feature_string(void) {
    pthread_once(&g_once, init_once);
    return g_feature_string;
}
