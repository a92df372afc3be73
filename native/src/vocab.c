/* vocab.c: the tokenizer's vocabulary: loading and validating tokenizer.ggml.* metadata, special tokens (ids,
 * end-of-generation set, parse_special splitting), the public tokenize entry and token pieces.
 * The algorithms live in tokenize_bpe.c and tokenize_spm.c; ids match llama.cpp's on the same file. */
#include "tokenize_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- small helpers ---- */

bool sp_tokvec_push(sp_tokvec *t, int32_t id) {
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 256;
        int32_t *v = realloc(t->v, cap * sizeof *v);
        if (!v) return false;
        t->v = v;
        t->cap = cap;
    }
    t->v[t->n++] = id;
    return true;
}

static uint64_t hash_bytes(const char *s, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_u64(uint64_t x) { /* splitmix64 finalizer */
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t table_size(uint64_t n) {
    uint64_t s = 16;
    while (s < 2 * n) s *= 2;
    return s;
}

int32_t sp_vocab_find(const sp_vocab *v, const char *text, size_t len) {
    for (uint64_t i = hash_bytes(text, len) & v->text_mask;; i = (i + 1) & v->text_mask) {
        int32_t id = v->text_hash[i];
        if (id < 0) return -1;
        if (v->tok[id].len == len && memcmp(v->tok[id].text, text, len) == 0) return id;
    }
}

const sp_merge *sp_vocab_find_merge(const sp_vocab *v, int32_t left, int32_t right) {
    if (!v->merges) return NULL;
    const uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint64_t i = hash_u64(key) & v->merge_mask;; i = (i + 1) & v->merge_mask) {
        const sp_merge *m = &v->merges[i];
        if (m->key == UINT64_MAX) return NULL;
        if (m->key == key) return m;
    }
}

static bool tok_is(const sp_vocab *v, int32_t id, const char *s) {
    return id >= 0 && v->tok[id].len == strlen(s) && memcmp(v->tok[id].text, s, v->tok[id].len) == 0;
}

static int32_t find_cstr(const sp_vocab *v, const char *s) { return sp_vocab_find(v, s, strlen(s)); }

/* ---- loading ---- */

void sp_vocab_free(sp_vocab *v) {
    if (!v) return;
    free(v->tok);
    free(v->text_hash);
    free(v->merges);
    free(v->eog);
    free(v->special);
    free(v);
}

static sp_status load_fail(sp_vocab *v, sp_status st) {
    sp_vocab_free(v);
    return st;
}

/* The pre-tokenizer families of llama.cpp (llama-vocab.cpp) that Sparrow implements. */
static sp_status set_pretok(sp_vocab *v, sp_gguf_str pre) {
    static const char *const gpt2[] = {"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                                       "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code",
                                       "roberta-bpe", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"};
    static const char *const smollm[] = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                                         "minerva-7b", "mellum2"};
    static const char *const llama3[] = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                         "midm-2.0", "lfm2", "jina-v5-nano"};
    static const char *const llama3_keep_merges[] = {"dbrx", "smaug-bpe", "chatglm-bpe"};
    static const char *const qwen2[] = {"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez"};
#define IN(list) for (size_t i = 0; i < sizeof list / sizeof *list; i++) if (sp_gguf_str_eq(pre, list[i]))
    if (pre.len == 0 || sp_gguf_str_eq(pre, "default")) { v->pre = SP_PRETOK_DEFAULT; return SP_OK; }
    IN(gpt2) { v->pre = SP_PRETOK_GPT2; return SP_OK; }
    IN(smollm) { v->pre = SP_PRETOK_SMOLLM; return SP_OK; }
    IN(llama3) { v->pre = SP_PRETOK_LLAMA3; v->ignore_merges = true; v->add_bos = true; return SP_OK; }
    IN(llama3_keep_merges) { v->pre = SP_PRETOK_LLAMA3; return SP_OK; }
    IN(qwen2) { v->pre = SP_PRETOK_QWEN2; return SP_OK; }
#undef IN
    return sp_fail(SP_ERR_UNSUPPORTED, "tokenizer: pre-tokenizer 'tokenizer.ggml.pre' = '%.*s' is not supported",
                   (int)SP_MIN(pre.len, 64), pre.data);
}

