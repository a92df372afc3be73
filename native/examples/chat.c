/* chat.c: a terminal chat with speculative decoding, using only sparrow.h: the adaptive drafter (Token Recycling +
 * prompt lookup, planned, behind the draft gate), its learned matrix kept in a file between runs, the KV cache reused
 * from turn to turn.
 *
 *   ./sparrow-chat model.gguf [--state FILE.npy] [--greedy] [--max-tokens N] [--device K]
 *
 * One user message per line on stdin ("/quit" or end of input ends the chat). The conversation is ChatML
 * (<|im_start|>role\n...<|im_end|>\n) when the vocabulary has those tokens, "User: ...\nAssistant:" otherwise. Only the
 * markup is tokenized with control tokens; the user's text never is, so typing "<|im_end|>" is just text. After each
 * answer a line on stderr gives the tokens, the forward passes and what the drafter did. Sampling: chat's defaults
 * (temperature 0.2, top-p 0.9, repetition penalty 1.1) unless --greedy. --device K runs the model on GPU device K
 * (Vulkan, numbered from 1; the devices are listed on stderr at start). Every failure prints sp_last_error(). */
#include "sparrow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N_CTX = 2048, LINE_MAX_BYTES = 8192 };

typedef struct chat {
    const sp_model *model;
    int32_t *conv;   /* [N_CTX] the conversation's tokens */
    int32_t n;       /* tokens in conv */
    bool chatml;
} chat;

/* Append text's tokens to the conversation; special: markup (control tokens parsed), else user text (never). */
static bool append(chat *c, const char *text, bool add_bos, bool special) {
    size_t n = 0;
    if (sp_tokenize(c->model, text, strlen(text), add_bos, special, c->conv + c->n, (size_t)(N_CTX - c->n), &n) !=
        SP_OK)
        return false;
    c->n += (int32_t)n;
    return true;
}

/* The user's message in the conversation's markup; false when it (with room for the answer) does not fit. */
static bool add_user(chat *c, const char *text, int max_tokens) {
    const bool ok = c->chatml ? append(c, "<|im_start|>user\n", c->n == 0, true) && append(c, text, false, false) &&
                                    append(c, "<|im_end|>\n<|im_start|>assistant\n", false, true)
                              : append(c, "User: ", c->n == 0, true) && append(c, text, false, false) &&
                                    append(c, "\nAssistant:", false, true);
    return ok && c->n + max_tokens < N_CTX;
}

typedef struct answer {
    chat *c;
    int32_t n_new;
} answer;

