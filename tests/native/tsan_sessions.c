/* tsan_sessions.c: the library's threads under ThreadSanitizer (built and run by tools/tsan.sh).
 *
 * Usage: tsan_sessions MODEL.gguf
 * 1. The thread pool: one session with 4 threads evaluates batches and single tokens (every pool run and barrier).
 * 2. Two sessions sharing one model, each in its own host thread with its own 2-thread pool, while a third thread
 *    tokenizes and detokenizes with the same model: the model is read-only, so nothing may race, and each session's
 *    logits must equal what the same session computes alone.
 * 3. Two host threads calling sp_eval / truncate on one session: the second is refused with "in use by another
 *    thread" (never a deadlock or a race), and the session still computes the right logits afterwards.
 * Exit 0 when every check holds; ThreadSanitizer (halt_on_error=1) exits non-zero on a report. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparrow.h"
#include "check.h"

enum { T = 8, STEPS = 6 };

static sp_model *g_model;
static int32_t g_vocab;
static int32_t g_prompt[T];

/* The logits of the prompt followed by STEPS single tokens, last row of each eval, into out[STEPS + 1][V]. */
static void run_session(sp_session *s, float *out) {
    CHECK(sp_session_truncate(s, 0) == SP_OK);
    sp_batch b = {.tokens = g_prompt, .n_tokens = T, .logits = out, .logits_last_only = true};
    CHECK(sp_eval(s, &b) == SP_OK);
    for (int i = 0; i < STEPS; i++) {
        const int32_t tok = (g_prompt[i] * 7 + i) % g_vocab;
        sp_batch one = {.tokens = &tok, .n_tokens = 1, .logits = out + (size_t)(i + 1) * g_vocab,
                        .logits_last_only = true};
        CHECK(sp_eval(s, &one) == SP_OK);
    }
}

static sp_session *new_session(int n_threads) {
    sp_session_params p = sp_session_default_params();
    p.n_ctx = 64;
    p.n_batch = T;
    p.n_threads = n_threads;
    sp_session *s = NULL;
    CHECK(sp_session_new(g_model, p, &s) == SP_OK);
    return s;
}

typedef struct {
    sp_session *s;
    float *out;
    const float *want;
} session_job;

static void *session_thread(void *arg) {
    session_job *j = arg;
    for (int rep = 0; rep < 3; rep++) {
        run_session(j->s, j->out);
        CHECK(memcmp(j->out, j->want, (size_t)(STEPS + 1) * g_vocab * sizeof(float)) == 0);
    }
    return NULL;
}

static atomic_int g_stop;

static void *tokenizer_thread(void *arg) {
    (void)arg;
    static const char text[] = "The quick brown fox jumps over the lazy dog, 12345 times. <|im_start|>user\n";
    int32_t toks[256];
    char piece[256];
    while (!atomic_load(&g_stop)) {
        size_t n = 0;
        CHECK(sp_tokenize(g_model, text, sizeof text - 1, true, true, toks, 256, &n) == SP_OK);
        for (size_t i = 0; i < n; i++) {
            size_t len = 0;
            CHECK(sp_token_to_piece(g_model, toks[i], true, piece, sizeof piece, &len) == SP_OK);
        }
    }
    return NULL;
}

typedef struct {
    sp_session *s;
    atomic_int *refused;
    int32_t *buf;
} contend_job;

static void *contend_thread(void *arg) {
    contend_job *j = arg;
    float *logits = malloc((size_t)g_vocab * sizeof *logits);
    CHECK(logits);
    for (int i = 0; i < 40; i++) {
        sp_batch b = {.tokens = g_prompt, .n_tokens = 1 + i % T, .logits = logits, .logits_last_only = true};
        sp_status st = sp_session_truncate(j->s, 0);
        if (st == SP_OK) st = sp_eval(j->s, &b);
        if (st != SP_OK) {
            /* the only acceptable failures: the other thread holds the session, or its eval filled the cache */
            CHECK(st == SP_ERR_INVALID_ARG || st == SP_ERR_CONTEXT_FULL);
            if (st == SP_ERR_INVALID_ARG) {
                CHECK(strstr(sp_last_error(), "in use by another thread") != NULL);
                atomic_fetch_add(j->refused, 1);
            }
        }
    }
    free(logits);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    CHECK(sp_model_load(argv[1], sp_model_default_params(), &g_model) == SP_OK);
    sp_model_info info;
    CHECK(sp_model_get_info(g_model, &info) == SP_OK);
    g_vocab = info.n_vocab;
    for (int i = 0; i < T; i++) g_prompt[i] = (int32_t)((i * 2654435761u) % (uint32_t)g_vocab);
    const size_t n_out = (size_t)(STEPS + 1) * g_vocab;

    /* 1. a 4-thread pool alone; then the reference logits of a 2-thread session */
    float *want2 = malloc(n_out * sizeof(float)), *want4 = malloc(n_out * sizeof(float));
    CHECK(want2 && want4);
    sp_session *s4 = new_session(4);
    run_session(s4, want4);
    sp_session_free(s4);
    sp_session *a = new_session(2), *b = new_session(2);
    run_session(a, want2);
    for (size_t i = 0; i < n_out; i++) CHECK(isfinite(want2[i]) && isfinite(want4[i]));
    printf("1. thread pool of 4: ok\n");

    /* 2. two sessions over one model at once, and a tokenizer */
    float *out_a = malloc(n_out * sizeof(float)), *out_b = malloc(n_out * sizeof(float));
    CHECK(out_a && out_b);
    session_job ja = {a, out_a, want2}, jb = {b, out_b, want2};
    pthread_t ta, tb, tt;
    CHECK(pthread_create(&tt, NULL, tokenizer_thread, NULL) == 0);
    CHECK(pthread_create(&ta, NULL, session_thread, &ja) == 0);
    CHECK(pthread_create(&tb, NULL, session_thread, &jb) == 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    atomic_store(&g_stop, 1);
    pthread_join(tt, NULL);
    printf("2. two sessions sharing the model, and a tokenizer thread: ok (same logits as alone)\n");

    /* 3. two threads on one session */
    atomic_int refused = 0;
    contend_job c1 = {a, &refused, NULL}, c2 = {a, &refused, NULL};
    pthread_t t1, t2;
    CHECK(pthread_create(&t1, NULL, contend_thread, &c1) == 0);
    CHECK(pthread_create(&t2, NULL, contend_thread, &c2) == 0);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    run_session(a, out_a);
    CHECK(memcmp(out_a, want2, n_out * sizeof(float)) == 0);
    printf("3. two threads on one session: %d calls refused as in use, no deadlock, logits unchanged\n",
           atomic_load(&refused));

    sp_session_free(a);
    sp_session_free(b);
    sp_model_free(g_model);
    free(want2);
    free(want4);
    free(out_a);
    free(out_b);
    printf("OK\n");
    return 0;
}