/* A numeric array with at least n entries, or absent. */
static sp_status numeric_array(const sp_gguf *g, const char *key, uint64_t n, bool allow_float, const sp_gguf_kv **out) {
    const sp_gguf_kv *kv = sp_gguf_find(g, key);
    *out = NULL;
    if (!kv) return SP_OK;
    if (kv->type != SP_GGUF_ARRAY || kv->arr_type == SP_GGUF_STRING || kv->arr_type == SP_GGUF_ARRAY ||
        kv->arr_type == SP_GGUF_BOOL ||
        (!allow_float && (kv->arr_type == SP_GGUF_F32 || kv->arr_type == SP_GGUF_F64)))
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: '%s' must be a numeric array", key);
    if (kv->arr_n < n)
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: '%s' has %llu entries but there are %llu tokens", key,
                       (unsigned long long)kv->arr_n, (unsigned long long)n);
    *out = kv;
    return SP_OK;
}

static sp_status load_tokens(sp_vocab *v, const sp_gguf *g) {
    const sp_gguf_kv *kv = sp_gguf_find(g, "tokenizer.ggml.tokens");
    if (!kv) return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.tokens' is missing");
    if (kv->type != SP_GGUF_ARRAY || kv->arr_type != SP_GGUF_STRING)
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.tokens' must be an array of strings");
    if (kv->arr_n == 0 || kv->arr_n > (uint64_t)INT32_MAX / 4)
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.tokens' has %llu entries",
                       (unsigned long long)kv->arr_n);
    const uint64_t n = kv->arr_n;
    const sp_gguf_kv *scores, *types;
    sp_status st = numeric_array(g, "tokenizer.ggml.scores", n, true, &scores);
    if (st == SP_OK) st = numeric_array(g, "tokenizer.ggml.token_type", n, false, &types);
    if (st != SP_OK) return st;

    v->n_tokens = (int32_t)n;
    v->tok = calloc(n, sizeof *v->tok);
    v->text_mask = table_size(n) - 1;
    v->text_hash = malloc((v->text_mask + 1) * sizeof *v->text_hash);
    if (!v->tok || !v->text_hash) return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory for %llu tokens",
                                                 (unsigned long long)n);
    memset(v->text_hash, 0xFF, (v->text_mask + 1) * sizeof *v->text_hash);
    for (uint64_t i = 0; i < n; i++) {
        sp_gguf_str s = sp_gguf_arr_str(kv, i);
        if (s.len > 0xFFFFFF)
            return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: token %llu is %llu bytes long", (unsigned long long)i,
                           (unsigned long long)s.len);
        sp_vtoken *t = &v->tok[i];
        t->text = s.data;
        t->len = (uint32_t)s.len;
        t->score = scores ? sp_gguf_arr_f32(scores, i) : 0.0f;
        t->attr = SP_TATTR_NORMAL;
        if (types) {
            switch (sp_gguf_arr_i64(types, i)) {
            case 1: t->attr = SP_TATTR_NORMAL; break;
            case 2: t->attr = SP_TATTR_UNKNOWN; break;
            case 3: t->attr = SP_TATTR_CONTROL; break;
            case 4: t->attr = SP_TATTR_USER_DEFINED; break;
            case 5: t->attr = SP_TATTR_UNUSED; break;
            case 6: t->attr = SP_TATTR_BYTE; break;
            default: t->attr = SP_TATTR_UNDEFINED; break;
            }
        }
        if (s.len == 0) continue; /* an empty token can never match text */
        uint64_t h = hash_bytes(s.data, s.len) & v->text_mask;
        for (;; h = (h + 1) & v->text_mask) {
            int32_t id = v->text_hash[h];
            if (id < 0) break;
            if (v->tok[id].len == s.len && memcmp(v->tok[id].text, s.data, s.len) == 0)
                return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: tokens %d and %llu have the same text '%.*s'", id,
                               (unsigned long long)i, (int)SP_MIN(s.len, 64), s.data);
        }
        v->text_hash[h] = (int32_t)i;
    }
    return SP_OK;
}

