/* unicode.c: UTF-8, category flags, the GPT-2 byte mapping and the pre-tokenizer splitters (see unicode.h).
 *
 * The splitters are ports of llama.cpp's hand-written regex matchers (unicode_regex_split_custom_gpt2 / _llama3)
 * plus the few small regexes llama.cpp runs through std::regex on a "collapsed" text (each non-ASCII codepoint
 * replaced by one byte standing for its category); here those are written out as the character-class runs they
 * match. Each splitter turns the piece lengths of the previous stage into finer pieces. */
#include "unicode.h"
#include "unicode_data.h"

#include <stdlib.h>
#include <string.h>

/* ---- category flags ---- */

static bool is_whitespace(uint32_t cp) {
    switch (cp) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0: case 0x1680:
    case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}

static uint32_t category(uint32_t cp) {
    /* binary search for the last range whose first codepoint is <= cp */
    size_t lo = 0, hi = SP_UNICODE_N_RANGES - 1; /* the sentinel (0x110000) is never a match */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if ((sp_unicode_ranges[mid] >> 8) <= cp) lo = mid;
        else hi = mid;
    }
    return sp_unicode_ranges[lo] & 0xFF;
}

uint32_t sp_unicode_flags(uint32_t cp) {
    if (cp >= 0x110000) return SP_UCAT_UNDEFINED;
    return category(cp) | (is_whitespace(cp) ? SP_UCAT_WHITESPACE : 0);
}

/* ---- UTF-8 ---- */

size_t sp_utf8_decode(const char *str, size_t len, uint32_t *cps) {
    const uint8_t *s = (const uint8_t *)str;
    size_t n = 0, i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (!(c & 0x80)) { cps[n++] = c; i += 1; continue; }
        if ((c & 0xE0) == 0xC0) {
            if (i + 1 < len && (s[i + 1] & 0xC0) == 0x80) {
                cps[n++] = ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F);
                i += 2;
                continue;
            }
        } else if ((c & 0xF0) == 0xE0) {
            if (i + 2 < len && (s[i + 1] & 0xC0) == 0x80 && (s[i + 2] & 0xC0) == 0x80) {
                cps[n++] = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
                i += 3;
                continue;
            }
        } else if ((c & 0xF8) == 0xF0) {
            if (i + 3 < len && (s[i + 1] & 0xC0) == 0x80 && (s[i + 2] & 0xC0) == 0x80 && (s[i + 3] & 0xC0) == 0x80) {
                cps[n++] = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
                           ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
                i += 4;
                continue;
            }
        }
        cps[n++] = 0xFFFD; /* invalid or truncated: skip one byte */
        i += 1;
    }
    return n;
}

int sp_utf8_encode(uint32_t cp, char *out) {
    uint8_t *o = (uint8_t *)out;
    if (cp <= 0x7F) { o[0] = (uint8_t)cp; return 1; }
    if (cp <= 0x7FF) { o[0] = (uint8_t)(0xC0 | (cp >> 6)); o[1] = (uint8_t)(0x80 | (cp & 0x3F)); return 2; }
    if (cp > 0x10FFFF) cp = 0xFFFD;
    if (cp <= 0xFFFF) {
        o[0] = (uint8_t)(0xE0 | (cp >> 12)); o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F)); o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | (cp >> 18)); o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- GPT-2 byte-level mapping: printable bytes map to themselves, the other 68 to U+0100.. in byte order ---- */

static bool gpt2_printable(unsigned b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); }

uint32_t sp_gpt2_byte_to_cp(uint8_t b) {
    if (gpt2_printable(b)) return b;
    uint32_t n = 0; /* rank of b among the non-printable bytes */
    for (unsigned c = 0; c < b; c++) n += !gpt2_printable(c);
    return 256 + n;
}

int sp_gpt2_cp_to_byte(uint32_t cp) {
    if (cp < 256) return gpt2_printable(cp) ? (int)cp : -1;
    if (cp >= 256 + 68) return -1;
    uint32_t n = cp - 256;
    for (unsigned c = 0; c < 256; c++)
        if (!gpt2_printable(c) && n-- == 0) return (int)c;
    return -1;
}

/* ---- piece lists ---- */

