/* generator_allocs.c: a generation allocates nothing (run by tests/test_generate_native.py; not under sanitizers,
 * which bring their own allocator).
 *
 * Usage: generator_allocs MODEL.gguf
 * malloc, calloc, realloc, aligned_alloc, posix_memalign and memalign are interposed here (the shared library's
 * calls resolve to them) and counted, in every thread, from sp_generator_start to the end of the generation:
 * greedy and sampled (repetition penalty on), with prompt lookup and stop strings. Prints the counts and exits 0
 * when both are 0. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparrow.h"

extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t align, size_t n);
extern void __libc_free(void *p);

static atomic_long g_allocs;
static atomic_int g_counting;

static void count(void) {
    if (atomic_load(&g_counting)) atomic_fetch_add(&g_allocs, 1);
}
void *malloc(size_t n) { count(); return __libc_malloc(n); }
void *calloc(size_t n, size_t size) { count(); return __libc_calloc(n, size); }
void *realloc(void *p, size_t n) { count(); return __libc_realloc(p, n); }
void *aligned_alloc(size_t align, size_t n) { count(); return __libc_memalign(align, n); }
void *memalign(size_t align, size_t n) { count(); return __libc_memalign(align, n); }
int posix_memalign(void **out, size_t align, size_t n) {
    count();
    *out = __libc_memalign(align, n);
    return *out ? 0 : 12; /* ENOMEM */
}
void free(void *p) { __libc_free(p); }

static long generation(sp_session *s, const int32_t *prompt, int32_t n, float temperature, int *n_tokens) {
    sp_generator_params gp = sp_generator_default_params();
    gp.sampler.temperature = temperature;
    gp.sampler.repeat_penalty = temperature > 0 ? 1.1f : 1.0f;
    gp.max_tokens = 48;
    gp.stop_at_eog = false;
    gp.drafter = SP_DRAFTER_PROMPT_LOOKUP;
    gp.n_stop = 2;
    gp.stop[0] = "never appears\x01";
    gp.stop[1] = "\x02\x03";
    sp_generator *g = NULL;
    if (sp_generator_new(s, &gp, &g) != SP_OK) return -1;
    atomic_store(&g_allocs, 0);
    atomic_store(&g_counting, 1);
    sp_gen_stop why = SP_GEN_RUNNING;
    int32_t tok;
    *n_tokens = 0;
    if (sp_generator_start(g, prompt, n) != SP_OK) return -1;
    while (sp_generate_next(g, &tok, &why) == SP_OK && why == SP_GEN_RUNNING) (*n_tokens)++;
    atomic_store(&g_counting, 0);
    sp_generator_free(g);
    return atomic_load(&g_allocs);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    sp_model *model = NULL;
    sp_session *s = NULL;
    sp_session_params sp = sp_session_default_params();
    sp.n_ctx = 256;
    sp.n_threads = 2;
    if (sp_model_load(argv[1], sp_model_default_params(), &model) != SP_OK || sp_session_new(model, sp, &s) != SP_OK) {
        fprintf(stderr, "error: %s\n", sp_last_error());
        return 1;
    }
    const char *text = "red green blue, red green blue, red green blue, red green";
    int32_t prompt[64];
    size_t n = 0;
    if (sp_tokenize(model, text, strlen(text), true, false, prompt, 64, &n) != SP_OK) return 1;
    int greedy_tokens = 0, sampled_tokens = 0;
    const long greedy = generation(s, prompt, (int32_t)n, 0.0f, &greedy_tokens);
    const long sampled = generation(s, prompt, (int32_t)n, 0.8f, &sampled_tokens);
    printf("allocations: greedy %ld (%d tokens), sampled %ld (%d tokens)\n", greedy, greedy_tokens, sampled,
           sampled_tokens);
    sp_session_free(s);
    sp_model_free(model);
    return greedy == 0 && sampled == 0 && greedy_tokens == 48 && sampled_tokens == 48 ? 0 : 1;
}