static sp_status load_merges(sp_vocab *v, const sp_gguf *g) {
    const sp_gguf_kv *kv = sp_gguf_find(g, "tokenizer.ggml.merges");
    if (!kv) return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: BPE vocabulary without 'tokenizer.ggml.merges'");
    if (kv->type != SP_GGUF_ARRAY || kv->arr_type != SP_GGUF_STRING)
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.merges' must be an array of strings");
    if (kv->arr_n > (uint64_t)INT32_MAX / 4)
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.merges' has %llu entries",
                       (unsigned long long)kv->arr_n);
    v->merge_mask = table_size(kv->arr_n) - 1;
    v->merges = malloc((v->merge_mask + 1) * sizeof *v->merges);
    char *cat = NULL;
    size_t cat_cap = 0;
    if (!v->merges) return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory for merges");
    for (uint64_t i = 0; i <= v->merge_mask; i++) v->merges[i].key = UINT64_MAX;
    sp_status st = SP_OK;
    for (uint64_t i = 0; i < kv->arr_n && st == SP_OK; i++) {
        sp_gguf_str s = sp_gguf_arr_str(kv, i);
        /* "left right": the first space after the first byte splits (as llama.cpp: word.find(' ', 1)) */
        const char *sp = s.len > 1 ? memchr(s.data + 1, ' ', s.len - 1) : NULL;
        if (!sp) {
            st = sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: merge %llu ('%.*s') is not 'left right'", (unsigned long long)i,
                         (int)SP_MIN(s.len, 64), s.data);
            break;
        }
        const size_t nl = (size_t)(sp - s.data), nr = s.len - nl - 1;
        const int32_t l = sp_vocab_find(v, s.data, nl), r = sp_vocab_find(v, sp + 1, nr);
        if (l < 0 || r < 0) {
            st = sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: merge %llu ('%.*s') joins text that is not a token",
                         (unsigned long long)i, (int)SP_MIN(s.len, 64), s.data);
            break;
        }
        if (nl + nr > cat_cap) {
            char *c = realloc(cat, nl + nr);
            if (!c) { st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory"); break; }
            cat = c;
            cat_cap = nl + nr;
        }
        memcpy(cat, s.data, nl);
        memcpy(cat + nl, sp + 1, nr);
        const uint64_t key = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
        uint64_t h = hash_u64(key) & v->merge_mask;
        while (v->merges[h].key != UINT64_MAX && v->merges[h].key != key) h = (h + 1) & v->merge_mask;
        if (v->merges[h].key == key) continue; /* a repeated merge keeps its first (best) rank */
        v->merges[h] = (sp_merge){key, (int32_t)i, sp_vocab_find(v, cat, nl + nr)};
    }
    free(cat);
    return st;
}

/* An optional token id: absent keeps *id; negative means none; >= n_tokens is a lie. */
static sp_status special_id(const sp_vocab *v, const sp_gguf *g, const char *key, int32_t *id) {
    const sp_gguf_kv *kv = sp_gguf_find(g, key);
    if (!kv) return SP_OK;
    int32_t x;
    uint32_t u;
    if (sp_gguf_get_i32(g, key, &x) == SP_OK) {
        if (x < 0) { *id = -1; return SP_OK; }
    } else if (sp_gguf_get_u32(g, key, &u) == SP_OK) {
        x = u > INT32_MAX ? INT32_MAX : (int32_t)u;
    } else {
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: '%s' must be an integer token id", key);
    }
    if (x >= v->n_tokens)
        return sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: '%s' = %d but the vocabulary has only %d tokens", key, x,
                       v->n_tokens);
    *id = x;
    return SP_OK;
}

static sp_status optional_bool(const sp_gguf *g, const char *key, bool *out) {
    if (!sp_gguf_find(g, key)) return SP_OK;
    return sp_gguf_get_bool(g, key, out);
}

/* The first of the texts that is a token (marked control, as llama.cpp does), or -1. */
static int32_t detect(sp_vocab *v, const char *const *texts, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int32_t id = find_cstr(v, texts[i]);
        if (id >= 0) {
            v->tok[id].attr |= SP_TATTR_CONTROL;
            return id;
        }
    }
    return -1;
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

typedef struct len_id {
    uint32_t len;
    int32_t id;
} len_id;

