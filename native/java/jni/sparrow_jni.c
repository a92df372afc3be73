/*
 * sparrow_jni.c: the JNI shim under the Java library dev.sparrow (native/java/src): one function per native method of
 * dev.sparrow.Native, each a thin call into sparrow.h.
 *
 * Rules kept everywhere:
 *  - Handles are the C pointers carried as jlong; the Java side never passes a freed one (NativeResource), and 0 is
 *    refused here anyway.
 *  - Text crosses as byte[] of UTF-8 both ways (NewStringUTF/GetStringUTFChars use Modified UTF-8, which breaks
 *    4-byte characters such as emoji). Only ASCII constants (status names, the version) become Strings here.
 *  - A failed sp_* call throws dev.sparrow.SparrowException(status name, sp_last_error()). Every JNI call that can
 *    fail or throw is checked; on a pending exception the function returns at once (its return value is ignored).
 *  - Params structs are read from and written to the Java Params objects by field name, through one table per struct
 *    (the *_fields functions): adding a field is one line there and one field in Java.
 */
#include <jni.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sparrow.h"

#define H(T, h) ((T *)(intptr_t)(h))

/* ---- exceptions ---- */

static void throw_class(JNIEnv *env, const char *cls, const char *msg) {
    jclass c = (*env)->FindClass(env, cls);
    if (c) (*env)->ThrowNew(env, c, msg);  /* else NoClassDefFoundError is pending */
}

static jbyteArray bytes_new(JNIEnv *env, const char *p, size_t n);

/* SparrowException(status, message as UTF-8 bytes). status is ASCII; msg may hold any UTF-8 (a path). */
static void throw_sparrow(JNIEnv *env, const char *status, const char *msg) {
    jclass c = (*env)->FindClass(env, "dev/sparrow/SparrowException");
    if (!c) return;
    jmethodID init = (*env)->GetMethodID(env, c, "<init>", "(Ljava/lang/String;[B)V");
    if (!init) return;
    jstring s = (*env)->NewStringUTF(env, status);
    if (!s) return;
    jbyteArray m = bytes_new(env, msg, strlen(msg));
    if (!m) return;
    jobject e = (*env)->NewObject(env, c, init, s, m);
    if ((*env)->ExceptionCheck(env) || !e) return;
    (*env)->Throw(env, (jthrowable)e);
}

/* After a failed sp_* call on this thread: sp_last_error() is still this call's message. */
static void throw_status(JNIEnv *env, sp_status st) {
    throw_sparrow(env, sp_status_string(st), sp_last_error());
}

static bool handle_ok(JNIEnv *env, jlong h) {
    if (h) return true;
    throw_class(env, "java/lang/IllegalStateException", "sparrow: a closed or null handle");
    return false;
}

/* ---- arrays ---- */

static jbyteArray bytes_new(JNIEnv *env, const char *p, size_t n) {
    if (n > INT32_MAX) {
        throw_class(env, "java/lang/OutOfMemoryError", "sparrow: text longer than a Java array");
        return NULL;
    }
    jbyteArray a = (*env)->NewByteArray(env, (jsize)n);
    if (!a) return NULL;
    if (n) (*env)->SetByteArrayRegion(env, a, 0, (jsize)n, (const jbyte *)p);
    if ((*env)->ExceptionCheck(env)) return NULL;
    return a;
}

/* A malloc'd copy of a byte[] with a NUL appended (so it may also serve as a C string); *n gets its length. */
static char *bytes_get(JNIEnv *env, jbyteArray a, size_t *n) {
    if (!a) {
        throw_class(env, "java/lang/NullPointerException", "sparrow: a null byte array");
        return NULL;
    }
    jsize len = (*env)->GetArrayLength(env, a);
    char *p = malloc((size_t)len + 1);
    if (!p) {
        throw_class(env, "java/lang/OutOfMemoryError", "sparrow: no memory for a copy of the text");
        return NULL;
    }
    (*env)->GetByteArrayRegion(env, a, 0, len, (jbyte *)p);
    if ((*env)->ExceptionCheck(env)) {
        free(p);
        return NULL;
    }
    p[len] = '\0';
    *n = (size_t)len;
    return p;
}

