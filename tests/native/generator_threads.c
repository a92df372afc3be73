/* generator_threads.c: the generator's C API under bad input and a second thread (run by tests/test_generate_native.py).
 *
 * Usage: generator_threads MODEL.gguf
 * 1. NULL arguments to every sp_generator function: SP_ERR_INVALID_ARG and a message, never a crash.
 * 2. Push and pull give the same tokens (greedy, prompt lookup).
 * 3. While sp_generate is inside its callback, another host thread calls sp_generate_next and sp_generator_start on
 *    the same generator: both are refused with "in use by another thread"; the generation goes on unharmed.
 * 4. A callback that rolls the session's KV cache back behind the generator's back: the next step fails with a clear
 *    error ("changed outside the generator"), and a new start works.
 * Prints "ok" and exits 0 when every check holds. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparrow.h"
#include "check.h"

enum { N_GEN = 24, CAP = 64 };

static sp_generator *g_gen;
static sp_session *g_ses;
static int32_t g_prompt[CAP];
static int32_t g_n_prompt;

typedef struct collect {
    int32_t tokens[N_GEN];
    int n;
    int mode; /* 0: collect; 1: a second thread contends at the third token; 2: truncate the cache at the second */
    int refused;
} collect;

static void *contend(void *arg) {
    (void)arg;
    int32_t tok;
    sp_gen_stop why;
    if (sp_generate_next(g_gen, &tok, &why) == SP_ERR_INVALID_ARG && strstr(sp_last_error(), "in use by another thread"))
        __atomic_add_fetch((int *)arg, 1, __ATOMIC_SEQ_CST);
    if (sp_generator_start(g_gen, g_prompt, g_n_prompt) == SP_ERR_INVALID_ARG &&
        strstr(sp_last_error(), "in use by another thread"))
        __atomic_add_fetch((int *)arg, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static bool on_token(int32_t token, void *user) {
    collect *c = user;
    c->tokens[c->n++] = token;
    if (c->mode == 1 && c->n == 3) {
        pthread_t th;
        CHECK(pthread_create(&th, NULL, contend, &c->refused) == 0);
        CHECK(pthread_join(th, NULL) == 0);
    }
    if (c->mode == 2 && c->n == 2) CHECK(sp_session_truncate(g_ses, 1) == SP_OK);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    sp_model *model = NULL;
    CHECK(sp_model_load(argv[1], sp_model_default_params(), &model) == SP_OK);
    sp_session_params sp = sp_session_default_params();
    sp.n_ctx = 256;
    sp.n_threads = 2;
    CHECK(sp_session_new(model, sp, &g_ses) == SP_OK);
    sp_generator_params gp = sp_generator_default_params();
    gp.sampler.temperature = 0.0f;
    gp.max_tokens = N_GEN;
    gp.stop_at_eog = false;
    gp.drafter = SP_DRAFTER_PROMPT_LOOKUP;

    /* 1. NULL arguments */
    sp_generator *g = (sp_generator *)1;
    CHECK(sp_generator_new(NULL, &gp, &g) == SP_ERR_INVALID_ARG && g == NULL && *sp_last_error());
    CHECK(sp_generator_new(g_ses, NULL, &g) == SP_ERR_INVALID_ARG && *sp_last_error());
    CHECK(sp_generator_new(g_ses, &gp, NULL) == SP_ERR_INVALID_ARG && *sp_last_error());
    int32_t tok;
    sp_gen_stop why;
    sp_generator_stats st;
    CHECK(sp_generator_start(NULL, g_prompt, 1) == SP_ERR_INVALID_ARG);
    CHECK(sp_generate_next(NULL, &tok, &why) == SP_ERR_INVALID_ARG);
    CHECK(sp_generate(NULL, NULL, NULL, &why) == SP_ERR_INVALID_ARG);
    CHECK(sp_generator_get_stats(NULL, &st) == SP_ERR_INVALID_ARG);
    CHECK(sp_generator_context(NULL, NULL) == 0);
    sp_generator_reset_stats(NULL);
    sp_generator_free(NULL);
    CHECK(sp_generator_new(g_ses, &gp, &g_gen) == SP_OK);
    CHECK(sp_generate_next(g_gen, NULL, &why) == SP_ERR_INVALID_ARG);
    CHECK(sp_generator_get_stats(g_gen, NULL) == SP_ERR_INVALID_ARG);
    CHECK(sp_generator_start(g_gen, NULL, 3) == SP_ERR_INVALID_ARG);

    const char *text = "one two three four, one two three four, one two";
    size_t n = 0;
    CHECK(sp_tokenize(model, text, strlen(text), true, false, g_prompt, CAP, &n) == SP_OK);
    g_n_prompt = (int32_t)n;

    /* 2. pull, then push: the same tokens */
    int32_t pulled[N_GEN];
    int n_pulled = 0;
    CHECK(sp_generator_start(g_gen, g_prompt, g_n_prompt) == SP_OK);
    for (;;) {
        CHECK(sp_generate_next(g_gen, &tok, &why) == SP_OK);
        if (why != SP_GEN_RUNNING) break;
        CHECK(tok >= 0 && n_pulled < N_GEN);
        pulled[n_pulled++] = tok;
    }
    CHECK(why == SP_GEN_MAX_TOKENS && n_pulled == N_GEN && tok == -1);
    CHECK(sp_generate_next(g_gen, &tok, NULL) == SP_OK && tok == -1);
    collect c = {.mode = 0};
    CHECK(sp_generator_start(g_gen, g_prompt, g_n_prompt) == SP_OK);
    CHECK(sp_generate(g_gen, on_token, &c, &why) == SP_OK && why == SP_GEN_MAX_TOKENS);
    CHECK(c.n == N_GEN && memcmp(c.tokens, pulled, sizeof pulled) == 0);

    /* 3. a second thread while the generator is inside its callback */
    collect c1 = {.mode = 1};
    CHECK(sp_generator_start(g_gen, g_prompt, g_n_prompt) == SP_OK);
    CHECK(sp_generate(g_gen, on_token, &c1, &why) == SP_OK && why == SP_GEN_MAX_TOKENS);
    CHECK(c1.refused == 2);
    CHECK(c1.n == N_GEN && memcmp(c1.tokens, pulled, sizeof pulled) == 0);

    /* 4. the cache rolled back behind the generator's back */
    collect c2 = {.mode = 2};
    CHECK(sp_generator_start(g_gen, g_prompt, g_n_prompt) == SP_OK);
    const sp_status s2 = sp_generate(g_gen, on_token, &c2, &why);
    CHECK(s2 == SP_ERR_INVALID_ARG && strstr(sp_last_error(), "changed outside the generator"));
    CHECK(sp_generate_next(g_gen, &tok, &why) == SP_ERR_INVALID_ARG);
    collect c3 = {.mode = 0};
    CHECK(sp_generator_start(g_gen, g_prompt, g_n_prompt) == SP_OK);
    CHECK(sp_generate(g_gen, on_token, &c3, &why) == SP_OK && memcmp(c3.tokens, pulled, sizeof pulled) == 0);
    CHECK(sp_generator_get_stats(g_gen, &st) == SP_OK && st.tokens > 0 && st.accepted <= st.drafted);

    sp_generator_free(g_gen);
    sp_session_free(g_ses);
    sp_model_free(model);
    printf("ok\n");
    return 0;
}