static int cmp_len_id(const void *a, const void *b) { /* longest text first, then by id */
    const len_id *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* End-of-generation ids, EOT/EOM detection and the special-token list, following llama.cpp's load(). */
static sp_status load_specials(sp_vocab *v, const sp_gguf *g, int32_t fim_pad, int32_t fim_rep, int32_t fim_sep) {
    static const char *const eot_texts[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
                                            "<\xEF\xBD\x9C" "end\xE2\x96\x81" "of\xE2\x96\x81" "sentence\xEF\xBD\x9C>",
                                            "<end_of_utterance>"};
    static const char *const eom_texts[] = {"<|eom_id|>"};
    static const char *const fim_pad_texts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"};
    static const char *const fim_rep_texts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"};
    static const char *const fim_sep_texts[] = {"<|file_sep|>"};
    static const char *const eog_texts[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
                                            "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>",
                                            "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
                                            "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                                            "<\xEF\xBD\x9C" "end\xE2\x96\x81" "of\xE2\x96\x81" "sentence\xEF\xBD\x9C>",
                                            "[e~["};
#define N(a) (sizeof a / sizeof *a)
    if (v->eot < 0) v->eot = detect(v, eot_texts, N(eot_texts));
    if (v->eom < 0) v->eom = detect(v, eom_texts, N(eom_texts));
    if (fim_pad < 0) fim_pad = detect(v, fim_pad_texts, N(fim_pad_texts));
    if (fim_rep < 0) fim_rep = detect(v, fim_rep_texts, N(fim_rep_texts));
    if (fim_sep < 0) fim_sep = detect(v, fim_sep_texts, N(fim_sep_texts));

    /* control tokens named "unused..." are unused */
    for (int32_t id = 0; id < v->n_tokens; id++) {
        sp_vtoken *t = &v->tok[id];
        if ((t->attr & SP_TATTR_CONTROL) && t->len >= 6) {
            for (uint32_t k = 0; k + 6 <= t->len; k++)
                if (memcmp(t->text + k, "unused", 6) == 0) { t->attr |= SP_TATTR_UNUSED; break; }
        }
    }

    /* gpt-oss: these always render */
    static const char *const user_texts[] = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"};
    for (size_t i = 0; i < N(user_texts); i++) {
        int32_t id = find_cstr(v, user_texts[i]);
        if (id >= 0) v->tok[id].attr = SP_TATTR_USER_DEFINED;
    }

    int32_t eog[64];
    size_t n = 0;
#define ADD(id) do { int32_t id_ = (id); if (id_ >= 0 && n < N(eog)) eog[n++] = id_; } while (0)
    ADD(fim_pad);
    ADD(fim_rep);
    ADD(fim_sep);
    for (size_t i = 0; i < N(eog_texts); i++) {
        int32_t id = find_cstr(v, eog_texts[i]);
        if (id >= 0) { v->tok[id].attr |= SP_TATTR_CONTROL; ADD(id); }
    }
    ADD(v->eos);
    ADD(v->eot);
    ADD(v->eom);
    qsort(eog, n, sizeof *eog, cmp_i32);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) if (m == 0 || eog[m - 1] != eog[i]) eog[m++] = eog[i];
    n = m;

    /* o200k_harmony / solar-open: "<|end|>" is not end of generation when <|return|>+<|call|> or <|calls|>+<|flush|> */
    bool has_return = false, has_call = false, has_flush = false;
    int32_t end_id = -1;
    for (size_t i = 0; i < n; i++) {
        if (tok_is(v, eog[i], "<|return|>")) has_return = true;
        else if (tok_is(v, eog[i], "<|call|>") || tok_is(v, eog[i], "<|calls|>")) has_call = true;
        else if (tok_is(v, eog[i], "<|flush|>")) has_flush = true;
        else if (tok_is(v, eog[i], "<|end|>")) end_id = eog[i];
    }
    /* gemma4 / plamo: a normal "</s>" */
    bool has_normal_s = false;
    int32_t s_id = -1;
    for (size_t i = 0; i < n; i++) {
        if (tok_is(v, eog[i], "<|tool_response>") || tok_is(v, eog[i], "<|plamo:eos|>")) has_normal_s = true;
        else if (tok_is(v, eog[i], "</s>")) s_id = eog[i];
    }
    int32_t drop_end = ((has_return && has_call) || (has_call && has_flush)) ? end_id : -1;
    int32_t drop_s = has_normal_s ? s_id : -1;
    if (drop_end >= 0) v->tok[drop_end].attr = SP_TATTR_USER_DEFINED;
    if (drop_s >= 0) v->tok[drop_s].attr = SP_TATTR_NORMAL;
    m = 0;
    for (size_t i = 0; i < n; i++) if (eog[i] != drop_end && eog[i] != drop_s) eog[m++] = eog[i];
    n = m;
#undef ADD
#undef N

    v->eog = malloc((n ? n : 1) * sizeof *v->eog);
    if (!v->eog) return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
    memcpy(v->eog, eog, n * sizeof *eog);
    v->n_eog = n;

    /* tokens that parse_special splits out of text: control, user-defined, unknown; longest text first */
    size_t ns = 0;
    for (int32_t id = 0; id < v->n_tokens; id++)
        ns += (v->tok[id].attr & (SP_TATTR_CONTROL | SP_TATTR_USER_DEFINED | SP_TATTR_UNKNOWN)) && v->tok[id].len;
    v->special = malloc((ns ? ns : 1) * sizeof *v->special);
    len_id *order = malloc((ns ? ns : 1) * sizeof *order);
    if (!v->special || !order) {
        free(order);
        return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
    }
    for (int32_t id = 0; id < v->n_tokens; id++)
        if ((v->tok[id].attr & (SP_TATTR_CONTROL | SP_TATTR_USER_DEFINED | SP_TATTR_UNKNOWN)) && v->tok[id].len)
            order[v->n_special++] = (len_id){v->tok[id].len, id};
    qsort(order, v->n_special, sizeof *order, cmp_len_id);
    for (size_t i = 0; i < v->n_special; i++) v->special[i] = order[i].id;
    free(order);
    (void)g;
    return SP_OK;
}

