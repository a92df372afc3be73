/* gguf_check.c: a command-line driver for the GGUF reader, for sanitizer/valgrind runs and content checks.
 *
 *   gguf_check MANIFEST        each line "EXPECTED path" (EXPECTED: a status name, or ANY): opens each file with
 *                              mmap, with read() and from memory, checks the three agree (and match EXPECTED), and on
 *                              success walks every KV, string and tensor. Exit 1 on any mismatch.
 *   gguf_check --dump PATH     prints the parsed KVs and tensors (strings in hex) for comparison with gguf-py.
 *   gguf_check --get PATH KEY...  prints what each typed getter returns for each key.
 *
 * Built from the sources directly (tools/asan_gguf.sh, tests/test_gguf.py):
 *   cc -std=c11 -Inative/include -Inative/src native/src/gguf.c native/src/error.c tests/native/gguf_check.c -lm
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_hex(const char *s, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) printf("%02x", (unsigned char)s[i]);
}

/* Touch everything a loader would read; the sums keep the compiler from dropping the reads. */
static uint64_t walk(const sp_gguf *g) {
    uint64_t h = 0;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const sp_gguf_kv *kv = &g->kv[i];
        char key[300];
        snprintf(key, sizeof key, "%.*s", (int)SP_MIN(kv->key.len, 299), kv->key.data);
        h += sp_gguf_find(g, key) == kv;
        uint32_t u; int32_t s; float f; bool b; sp_gguf_str str;
        h += sp_gguf_get_u32(g, key, &u) + sp_gguf_get_i32(g, key, &s) + sp_gguf_get_f32(g, key, &f)
             + sp_gguf_get_bool(g, key, &b) + sp_gguf_get_str(g, key, &str);
        if (kv->type != SP_GGUF_ARRAY) continue;
        for (uint64_t j = 0; j < kv->arr_n; j++) {
            if (kv->arr_type == SP_GGUF_STRING) {
                sp_gguf_str e = sp_gguf_arr_str(kv, j);
                for (uint64_t k = 0; k < e.len; k++) h += (unsigned char)e.data[k];
            } else {
                h += (uint64_t)sp_gguf_arr_i64(kv, j) + (uint64_t)(int64_t)sp_gguf_arr_f32(kv, j);
            }
        }
        h += sp_gguf_arr_str(kv, kv->arr_n).len + (uint64_t)sp_gguf_arr_i64(kv, kv->arr_n); /* out of range */
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const sp_gguf_tensor *t = &g->tensors[i];
        char name[80];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.data);
        h += sp_gguf_find_tensor(g, name) == t;
        const uint8_t *d = t->data;
        h += d[0] + d[t->nbytes - 1];
    }
    h += sp_gguf_find(g, "no.such.key") == NULL;
    return h;
}

/* Open path in one of three ways: 0 mmap, 1 read(), 2 from a buffer we read (*buf, freed by the caller). */
static sp_status open_mode(const char *path, int mode, sp_gguf **g, char **buf) {
    *buf = NULL;
    if (mode < 2) return sp_gguf_open(path, mode == 0, g);
    struct stat sb;
    FILE *in = stat(path, &sb) == 0 && S_ISREG(sb.st_mode) ? fopen(path, "rb") : NULL;
    long size = -1;
    if (in && fseek(in, 0, SEEK_END) == 0 && (size = ftell(in)) >= 0 && fseek(in, 0, SEEK_SET) == 0) {
        *buf = malloc(size ? (size_t)size : 1);
        if (*buf && fread(*buf, 1, (size_t)size, in) != (size_t)size) size = -1;
    }
    if (in) fclose(in);
    if (size < 0 || !*buf) return sp_gguf_open(path, false, g); /* unreadable: the IO error of the file path */
    return sp_gguf_open_memory(*buf, (uint64_t)size, g);
}

static int run_manifest(const char *manifest) {
    FILE *f = fopen(manifest, "r");
    if (!f) { perror(manifest); return 2; }
    char line[4200], expect[64], path[4096], msg[600];
    int n = 0, bad = 0;
    uint64_t sink = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%63s %4095[^\n]", expect, path) != 2) continue;
        n++;
        sp_status st[3];
        for (int mode = 0; mode < 3; mode++) {
            sp_gguf *g = (sp_gguf *)1; /* must be set to NULL on failure */
            char *buf;
            st[mode] = open_mode(path, mode, &g, &buf);
            if (mode == 0) snprintf(msg, sizeof msg, "%s", st[0] ? sp_last_error() : "");
            if (st[mode] == SP_OK) sink += walk(g);
            else if (g) { printf("FAIL %s: error %d left a handle\n", path, st[mode]); bad++; g = NULL; }
            else if (!sp_last_error()[0]) { printf("FAIL %s: error without a message\n", path); bad++; }
            sp_gguf_close(g);
            free(buf);
        }
        if (st[0] != st[1] || st[0] != st[2]) {
            printf("FAIL %s: mmap %s / read %s / memory %s\n", path, sp_status_string(st[0]), sp_status_string(st[1]),
                   sp_status_string(st[2]));
            bad++;
        } else if (strcmp(expect, "ANY") != 0 && strcmp(expect, sp_status_string(st[0])) != 0) {
            printf("FAIL %s: expected %s, got %s: %s\n", path, expect, sp_status_string(st[0]), msg);
            bad++;
        }
    }
    fclose(f);
    printf("%d files x 3 ways, %d failures (checksum %llu)\n", n, bad, (unsigned long long)(sink & 0xff));
    return bad ? 1 : 0;
}

