/* fuzz_eval.c: libFuzzer target for sessions: sp_eval with random batches, positions and masks, interleaved with
 * truncate, keep and the statistics calls, on tiny models (the data folder's model-*.gguf: llama with several weight
 * types, BlockFFN when the converter was available).
 *
 * Input: byte 0 picks the model, byte 1 the session (ffn_mode, 1 or 2 threads, n_batch), then up to 24 operations
 * until the bytes run out. Each call's status must be the one its arguments call for (computed here from the
 * documented rules), n_past must follow, and the logits of a pass must be finite. */
#include "fuzz.h"

#include <glob.h>
#include <math.h>

#include "sparrow.h"

enum { MAX_MODELS = 8, N_CTX = 32, MAX_BATCH = 8 };
static sp_model *g_model[MAX_MODELS];
static int32_t g_vocab[MAX_MODELS], g_layers[MAX_MODELS];
static int g_n;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char pattern[4096];
    glob_t gl;
    FZ_CHECK(glob(fz_data_path(pattern, sizeof pattern, "model-*.gguf"), 0, NULL, &gl) == 0);
    for (size_t i = 0; i < gl.gl_pathc && g_n < MAX_MODELS; i++) {
        if (sp_model_load(gl.gl_pathv[i], sp_model_default_params(), &g_model[g_n]) != SP_OK) {
            fprintf(stderr, "%s: %s\n", gl.gl_pathv[i], sp_last_error());
            abort();
        }
        sp_model_info info;
        FZ_CHECK(sp_model_get_info(g_model[g_n], &info) == SP_OK);
        g_vocab[g_n] = info.n_vocab;
        g_layers[g_n] = info.n_layer;
        g_n++;
    }
    globfree(&gl);
    FZ_CHECK(g_n > 0);
    return 0;
}

static void do_eval(fz_in *in, sp_session *ses, int32_t V, int32_t n_batch) {
    int32_t tokens[MAX_BATCH + 1], pos[MAX_BATCH + 1];
    uint8_t mask[(MAX_BATCH + 1) * (MAX_BATCH + 1)];
    static float logits[(MAX_BATCH + 1) * 4096];
    const uint8_t how = fz_u8(in);
    const int32_t T = 1 + fz_u8(in) % (n_batch + 1); /* n_batch + 1: refused */
    const int32_t n_past = sp_session_n_past(ses);
    bool bad = false;
    for (int32_t t = 0; t < T; t++) {
        tokens[t] = (int32_t)(fz_u16(in) % (uint32_t)(V + 4)) - 2; /* a few out of range */
        bad |= tokens[t] < 0 || tokens[t] >= V;
    }
    const bool with_pos = how & 1, with_mask = how & 2;
    for (int32_t t = 0; with_pos && t < T; t++) {
        const uint8_t k = fz_u8(in);
        pos[t] = k < 200 ? n_past + t + (int8_t)fz_u8(in) : k < 250 ? (int32_t)fz_u16(in) << (k % 9) : (int32_t)fz_u32(in);
        bad |= pos[t] < 0 || pos[t] > (1 << 24);
    }
    for (int32_t i = 0; with_mask && i < T * T; i++) mask[i] = fz_u8(in) & 1;
    const int logits_mode = (how >> 2) % 3; /* none, last, all */
    sp_batch b = {.tokens = tokens, .pos = with_pos ? pos : NULL, .mask = with_mask ? mask : NULL, .n_tokens = T,
                  .logits = logits_mode && V <= 4096 ? logits : NULL, .logits_last_only = logits_mode == 1};
    sp_status want = SP_OK;
    if (T > n_batch) want = SP_ERR_INVALID_ARG;
    else if (n_past + T > N_CTX) want = SP_ERR_CONTEXT_FULL;
    else if (bad) want = SP_ERR_INVALID_ARG;
    const sp_status st = sp_eval(ses, &b);
    FZ_CHECK(st == want);
    FZ_CHECK(sp_session_n_past(ses) == n_past + (st == SP_OK ? T : 0));
    if (st == SP_OK && b.logits) {
        const int32_t rows = b.logits_last_only ? 1 : T;
        for (int32_t i = 0; i < rows * V; i++) FZ_CHECK(isfinite(logits[i]));
    }
}

static void do_keep(fz_in *in, sp_session *ses) {
    const int32_t n_past = sp_session_n_past(ses);
    int32_t idx[N_CTX + 2];
    const int32_t n = fz_u8(in) % (n_past + 2);
    bool ok = n <= n_past;
    if (fz_u8(in) & 1) { /* a valid increasing subset when n <= n_past */
        for (int32_t i = 0, slot = 0; i < n; i++) {
            const int32_t room = n_past - slot - (n - i); /* slots that may still be skipped */
            slot += room > 0 ? fz_u8(in) % (room + 1) : 0;
            idx[i] = slot++;
        }
    } else {
        for (int32_t i = 0; i < n; i++) {
            idx[i] = (int32_t)(fz_u8(in) % (n_past + 3)) - 1;
            ok &= idx[i] >= 0 && idx[i] < n_past && (i == 0 || idx[i] > idx[i - 1]);
        }
    }
    const sp_status st = sp_session_keep(ses, idx, n);
    FZ_CHECK((st == SP_OK) == ok);
    FZ_CHECK(sp_session_n_past(ses) == (ok ? n : n_past));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    const int which = fz_u8(&in) % g_n;
    const uint8_t cfg = fz_u8(&in);
    sp_session_params p = sp_session_default_params();
    p.n_ctx = N_CTX;
    p.ffn_mode = (sp_ffn_mode)(cfg % 4);
    p.n_threads = 1 + (cfg >> 2) % 2;
    p.n_batch = 1 + (cfg >> 3) % MAX_BATCH;
    sp_session *ses = NULL;
    FZ_CHECK(sp_session_new(g_model[which], p, &ses) == SP_OK);
    const int32_t V = g_vocab[which], L = g_layers[which];
    for (int op = 0; op < 24 && in.n; op++) {
        switch (fz_u8(&in) % 5) {
        case 0:
        case 1: do_eval(&in, ses, V, p.n_batch); break;
        case 2: {
            const int32_t n_past = sp_session_n_past(ses), n = fz_u8(&in) % (n_past + 3);
            FZ_CHECK((sp_session_truncate(ses, n) == SP_OK) == (n <= n_past));
            FZ_CHECK(sp_session_n_past(ses) == (n <= n_past ? n : n_past));
            break;
        }
        case 3: do_keep(&in, ses); break;
        default: {
            const int32_t layer = (int32_t)(int8_t)fz_u8(&in);
            sp_sparsity_stats st;
            const sp_status s = sp_session_get_sparsity(ses, layer, &st);
            FZ_CHECK(s == SP_OK || layer < -1 || layer >= L);
            sp_timings tm;
            FZ_CHECK(sp_session_get_timings(ses, &tm) == SP_OK);
            if (layer & 1) sp_session_reset_sparsity(ses);
        }
        }
    }
    sp_session_free(ses);
    return 0;
}