static void load_byte_tokens(sp_vocab *v) {
    static const char hex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        v->single_byte_tok[b] = sp_vocab_find(v, &c, 1);
        if (v->type == SP_VOCAB_BPE) {
            char u[4];
            int n = sp_utf8_encode(sp_gpt2_byte_to_cp((uint8_t)b), u);
            v->byte_tok[b] = sp_vocab_find(v, u, (size_t)n);
        } else {
            const char t[6] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
            v->byte_tok[b] = sp_vocab_find(v, t, 6);
        }
    }
}

sp_status sp_vocab_load(const sp_gguf *g, sp_vocab **out) {
    if (!out) return sp_fail(SP_ERR_INVALID_ARG, "sp_vocab_load: out is NULL");
    *out = NULL;
    if (!g) return sp_fail(SP_ERR_INVALID_ARG, "sp_vocab_load: gguf is NULL");
    sp_vocab *v = calloc(1, sizeof *v);
    if (!v) return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
    v->bos = v->eos = v->eot = v->eom = v->unk = v->pad = -1;

    sp_gguf_str model, pre = {"", 0};
    if (sp_gguf_get_str(g, "tokenizer.ggml.model", &model) != SP_OK)
        return load_fail(v, sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.model' is missing or not a string"));
    if (sp_gguf_find(g, "tokenizer.ggml.pre") && sp_gguf_get_str(g, "tokenizer.ggml.pre", &pre) != SP_OK)
        return load_fail(v, sp_fail(SP_ERR_BAD_FORMAT, "tokenizer: 'tokenizer.ggml.pre' must be a string"));

    sp_status st;
    if (sp_gguf_str_eq(model, "gpt2")) {
        v->type = SP_VOCAB_BPE;
        if ((st = set_pretok(v, pre)) != SP_OK) return load_fail(v, st);
    } else if (sp_gguf_str_eq(model, "llama")) {
        v->type = SP_VOCAB_SPM;
        v->add_space_prefix = true;
        v->add_bos = true;
    } else {
        return load_fail(v, sp_fail(SP_ERR_UNSUPPORTED, "tokenizer: 'tokenizer.ggml.model' = '%.*s' is not supported "
                                    "(only 'gpt2' and 'llama')", (int)SP_MIN(model.len, 64), model.data));
    }
    if ((st = load_tokens(v, g)) != SP_OK) return load_fail(v, st);
    if (v->type == SP_VOCAB_BPE && (st = load_merges(v, g)) != SP_OK) return load_fail(v, st);

    /* llama.cpp's defaults, disabled when outside the vocabulary; then the file's ids, which must be inside */
    if (v->type == SP_VOCAB_SPM) { v->bos = 1; v->eos = 2; v->unk = 0; }
    else { v->bos = 11; v->eos = 11; }
    if (v->bos >= v->n_tokens) v->bos = -1;
    if (v->eos >= v->n_tokens) v->eos = -1;
    if (v->unk >= v->n_tokens) v->unk = -1;
    int32_t sep = -1, mask = -1, fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1, fim_sep = -1;
    struct { const char *key; int32_t *id; } ids[] = {
        {"tokenizer.ggml.bos_token_id", &v->bos}, {"tokenizer.ggml.eos_token_id", &v->eos},
        {"tokenizer.ggml.eot_token_id", &v->eot}, {"tokenizer.ggml.eom_token_id", &v->eom},
        {"tokenizer.ggml.unknown_token_id", &v->unk}, {"tokenizer.ggml.seperator_token_id", &sep},
        {"tokenizer.ggml.padding_token_id", &v->pad}, {"tokenizer.ggml.mask_token_id", &mask},
        {"tokenizer.ggml.fim_pre_token_id", &fim_pre}, {"tokenizer.ggml.fim_suf_token_id", &fim_suf},
        {"tokenizer.ggml.fim_mid_token_id", &fim_mid}, {"tokenizer.ggml.fim_pad_token_id", &fim_pad},
        {"tokenizer.ggml.fim_rep_token_id", &fim_rep}, {"tokenizer.ggml.fim_sep_token_id", &fim_sep},
    };
    for (size_t i = 0; i < sizeof ids / sizeof *ids; i++)
        if ((st = special_id(v, g, ids[i].key, ids[i].id)) != SP_OK) return load_fail(v, st);
    if ((st = optional_bool(g, "tokenizer.ggml.add_bos_token", &v->add_bos)) != SP_OK ||
        (st = optional_bool(g, "tokenizer.ggml.add_eos_token", &v->add_eos)) != SP_OK ||
        (st = optional_bool(g, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix)) != SP_OK)
        return load_fail(v, st);
    if (v->type == SP_VOCAB_BPE) v->add_space_prefix = false; /* only SPM uses it */

    if ((st = load_specials(v, g, fim_pad, fim_rep, fim_sep)) != SP_OK) return load_fail(v, st);
    load_byte_tokens(v);
    *out = v;
    return SP_OK;
}

/* ---- queries ---- */

int32_t sp_vocab_n_tokens(const sp_vocab *v) { return v ? v->n_tokens : 0; }
int32_t sp_vocab_bos(const sp_vocab *v) { return v ? v->bos : -1; }
int32_t sp_vocab_eos(const sp_vocab *v) { return v ? v->eos : -1; }
int32_t sp_vocab_eot(const sp_vocab *v) { return v ? v->eot : -1; }
bool sp_vocab_add_bos(const sp_vocab *v) { return v && v->add_bos && v->bos >= 0; }

bool sp_vocab_is_eog(const sp_vocab *v, int32_t token) {
    if (!v || token < 0) return false;
    size_t lo = 0, hi = v->n_eog;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v->eog[mid] == token) return true;
        if (v->eog[mid] < token) lo = mid + 1;
        else hi = mid;
    }
    return false;
}