static jintArray ints_new(JNIEnv *env, const int32_t *p, size_t n) {
    if (n > INT32_MAX) {
        throw_class(env, "java/lang/OutOfMemoryError", "sparrow: more tokens than a Java array holds");
        return NULL;
    }
    jintArray a = (*env)->NewIntArray(env, (jsize)n);
    if (!a) return NULL;
    if (n) (*env)->SetIntArrayRegion(env, a, 0, (jsize)n, (const jint *)p);
    if ((*env)->ExceptionCheck(env)) return NULL;
    return a;
}

/* A malloc'd copy of an int[] (at least one element allocated); *n gets its length. */
static int32_t *ints_get(JNIEnv *env, jintArray a, size_t *n) {
    if (!a) {
        throw_class(env, "java/lang/NullPointerException", "sparrow: a null token array");
        return NULL;
    }
    jsize len = (*env)->GetArrayLength(env, a);
    int32_t *p = malloc(((size_t)len + 1) * sizeof *p);
    if (!p) {
        throw_class(env, "java/lang/OutOfMemoryError", "sparrow: no memory for a copy of the tokens");
        return NULL;
    }
    (*env)->GetIntArrayRegion(env, a, 0, len, (jint *)p);
    if ((*env)->ExceptionCheck(env)) {
        free(p);
        return NULL;
    }
    *n = (size_t)len;
    return p;
}

/* ---- params structs <-> Java objects, by field name ---- */

/* One C field and the Java field of the same meaning. type: 'I' int32_t, 'F' float, 'Z' bool, 'J' 64-bit integer,
 * 'D' double. */
typedef struct jfield {
    const char *name;
    char type;
    void *c;
} jfield;

static bool fields_copy(JNIEnv *env, jobject obj, const jfield *f, int n, bool to_java) {
    if (!obj) {
        throw_class(env, "java/lang/NullPointerException", "sparrow: null params");
        return false;
    }
    jclass cls = (*env)->GetObjectClass(env, obj);
    if (!cls) return false;
    bool ok = true;
    for (int i = 0; i < n && ok; i++) {
        char sig[2] = {f[i].type, '\0'};
        jfieldID id = (*env)->GetFieldID(env, cls, f[i].name, sig);
        if (!id) { ok = false; break; }  /* NoSuchFieldError pending: the Java class and this table disagree */
        switch (f[i].type) {
        case 'I':
            if (to_java) (*env)->SetIntField(env, obj, id, *(int32_t *)f[i].c);
            else *(int32_t *)f[i].c = (*env)->GetIntField(env, obj, id);
            break;
        case 'F':
            if (to_java) (*env)->SetFloatField(env, obj, id, *(float *)f[i].c);
            else *(float *)f[i].c = (*env)->GetFloatField(env, obj, id);
            break;
        case 'Z':
            if (to_java) (*env)->SetBooleanField(env, obj, id, *(bool *)f[i].c ? JNI_TRUE : JNI_FALSE);
            else *(bool *)f[i].c = (*env)->GetBooleanField(env, obj, id) != JNI_FALSE;
            break;
        case 'J':
            if (to_java) (*env)->SetLongField(env, obj, id, (jlong) * (uint64_t *)f[i].c);
            else *(uint64_t *)f[i].c = (uint64_t)(*env)->GetLongField(env, obj, id);
            break;
        case 'D':
            if (to_java) (*env)->SetDoubleField(env, obj, id, *(double *)f[i].c);
            else *(double *)f[i].c = (*env)->GetDoubleField(env, obj, id);
            break;
        }
    }
    (*env)->DeleteLocalRef(env, cls);
    return ok;
}

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* dev.sparrow.Model.Params */
static bool model_params(JNIEnv *env, jobject obj, sp_model_params *p, bool to_java) {
    jfield f[] = {
        {"useMmap", 'Z', &p->use_mmap},
        {"vocabOnly", 'Z', &p->vocab_only},
        {"repack", 'Z', &p->repack},
    };
    return fields_copy(env, obj, f, COUNT(f), to_java);
}