void sp_sizes_free(sp_sizes *s) {
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

static bool sizes_push(sp_sizes *s, size_t len) {
    if (len == 0) return true;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        size_t *v = realloc(s->v, cap * sizeof *v);
        if (!v) return false;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = len;
    return true;
}

#define OUT_OF_RANGE 0xFFFFFFFFu

/* One piece [ini, end) of the previous stage, with llama.cpp's accessors: outside the piece a codepoint reads as
 * OUT_OF_RANGE and its flags as 0. */
typedef struct piece {
    const uint32_t *cps;
    size_t ini, end, prev_end;
    sp_sizes *out;
    bool oom;
} piece;

static uint32_t cpt_at(const piece *p, size_t pos) { return pos >= p->ini && pos < p->end ? p->cps[pos] : OUT_OF_RANGE; }
static uint32_t flags_at(const piece *p, size_t pos) {
    return pos >= p->ini && pos < p->end ? sp_unicode_flags(p->cps[pos]) : 0;
}
/* Close the current token at `end`; returns its length. */
static size_t add_token(piece *p, size_t end) {
    size_t len = end - p->prev_end;
    if (!sizes_push(p->out, len)) p->oom = true;
    p->prev_end = end;
    return len;
}

#define WS SP_UCAT_WHITESPACE
#define LET SP_UCAT_LETTER
#define NUM SP_UCAT_NUMBER

/* 's|'t|'re|'ve|'m|'ll|'d at pos (case-insensitive for llama3): length matched, 0 if none. */
static size_t contraction(const piece *p, size_t pos, bool fold_case) {
    if (cpt_at(p, pos) != '\'' || pos + 1 >= p->end) return 0;
    uint32_t a = cpt_at(p, pos + 1);
    if (fold_case && a >= 'A' && a <= 'Z') a += 32; /* no non-ASCII codepoint lowercases to these letters */
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (pos + 2 < p->end) {
        uint32_t b = cpt_at(p, pos + 2);
        if (fold_case && b >= 'A' && b <= 'Z') b += 32;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    return 0;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S) (and a lone \s+ at the end). */
static void split_gpt2_piece(piece *p) {
    for (size_t pos = p->ini; pos < p->end;) {
        const uint32_t cpt = cpt_at(p, pos);
        const uint32_t flags = flags_at(p, pos);
        size_t c = contraction(p, pos, false);
        if (c) { pos += add_token(p, pos + c); continue; }

        uint32_t f2 = cpt == ' ' ? flags_at(p, pos + 1) : flags;
        if (f2 & LET) { /* <space>?\p{L}+ */
            pos += cpt == ' ';
            while (f2 & LET) f2 = flags_at(p, ++pos);
            add_token(p, pos);
            continue;
        }
        if (f2 & NUM) { /* <space>?\p{N}+ */
            pos += cpt == ' ';
            while (f2 & NUM) f2 = flags_at(p, ++pos);
            add_token(p, pos);
            continue;
        }
        if (!(f2 & (WS | LET | NUM)) && f2) { /* <space>?[^\s\p{L}\p{N}]+ */
            pos += cpt == ' ';
            while (!(f2 & (WS | LET | NUM)) && f2) f2 = flags_at(p, ++pos);
            add_token(p, pos);
            continue;
        }
        size_t nws = 0;
        while (flags_at(p, pos + nws) & WS) nws++;
        if (nws > 1 && cpt_at(p, pos + nws) != OUT_OF_RANGE) { /* \s+(?!\S): leave the last space to the word */
            pos += nws - 1;
            add_token(p, pos);
            continue;
        }
        if (nws > 0) { /* \s+ */
            pos += nws;
            add_token(p, pos);
            continue;
        }
        add_token(p, ++pos); /* no match */
    }
}

/* LLAMA3 / QWEN2: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}
 *                 | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static void split_llama3_piece(piece *p, size_t max_digits) {
    for (size_t pos = p->ini; pos < p->end;) {
        const uint32_t cpt = cpt_at(p, pos);
        const uint32_t flags = flags_at(p, pos);
        size_t c = contraction(p, pos, true);
        if (c) { pos += add_token(p, pos + c); continue; }

        if (!(cpt == '\r' || cpt == '\n' || (flags & NUM))) { /* [^\r\n\p{L}\p{N}]?\p{L}+ */
            if ((flags & LET) || (flags_at(p, pos + 1) & LET)) {
                pos++;
                while (flags_at(p, pos) & LET) pos++;
                add_token(p, pos);
                continue;
            }
        }
        if (flags & NUM) { /* \p{N}{1,max_digits} */
            size_t ini = pos;
            while (flags_at(p, pos) & NUM) {
                if (++pos - ini >= max_digits) {
                    add_token(p, pos);
                    ini = pos;
                }
            }
            add_token(p, pos);
            continue;
        }
        uint32_t f2 = cpt == ' ' ? flags_at(p, pos + 1) : flags;
        if (!(f2 & (WS | LET | NUM)) && flags) { /* <space>?[^\s\p{L}\p{N}]+[\r\n]* */
            pos += cpt == ' ';
            while (!(f2 & (WS | LET | NUM)) && f2) f2 = flags_at(p, ++pos);
            uint32_t c2 = cpt_at(p, pos);
            while (c2 == '\r' || c2 == '\n') c2 = cpt_at(p, ++pos);
            add_token(p, pos);
            continue;
        }
        size_t nws = 0, last_rn = 0;
        while (flags_at(p, pos + nws) & WS) {
            uint32_t c2 = cpt_at(p, pos + nws);
            if (c2 == '\r' || c2 == '\n') last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) { /* \s*[\r\n]+ */
            pos = last_rn;
            add_token(p, pos);
            continue;
        }
        if (nws > 1 && cpt_at(p, pos + nws) != OUT_OF_RANGE) { /* \s+(?!\S) */
            pos += nws - 1;
            add_token(p, pos);
            continue;
        }
        if (nws > 0) { /* \s+ */
            pos += nws;
            add_token(p, pos);
            continue;
        }
        add_token(p, ++pos);
    }
}