/* ---- tokenize ---- */

/* A piece of the input: raw text still to tokenize, or a special token already found. */
typedef struct fragment {
    int32_t token; /* -1 for raw text */
    size_t off, len;
} fragment;

typedef struct fragvec {
    fragment *v;
    size_t n, cap;
} fragvec;

static bool frag_push(fragvec *f, int32_t token, size_t off, size_t len) {
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 16;
        fragment *v = realloc(f->v, cap * sizeof *v);
        if (!v) return false;
        f->v = v;
        f->cap = cap;
    }
    f->v[f->n++] = (fragment){token, off, len};
    return true;
}

/* First occurrence of needle[0..nn) (nn >= 1) in hay[0..nh), or NULL. */
static const char *find_bytes(const char *hay, size_t nh, const char *needle, size_t nn) {
    while (nh >= nn) {
        const char *p = memchr(hay, needle[0], nh - nn + 1);
        if (!p) return NULL;
        if (memcmp(p, needle, nn) == 0) return p;
        nh -= (size_t)(p - hay) + 1;
        hay = p + 1;
    }
    return NULL;
}

/* Split the raw text fragments on each special token's text, longest token first (llama.cpp's
 * tokenizer_st_partition). Without parse_special only user-defined tokens are split out. */
static bool partition(const sp_vocab *v, const char *text, bool parse_special, fragvec *frags) {
    fragvec next = {0};
    for (size_t si = 0; si < v->n_special; si++) {
        const sp_vtoken *t = &v->tok[v->special[si]];
        if (!parse_special && (t->attr & (SP_TATTR_CONTROL | SP_TATTR_UNKNOWN))) continue;
        next.n = 0;
        bool found = false;
        for (size_t fi = 0; fi < frags->n; fi++) {
            fragment f = frags->v[fi];
            if (f.token >= 0 || f.len < t->len) {
                if (!frag_push(&next, f.token, f.off, f.len)) goto oom;
                continue;
            }
            size_t pos = f.off, end = f.off + f.len;
            for (;;) {
                const char *m = find_bytes(text + pos, end - pos, t->text, t->len);
                if (!m) break;
                size_t at = (size_t)(m - text);
                found = true;
                if (at > pos && !frag_push(&next, -1, pos, at - pos)) goto oom;
                if (!frag_push(&next, v->special[si], at, t->len)) goto oom;
                pos = at + t->len;
            }
            if (pos < end && !frag_push(&next, -1, pos, end - pos)) goto oom;
        }
        if (found) { fragvec tmp = *frags; *frags = next; next = tmp; }
    }
    free(next.v);
    return true;
oom:
    free(next.v);
    return false;
}