/* dev.sparrow.Session.Params */
static bool session_params(JNIEnv *env, jobject obj, sp_session_params *p, bool to_java) {
    jfield f[] = {
        {"nCtx", 'I', &p->n_ctx},
        {"nBatch", 'I', &p->n_batch},
        {"nThreads", 'I', &p->n_threads},
        {"device", 'I', &p->device},
    };
    return fields_copy(env, obj, f, COUNT(f), to_java);
}

/* dev.sparrow.Generator.Params (drafter, an enum, and the stop strings are handled by generator_params) */
static bool generator_fields(JNIEnv *env, jobject obj, sp_generator_params *p, bool to_java) {
    jfield f[] = {
        {"maxTokens", 'I', &p->max_tokens},
        {"stopAtEog", 'Z', &p->stop_at_eog},
        {"temperature", 'F', &p->sampler.temperature},
        {"topK", 'I', &p->sampler.top_k},
        {"topP", 'F', &p->sampler.top_p},
        {"minP", 'F', &p->sampler.min_p},
        {"repeatPenalty", 'F', &p->sampler.repeat_penalty},
        {"repeatLastN", 'I', &p->sampler.repeat_last_n},
        {"seed", 'J', &p->sampler.seed},
        {"ngram", 'I', &p->ngram},
        {"minNgram", 'I', &p->min_ngram},
        {"draftK", 'I', &p->draft_k},
        {"recyclingK", 'I', &p->recycling_k},
        {"maxNodes", 'I', &p->max_nodes},
        {"plan", 'Z', &p->plan},
        {"probeEvery", 'I', &p->probe_every},
        {"maxProbeEvery", 'I', &p->max_probe_every},
        {"learnEvery", 'I', &p->learn_every},
    };
    return fields_copy(env, obj, f, COUNT(f), to_java);
}

/* Params.branching (int[]) <-> branching[0 .. n_branching). */
static bool generator_branching(JNIEnv *env, jobject obj, sp_generator_params *p, bool to_java) {
    jclass cls = (*env)->GetObjectClass(env, obj);
    if (!cls) return false;
    jfieldID id = (*env)->GetFieldID(env, cls, "branching", "[I");
    (*env)->DeleteLocalRef(env, cls);
    if (!id) return false;
    if (to_java) {
        jintArray a = ints_new(env, p->branching, p->n_branching > 0 ? (size_t)p->n_branching : 0);
        if (!a) return false;
        (*env)->SetObjectField(env, obj, id, a);
        (*env)->DeleteLocalRef(env, a);
        return true;
    }
    jintArray a = (jintArray)(*env)->GetObjectField(env, obj, id);
    if (!a) {
        throw_sparrow(env, "SP_ERR_INVALID_ARG", "Generator.Params.branching is null");
        return false;
    }
    jsize n = (*env)->GetArrayLength(env, a);
    bool ok = n <= SP_GEN_MAX_DEPTH;
    if (!ok) throw_sparrow(env, "SP_ERR_INVALID_ARG", "Generator.Params.branching: more than SP_GEN_MAX_DEPTH entries");
    else {
        (*env)->GetIntArrayRegion(env, a, 0, n, (jint *)p->branching);
        ok = !(*env)->ExceptionCheck(env);
        p->n_branching = n;  /* 0 is the library's to refuse */
    }
    (*env)->DeleteLocalRef(env, a);
    return ok;
}