/* Character-class regexes llama.cpp runs through std::regex: matches become pieces, the text between them too. */
typedef enum cls_kind {
    CLS_NUMBER_EACH,  /* \p{N}             : every number codepoint alone */
    CLS_NUMBER_RUNS,  /* \p{N}+            : runs of numbers */
    CLS_PUNCT_RUNS,   /* [\p{P}$+<=>^~|]+  : runs of punctuation and those ASCII symbols */
    CLS_DIGIT_TRIPLES /* [0-9][0-9][0-9]   : ASCII digits in threes, left to right */
} cls_kind;

static bool punct_or_listed(uint32_t cp) {
    return (sp_unicode_flags(cp) & SP_UCAT_PUNCTUATION) || (cp < 128 && cp && strchr("$+<=>^~|", (int)cp));
}
static bool ascii_digit(uint32_t cp) { return cp >= '0' && cp <= '9'; }

static void split_class_piece(piece *p, cls_kind kind) {
    for (size_t pos = p->ini; pos < p->end;) {
        size_t m = 0; /* length of a match starting at pos */
        const uint32_t cp = p->cps[pos];
        switch (kind) {
        case CLS_NUMBER_EACH: m = (sp_unicode_flags(cp) & NUM) ? 1 : 0; break;
        case CLS_NUMBER_RUNS: while (pos + m < p->end && (sp_unicode_flags(p->cps[pos + m]) & NUM)) m++; break;
        case CLS_PUNCT_RUNS: while (pos + m < p->end && punct_or_listed(p->cps[pos + m])) m++; break;
        case CLS_DIGIT_TRIPLES:
            m = pos + 3 <= p->end && ascii_digit(cp) && ascii_digit(p->cps[pos + 1]) && ascii_digit(p->cps[pos + 2]) ? 3 : 0;
            break;
        }
        if (m == 0) { pos++; continue; }
        add_token(p, pos);     /* the unmatched text before the match */
        add_token(p, pos + m); /* the match */
        pos += m;
    }
    add_token(p, p->end);
}

typedef enum stage { ST_GPT2, ST_LLAMA3, ST_QWEN2, ST_NUMBER_EACH, ST_NUMBER_RUNS, ST_PUNCT_RUNS, ST_DIGIT_TRIPLES } stage;

static sp_status run_stage(stage st, const uint32_t *cps, const sp_sizes *in, sp_sizes *out) {
    out->n = 0;
    size_t start = 0;
    for (size_t i = 0; i < in->n; i++) {
        piece p = {cps, start, start + in->v[i], start, out, false};
        start += in->v[i];
        switch (st) {
        case ST_GPT2: split_gpt2_piece(&p); break;
        case ST_LLAMA3: split_llama3_piece(&p, 3); break;
        case ST_QWEN2: split_llama3_piece(&p, 1); break;
        case ST_NUMBER_EACH: split_class_piece(&p, CLS_NUMBER_EACH); break;
        case ST_NUMBER_RUNS: split_class_piece(&p, CLS_NUMBER_RUNS); break;
        case ST_PUNCT_RUNS: split_class_piece(&p, CLS_PUNCT_RUNS); break;
        case ST_DIGIT_TRIPLES: split_class_piece(&p, CLS_DIGIT_TRIPLES); break;
        }
        if (p.oom) return sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory splitting text");
    }
    return SP_OK;
}

sp_status sp_pretokenize(sp_pretok pre, const uint32_t *cps, size_t n, sp_sizes *out) {
    static const stage k_default[] = {ST_PUNCT_RUNS, ST_GPT2, ST_NUMBER_RUNS, ST_DIGIT_TRIPLES};
    static const stage k_gpt2[] = {ST_GPT2};
    static const stage k_smollm[] = {ST_NUMBER_EACH, ST_GPT2};
    static const stage k_llama3[] = {ST_LLAMA3};
    static const stage k_qwen2[] = {ST_QWEN2};
    const stage *chain = k_gpt2;
    size_t n_stages = 1;
    switch (pre) {
    case SP_PRETOK_DEFAULT: chain = k_default; n_stages = 4; break;
    case SP_PRETOK_GPT2: chain = k_gpt2; break;
    case SP_PRETOK_SMOLLM: chain = k_smollm; n_stages = 2; break;
    case SP_PRETOK_LLAMA3: chain = k_llama3; break;
    case SP_PRETOK_QWEN2: chain = k_qwen2; break;
    }
    out->n = 0;
    if (n == 0) return SP_OK;
    sp_sizes a = {0}, b = {0};
    sp_status st = sizes_push(&a, n) ? SP_OK : sp_fail(SP_ERR_NO_MEMORY, "tokenizer: out of memory");
    for (size_t i = 0; st == SP_OK && i < n_stages; i++) {
        st = run_stage(chain[i], cps, &a, &b);
        sp_sizes t = a; a = b; b = t;
    }
    sp_sizes_free(&b);
    sp_sizes_free(out);
    *out = a; /* on error a holds a partial list; the caller only frees it */
    return st;
}