sp_status sp_vocab_tokenize(const sp_vocab *v, const char *text, size_t len, bool add_special, bool parse_special,
                            int32_t *tokens, size_t capacity, size_t *n_out) {
    if (!v || !n_out || (!text && len) || (!tokens && capacity))
        return sp_fail(SP_ERR_INVALID_ARG, "sp_tokenize: NULL argument");
    *n_out = 0;
    sp_tokvec out = {0};
    fragvec frags = {0};
    sp_status st = SP_OK;
    if (len && !frag_push(&frags, -1, 0, len)) goto oom;
    if (len && !partition(v, text, parse_special, &frags)) goto oom;

    if (add_special && v->add_bos && v->bos >= 0 && !sp_tokvec_push(&out, v->bos)) goto oom;
    bool prev_special = true; /* SPM: a space prefix at the start and after each special token */
    for (size_t i = 0; i < frags.n && st == SP_OK; i++) {
        const fragment *f = &frags.v[i];
        if (f->token >= 0) {
            if (!sp_tokvec_push(&out, f->token)) goto oom;
            prev_special = true;
        } else if (v->type == SP_VOCAB_SPM) {
            st = sp_tokenize_spm(v, text + f->off, f->len, v->add_space_prefix && prev_special, &out);
            prev_special = false;
        } else {
            st = sp_tokenize_bpe(v, text + f->off, f->len, &out);
        }
    }
    if (st == SP_OK && add_special && v->add_eos && v->eos >= 0 && !sp_tokvec_push(&out, v->eos)) goto oom;
    if (st == SP_OK) {
        *n_out = out.n;
        if (out.n && capacity) memcpy(tokens, out.v, SP_MIN(out.n, capacity) * sizeof *tokens);
        if (out.n > capacity)
            st = sp_fail(SP_ERR_INVALID_ARG, "sp_tokenize: %zu tokens do not fit in capacity %zu", out.n, capacity);
    }
    goto done;
oom:
    st = sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
done:
    free(out.v);
    free(frags.v);
    return st;
}