/* Params.drafter <-> sp_drafter_kind, through the enum's value field and Drafter.fromValue. */
static bool generator_drafter(JNIEnv *env, jobject obj, sp_generator_params *p, bool to_java) {
    jclass cls = (*env)->GetObjectClass(env, obj);
    if (!cls) return false;
    jfieldID id = (*env)->GetFieldID(env, cls, "drafter", "Ldev/sparrow/Drafter;");
    (*env)->DeleteLocalRef(env, cls);
    if (!id) return false;
    jclass dcls = (*env)->FindClass(env, "dev/sparrow/Drafter");
    if (!dcls) return false;
    bool ok = false;
    if (to_java) {
        jmethodID of = (*env)->GetStaticMethodID(env, dcls, "fromValue", "(I)Ldev/sparrow/Drafter;");
        if (of) {
            jobject d = (*env)->CallStaticObjectMethod(env, dcls, of, (jint)p->drafter);
            if (!(*env)->ExceptionCheck(env)) {
                (*env)->SetObjectField(env, obj, id, d);
                ok = true;
            }
            if (d) (*env)->DeleteLocalRef(env, d);
        }
    } else {
        jfieldID vid = (*env)->GetFieldID(env, dcls, "value", "I");
        jobject d = vid ? (*env)->GetObjectField(env, obj, id) : NULL;
        if (vid && !d) {
            throw_sparrow(env, "SP_ERR_INVALID_ARG", "Generator.Params.drafter is null (Drafter.NONE for none)");
        } else if (d) {
            p->drafter = (sp_drafter_kind)(*env)->GetIntField(env, d, vid);
            (*env)->DeleteLocalRef(env, d);
            ok = true;
        }
    }
    (*env)->DeleteLocalRef(env, dcls);
    return ok;
}

/* ---- library ---- */

JNIEXPORT jstring JNICALL Java_dev_sparrow_Native_version(JNIEnv *env, jclass cls) {
    return (*env)->NewStringUTF(env, sp_version());  /* ASCII */
}

/* ---- model ---- */

JNIEXPORT void JNICALL Java_dev_sparrow_Native_modelDefaults(JNIEnv *env, jclass cls, jobject out) {
    sp_model_params p = sp_model_default_params();
    model_params(env, out, &p, true);
}

