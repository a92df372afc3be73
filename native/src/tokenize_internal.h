/* tokenize_internal.h: the sp_vocab layout shared by vocab.c (loading, special tokens, pieces) and the two
 * tokenizer algorithms, tokenize_bpe.c (GPT-2 byte-level BPE) and tokenize_spm.c (SentencePiece-style). */
#ifndef SP_TOKENIZE_INTERNAL_H
#define SP_TOKENIZE_INTERNAL_H

#include "unicode.h"
#include "vocab.h"

/* Token attributes, as llama.cpp's llama_token_attr bits. */
enum {
    SP_TATTR_UNDEFINED = 0,
    SP_TATTR_UNKNOWN = 1 << 0,
    SP_TATTR_UNUSED = 1 << 1,
    SP_TATTR_NORMAL = 1 << 2,
    SP_TATTR_CONTROL = 1 << 3,
    SP_TATTR_USER_DEFINED = 1 << 4,
    SP_TATTR_BYTE = 1 << 5,
};

typedef enum sp_vocab_type { SP_VOCAB_BPE, SP_VOCAB_SPM } sp_vocab_type;

typedef struct sp_vtoken {
    const char *text; /* into the GGUF mapping, not NUL-terminated */
    uint32_t len;
    float score;
    uint32_t attr;    /* SP_TATTR_* */
} sp_vtoken;

/* A BPE merge "left right": rank = its line number; result = the id of left+right (-1 if not a token). */
typedef struct sp_merge {
    uint64_t key; /* (uint64)left_id << 32 | right_id; UINT64_MAX marks an empty slot */
    int32_t rank;
    int32_t result;
} sp_merge;

struct sp_vocab {
    sp_vocab_type type;
    sp_pretok pre;
    bool ignore_merges;    /* BPE: a pre-token that is itself a token is taken whole (llama3 family) */
    bool add_space_prefix; /* SPM: prepend ' ' to text after BOS / a special token */
    bool add_bos, add_eos;

    int32_t n_tokens;
    sp_vtoken *tok;        /* [n_tokens] */
    int32_t *text_hash;    /* open addressing over token texts: ids, -1 = empty; [text_mask + 1] */
    uint64_t text_mask;
    sp_merge *merges;      /* open addressing over (left, right) ids; [merge_mask + 1] */
    uint64_t merge_mask;

    int32_t bos, eos, eot, eom, unk, pad;
    int32_t *eog;          /* end-of-generation ids, sorted */
    size_t n_eog;
    int32_t *special;      /* control / user-defined / unknown ids, longest text first (parse_special order) */
    size_t n_special;

    int32_t byte_tok[256];        /* BPE: token of the byte's GPT-2 character; SPM: the <0xXX> token; -1 none */
    int32_t single_byte_tok[256]; /* token whose text is exactly that one byte; -1 none */
};

/* Growable token list. */
typedef struct sp_tokvec {
    int32_t *v;
    size_t n, cap;
} sp_tokvec;
bool sp_tokvec_push(sp_tokvec *t, int32_t id);

/* Id of the token with exactly this text, -1 if none. */
int32_t sp_vocab_find(const sp_vocab *v, const char *text, size_t len);
/* The merge (left, right) or NULL. */
const sp_merge *sp_vocab_find_merge(const sp_vocab *v, int32_t left, int32_t right);

/* Tokenize one raw-text fragment (no special tokens in it) and append the ids. */
sp_status sp_tokenize_bpe(const sp_vocab *v, const char *text, size_t len, sp_tokvec *out);
sp_status sp_tokenize_spm(const sp_vocab *v, const char *text, size_t len, bool space_prefix, sp_tokvec *out);

#endif