/* ---- pieces ---- */

/* Bytes appended to a caller buffer: everything is counted, only what fits is written. */
typedef struct emitter {
    char *buf;
    size_t cap, n;
} emitter;

static void emit(emitter *e, const char *s, size_t n) {
    if (e->n < e->cap) memcpy(e->buf + e->n, s, SP_MIN(n, e->cap - e->n));
    e->n += n;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* BPE: each character of the text is the GPT-2 stand-in for one byte (llama.cpp's llama_decode_text).
 * A character that stands for no byte becomes "[UNK_BYTE_0x<its UTF-8 in hex>]"; llama.cpp appends the whole token
 * text inside every such marker, so a long token of such characters grows quadratically (a 90 KB token gave 2.7 GB).
 * Here only the first marker carries the token text (the same output as llama.cpp for a token with one such
 * character): a piece is at most 22 x the token's length. */
static void emit_gpt2_decoded(emitter *e, const sp_vtoken *t) {
    uint32_t cps_small[64];
    uint32_t *cps = t->len <= 64 ? cps_small : malloc(t->len * sizeof *cps);
    if (!cps) return;
    size_t n = sp_utf8_decode(t->text, t->len, cps);
    bool text_shown = false;
    for (size_t i = 0; i < n; i++) {
        int b = sp_gpt2_cp_to_byte(cps[i]);
        if (b >= 0) {
            char c = (char)b;
            emit(e, &c, 1);
            continue;
        }
        /* not a byte stand-in: "[UNK_BYTE_0x<utf8 hex><token text, the first time only>]" */
        static const char hx[] = "0123456789abcdef";
        char u[4], h[8];
        int nu = sp_utf8_encode(cps[i], u);
        for (int k = 0; k < nu; k++) { h[2 * k] = hx[(uint8_t)u[k] >> 4]; h[2 * k + 1] = hx[(uint8_t)u[k] & 15]; }
        emit(e, "[UNK_BYTE_0x", 12);
        emit(e, h, (size_t)(2 * nu));
        if (!text_shown) emit(e, t->text, t->len);
        text_shown = true;
        emit(e, "]", 1);
    }
    if (cps != cps_small) free(cps);
}

sp_status sp_vocab_token_to_piece(const sp_vocab *v, int32_t token, bool render_special, char *buf, size_t capacity,
                                  size_t *len) {
    if (!v || !len || (!buf && capacity)) return sp_fail(SP_ERR_INVALID_ARG, "sp_token_to_piece: NULL argument");
    *len = 0;
    if (token < 0 || token >= v->n_tokens)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_token_to_piece: token %d is outside the vocabulary (%d tokens)", token,
                       v->n_tokens);
    const sp_vtoken *t = &v->tok[token];
    emitter e = {buf, capacity, 0};
    if (t->attr & (SP_TATTR_UNKNOWN | SP_TATTR_CONTROL | SP_TATTR_USER_DEFINED)) {
        if (render_special || (t->attr & (SP_TATTR_UNKNOWN | SP_TATTR_CONTROL)) == 0) emit(&e, t->text, t->len);
    } else if (t->attr & SP_TATTR_NORMAL) {
        if (v->type == SP_VOCAB_SPM) { /* U+2581 -> ' ' */
            size_t i = 0;
            while (i < t->len) {
                if (i + 3 <= t->len && memcmp(t->text + i, "\xE2\x96\x81", 3) == 0) { emit(&e, " ", 1); i += 3; }
                else emit(&e, t->text + i++, 1);
            }
        } else {
            emit_gpt2_decoded(&e, t);
        }
    } else if (t->attr & SP_TATTR_BYTE) { /* "<0xXX>" */
        int b = 0;
        for (uint32_t k = 3; k < 5 && k < t->len && hexval(t->text[k]) >= 0; k++) b = b * 16 + hexval(t->text[k]);
        char c = (char)b;
        emit(&e, &c, 1);
    }
    *len = e.n;
    if (e.n > capacity)
        return sp_fail(SP_ERR_INVALID_ARG, "sp_token_to_piece: the piece needs %zu bytes, capacity is %zu", e.n,
                       capacity);
    return SP_OK;
}