JNIEXPORT jlong JNICALL Java_dev_sparrow_Native_modelLoad(JNIEnv *env, jclass cls, jbyteArray path, jobject params) {
    sp_model_params p = sp_model_default_params();
    if (!model_params(env, params, &p, false)) return 0;
    size_t n;
    char *cpath = bytes_get(env, path, &n);
    if (!cpath) return 0;
    if (memchr(cpath, '\0', n)) {
        free(cpath);
        throw_sparrow(env, "SP_ERR_INVALID_ARG", "Model.load: the path contains a NUL character");
        return 0;
    }
    sp_model *m = NULL;
    sp_status st = sp_model_load(cpath, p, &m);
    free(cpath);
    if (st != SP_OK) {
        throw_status(env, st);
        return 0;
    }
    return (jlong)(intptr_t)m;
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_modelFree(JNIEnv *env, jclass cls, jlong h) {
    sp_model_free(H(sp_model, h));
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_modelInfo(JNIEnv *env, jclass cls, jlong h, jobject out) {
    if (!handle_ok(env, h)) return;
    sp_model_info info;
    sp_status st = sp_model_get_info(H(sp_model, h), &info);
    if (st != SP_OK) {
        throw_status(env, st);
        return;
    }
    jfield f[] = {
        {"nVocab", 'I', &info.n_vocab},     {"nCtxTrain", 'I', &info.n_ctx_train}, {"nEmbd", 'I', &info.n_embd},
        {"nLayer", 'I', &info.n_layer},     {"nHead", 'I', &info.n_head},          {"nHeadKv", 'I', &info.n_head_kv},
        {"nFf", 'I', &info.n_ff},           {"bosToken", 'I', &info.bos_token},    {"eosToken", 'I', &info.eos_token},
        {"eotToken", 'I', &info.eot_token}, {"addBos", 'Z', &info.add_bos},        {"nParams", 'J', &info.n_params},
        {"weightBytes", 'J', &info.weight_bytes},
    };
    fields_copy(env, out, f, COUNT(f), true);
}

JNIEXPORT jbyteArray JNICALL Java_dev_sparrow_Native_modelString(JNIEnv *env, jclass cls, jlong h, jint which) {
    if (!handle_ok(env, h)) return NULL;
    sp_model_info info;
    sp_status st = sp_model_get_info(H(sp_model, h), &info);
    if (st != SP_OK) {
        throw_status(env, st);
        return NULL;
    }
    const char *s = which == 0 ? info.architecture : info.name;
    if (!s) s = "";
    return bytes_new(env, s, strlen(s));
}

JNIEXPORT jintArray JNICALL Java_dev_sparrow_Native_tokenize(JNIEnv *env, jclass cls, jlong h, jbyteArray text,
                                                             jboolean add_special) {
    if (!handle_ok(env, h)) return NULL;
    size_t len;
    char *s = bytes_get(env, text, &len);
    if (!s) return NULL;
    /* User text: parse_special is always false, so "<|im_start|>" in it stays characters. One try with room for
     * a token per byte (plus BOS) is nearly always enough; otherwise the size the library reports. */
    size_t cap = len + 2, n = 0;
    int32_t *toks = malloc(cap * sizeof *toks);
    sp_status st = toks ? sp_tokenize(H(sp_model, h), s, len, add_special, false, toks, cap, &n) : SP_ERR_NO_MEMORY;
    if (st == SP_ERR_INVALID_ARG && n > cap) {
        free(toks);
        cap = n;
        toks = malloc(cap * sizeof *toks);
        st = toks ? sp_tokenize(H(sp_model, h), s, len, add_special, false, toks, cap, &n) : SP_ERR_NO_MEMORY;
    }
    free(s);
    jintArray out = NULL;
    if (st == SP_ERR_NO_MEMORY && !toks) throw_class(env, "java/lang/OutOfMemoryError", "sparrow: tokenize");
    else if (st != SP_OK) throw_status(env, st);
    else out = ints_new(env, toks, n);
    free(toks);
    return out;
}

/* A token's bytes into buf (grown as needed); false with an exception pending on failure. */
static bool piece(JNIEnv *env, const sp_model *m, int32_t token, bool render_special, char **buf, size_t *cap,
                  size_t *len) {
    sp_status st = sp_token_to_piece(m, token, render_special, *buf, *cap, len);
    if (st == SP_OK && *len > *cap) {  /* the piece did not fit: *len is the size needed */
        char *bigger = realloc(*buf, *len);
        if (!bigger) {
            throw_class(env, "java/lang/OutOfMemoryError", "sparrow: token text");
            return false;
        }
        *buf = bigger;
        *cap = *len;
        st = sp_token_to_piece(m, token, render_special, *buf, *cap, len);
    }
    if (st != SP_OK) {
        throw_status(env, st);
        return false;
    }
    return true;
}

JNIEXPORT jbyteArray JNICALL Java_dev_sparrow_Native_tokenPiece(JNIEnv *env, jclass cls, jlong h, jint token,
                                                                jboolean render_special) {
    if (!handle_ok(env, h)) return NULL;
    size_t cap = 64, len = 0;
    char *buf = malloc(cap);
    if (!buf) {
        throw_class(env, "java/lang/OutOfMemoryError", "sparrow: token text");
        return NULL;
    }
    jbyteArray out = NULL;
    if (piece(env, H(sp_model, h), token, render_special, &buf, &cap, &len)) out = bytes_new(env, buf, len);
    free(buf);
    return out;
}

JNIEXPORT jbyteArray JNICALL Java_dev_sparrow_Native_detokenize(JNIEnv *env, jclass cls, jlong h, jintArray tokens,
                                                                jboolean render_special) {
    if (!handle_ok(env, h)) return NULL;
    size_t n;
    int32_t *toks = ints_get(env, tokens, &n);
    if (!toks) return NULL;
    size_t cap = 64, len = 0, used = 0, text_cap = 256;
    char *buf = malloc(cap), *text = malloc(text_cap);
    jbyteArray out = NULL;
    bool ok = buf && text;
    if (!ok) throw_class(env, "java/lang/OutOfMemoryError", "sparrow: detokenize");
    for (size_t i = 0; ok && i < n; i++) {
        ok = piece(env, H(sp_model, h), toks[i], render_special, &buf, &cap, &len);
        if (ok && used + len > text_cap) {
            while (used + len > text_cap) text_cap *= 2;
            char *bigger = realloc(text, text_cap);
            if (!bigger) {
                throw_class(env, "java/lang/OutOfMemoryError", "sparrow: detokenize");
                ok = false;
            } else {
                text = bigger;
            }
        }
        if (ok) {
            memcpy(text + used, buf, len);
            used += len;
        }
    }
    if (ok) out = bytes_new(env, text, used);
    free(buf);
    free(text);
    free(toks);
    return out;
}

JNIEXPORT jboolean JNICALL Java_dev_sparrow_Native_isEog(JNIEnv *env, jclass cls, jlong h, jint token) {
    if (!handle_ok(env, h)) return JNI_FALSE;
    return sp_token_is_eog(H(sp_model, h), token) ? JNI_TRUE : JNI_FALSE;
}

/* ---- session ---- */

JNIEXPORT void JNICALL Java_dev_sparrow_Native_sessionDefaults(JNIEnv *env, jclass cls, jobject out) {
    sp_session_params p = sp_session_default_params();
    session_params(env, out, &p, true);
}

JNIEXPORT jlong JNICALL Java_dev_sparrow_Native_sessionNew(JNIEnv *env, jclass cls, jlong model, jobject params) {
    if (!handle_ok(env, model)) return 0;
    sp_session_params p = sp_session_default_params();
    if (!session_params(env, params, &p, false)) return 0;
    sp_session *s = NULL;
    sp_status st = sp_session_new(H(sp_model, model), p, &s);
    if (st != SP_OK) {
        throw_status(env, st);
        return 0;
    }
    return (jlong)(intptr_t)s;
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_sessionFree(JNIEnv *env, jclass cls, jlong h) {
    sp_session_free(H(sp_session, h));
}

/* GPU devices: their count, and one's name as UTF-8 bytes (a driver's name may hold any character) */
JNIEXPORT jint JNICALL Java_dev_sparrow_Native_deviceCount(JNIEnv *env, jclass cls) { return sp_device_count(); }

JNIEXPORT jbyteArray JNICALL Java_dev_sparrow_Native_deviceName(JNIEnv *env, jclass cls, jint device) {
    sp_device_info info;
    const sp_status st = sp_device_get_info(device, &info);
    if (st != SP_OK) {
        throw_status(env, st);
        return NULL;
    }
    return bytes_new(env, info.name, strlen(info.name));
}

JNIEXPORT jint JNICALL Java_dev_sparrow_Native_sessionNCtx(JNIEnv *env, jclass cls, jlong h) {
    return handle_ok(env, h) ? sp_session_n_ctx(H(sp_session, h)) : 0;
}

JNIEXPORT jint JNICALL Java_dev_sparrow_Native_sessionNPast(JNIEnv *env, jclass cls, jlong h) {
    return handle_ok(env, h) ? sp_session_n_past(H(sp_session, h)) : 0;
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_sessionTruncate(JNIEnv *env, jclass cls, jlong h, jint n) {
    if (!handle_ok(env, h)) return;
    sp_status st = sp_session_truncate(H(sp_session, h), n);
    if (st != SP_OK) throw_status(env, st);
}

/* ---- generator ---- */

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorDefaults(JNIEnv *env, jclass cls, jobject out,
                                                                 jint drafter) {
    sp_generator_params p =
        drafter < 0 ? sp_generator_default_params() : sp_generator_default_params_for((sp_drafter_kind)drafter);
    if (generator_fields(env, out, &p, true) && generator_branching(env, out, &p, true))
        generator_drafter(env, out, &p, true);
}

JNIEXPORT jlong JNICALL Java_dev_sparrow_Native_generatorNew(JNIEnv *env, jclass cls, jlong session, jobject params,
                                                             jobjectArray stops, jlong draft_session) {
    if (!handle_ok(env, session)) return 0;
    sp_generator_params p = sp_generator_default_params();
    if (!generator_fields(env, params, &p, false) || !generator_branching(env, params, &p, false) ||
        !generator_drafter(env, params, &p, false))
        return 0;
    p.draft_session = H(sp_session, draft_session);  /* 0: none */
    jsize n_stop = stops ? (*env)->GetArrayLength(env, stops) : 0;
    if (n_stop > SP_GEN_MAX_STOP) {
        throw_sparrow(env, "SP_ERR_INVALID_ARG", "Generator.Params.stop: more stop strings than SP_GEN_MAX_STOP (8)");
        return 0;
    }
    char *stop[SP_GEN_MAX_STOP] = {0};
    bool ok = true;
    for (jsize i = 0; i < n_stop && ok; i++) {
        jbyteArray a = (jbyteArray)(*env)->GetObjectArrayElement(env, stops, i);
        if ((*env)->ExceptionCheck(env)) { ok = false; break; }
        size_t len;
        stop[i] = bytes_get(env, a, &len);  /* null element: NullPointerException */
        if (a) (*env)->DeleteLocalRef(env, a);
        ok = stop[i] != NULL;
        if (ok && memchr(stop[i], '\0', len)) {
            throw_sparrow(env, "SP_ERR_INVALID_ARG", "Generator.Params.stop: a stop string contains a NUL character");
            ok = false;
        }
    }
    sp_generator *g = NULL;
    if (ok) {
        p.n_stop = n_stop;
        for (jsize i = 0; i < n_stop; i++) p.stop[i] = stop[i];
        sp_status st = sp_generator_new(H(sp_session, session), &p, &g);  /* copies the stop strings */
        if (st != SP_OK) throw_status(env, st);
    }
    for (int i = 0; i < SP_GEN_MAX_STOP; i++) free(stop[i]);
    return (jlong)(intptr_t)g;
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorFree(JNIEnv *env, jclass cls, jlong h) {
    sp_generator_free(H(sp_generator, h));
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorStart(JNIEnv *env, jclass cls, jlong h, jintArray prompt) {
    if (!handle_ok(env, h)) return;
    size_t n;
    int32_t *toks = ints_get(env, prompt, &n);
    if (!toks) return;
    sp_status st = sp_generator_start(H(sp_generator, h), toks, (int32_t)n);
    free(toks);
    if (st != SP_OK) throw_status(env, st);
}

JNIEXPORT jint JNICALL Java_dev_sparrow_Native_generatorNext(JNIEnv *env, jclass cls, jlong h) {
    if (!handle_ok(env, h)) return 0;
    int32_t token = -1;
    sp_gen_stop stop = SP_GEN_RUNNING;
    sp_status st = sp_generate_next(H(sp_generator, h), &token, &stop);
    if (st != SP_OK) {
        throw_status(env, st);
        return 0;
    }
    if (token >= 0) return token;
    if (stop == SP_GEN_RUNNING) {  /* not in the contract; never let it read as token 0 */
        throw_sparrow(env, "SP_ERR_INTERNAL", "sp_generate_next: no token and no stop reason");
        return 0;
    }
    return -(jint)stop;
}

/* sp_generate's callback: the Java TokenCallback, on the calling thread (sp_generate calls back on its caller's). */
typedef struct java_callback {
    JNIEnv *env;
    jobject cb;
    jmethodID on_token;
} java_callback;

static bool call_java(int32_t token, void *user_data) {
    java_callback *c = user_data;
    jboolean go = (*c->env)->CallBooleanMethod(c->env, c->cb, c->on_token, (jint)token);
    if ((*c->env)->ExceptionCheck(c->env)) return false;  /* stop; the exception propagates to the Java caller */
    return go != JNI_FALSE;
}

JNIEXPORT jint JNICALL Java_dev_sparrow_Native_generate(JNIEnv *env, jclass cls, jlong h, jobject cb) {
    if (!handle_ok(env, h)) return 0;
    java_callback c = {env, cb, NULL};
    if (cb) {
        jclass cb_cls = (*env)->GetObjectClass(env, cb);
        if (!cb_cls) return 0;
        c.on_token = (*env)->GetMethodID(env, cb_cls, "onToken", "(I)Z");
        (*env)->DeleteLocalRef(env, cb_cls);
        if (!c.on_token) return 0;
    }
    sp_gen_stop stop = SP_GEN_RUNNING;
    sp_status st = sp_generate(H(sp_generator, h), cb ? call_java : NULL, &c, &stop);
    if ((*env)->ExceptionCheck(env)) return 0;  /* the callback threw */
    if (st != SP_OK) {
        throw_status(env, st);
        return 0;
    }
    return (jint)stop;
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorStats(JNIEnv *env, jclass cls, jlong h, jobject out) {
    if (!handle_ok(env, h)) return;
    sp_generator_stats s;
    sp_status st = sp_generator_get_stats(H(sp_generator, h), &s);
    if (st != SP_OK) {
        throw_status(env, st);
        return;
    }
    jfield f[] = {
        {"steps", 'J', &s.steps},   {"drafted", 'J', &s.drafted},         {"accepted", 'J', &s.accepted},
        {"tokens", 'J', &s.tokens}, {"promptTokens", 'J', &s.prompt_tokens}, {"evalSeconds", 'D', &s.eval_s},
        {"loopSeconds", 'D', &s.loop_s}, {"draftEvalSeconds", 'D', &s.draft_eval_s},
        {"plainSteps", 'J', &s.plain_steps},
    };
    fields_copy(env, out, f, COUNT(f), true);
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorResetStats(JNIEnv *env, jclass cls, jlong h) {
    if (handle_ok(env, h)) sp_generator_reset_stats(H(sp_generator, h));
}

JNIEXPORT jintArray JNICALL Java_dev_sparrow_Native_generatorContext(JNIEnv *env, jclass cls, jlong h) {
    if (!handle_ok(env, h)) return NULL;
    const int32_t *toks = NULL;
    int32_t n = sp_generator_context(H(sp_generator, h), &toks);
    return ints_new(env, toks, n > 0 ? (size_t)n : 0);
}

/* Token Recycling's matrix to / from a .npy file. */
static void drafter_file(JNIEnv *env, jlong h, jbyteArray path, bool save) {
    if (!handle_ok(env, h)) return;
    size_t n;
    char *cpath = bytes_get(env, path, &n);
    if (!cpath) return;
    if (memchr(cpath, '\0', n)) {
        free(cpath);
        throw_sparrow(env, "SP_ERR_INVALID_ARG", "Generator: the drafter file path contains a NUL character");
        return;
    }
    sp_generator *g = H(sp_generator, h);
    sp_status st = save ? sp_generator_save_drafter(g, cpath) : sp_generator_load_drafter(g, cpath);
    free(cpath);
    if (st != SP_OK) throw_status(env, st);
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorSaveDrafter(JNIEnv *env, jclass cls, jlong h, jbyteArray path) {
    drafter_file(env, h, path, true);
}

JNIEXPORT void JNICALL Java_dev_sparrow_Native_generatorLoadDrafter(JNIEnv *env, jclass cls, jlong h, jbyteArray path) {
    drafter_file(env, h, path, false);
}