static int dump(const char *path) {
    sp_gguf *g;
    if (sp_gguf_open(path, true, &g) != SP_OK) { printf("error\t%s\n", sp_last_error()); return 1; }
    printf("header\t%u\t%llu\t%llu\t%u\t%llu\n", g->version, (unsigned long long)g->n_kv,
           (unsigned long long)g->n_tensors, g->alignment, (unsigned long long)g->data_offset);
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const sp_gguf_kv *kv = &g->kv[i];
        printf("kv\t");
        print_hex(kv->key.data, kv->key.len);
        printf("\t%d\t", kv->type);
        if (kv->type == SP_GGUF_STRING) {
            sp_gguf_str s = {0};
            char key[300];
            snprintf(key, sizeof key, "%.*s", (int)SP_MIN(kv->key.len, 299), kv->key.data);
            sp_gguf_get_str(g, key, &s);
            print_hex(s.data, s.len);
        } else if (kv->type == SP_GGUF_ARRAY) {
            printf("%d\t%llu\t", kv->arr_type, (unsigned long long)kv->arr_n);
            for (uint64_t j = 0; j < kv->arr_n; j++) {
                if (j) printf(",");
                if (kv->arr_type == SP_GGUF_STRING) {
                    sp_gguf_str e = sp_gguf_arr_str(kv, j);
                    print_hex(e.data, e.len);
                } else if (kv->arr_type == SP_GGUF_F32 || kv->arr_type == SP_GGUF_F64) {
                    printf("%.9g", sp_gguf_arr_f32(kv, j));
                } else {
                    printf("%lld", (long long)sp_gguf_arr_i64(kv, j));
                }
            }
        } else {
            /* scalars: raw little-endian bytes */
            static const int size[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
            print_hex((const char *)kv->value, (uint64_t)size[kv->type]);
        }
        printf("\n");
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const sp_gguf_tensor *t = &g->tensors[i];
        printf("tensor\t%.*s\t%d\t%d\t%lld,%lld,%lld,%lld\t%llu\t%llu\t%llu\n", (int)t->name.len, t->name.data, t->type,
               t->n_dims, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3],
               (unsigned long long)t->offset, (unsigned long long)t->nbytes,
               (unsigned long long)((const uint8_t *)t->data - g->base));
    }
    sp_gguf_close(g);
    return 0;
}

static int get(const char *path, int n, char **keys) {
    sp_gguf *g;
    if (sp_gguf_open(path, false, &g) != SP_OK) { printf("error\t%s\n", sp_last_error()); return 1; }
    for (int i = 0; i < n; i++) {
        uint32_t u = 0; int32_t s = 0; float f = 0; bool b = false; sp_gguf_str str = {"", 0};
        char err[5][600];
        sp_status st[5];
#define CALL(j, expr) (st[j] = (expr), snprintf(err[j], sizeof err[j], "%s", st[j] ? sp_last_error() : ""))
        CALL(0, sp_gguf_get_u32(g, keys[i], &u));
        CALL(1, sp_gguf_get_i32(g, keys[i], &s));
        CALL(2, sp_gguf_get_f32(g, keys[i], &f));
        CALL(3, sp_gguf_get_bool(g, keys[i], &b));
        CALL(4, sp_gguf_get_str(g, keys[i], &str));
#undef CALL
        printf("%s\tu32=%s:%u\ti32=%s:%d\tf32=%s:%.9g\tbool=%s:%d\tstr=%s:%.*s\n", keys[i], sp_status_string(st[0]), u,
               sp_status_string(st[1]), s, sp_status_string(st[2]), f, sp_status_string(st[3]), b,
               sp_status_string(st[4]), (int)str.len, str.data);
        for (int j = 0; j < 5; j++)
            if (st[j]) printf("error\t%s\n", err[j]);
    }
    sp_gguf_close(g);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2) return run_manifest(argv[1]);
    if (argc == 3 && strcmp(argv[1], "--dump") == 0) return dump(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "--get") == 0) return get(argv[2], argc - 3, argv + 3);
    fprintf(stderr, "usage: gguf_check MANIFEST | --dump PATH | --get PATH KEY...\n");
    return 2;
}
