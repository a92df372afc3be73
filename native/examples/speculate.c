/* speculate.c: generation with speculative decoding (prompt lookup) through the C generator, using only sparrow.h.
 *
 *   ./sparrow-speculate model.gguf "Repeat this list: one, two, three, four." [N_TOKENS] [TEMPERATURE]
 *
 * Loads a model, wraps the prompt in the model's chat markup when it has <|im_start|> (SmolLM2), starts a generator
 * with the prompt-lookup drafter and streams the continuation through a callback, then prints the statistics: forward
 * passes, drafted and accepted tokens, and the generator's own time per step outside the forward pass.
 * Every failure prints sp_last_error() and exits with 1; everything is freed on every path. */
#include "sparrow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct printer {
    const sp_model *model;
    int n;
} printer;

static bool print_token(int32_t token, void *user_data) {
    printer *p = user_data;
    char piece[256];
    size_t n = 0;
    if (sp_token_to_piece(p->model, token, false, piece, sizeof piece, &n) == SP_OK) fwrite(piece, 1, n, stdout);
    fflush(stdout);
    p->n++;
    return true; /* false would stop the generation (SP_GEN_CALLBACK) */
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [N_TOKENS] [TEMPERATURE]\n", argv[0]);
        return 2;
    }
    int rc = 1;
    sp_model *model = NULL;
    sp_session *session = NULL;
    sp_generator *gen = NULL;
    int32_t *tokens = NULL;
    char *text = NULL;

    if (sp_model_load(argv[1], sp_model_default_params(), &model) != SP_OK) goto fail;
    sp_session_params sp = sp_session_default_params();
    sp.n_ctx = 1024;
    if (sp_session_new(model, sp, &session) != SP_OK) goto fail;

    /* chat markup where the vocabulary has it */
    int32_t probe[4];
    size_t n_probe = 0;
    const bool chat = sp_tokenize(model, "<|im_start|>", 12, false, true, probe, 4, &n_probe) == SP_OK && n_probe == 1;
    const char *fmt = chat ? "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n" : "%s";
    const size_t len = strlen(argv[2]) + strlen(fmt) + 1;
    text = malloc(len);
    if (!text) goto fail;
    snprintf(text, len, fmt, argv[2]);
    size_t n_prompt = 0;
    sp_tokenize(model, text, strlen(text), true, true, NULL, 0, &n_prompt); /* the size needed */
    tokens = malloc(sizeof *tokens * (n_prompt ? n_prompt : 1));
    if (!tokens || sp_tokenize(model, text, strlen(text), true, true, tokens, n_prompt, &n_prompt) != SP_OK) goto fail;

    sp_generator_params gp = sp_generator_default_params();
    gp.max_tokens = argc > 3 ? atoi(argv[3]) : 64;
    gp.sampler.temperature = argc > 4 ? (float)atof(argv[4]) : 0.0f; /* greedy unless told */
    gp.drafter = SP_DRAFTER_PROMPT_LOOKUP;                           /* ngram 3..2, draft_k 4 by default */
    if (sp_generator_new(session, &gp, &gen) != SP_OK) goto fail;
    if (sp_generator_start(gen, tokens, (int32_t)n_prompt) != SP_OK) goto fail;
    printer pr = {model, 0};
    sp_gen_stop why;
    if (sp_generate(gen, print_token, &pr, &why) != SP_OK) goto fail;
    sp_generator_stats st;
    sp_generator_get_stats(gen, &st);
    static const char *reasons[] = {"running", "end of generation", "max tokens", "stop string", "context full",
                                    "callback"};
    printf("\n[%d tokens, stopped by %s; %lld steps, %lld drafted, %lld accepted, %.2f tokens/step; "
           "forward passes %.1f ms, generator loop %.1f us/step]\n",
           pr.n, reasons[why], (long long)st.steps, (long long)st.drafted, (long long)st.accepted,
           st.steps ? (double)st.tokens / (double)st.steps : 0.0, st.eval_s * 1e3,
           st.steps ? st.loop_s * 1e6 / (double)st.steps : 0.0);
    rc = 0;
fail:
    if (rc) fprintf(stderr, "error: %s\n", sp_last_error());
    free(tokens);
    free(text);
    sp_generator_free(gen);
    sp_session_free(session);
    sp_model_free(model);
    return rc;
}