static bool on_token(int32_t token, void *user_data) {
    answer *a = user_data;
    char piece[256];
    size_t n = 0;
    if (sp_token_to_piece(a->c->model, token, false, piece, sizeof piece, &n) == SP_OK && n <= sizeof piece)
        fwrite(piece, 1, n, stdout);
    fflush(stdout);
    if (a->c->n < N_CTX) a->c->conv[a->c->n++] = token; /* the answer becomes part of the conversation */
    a->n_new++;
    return true;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *state = NULL;
    bool greedy = false;
    int max_tokens = 256, device = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--state") && i + 1 < argc) state = argv[++i];
        else if (!strcmp(argv[i], "--greedy")) greedy = true;
        else if (!strcmp(argv[i], "--max-tokens") && i + 1 < argc) max_tokens = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) device = atoi(argv[++i]);
        else if (!model_path && argv[i][0] != '-') model_path = argv[i];
        else model_path = NULL, i = argc;
    }
    if (!model_path || max_tokens < 1 || device < 0) {
        fprintf(stderr, "usage: %s MODEL.gguf [--state FILE.npy] [--greedy] [--max-tokens N] [--device K]\n", argv[0]);
        return 2;
    }
    if (device > 0) {
        const int32_t n = sp_device_count();
        for (int32_t k = 1; k <= n; k++) {
            sp_device_info info;
            if (sp_device_get_info(k, &info) == SP_OK)
                fprintf(stderr, "[device %d: %s (%s, Vulkan %s)%s]\n", k, info.name, info.kind, info.api_version,
                        k == device ? " <- this chat" : "");
        }
    }
    int rc = 1;
    sp_model *model = NULL;
    sp_session *session = NULL;
    sp_generator *gen = NULL;
    chat c = {0};
    char *line = malloc(LINE_MAX_BYTES);
    c.conv = malloc(sizeof *c.conv * N_CTX);
    if (!line || !c.conv) goto fail;

    if (sp_model_load(model_path, sp_model_default_params(), &model) != SP_OK) goto fail;
    c.model = model;
    sp_session_params sp = sp_session_default_params();
    sp.n_ctx = N_CTX;
    sp.device = device;
    if (sp_session_new(model, sp, &session) != SP_OK) goto fail;
    int32_t probe[4];
    size_t n_probe = 0;
    c.chatml = sp_tokenize(model, "<|im_start|>", 12, false, true, probe, 4, &n_probe) == SP_OK && n_probe == 1;

    sp_generator_params gp = sp_generator_default_params_for(SP_DRAFTER_ADAPTIVE);
    gp.max_tokens = max_tokens;
    if (greedy) {
        gp.sampler.temperature = 0.0f;
    } else {
        gp.sampler.temperature = 0.2f;
        gp.sampler.top_p = 0.9f;
        gp.sampler.repeat_penalty = 1.1f;
    }
    if (!c.chatml) {
        gp.n_stop = 1;
        gp.stop[0] = "\nUser:";
    }
    if (sp_generator_new(session, &gp, &gen) != SP_OK) goto fail;
    if (state) {
        FILE *f = fopen(state, "rb");
        if (f) {
            fclose(f);
            if (sp_generator_load_drafter(gen, state) != SP_OK)
                fprintf(stderr, "[the saved drafter state is not used: %s]\n", sp_last_error());
        }
    }

    while (fgets(line, LINE_MAX_BYTES, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (!strcmp(line, "/quit")) break;
        if (!line[0]) continue;
        if (!add_user(&c, line, max_tokens)) {
            c.n = 0; /* a new conversation, this message first */
            if (!add_user(&c, line, max_tokens)) {
                fprintf(stderr, "[that message does not fit the context (%d tokens with the answer)]\n", N_CTX);
                c.n = 0;
                continue;
            }
            fprintf(stderr, "[the conversation no longer fit the context: a new one starts with this message]\n");
        }
        sp_generator_stats st0, st1;
        sp_generator_get_stats(gen, &st0);
        if (sp_generator_start(gen, c.conv, c.n) != SP_OK) goto fail;
        answer a = {&c, 0};
        sp_gen_stop why;
        if (sp_generate(gen, on_token, &a, &why) != SP_OK) goto fail;
        printf("\n");
        fflush(stdout);
        if (c.chatml && !append(&c, "<|im_end|>\n", false, true)) c.n = 0;
        else if (!c.chatml && !append(&c, "\n", false, true)) c.n = 0;
        sp_generator_get_stats(gen, &st1);
        const long long steps = st1.steps - st0.steps;
        fprintf(stderr, "[%d tokens in %lld forward passes (%.2f per pass): %lld drafted, %lld accepted, %lld plain "
                "steps; forward passes %.1f ms, generator loop %.1f us/step]\n", a.n_new, steps,
                steps ? (double)a.n_new / (double)steps : 0.0, (long long)(st1.drafted - st0.drafted),
                (long long)(st1.accepted - st0.accepted), (long long)(st1.plain_steps - st0.plain_steps),
                (st1.eval_s - st0.eval_s) * 1e3, steps ? (st1.loop_s - st0.loop_s) * 1e6 / (double)steps : 0.0);
    }
    if (state && sp_generator_save_drafter(gen, state) != SP_OK)
        fprintf(stderr, "[could not save the drafter state: %s]\n", sp_last_error());
    rc = 0;
fail:
    if (rc) fprintf(stderr, "error: %s\n", sp_last_error());
    sp_generator_free(gen);
    sp_session_free(session);
    sp_model_free(model);
    free(c.conv);
    free(line);
    return rc;
}
