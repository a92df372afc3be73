/* generate.c: the C API end to end, as an app embedding libsparrow would use it.
 *
 *   cc -O2 native/examples/generate.c -Inative/include -Lbuild/dev -lsparrow -o sparrow-generate
 *   ./sparrow-generate model.gguf "Once upon a time" 32
 *
 * Loads a model, tokenizes the prompt, evaluates it in one batch, then samples greedily token by token, printing each
 * piece as it comes. Every failure prints sp_last_error() and exits cleanly; everything is freed on every path. */
#include "sparrow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [N_TOKENS]\n", argv[0]);
        return 2;
    }
    const int n_gen = argc > 3 ? atoi(argv[3]) : 32;
    int rc = 1;
    sp_model *model = NULL;
    sp_session *session = NULL;
    sp_sampler *sampler = NULL;
    int32_t *tokens = NULL;
    float *logits = NULL;

    if (sp_model_load(argv[1], sp_model_default_params(), &model) != SP_OK) goto fail;
    sp_model_info info;
    sp_model_get_info(model, &info);
    sp_session_params sp = sp_session_default_params();
    sp.n_ctx = 512;
    if (sp_session_new(model, sp, &session) != SP_OK) goto fail;
    sp_sampler_params samp = sp_sampler_default_params();
    samp.temperature = 0.0f; /* greedy */
    if (sp_sampler_new(samp, info.n_vocab, &sampler) != SP_OK) goto fail;

    /* tokenize: ask for the size first, then fill */
    size_t n_prompt = 0;
    const size_t len = strlen(argv[2]);
    sp_tokenize(model, argv[2], len, true, true, NULL, 0, &n_prompt);
    tokens = malloc(sizeof *tokens * (n_prompt > 0 ? n_prompt : 1));
    logits = malloc(sizeof *logits * (size_t)info.n_vocab);
    if (!tokens || !logits) goto fail;
    if (sp_tokenize(model, argv[2], len, true, true, tokens, n_prompt, &n_prompt) != SP_OK) goto fail;

    /* prompt in chunks of n_batch, logits of the last token only */
    for (size_t i = 0; i < n_prompt; i += (size_t)sp.n_batch) {
        sp_batch b = {.tokens = tokens + i, .n_tokens = (int32_t)(n_prompt - i < (size_t)sp.n_batch ? n_prompt - i : (size_t)sp.n_batch),
                      .logits = logits, .logits_last_only = true};
        if (sp_eval(session, &b) != SP_OK) goto fail;
    }
    printf("%s", argv[2]);
    for (int i = 0; i < n_gen; i++) {
        int32_t tok;
        if (sp_sampler_sample(sampler, logits, &tok) != SP_OK) goto fail;
        sp_sampler_accept(sampler, tok);
        if (sp_token_is_eog(model, tok)) break;
        char piece[256];
        size_t n = 0;
        if (sp_token_to_piece(model, tok, false, piece, sizeof piece, &n) == SP_OK) fwrite(piece, 1, n, stdout);
        fflush(stdout);
        sp_batch b = {.tokens = &tok, .n_tokens = 1, .logits = logits, .logits_last_only = true};
        if (sp_eval(session, &b) != SP_OK) goto fail;
    }
    printf("\n");
    rc = 0;
fail:
    if (rc) fprintf(stderr, "error: %s\n", sp_last_error());
    free(tokens);
    free(logits);
    sp_sampler_free(sampler);
    sp_session_free(session);
    sp_model_free(model);
    return rc;
}
