/* fuzz_load.c: libFuzzer target for the model loader. The input is a GGUF file.
 *
 * sp_model_load reads it from a memfd (so through the real path code: open, fstat, mmap or read), with the file
 * mapped or read and repacking on or off by the input's length; a file whose weights fail to load is tried again
 * vocab_only. A model that loads is then used as a host would: info, metadata, its vocabulary (fz_exercise_vocab),
 * and, when it has weights, a session evaluating a few tokens.
 * Seeds: tests/gguf_corpus.py's negative corpus, tiny llama models of several weight types, vocabularies. */
#include "fuzz.h"

#include <sys/mman.h>
#include <unistd.h>

#include "model.h"

static int g_fd = -1;
static char g_path[64];

/* The input as a regular file at g_path. */
static int write_file(const uint8_t *data, size_t size) {
    if (g_fd < 0) {
        g_fd = memfd_create("sparrow-fuzz-load", MFD_CLOEXEC);
        FZ_CHECK(g_fd >= 0);
        snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
    }
    if (ftruncate(g_fd, 0) != 0) return -1;
    for (size_t off = 0; off < size;) {
        ssize_t w = pwrite(g_fd, data + off, size - off, (off_t)off);
        if (w <= 0) return -1;
        off += (size_t)w;
    }
    return 0;
}

static void use_model(sp_model *m) {
    sp_model_info info;
    FZ_CHECK(sp_model_get_info(m, &info) == SP_OK);
    FZ_CHECK(info.n_vocab > 0);
    FZ_CHECK(info.bos_token < info.n_vocab && info.eos_token < info.n_vocab && info.eot_token < info.n_vocab);
    const char *s;
    size_t n;
    (void)sp_model_meta_str(m, "tokenizer.chat_template", &s, &n);
    fz_exercise_vocab(m->vocab, 512);
    if (!m->has_weights) return;
    sp_session_params p = sp_session_default_params();
    p.n_ctx = 8;
    p.n_batch = 4;
    p.n_threads = 1;
    sp_session *ses = NULL;
    if (sp_session_new(m, p, &ses) != SP_OK) return; /* e.g. no memory for a huge (but file-backed) shape */
    const int32_t V = info.n_vocab;
    float *logits = malloc((size_t)V * 4 * sizeof *logits);
    if (logits) {
        const int32_t toks[4] = {0, V - 1, V / 2, info.bos_token >= 0 ? info.bos_token : 0};
        sp_batch b = {.tokens = toks, .n_tokens = 4, .logits = logits};
        FZ_CHECK(sp_eval(ses, &b) == SP_OK);
        b.n_tokens = 1;
        b.logits_last_only = true;
        FZ_CHECK(sp_eval(ses, &b) == SP_OK);
        FZ_CHECK(sp_session_n_past(ses) == 5);
        sp_sparsity_stats st;
        FZ_CHECK(sp_session_get_sparsity(ses, -1, &st) == SP_OK);
    }
    free(logits);
    sp_session_free(ses);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (write_file(data, size) != 0) return 0;
    sp_model_params p = sp_model_default_params();
    p.use_mmap = size & 1;
    p.repack = !(size & 2);
    sp_model *m = NULL;
    sp_status st = sp_model_load(g_path, p, &m);
    FZ_CHECK((st == SP_OK) == (m != NULL));
    if (st != SP_OK) {
        FZ_CHECK(sp_last_error()[0] != '\0');
        p.vocab_only = true;
        st = sp_model_load(g_path, p, &m);
        FZ_CHECK((st == SP_OK) == (m != NULL));
    }
    if (m) use_model(m);
    sp_model_free(m);
    return 0;
}
