/* logits_dump.c: a model's logits and greedy continuation, for comparing a build on another CPU (an aarch64 build
 * under qemu, tests/test_arm.py) with the host's.
 *
 *   logits_dump MODEL OUT TOKENS N_GEN      TOKENS: comma-separated prompt token ids
 *
 * Evaluates the prompt in one batch (every position's logits), then decodes N_GEN tokens greedily one at a time.
 * OUT (binary, little-endian): int32 n_vocab, int32 n_rows, int32 n_gen, then n_rows float32 rows of n_vocab logits
 * (the prompt's positions, then the row each greedy token was picked from), then n_gen int32 tokens. Prints the
 * kernel tier on stdout. Exit 1 with sp_last_error() on any failure. */
#include "sparrow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "logits_dump: %s: %s\n", what, sp_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL OUT TOKENS N_GEN\n", argv[0]);
        return 2;
    }
    int32_t prompt[256];
    int32_t n_prompt = 0;
    for (char *s = argv[3]; *s && n_prompt < 256;) {
        char *end = NULL;
        prompt[n_prompt++] = (int32_t)strtol(s, &end, 10);
        if (end == s) return fail("bad token list");
        s = *end == ',' ? end + 1 : end;
    }
    const int32_t n_gen = atoi(argv[4]);
    if (n_prompt < 1 || n_gen < 0 || n_gen > 1024) {
        fprintf(stderr, "logits_dump: need 1..256 prompt tokens and 0..1024 to generate\n");
        return 2;
    }
    sp_model *model = NULL;
    sp_session *ses = NULL;
    if (sp_model_load(argv[1], sp_model_default_params(), &model) != SP_OK) return fail("load");
    sp_model_info info;
    sp_model_get_info(model, &info);
    sp_session_params sp = sp_session_default_params();
    sp.n_ctx = n_prompt + n_gen + 1;
    sp.n_batch = n_prompt;
    sp.n_threads = 2;
    const int32_t V = info.n_vocab, n_rows = n_prompt + n_gen;
    float *logits = malloc((size_t)n_rows * (size_t)V * sizeof *logits);
    int32_t *gen = malloc((size_t)(n_gen + 1) * sizeof *gen);
    int rc = 1;
    if (!logits || !gen) {
        fprintf(stderr, "logits_dump: out of memory\n");
        goto done;
    }
    if (sp_session_new(model, sp, &ses) != SP_OK) {
        rc = fail("session");
        goto done;
    }
    sp_batch b = {.tokens = prompt, .n_tokens = n_prompt, .logits = logits};
    if (sp_eval(ses, &b) != SP_OK) {
        rc = fail("prompt");
        goto done;
    }
    for (int32_t i = 0; i < n_gen; i++) {
        const float *row = logits + (size_t)(n_prompt - 1 + i) * (size_t)V;
        int32_t best = 0;
        for (int32_t j = 1; j < V; j++)
            if (row[j] > row[best]) best = j;
        gen[i] = best;
        sp_batch one = {.tokens = &gen[i], .n_tokens = 1, .logits = logits + (size_t)(n_prompt + i) * (size_t)V};
        if (i + 1 < n_gen && sp_eval(ses, &one) != SP_OK) {
            rc = fail("decode");
            goto done;
        }
    }
    FILE *f = fopen(argv[2], "wb");
    if (!f) {
        fprintf(stderr, "logits_dump: cannot write %s\n", argv[2]);
        goto done;
    }
    const int32_t head[3] = {V, n_rows - (n_gen ? 1 : 0), n_gen};
    fwrite(head, sizeof head, 1, f);
    fwrite(logits, sizeof *logits, (size_t)head[1] * (size_t)V, f);
    fwrite(gen, sizeof *gen, (size_t)n_gen, f);
    rc = fclose(f) == 0 ? 0 : 1;
    printf("%s\n", sp_kernel_tier());
done:
    sp_session_free(ses);
    sp_model_free(model);
    free(logits);
    free(gen);
    return rc;
}
