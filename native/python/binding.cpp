// binding.cpp: the Python module runtime._sparrow, a thin nanobind layer that mirrors sparrow.h one to one.
// The Pythonic API (classes with context managers, generators) lives in runtime/; this file only converts types,
// turns sp_status failures into SparrowError, and releases the GIL around work in C.
// The `testing` submodule exposes the test hooks of native/src/testing.h (functions only: kernel tiers against _ref,
// the GGUF validator, the vocabulary, synthetic routing), for tests and benchmarks.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
#include "sparrow.h"
#include "testing.h"
}

namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct SparrowError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void check(sp_status s) {
    if (s != SP_OK) throw SparrowError(std::string(sp_status_string(s)) + ": " + sp_last_error());
}

// A C string as str, bytes that are not UTF-8 replaced by U+FFFD: messages and names can quote a GGUF file's strings,
// which need not be valid UTF-8 (nanobind's own conversion would raise UnicodeDecodeError instead).
nb::str lossy_str(const char *s) {
    PyObject *o = PyUnicode_DecodeUTF8(s, (Py_ssize_t)std::strlen(s), "replace");
    if (!o) throw nb::python_error();
    return nb::steal<nb::str>(o);
}

using F32Array = nb::ndarray<nb::numpy, float>;

// Lifetimes under threads. The binding releases the GIL while C works, so another Python thread may close an object,
// or call it again, in the meantime. Every call therefore holds a use of its object (ModelUse / SessionUse below: taken
// before the GIL is released, given back after it is taken again):
//  - a Model counts its uses (calls in flight, plus one per open Session); close() refuses new uses at once, and the
//    C model is freed by whichever comes last, close() or the last use;
//  - a Session (KV cache, scratch, thread pool: one call at a time) has at most one use: a call from a second thread
//    is refused with "in use by another thread" (entering sp_eval twice would deadlock its pool), and close() during
//    a call frees the session when that call returns.
// The counts sit behind a mutex, so this holds without the GIL too; the mutex is never held while C works or while
// waiting for the GIL. Sampler calls never release the GIL, so they need no guard.
struct Model {
    sp_model *m = nullptr;
    sp_model_info info{};
    explicit Model(const std::string &path, bool use_mmap, bool vocab_only, bool repack = true) {
        if (path.find('\0') != std::string::npos)  // C would open the path up to the NUL: another file
            throw SparrowError("SP_ERR_INVALID_ARG: the model path contains a NUL character");
        sp_model_params p = sp_model_default_params();
        p.use_mmap = use_mmap;
        p.vocab_only = vocab_only;
        p.repack = repack;
        sp_status s;
        {
            nb::gil_scoped_release r;
            s = sp_model_load(path.c_str(), p, &m);
        }
        check(s);
        check(sp_model_get_info(m, &info));
    }
    ~Model() { sp_model_free(m); }  // no use is left: each call and each Session holds a reference to this object
    // close() makes the model unusable at once; its memory is freed when the last call or session using it ends.
    void close() {
        sp_model *dead = nullptr;
        {
            std::lock_guard<std::mutex> g(mu);
            closed = true;
            if (uses == 0) std::swap(dead, m);
        }
        sp_model_free(dead);
    }
    sp_model *acquire() {
        std::lock_guard<std::mutex> g(mu);
        if (closed || !m) throw SparrowError("SP_ERR_INVALID_ARG: the model is closed");
        uses++;
        return m;
    }
    void release() {
        sp_model *dead = nullptr;
        {
            std::lock_guard<std::mutex> g(mu);
            if (--uses == 0 && closed) std::swap(dead, m);
        }
        sp_model_free(dead);
    }
    std::mutex mu;
    int uses = 0;  // calls in flight + open sessions
    bool closed = false;
};

// One call's use of a Model (see "Lifetimes under threads"): converts to the sp_model it keeps alive.
struct ModelUse {
    Model &model;
    sp_model *m;
    explicit ModelUse(Model &x) : model(x), m(x.acquire()) {}
    ~ModelUse() { model.release(); }
    ModelUse(const ModelUse &) = delete;
    ModelUse &operator=(const ModelUse &) = delete;
    operator sp_model *() const { return m; }
};

// n_ctx None: the library default; n_batch / n_threads 0 or None: default. Other values go to C to be checked.
sp_session_params session_params(std::optional<int32_t> n_ctx, std::optional<int32_t> n_batch,
                                 std::optional<int32_t> n_threads, int32_t ffn_mode, int32_t kv_type,
                                 int32_t n_seq, int32_t device) {
    sp_session_params p = sp_session_default_params();
    p.device = device;
    p.ffn_mode = (sp_ffn_mode)ffn_mode;
    p.kv_type = (sp_kv_type)kv_type;
    p.n_seq = n_seq;
    if (n_ctx) p.n_ctx = *n_ctx;
    if (n_batch && *n_batch != 0) p.n_batch = *n_batch;
    if (n_threads && *n_threads != 0) p.n_threads = *n_threads;
    return p;
}

nb::dict memory_dict(const sp_session_memory &mem) {
    nb::dict d;
    d["n_ctx"] = mem.n_ctx;
    d["kv_cache_bytes"] = mem.kv_cache_bytes;
    d["total_bytes"] = mem.total_bytes;
    return d;
}

struct Session {
    sp_session *s = nullptr;
    Model *model = nullptr;
    nb::object model_ref;  // keeps the Python Model alive while the session lives
    int32_t n_vocab = 0;
    Session(nb::object model_obj, std::optional<int32_t> n_ctx, std::optional<int32_t> n_batch,
            std::optional<int32_t> n_threads, int32_t ffn_mode, int32_t kv_type, int32_t n_seq, int32_t device) {
        Model &mo = nb::cast<Model &>(model_obj);
        sp_model *m = mo.acquire();  // held until the session is freed
        sp_status st;
        {
            nb::gil_scoped_release unlocked;  // a GPU session uploads the model's weights the first time
            st = sp_session_new(m, session_params(n_ctx, n_batch, n_threads, ffn_mode, kv_type, n_seq, device), &s);
        }
        if (st != SP_OK) {
            mo.release();
            check(st);
        }
        model = &mo;
        model_ref = model_obj;
        n_vocab = mo.info.n_vocab;
    }
    ~Session() { close(); }
    // close() makes the session unusable at once; a call in flight on another thread finishes first, then frees it.
    void close() {
        sp_session *dead = nullptr;
        {
            std::lock_guard<std::mutex> g(mu);
            closed = true;
            if (!busy) std::swap(dead, s);
        }
        free_now(dead);
    }
    sp_session *acquire() {
        std::lock_guard<std::mutex> g(mu);
        if (closed || !s) throw SparrowError("SP_ERR_INVALID_ARG: the session is closed");
        if (busy)
            throw SparrowError("SP_ERR_INVALID_ARG: the session is in use by another thread (a session runs one call "
                               "at a time: give each thread its own session)");
        busy = true;
        return s;
    }
    void release() {  // with the GIL held
        sp_session *dead = nullptr;
        {
            std::lock_guard<std::mutex> g(mu);
            busy = false;
            if (closed) std::swap(dead, s);
        }
        free_now(dead);
    }
    void free_now(sp_session *dead) {  // with the GIL held (drops model_ref)
        if (!dead) return;
        sp_session_free(dead);
        model->release();
        model_ref = nb::none();
    }
    std::mutex mu;
    bool busy = false;  // a call is in flight
    bool closed = false;
};

// One call's use of a Session: converts to the sp_session it holds; a second thread's use is refused.
struct SessionUse {
    Session &ses;
    sp_session *s;
    explicit SessionUse(Session &x) : ses(x), s(x.acquire()) {}
    ~SessionUse() { ses.release(); }
    SessionUse(const SessionUse &) = delete;
    SessionUse &operator=(const SessionUse &) = delete;
    operator sp_session *() const { return s; }
};

struct Sampler {
    sp_sampler *s = nullptr;
    int32_t n_vocab;
    Sampler(int32_t n_vocab_, float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
            int32_t repeat_last_n, uint64_t seed)
        : n_vocab(n_vocab_) {
        sp_sampler_params p = sp_sampler_default_params();
        p.temperature = temperature;
        p.top_k = top_k;
        p.top_p = top_p;
        p.min_p = min_p;
        p.repeat_penalty = repeat_penalty;
        p.repeat_last_n = repeat_last_n;
        p.seed = seed;
        check(sp_sampler_new(p, n_vocab, &s));
    }
    ~Sampler() { close(); }
    void close() {
        if (s) sp_sampler_free(s);
        s = nullptr;
    }
    sp_sampler *get() const {
        if (!s) throw SparrowError("SP_ERR_INVALID_ARG: the sampler is closed");
        return s;
    }
};

using F32Rows = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// sp_generator over a Session. Every call holds a use of its Session (so the session cannot be freed, nor used by
// another thread, while the generator runs on it) and of the generator itself (a second thread is refused; close()
// during a call frees the generator when the call returns).
struct Generator {
    sp_generator *g = nullptr;
    Session *ses = nullptr, *dses = nullptr;
    nb::object ses_ref, dses_ref;  // keep the Python Sessions (target, draft) alive while the generator lives
    Generator(nb::object session_obj, float temperature, int32_t top_k, float top_p, float min_p,
              float repeat_penalty, int32_t repeat_last_n, uint64_t seed, int32_t max_tokens, bool stop_at_eog,
              int32_t drafter, int32_t ngram, int32_t min_ngram, int32_t draft_k, std::vector<nb::bytes> stop,
              int32_t recycling_k, std::vector<int32_t> branching, int32_t max_nodes, nb::object draft_obj, bool plan,
              int32_t probe_every, int32_t max_probe_every, int32_t learn_every) {
        Session &so = nb::cast<Session &>(session_obj);
        sp_generator_params p = sp_generator_default_params();
        p.sampler.temperature = temperature;
        p.sampler.top_k = top_k;
        p.sampler.top_p = top_p;
        p.sampler.min_p = min_p;
        p.sampler.repeat_penalty = repeat_penalty;
        p.sampler.repeat_last_n = repeat_last_n;
        p.sampler.seed = seed;
        p.max_tokens = max_tokens;
        p.stop_at_eog = stop_at_eog;
        p.drafter = (sp_drafter_kind)drafter;
        p.ngram = ngram;
        p.min_ngram = min_ngram;
        p.draft_k = draft_k;
        p.recycling_k = recycling_k;
        if (branching.empty() || branching.size() > SP_GEN_MAX_DEPTH)
            throw SparrowError("SP_ERR_INVALID_ARG: generator: branching needs 1.." + std::to_string(SP_GEN_MAX_DEPTH) +
                               " entries");
        p.n_branching = (int32_t)branching.size();
        std::copy(branching.begin(), branching.end(), p.branching);
        p.max_nodes = max_nodes;
        p.plan = plan;
        p.probe_every = probe_every;
        p.max_probe_every = max_probe_every;
        p.learn_every = learn_every;
        if (stop.size() > SP_GEN_MAX_STOP)
            throw SparrowError("SP_ERR_INVALID_ARG: generator: at most " + std::to_string(SP_GEN_MAX_STOP) +
                               " stop strings");
        std::vector<std::string> copies;
        for (auto &b : stop) {
            std::string c(b.c_str(), b.size());
            if (c.find('\0') != std::string::npos)
                throw SparrowError("SP_ERR_INVALID_ARG: generator: a stop string contains a NUL byte");
            copies.push_back(c);
        }
        p.n_stop = (int32_t)copies.size();
        for (size_t i = 0; i < copies.size(); i++) p.stop[i] = copies[i].c_str();
        Session *dso = draft_obj.is_none() ? nullptr : &nb::cast<Session &>(draft_obj);
        SessionUse s(so);
        std::optional<SessionUse> ds;
        if (dso && dso != &so) ds.emplace(*dso);  // the same session twice: sp_generator_new refuses it
        p.draft_session = dso ? (dso == &so ? (sp_session *)s : (sp_session *)*ds) : nullptr;
        check(sp_generator_new(s, &p, &g));
        ses = &so;
        ses_ref = session_obj;
        if (dso) {
            dses = dso;
            dses_ref = draft_obj;
        }
    }
    ~Generator() { close(); }
    void close() {
        sp_generator *dead = nullptr;
        {
            std::lock_guard<std::mutex> l(mu);
            closed = true;
            if (!busy) std::swap(dead, g);
        }
        sp_generator_free(dead);
    }
    sp_generator *acquire() {
        std::lock_guard<std::mutex> l(mu);
        if (closed || !g) throw SparrowError("SP_ERR_INVALID_ARG: the generator is closed");
        if (busy)
            throw SparrowError("SP_ERR_INVALID_ARG: the generator is in use by another thread (one call at a time "
                               "per generator: give each thread its own session and generator)");
        busy = true;
        return g;
    }
    void release() {
        sp_generator *dead = nullptr;
        {
            std::lock_guard<std::mutex> l(mu);
            busy = false;
            if (closed) std::swap(dead, g);
        }
        sp_generator_free(dead);
    }
    std::mutex mu;
    bool busy = false;
    bool closed = false;
};

// One call's use of a Generator and of its Session (taken in that order, given back in reverse).
struct GeneratorUse {
    Generator &gen;
    sp_generator *g;
    std::optional<SessionUse> s, ds;
    explicit GeneratorUse(Generator &x) : gen(x), g(x.acquire()) {
        try {
            s.emplace(*x.ses);
            if (x.dses) ds.emplace(*x.dses);
        } catch (...) {
            s.reset();
            x.release();
            throw;
        }
    }
    ~GeneratorUse() {
        ds.reset();
        s.reset();
        gen.release();
    }
    GeneratorUse(const GeneratorUse &) = delete;
    GeneratorUse &operator=(const GeneratorUse &) = delete;
};

// sp_generate's callback: the Python callable, called with the GIL (a Python exception stops the generation and is
// raised once sp_generate has returned).
struct PyCallback {
    nb::object fn;
    std::vector<int32_t> tokens;
    std::exception_ptr error;
    static bool call(int32_t token, void *user) {
        PyCallback *self = (PyCallback *)user;
        self->tokens.push_back(token);
        if (!self->fn.is_valid() || self->fn.is_none()) return true;
        nb::gil_scoped_acquire g;
        try {
            nb::object r = self->fn(token);
            return r.is_none() || nb::cast<bool>(r);
        } catch (...) {
            self->error = std::current_exception();
            return false;
        }
    }
};


// (status name, message) of a validator's result: ("SP_OK", "") when valid.
nb::tuple status_pair(sp_status s) {
    return nb::make_tuple(sp_status_string(s), lossy_str(s == SP_OK ? "" : sp_last_error()));
}

// A new float32 array of `shape` (zeroed, then filled by fill(data)) that owns its buffer; freed if fill throws.
template <class Fill>
F32Array new_f32(std::initializer_list<size_t> shape, Fill fill) {
    size_t n = 1;
    for (size_t d : shape) n *= d;
    std::unique_ptr<float[]> buf(new float[std::max<size_t>(n, 1)]());
    fill(buf.get());
    nb::capsule owner(buf.get(), [](void *p) noexcept { delete[] (float *)p; });
    return F32Array(buf.release(), shape, owner);
}

}  // namespace

NB_MODULE(_sparrow, m) {
    m.doc() = "Low-level binding of libsparrow (mirrors native/include/sparrow.h).";
    nb::exception<SparrowError> sparrow_error(m, "SparrowError", PyExc_RuntimeError);
    // Replaces the translator nb::exception registered (later ones are tried first): the message decoded leniently.
    nb::register_exception_translator([](const std::exception_ptr &p, void *type) {
        try {
            std::rethrow_exception(p);
        } catch (const SparrowError &e) {
            PyObject *msg = PyUnicode_DecodeUTF8(e.what(), (Py_ssize_t)std::strlen(e.what()), "replace");
            if (msg) PyErr_SetObject((PyObject *)type, msg);  // else the decoder's own error (MemoryError) stands
            Py_XDECREF(msg);
        }
    }, sparrow_error.ptr());

    m.def("version", &sp_version);
    m.def("cpu_features", &sp_cpu_features);
    m.def("kernel_tier", &sp_kernel_tier);
    // devices() -> list of dicts (sp_device_info; index = the device number for sessions, from 1); empty without the
    // Vulkan backend, loader or a device (device_error() then says why)
    m.def("devices", []() {
        nb::list out;
        int32_t n;
        {
            nb::gil_scoped_release unlocked;
            n = sp_device_count();
        }
        for (int32_t i = 1; i <= n; i++) {
            sp_device_info info;
            check(sp_device_get_info(i, &info));
            nb::dict d;
            d["index"] = i;
            d["name"] = std::string(info.name);
            d["kind"] = std::string(info.kind);
            d["api"] = std::string(info.api);
            d["api_version"] = std::string(info.api_version);
            d["driver"] = std::string(info.driver);
            d["memory_bytes"] = info.memory_bytes;
            out.append(d);
        }
        return out;
    });
    m.def("device_error", []() {
        nb::gil_scoped_release unlocked;
        return sp_device_count() > 0 ? std::string() : std::string(sp_last_error());
    });
    m.def("device_backend_built", &sp_device_backend_built);
    // device_validation() -> (errors, warnings, last message) the Vulkan validation layer reported (when on)
    m.def("device_validation", []() {
        int64_t warnings = 0;
        char msg[1024];
        const int64_t errors = sp_device_validation_errors(&warnings, msg, sizeof msg);
        return nb::make_tuple(errors, warnings, std::string(msg));
    });
    // supported_architectures() -> list of str: the GGUF architectures sp_model_load implements
    m.def("supported_architectures", []() {
        std::vector<std::string> out;
        for (const char *const *a = sp_supported_architectures(); *a; a++) out.emplace_back(*a);
        return out;
    });
    // sampler_default_params() -> dict of sp_sampler_default_params(): the library's sampling defaults
    m.def("sampler_default_params", []() {
        const sp_sampler_params p = sp_sampler_default_params();
        nb::dict d;
        d["temperature"] = p.temperature;
        d["top_k"] = p.top_k;
        d["top_p"] = p.top_p;
        d["min_p"] = p.min_p;
        d["repeat_penalty"] = p.repeat_penalty;
        d["repeat_last_n"] = p.repeat_last_n;
        d["seed"] = p.seed;
        return d;
    });
    nb::enum_<sp_ffn_mode>(m, "FfnMode", nb::is_arithmetic(), "sp_ffn_mode: how a sparse-expert FFN runs a batch.")
        .value("AUTO", SP_FFN_AUTO)
        .value("DENSE", SP_FFN_DENSE)
        .value("SPARSE_TOKEN", SP_FFN_SPARSE_TOKEN)
        .value("SPARSE_CHUNK", SP_FFN_SPARSE_CHUNK);
    // top_k(x [R, V] float32, k) -> int32 [R, k]: each row's k largest entries' indices, largest first, ties to the
    // lower index (sp_top_k per row, without the GIL).
    m.def("top_k", [](F32Rows x, int32_t k) {
        const size_t R = x.shape(0), V = x.shape(1);
        if (V > (size_t)INT32_MAX) throw SparrowError("SP_ERR_INVALID_ARG: top_k: rows too long");
        if (k < 1 || k > SP_TOP_K_MAX || (size_t)k > V)
            throw SparrowError("SP_ERR_INVALID_ARG: top_k: k=" + std::to_string(k) + " must be in [1, min(" +
                               std::to_string(V) + ", " + std::to_string(SP_TOP_K_MAX) + ")]");
        int32_t *out = new int32_t[std::max<size_t>(R * (size_t)std::max(k, 0), 1)];
        sp_status st = SP_OK;
        {
            nb::gil_scoped_release r;
            for (size_t i = 0; i < R && st == SP_OK; i++) st = sp_top_k(x.data() + i * V, (int32_t)V, k, out + i * (size_t)k);
        }
        if (st != SP_OK) {
            delete[] out;
            check(st);
        }
        nb::capsule owner(out, [](void *p) noexcept { delete[] (int32_t *)p; });
        return nb::ndarray<nb::numpy, int32_t, nb::ndim<2>>(out, {R, (size_t)k}, owner);
    }, "x"_a, "k"_a);
    m.def("bench_read_bandwidth", [](int32_t n_threads, size_t bytes_per_thread, int32_t repeats, bool pin_threads) {
        sp_bandwidth_params p = sp_bandwidth_default_params();
        p.n_threads = n_threads;
        p.bytes_per_thread = bytes_per_thread;
        p.repeats = repeats;
        p.pin_threads = pin_threads;
        sp_bandwidth_result r;
        sp_status s;
        {
            nb::gil_scoped_release rel;
            s = sp_bench_read_bandwidth(p, &r);
        }
        check(s);
        nb::dict d;
        d["n_threads"] = r.n_threads;
        d["bytes_per_thread"] = r.bytes_per_thread;
        d["gb_s"] = std::vector<double>(r.gb_s, r.gb_s + r.repeats);
        d["median"] = r.gb_s_median;
        d["min"] = r.gb_s_min;
        d["max"] = r.gb_s_max;
        d["n_pinned"] = r.n_pinned;
        d["pin_errno"] = r.pin_errno;
        return d;
    }, "n_threads"_a = 1, "bytes_per_thread"_a = size_t(256) << 20, "repeats"_a = 5, "pin_threads"_a = true,
       "Memory read bandwidth (GB/s) of n_threads threads streaming private buffers: sp_bench_read_bandwidth.");

    nb::class_<Model>(m, "Model")
        .def(nb::init<const std::string &, bool, bool, bool>(), "path"_a, "use_mmap"_a = true, "vocab_only"_a = false,
             "repack"_a = true)
        .def("close", &Model::close)
        .def_prop_ro("closed", [](Model &self) { return self.closed; })
        .def("info", [](Model &self) {
            ModelUse use(self);
            const sp_model_info &i = self.info;
            nb::dict d;
            d["architecture"] = lossy_str(i.architecture);
            d["name"] = lossy_str(i.name);
            d["n_vocab"] = i.n_vocab;
            d["n_ctx_train"] = i.n_ctx_train;
            d["n_embd"] = i.n_embd;
            d["n_layer"] = i.n_layer;
            d["n_head"] = i.n_head;
            d["n_head_kv"] = i.n_head_kv;
            d["n_ff"] = i.n_ff;
            d["bos_token"] = i.bos_token;
            d["eos_token"] = i.eos_token;
            d["eot_token"] = i.eot_token;
            d["add_bos"] = i.add_bos;
            d["n_params"] = i.n_params;
            d["weight_bytes"] = i.weight_bytes;
            return d;
        })
        .def("meta_str", [](Model &self, const std::string &key) -> std::optional<nb::bytes> {
            const char *p = nullptr;
            size_t n = 0;
            ModelUse m(self);
            if (sp_model_meta_str(m, key.c_str(), &p, &n) != SP_OK) return std::nullopt;
            return nb::bytes(p, n);
        })
        .def("tokenize", [](Model &self, nb::bytes text, bool add_special, bool parse_special) {
            ModelUse m(self);
            std::vector<int32_t> out(text.size() + 16);
            size_t n = 0;
            sp_status s;
            {
                nb::gil_scoped_release r;
                s = sp_tokenize(m, text.c_str(), text.size(), add_special, parse_special, out.data(),
                                out.size(), &n);
                if (s == SP_ERR_INVALID_ARG && n > out.size()) {
                    out.resize(n);
                    s = sp_tokenize(m, text.c_str(), text.size(), add_special, parse_special, out.data(),
                                    out.size(), &n);
                }
            }
            check(s);
            out.resize(n);
            return out;
        }, "text"_a, "add_special"_a = true, "parse_special"_a = false)
        .def("token_to_piece", [](Model &self, int32_t token, bool render_special) {
            ModelUse m(self);
            char buf[256];
            size_t n = 0;
            sp_status s = sp_token_to_piece(m, token, render_special, buf, sizeof buf, &n);
            if (s == SP_ERR_INVALID_ARG && n > sizeof buf) {
                std::string big(n, '\0');
                check(sp_token_to_piece(m, token, render_special, big.data(), n, &n));
                return nb::bytes(big.data(), n);
            }
            check(s);
            return nb::bytes(buf, n);
        }, "token"_a, "render_special"_a = false)
        .def("is_eog", [](Model &self, int32_t token) { return sp_token_is_eog(ModelUse(self), token); })
        // session_memory(...) -> dict of sp_session_memory: what a Session with these arguments would allocate
        .def("session_memory", [](Model &self, std::optional<int32_t> n_ctx, std::optional<int32_t> n_batch,
                                  std::optional<int32_t> n_threads, int32_t ffn_mode, int32_t kv_type,
                                  int32_t n_seq, int32_t device) {
            sp_session_memory mem;
            check(sp_session_memory_estimate(ModelUse(self),
                                             session_params(n_ctx, n_batch, n_threads, ffn_mode, kv_type, n_seq,
                                                            device),
                                             &mem));
            return memory_dict(mem);
        }, "n_ctx"_a = nb::none(), "n_batch"_a = nb::none(), "n_threads"_a = nb::none(),
           "ffn_mode"_a = (int32_t)SP_FFN_AUTO, "kv_type"_a = (int32_t)SP_KV_F16, "n_seq"_a = 1, "device"_a = 0);

    nb::class_<Session>(m, "Session")
        .def(nb::init<nb::object, std::optional<int32_t>, std::optional<int32_t>, std::optional<int32_t>, int32_t,
                      int32_t, int32_t, int32_t>(),
             "model"_a, "n_ctx"_a = nb::none(), "n_batch"_a = nb::none(), "n_threads"_a = nb::none(),
             "ffn_mode"_a = (int32_t)SP_FFN_AUTO, "kv_type"_a = (int32_t)SP_KV_F16, "n_seq"_a = 1, "device"_a = 0)
        // sparsity(layer=-1) -> dict of sp_sparsity_stats (cls as {k: value} for k = 2..16); None without experts
        .def("sparsity", [](Session &self, int32_t layer) -> nb::object {
            sp_sparsity_stats st;
            check(sp_session_get_sparsity(SessionUse(self), layer, &st));
            if (st.n_expert == 0) return nb::none();
            nb::dict d, cls;
            d["n_expert"] = st.n_expert;
            d["n_tokens"] = st.n_tokens;
            d["tls"] = st.tls;
            for (int k = 2; k <= SP_CLS_MAX; k++) cls[nb::int_(k)] = st.cls[k];
            d["cls"] = cls;
            d["expert_bytes_per_token"] = st.expert_bytes_per_token;
            d["dense_bytes_per_token"] = st.dense_bytes_per_token;
            return d;
        }, "layer"_a = -1)
        .def("reset_sparsity", [](Session &self) { sp_session_reset_sparsity(SessionUse(self)); })
        // timings() -> dict of sp_timings: where sp_eval's time went, per phase, since creation or reset_timings()
        .def("timings", [](Session &self) {
            sp_timings tm;
            check(sp_session_get_timings(SessionUse(self), &tm));
            nb::dict d;
            d["n_evals"] = tm.n_evals;
            d["n_tokens"] = tm.n_tokens;
            d["embed_s"] = tm.embed_s;
            d["attention_s"] = tm.attention_s;
            d["ffn_s"] = tm.ffn_s;
            d["head_s"] = tm.head_s;
            d["ffn_router_s"] = tm.ffn_router_s;
            d["ffn_plan_s"] = tm.ffn_plan_s;
            d["ffn_experts_s"] = tm.ffn_experts_s;
            d["ffn_up_s"] = tm.ffn_up_s;
            d["ffn_down_s"] = tm.ffn_down_s;
            d["ffn_reduce_s"] = tm.ffn_reduce_s;
            return d;
        })
        .def("reset_timings", [](Session &self) { sp_session_reset_timings(SessionUse(self)); })
        // memory() -> dict of sp_session_memory: what this session allocated when it was created
        .def("memory", [](Session &self) {
            sp_session_memory mem;
            check(sp_session_get_memory(SessionUse(self), &mem));
            return memory_dict(mem);
        })
        .def("close", &Session::close)
        .def_prop_ro("closed", [](Session &self) { return self.closed; })
        .def_prop_ro("n_past", [](Session &self) { return sp_session_n_past(SessionUse(self)); })
        .def_prop_ro("n_ctx", [](Session &self) { return sp_session_n_ctx(SessionUse(self)); })
        .def("truncate", [](Session &self, int32_t n, int32_t seq) {
            check(sp_session_seq_truncate(SessionUse(self), seq, n));
        }, "n"_a, "seq"_a = 0)
        .def("keep", [](Session &self, std::vector<int32_t> idx, int32_t seq) {
            check(sp_session_seq_keep(SessionUse(self), seq, idx.data(), (int32_t)idx.size()));
        }, "idx"_a, "seq"_a = 0)
        // seq_n_past(seq) -> the tokens sequence seq holds (-1 for a seq out of range)
        .def("seq_n_past", [](Session &self, int32_t seq) { return sp_session_seq_n_past(SessionUse(self), seq); })
        // eval(tokens, pos=None, mask=None, logits="last"|"all"|"none", out=None, seq=None) -> float32 array [V] /
        // [T, V] / None; out: a float32 C-contiguous array of that shape to write the logits into (returned), instead
        // of a new one. seq: a sequence id per token (runs of one sequence each): "last" then gives [R, V], the last
        // token of each of the R runs.
        .def("eval", [](Session &self, std::vector<int32_t> tokens, std::optional<std::vector<int32_t>> pos,
                        std::optional<nb::ndarray<uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>> mask,
                        const std::string &logits,
                        std::optional<nb::ndarray<float, nb::c_contig, nb::device::cpu>> out_arr,
                        std::optional<std::vector<int32_t>> seq) -> nb::object {
            SessionUse s(self);  // given back after the GIL is taken again (and on every error)
            const size_t T = tokens.size();
            if (pos && pos->size() != T) throw SparrowError("SP_ERR_INVALID_ARG: pos must have one entry per token");
            if (seq && seq->size() != T) throw SparrowError("SP_ERR_INVALID_ARG: seq must have one entry per token");
            size_t runs = 1;
            if (seq)
                for (size_t t = 1; t < T; t++) runs += (*seq)[t] != (*seq)[t - 1];
            if (mask && (mask->shape(0) != T || mask->shape(1) != T))
                throw SparrowError("SP_ERR_INVALID_ARG: mask must have shape [T, T]");
            if (logits != "last" && logits != "all" && logits != "none")
                throw SparrowError("SP_ERR_INVALID_ARG: logits must be 'last', 'all' or 'none'");
            const size_t rows = logits == "all" ? T : (logits == "last" ? (seq ? runs : 1) : 0);
            const bool per_run = seq && logits == "last";  // [R, V]
            float *given = nullptr;
            if (out_arr) {
                auto &arr = *out_arr;
                const bool ok = rows && (logits == "last" && !per_run
                                             ? arr.ndim() == 1 && arr.shape(0) == (size_t)self.n_vocab
                                             : arr.ndim() == 2 && arr.shape(0) == rows &&
                                                   arr.shape(1) == (size_t)self.n_vocab);
                if (!ok)
                    throw SparrowError("SP_ERR_INVALID_ARG: out must be a float32 C-contiguous array of the logits' "
                                       "shape ([V] for 'last', [R, V] for 'last' with seq, [T, V] for 'all')");
                given = arr.data();
            }
            float *out = given ? given : (rows ? new float[rows * (size_t)self.n_vocab] : nullptr);
            sp_batch b{};
            b.tokens = tokens.data();
            b.pos = pos ? pos->data() : nullptr;
            b.mask = mask ? mask->data() : nullptr;
            b.n_tokens = (int32_t)T;
            b.logits = out;
            b.logits_last_only = logits == "last";
            b.seq = seq ? seq->data() : nullptr;
            sp_status st;
            {
                nb::gil_scoped_release r;
                st = sp_eval(s, &b);
            }
            if (st != SP_OK) {
                if (!given) delete[] out;
                check(st);
            }
            if (given) return nb::cast(*out_arr);
            if (!out) return nb::none();
            nb::capsule owner(out, [](void *p) noexcept { delete[] (float *)p; });
            if (logits == "last" && !per_run) return nb::cast(F32Array(out, {(size_t)self.n_vocab}, owner));
            return nb::cast(F32Array(out, {rows, (size_t)self.n_vocab}, owner));
        }, "tokens"_a, "pos"_a = nb::none(), "mask"_a = nb::none(), "logits"_a = "last", "out"_a.noconvert() = nb::none(),
           "seq"_a = nb::none());

    // The drafter options of sp_generator_default_params_for(kind), by Generator keyword.
    m.def("generator_defaults", [](int32_t kind) {
        if (kind < SP_DRAFTER_NONE || kind > SP_DRAFTER_ADAPTIVE)
            throw SparrowError("SP_ERR_INVALID_ARG: unknown drafter kind " + std::to_string(kind));
        const sp_generator_params p = sp_generator_default_params_for((sp_drafter_kind)kind);
        nb::dict d;
        d["ngram"] = p.ngram;
        d["min_ngram"] = p.min_ngram;
        d["draft_k"] = p.draft_k;
        d["recycling_k"] = p.recycling_k;
        d["branching"] = std::vector<int32_t>(p.branching, p.branching + p.n_branching);
        d["max_nodes"] = p.max_nodes;
        d["plan"] = p.plan;
        d["probe_every"] = p.probe_every;
        d["max_probe_every"] = p.max_probe_every;
        d["learn_every"] = p.learn_every;
        return d;
    }, "kind"_a);
    // Generator(session, sampler params..., max_tokens, stop_at_eog, drafter, ngram, min_ngram, draft_k, stop, ...)
    const sp_generator_params gd = sp_generator_default_params();
    nb::class_<Generator>(m, "Generator")
        .def(nb::init<nb::object, float, int32_t, float, float, float, int32_t, uint64_t, int32_t, bool, int32_t,
                      int32_t, int32_t, int32_t, std::vector<nb::bytes>, int32_t, std::vector<int32_t>, int32_t, nb::object, bool, int32_t,
                      int32_t, int32_t>(),
             "session"_a, "temperature"_a = gd.sampler.temperature, "top_k"_a = gd.sampler.top_k,
             "top_p"_a = gd.sampler.top_p, "min_p"_a = gd.sampler.min_p, "repeat_penalty"_a = gd.sampler.repeat_penalty,
             "repeat_last_n"_a = gd.sampler.repeat_last_n, "seed"_a = gd.sampler.seed, "max_tokens"_a = gd.max_tokens,
             "stop_at_eog"_a = gd.stop_at_eog, "drafter"_a = (int32_t)gd.drafter, "ngram"_a = gd.ngram,
             "min_ngram"_a = gd.min_ngram, "draft_k"_a = gd.draft_k, "stop"_a = std::vector<nb::bytes>(),
             "recycling_k"_a = gd.recycling_k, "branching"_a = std::vector<int32_t>(1, gd.branching[0]),
             "max_nodes"_a = gd.max_nodes, "draft_session"_a = nb::none(), "plan"_a = gd.plan,
             "probe_every"_a = gd.probe_every, "max_probe_every"_a = gd.max_probe_every,
             "learn_every"_a = gd.learn_every)
        .def("close", &Generator::close)
        .def_prop_ro("closed", [](Generator &self) { return self.closed; })
        .def("start", [](Generator &self, std::vector<int32_t> prompt) {
            GeneratorUse u(self);
            sp_status st;
            {
                nb::gil_scoped_release r;
                st = sp_generator_start(u.g, prompt.data(), (int32_t)prompt.size());
            }
            check(st);
        }, "prompt"_a)
        // next() -> (token, stop): token -1 and the reason (sp_gen_stop) once the generation has ended
        .def("next", [](Generator &self) {
            GeneratorUse u(self);
            int32_t tok = -1;
            sp_gen_stop why = SP_GEN_RUNNING;
            sp_status st;
            {
                nb::gil_scoped_release r;
                st = sp_generate_next(u.g, &tok, &why);
            }
            check(st);
            return std::make_pair(tok, (int)why);
        })
        // generate(callback=None) -> (tokens, stop): to the end, callback(token) -> False stops it
        .def("generate", [](Generator &self, nb::object callback) {
            GeneratorUse u(self);
            PyCallback cb{callback, {}, nullptr};
            sp_gen_stop why = SP_GEN_RUNNING;
            sp_status st;
            {
                nb::gil_scoped_release r;
                st = sp_generate(u.g, PyCallback::call, &cb, &why);
            }
            if (cb.error) std::rethrow_exception(cb.error);
            check(st);
            return std::make_pair(cb.tokens, (int)why);
        }, "callback"_a = nb::none())
        .def("stats", [](Generator &self) {
            GeneratorUse u(self);
            sp_generator_stats st;
            check(sp_generator_get_stats(u.g, &st));
            nb::dict d;
            d["steps"] = st.steps;
            d["drafted"] = st.drafted;
            d["accepted"] = st.accepted;
            d["tokens"] = st.tokens;
            d["prompt_tokens"] = st.prompt_tokens;
            d["eval_s"] = st.eval_s;
            d["loop_s"] = st.loop_s;
            d["draft_eval_s"] = st.draft_eval_s;
            d["plain_steps"] = st.plain_steps;
            d["plan_steps"] = st.plan_steps;
            d["plan_candidates"] = st.plan_candidates;
            d["plan_kept"] = st.plan_kept;
            d["cost_step_s"] = st.cost_step_s;
            d["cost_token_s"] = st.cost_token_s;
            d["cost_expert_byte_s"] = st.cost_expert_byte_s;
            d["gate_drafting"] = std::vector<bool>(st.gate_drafting, st.gate_drafting + 3);
            d["gate_probes"] = std::vector<int64_t>(st.gate_probes, st.gate_probes + 3);
            d["gate_paid"] = std::vector<int64_t>(st.gate_paid, st.gate_paid + 3);
            return d;
        })
        .def("save_drafter", [](Generator &self, const std::string &path) {
            GeneratorUse u(self);
            check(sp_generator_save_drafter(u.g, path.c_str()));
        }, "path"_a)
        .def("load_drafter", [](Generator &self, const std::string &path) {
            GeneratorUse u(self);
            check(sp_generator_load_drafter(u.g, path.c_str()));
        }, "path"_a)
        .def("reset_stats", [](Generator &self) { sp_generator_reset_stats(GeneratorUse(self).g); })
        .def("context", [](Generator &self) {
            GeneratorUse u(self);
            const int32_t *t = nullptr;
            const int32_t n = sp_generator_context(u.g, &t);
            return std::vector<int32_t>(t, t + n);
        });

    const sp_sampler_params sd = sp_sampler_default_params();
    nb::class_<Sampler>(m, "Sampler")
        .def(nb::init<int32_t, float, int32_t, float, float, float, int32_t, uint64_t>(), "n_vocab"_a,
             "temperature"_a = sd.temperature, "top_k"_a = sd.top_k, "top_p"_a = sd.top_p, "min_p"_a = sd.min_p,
             "repeat_penalty"_a = sd.repeat_penalty, "repeat_last_n"_a = sd.repeat_last_n, "seed"_a = sd.seed)
        .def("close", &Sampler::close)
        .def("sample", [](Sampler &self, nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> logits) {
            if ((int64_t)logits.shape(0) != self.n_vocab)
                throw SparrowError("SP_ERR_INVALID_ARG: logits must have n_vocab entries");
            int32_t tok = -1;
            check(sp_sampler_sample(self.get(), logits.data(), &tok));
            return tok;
        })
        // candidates(logits) -> (ids int32 [K], probs float32 [K]): the distribution sample() draws from
        .def("candidates", [](Sampler &self, nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> logits) {
            if ((int64_t)logits.shape(0) != self.n_vocab)
                throw SparrowError("SP_ERR_INVALID_ARG: logits must have n_vocab entries");
            std::vector<int32_t> ids((size_t)self.n_vocab);
            std::vector<float> probs((size_t)self.n_vocab);
            int32_t n = 0;
            check(sp_sampler_candidates(self.get(), logits.data(), self.n_vocab, ids.data(), probs.data(), &n));
            int32_t *i_out = new int32_t[std::max(n, 1)];
            float *p_out = new float[std::max(n, 1)];
            std::copy(ids.begin(), ids.begin() + n, i_out);
            std::copy(probs.begin(), probs.begin() + n, p_out);
            nb::capsule oi(i_out, [](void *p) noexcept { delete[] (int32_t *)p; });
            nb::capsule op(p_out, [](void *p) noexcept { delete[] (float *)p; });
            return nb::make_tuple(nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>(i_out, {(size_t)n}, oi),
                                  nb::ndarray<nb::numpy, float, nb::ndim<1>>(p_out, {(size_t)n}, op));
        })
        .def("accept", [](Sampler &self, int32_t tok) { sp_sampler_accept(self.get(), tok); })
        .def("reset", [](Sampler &self) { sp_sampler_reset(self.get()); });

    // ---- internals for tests and benchmarks: the hooks of native/src/testing.h (kernel tiers, (de)quantization, the
    // FFN block alone, synthetic routing, the GGUF validator, the vocabulary); shapes checked in C ----
    nb::module_ t = m.def_submodule("testing", "Internal kernels and validators, for tests only.");
    using F32Vec = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
    using F16Vec = nb::ndarray<const uint16_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
    using F16Rows = nb::ndarray<const uint16_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
    t.def("tiers", []() {
        const char *names[8];
        const int32_t n = sp_testing_tiers(names, 8);
        return std::vector<std::string>(names, names + n);
    });
    t.def("row_size", [](uint32_t type, int64_t k) {
        size_t n = 0;
        check(sp_testing_row_size(type, k, &n));
        return n;
    });
    t.def("quantize", [](uint32_t type, F32Vec x) {
        const int64_t k = (int64_t)x.shape(0);
        size_t n = 0;
        check(sp_testing_row_size(type, k, &n));
        std::string out(n, '\0');
        check(sp_testing_quantize(type, x.data(), k, out.data()));
        return nb::bytes(out.data(), out.size());
    });
    t.def("dequantize", [](uint32_t type, nb::bytes data, int64_t k) {
        return new_f32({(size_t)std::max<int64_t>(k, 0)}, [&](float *out) {
            check(sp_testing_dequantize(type, data.c_str(), data.size(), k, out));
        });
    });
    // y[T, N] = x[T, K] @ W[N, K]^T with the given tier; W given as raw rows of the weight type.
    // The Vulkan backend's shaders one at a time (testing.h sp_testing_vk_*): vk_run(device, pipe, bufs, u, f,
    // groups) copies each numpy array of bufs (C-contiguous, any dtype; at most 5) to the device, runs the pipeline
    // once and copies every buffer back into its array (in place).
    t.def("vk_run", [](int32_t device, const std::string &pipe, std::vector<nb::ndarray<nb::c_contig, nb::device::cpu>> bufs,
                       std::vector<uint32_t> u, std::vector<float> f, std::vector<uint32_t> groups) {
        if (bufs.size() > 5 || u.size() > 12 || f.size() > 4 || groups.size() != 3)
            throw SparrowError("SP_ERR_INVALID_ARG: at most 5 buffers, 12 u, 4 f, and 3 group counts");
        void *ptrs[5];
        size_t bytes[5];
        for (size_t i = 0; i < bufs.size(); i++) {
            ptrs[i] = bufs[i].data();
            bytes[i] = bufs[i].nbytes();
        }
        u.resize(12, 0);
        f.resize(4, 0.0f);
        sp_status st;
        {
            nb::gil_scoped_release unlocked;
            st = sp_testing_vk_run(device, pipe.c_str(), ptrs, bytes, (int32_t)bufs.size(), u.data(), f.data(),
                                   groups.data());
        }
        check(st);
    });
    // vk_layout(type, w bytes, N, K) -> (uint32 words array, d_off, m_off): W in the GPU layout
    t.def("vk_layout", [](uint32_t type, nb::bytes w, int64_t N, int64_t K) {
        size_t n = 0;
        uint32_t d_off = 0, m_off = 0;
        check(sp_testing_vk_layout(type, w.c_str(), w.size(), N, K, nullptr, &n, &d_off, &m_off));
        uint32_t *out = new uint32_t[n ? n : 1];
        nb::capsule owner(out, [](void *p) noexcept { delete[] (uint32_t *)p; });
        check(sp_testing_vk_layout(type, w.c_str(), w.size(), N, K, out, &n, &d_off, &m_off));
        return nb::make_tuple(nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>(out, {n}, owner), d_off, m_off);
    });
    t.def("vk_rows_per_group", [](int32_t device) {
        uint32_t r = 0;
        check(sp_testing_vk_rows_per_group(device, &r));
        return r;
    });
    t.def("matmul", [](const std::string &tier, uint32_t type, nb::bytes w, int64_t N, F32Rows x) {
        return new_f32({x.shape(0), (size_t)std::max<int64_t>(N, 0)}, [&](float *y) {
            check(sp_testing_matmul(tier.c_str(), type, w.c_str(), w.size(), N, x.data(), (int64_t)x.shape(0),
                                    (int64_t)x.shape(1), y));
        });
    });
    // y[T', H] += c[T, F] @ D[F, H] with the tier's accum kernel; D as raw rows of the weight type; idx [T] rows of
    // y (or empty for rows 0..T-1). Returns the updated copy of y.
    t.def("accum", [](const std::string &tier, uint32_t type, nb::bytes d, int64_t F, int64_t H, F32Rows c, F32Rows y,
                      std::vector<int32_t> idx) {
        const size_t T = c.shape(0), R = y.shape(0);
        if ((int64_t)y.shape(1) != H || (!idx.empty() && idx.size() != T))
            throw SparrowError("SP_ERR_INVALID_ARG: shapes do not match");
        return new_f32({R, y.shape(1)}, [&](float *out) {
            std::memcpy(out, y.data(), R * y.shape(1) * sizeof(float));
            check(sp_testing_accum(tier.c_str(), type, d.c_str(), d.size(), F, H, c.data(), (int64_t)T,
                                   (int64_t)c.shape(1), out, (int64_t)R, idx.empty() ? nullptr : idx.data()));
        });
    }, "tier"_a, "type"_a, "d"_a, "F"_a, "H"_a, "c"_a, "y"_a, "idx"_a = std::vector<int32_t>());
    // The same with D repacked into the tier's "down" streaming layout and its accum_packed kernel (i8: the "down
    // int8" layout and accum_packed_i8), over rows [f0, f1) of D (f1 = -1: F; f0 a multiple of 16). SparrowError
    // (SP_ERR_UNSUPPORTED) where the tier has none.
    t.def("accum_packed", [](const std::string &tier, uint32_t type, nb::bytes d, int64_t F, int64_t H, F32Rows c,
                             F32Rows y, std::vector<int32_t> idx, int64_t f0, int64_t f1, bool i8) {
        const size_t T = c.shape(0), R = y.shape(0);
        if ((int64_t)y.shape(1) != H || (!idx.empty() && idx.size() != T))
            throw SparrowError("SP_ERR_INVALID_ARG: shapes do not match");
        return new_f32({R, y.shape(1)}, [&](float *out) {
            std::memcpy(out, y.data(), R * y.shape(1) * sizeof(float));
            check(sp_testing_accum_packed(tier.c_str(), type, d.c_str(), d.size(), F, H, c.data(), (int64_t)T,
                                          (int64_t)c.shape(1), out, (int64_t)R, idx.empty() ? nullptr : idx.data(),
                                          f0, f1, i8));
        });
    }, "tier"_a, "type"_a, "d"_a, "F"_a, "H"_a, "c"_a, "y"_a, "idx"_a = std::vector<int32_t>(), "f0"_a = 0,
       "f1"_a = -1, "i8"_a = false);
    // Run one BlockFFN layer's FFN block alone: xn [T, H], router scores r [T, E] (None: computed by the router),
    // mode (sp_ffn_mode). Returns y [T, H] (before the residual scale).
    t.def("ffn_run", [](Session &self, int32_t il, F32Rows xn, std::optional<F32Rows> r, int mode) {
        SessionUse s(self);
        const int32_t T = (int32_t)xn.shape(0);
        if (r && (int64_t)r->shape(0) != T) throw SparrowError("SP_ERR_INVALID_ARG: r must be [T, E]");
        return new_f32({(size_t)T, xn.shape(1)}, [&](float *out) {
            sp_status st;
            {
                nb::gil_scoped_release g;
                st = sp_testing_ffn_run(s, il, xn.data(), (int64_t)xn.shape(1), r ? r->data() : nullptr,
                                        r ? (int64_t)r->shape(1) : -1, T, (sp_ffn_mode)mode, out);
            }
            check(st);
        });
    }, "session"_a, "layer"_a, "xn"_a, "r"_a = nb::none(), "mode"_a = (int)SP_FFN_AUTO);
    // Benchmark hook: seconds per FFN call for `reps` calls on layers cycling through `layers` (so that, with enough
    // layers, expert weights come from DRAM as in a forward pass), with fixed xn and scores r. One warm-up pass.
    t.def("ffn_time", [](Session &self, std::vector<int32_t> layers, F32Rows xn, F32Rows r, int mode, int reps) {
        SessionUse s(self);
        const int32_t T = (int32_t)xn.shape(0);
        if ((int64_t)r.shape(0) != T) throw SparrowError("SP_ERR_INVALID_ARG: layers empty, reps < 1 or r not [T, E]");
        std::vector<double> out((size_t)std::max(reps, 0));
        sp_status st;
        {
            nb::gil_scoped_release g;
            st = sp_testing_ffn_time(s, layers.data(), (int32_t)layers.size(), xn.data(), (int64_t)xn.shape(1),
                                     r.data(), (int64_t)r.shape(1), T, (sp_ffn_mode)mode, reps, out.data());
        }
        check(st);
        return out;
    }, "session"_a, "layers"_a, "xn"_a, "r"_a, "mode"_a, "reps"_a);
    // Synthetic routing (routing_synth.c): every BlockFFN layer's router scores replaced by a pattern of stated TLS and
    // CLS-k keyed by (layer, position). Returns the effective setting (A, U of E experts; the exact TLS/CLS-k).
    auto synth_dict = [](const sp_session *s) -> nb::object {
        sp_testing_synth_info i;
        check(sp_testing_synthetic_routing(s, &i));
        if (!i.on) return nb::none();
        nb::dict d;
        d["n_expert"] = i.n_expert;
        d["n_active"] = i.n_active;
        d["n_union"] = i.n_union;
        d["k"] = i.k;
        d["seed"] = i.seed;
        d["tls"] = i.tls;
        d["cls"] = i.cls;
        return d;
    };
    t.def("set_synthetic_routing", [synth_dict](Session &self, double tls, double cls, int32_t k, uint64_t seed) {
        SessionUse s(self);
        check(sp_testing_set_synthetic_routing(s, tls, cls, k, seed));
        return synth_dict(s);
    }, "session"_a, "tls"_a, "cls"_a, "k"_a = 8, "seed"_a = 0);
    t.def("clear_synthetic_routing", [](Session &self) { check(sp_testing_clear_synthetic_routing(SessionUse(self))); });
    t.def("synthetic_routing", [synth_dict](Session &self) { return synth_dict(SessionUse(self)); });
    // The synthetic scores [T, E] of `layer` at `positions` (what a pass uses for tokens at those positions).
    t.def("synthetic_scores", [](Session &self, int32_t layer, std::vector<int64_t> positions) {
        SessionUse s(self);
        return new_f32({positions.size(), (size_t)sp_testing_n_expert(s)}, [&](float *out) {
            check(sp_testing_synthetic_scores(s, layer, positions.data(), (int64_t)positions.size(), out));
        });
    }, "session"_a, "layer"_a, "positions"_a);
    // The router scores [n_tokens, E] the last BlockFFN layer used in the most recent pass (session scratch).
    t.def("last_router_scores", [](Session &self, int32_t n_tokens) {
        SessionUse s(self);
        return new_f32({(size_t)std::max(n_tokens, 0), (size_t)sp_testing_n_expert(s)}, [&](float *out) {
            check(sp_testing_last_router_scores(s, n_tokens, out));
        });
    }, "session"_a, "n_tokens"_a);
    // n_past = n with every layer's first n cache slots pseudo-random (long-context benchmarks without a prefill).
    t.def("fill_cache", [](Session &self, int32_t n, uint64_t seed) { check(sp_testing_fill_cache(SessionUse(self), n, seed)); },
          "session"_a, "n"_a, "seed"_a = 0);
    t.def("quantize_q8a", [](const std::string &tier, F32Vec x) {
        const int64_t k = (int64_t)x.shape(0);
        std::string out(sp_testing_q8a_size(k), '\0');
        check(sp_testing_quantize_q8a(tier.c_str(), x.data(), k, out.data()));
        return nb::bytes(out.data(), out.size());
    });
    t.def("dot_f32", [](const std::string &tier, F32Vec a, F32Vec b) {
        if (a.shape(0) != b.shape(0)) throw SparrowError("SP_ERR_INVALID_ARG: length mismatch");
        float r = 0;
        check(sp_testing_dot_f32(tier.c_str(), a.data(), b.data(), (int64_t)a.shape(0), &r));
        return r;
    });
    // Seconds per call of `reps` single-threaded matmul calls inside C (activations quantized once, untimed), the
    // weights (or their packed copy) spread over `copies` copies: sp_testing_matmul_time.
    auto matmul_time = [](const std::string &tier, uint32_t type, bool packed, const nb::bytes &w, int64_t N,
                          const F32Rows &x, int reps, int copies) {
        const char *wp = w.c_str();
        const size_t w_size = w.size();
        std::vector<double> out((size_t)std::max(reps, 0));
        sp_status st;
        {
            nb::gil_scoped_release r;
            st = sp_testing_matmul_time(tier.c_str(), type, packed, wp, w_size, N, x.data(), (int64_t)x.shape(0),
                                        (int64_t)x.shape(1), copies, reps, out.data());
        }
        check(st);
        return out;
    };
    // Benchmark hook: matmul_time on the weights as given (see matmul_time above).
    t.def("matmul_time", [matmul_time](const std::string &tier, uint32_t type, nb::bytes w, int64_t N, F32Rows x,
                                       int reps, int copies) {
        return matmul_time(tier, type, false, w, N, x, reps, copies);
    }, "tier"_a, "type"_a, "w"_a, "N"_a, "x"_a, "reps"_a, "copies"_a = 1);
    // F16 vector kernels of the KV cache: dot(a, b_f16), y + alpha*x_f16, and f32 -> f16 rows (bits as uint16).
    // attn_time(tier, G, T, n, D, reps) -> seconds [reps]: one kv head's attention for T tokens after n cached slots
    t.def("attn_time", [](const std::string &tier, int64_t G, int64_t T, int64_t n, int64_t D, int32_t reps) {
        std::vector<double> s((size_t)std::max(reps, 1));
        check(sp_testing_attn_time(tier.c_str(), G, T, n, D, reps, s.data()));
        return s;
    });
    // attn_scores_f16(tier, q [M, D], rows f16 [n, D], scale) -> [M, n]: q[m] . rows[j] * scale (the hook lays the
    // rows out as the key cache does)
    t.def("attn_scores_f16", [](const std::string &tier, F32Rows q, F16Rows rows, float scale) {
        if (q.shape(1) != rows.shape(1)) throw SparrowError("SP_ERR_INVALID_ARG: shape mismatch");
        return new_f32({q.shape(0), rows.shape(0)}, [&](float *out) {
            check(sp_testing_attn_scores_f16(tier.c_str(), q.data(), (int64_t)q.shape(0), (int64_t)q.shape(1),
                                             rows.data(), (int64_t)rows.shape(0), scale, out));
        });
    });
    // attn_sum_f16(tier, out [M, D], p [M, n], rows f16 [n, ld]) -> out + p @ rows[:, :D]
    t.def("attn_sum_f16", [](const std::string &tier, F32Rows out, F32Rows p, F16Rows rows) {
        if (p.shape(0) != out.shape(0) || p.shape(1) != rows.shape(0))
            throw SparrowError("SP_ERR_INVALID_ARG: shape mismatch");
        return new_f32({out.shape(0), out.shape(1)}, [&](float *y) {
            std::copy(out.data(), out.data() + out.shape(0) * out.shape(1), y);
            check(sp_testing_attn_sum_f16(tier.c_str(), y, (int64_t)out.shape(0), (int64_t)out.shape(1), p.data(),
                                          rows.data(), (int64_t)rows.shape(1), (int64_t)rows.shape(0)));
        });
    });
    // silu(x) * (m if given, else s) elementwise by the tier's SwiGLU kernel.
    t.def("silu_mul", [](const std::string &tier, F32Vec x, std::optional<F32Vec> m, float s) {
        if (m && m->shape(0) != x.shape(0)) throw SparrowError("SP_ERR_INVALID_ARG: length mismatch");
        return new_f32({x.shape(0)}, [&](float *y) {
            std::copy(x.data(), x.data() + x.shape(0), y);
            check(sp_testing_silu_mul(tier.c_str(), y, m ? m->data() : nullptr, s, (int64_t)x.shape(0)));
        });
    }, "tier"_a, "x"_a, "m"_a.none(), "s"_a = 1.0f);
    // (exp(x - mx) elementwise, their sum) by the tier's softmax kernel.
    t.def("exp_sum", [](const std::string &tier, F32Vec x, float mx) {
        std::vector<float> y(x.data(), x.data() + x.shape(0));
        float sum = 0;
        check(sp_testing_exp_sum(tier.c_str(), y.data(), (int64_t)y.size(), mx, &sum));
        return std::make_pair(y, sum);
    });
    t.def("first_above", [](const std::string &tier, F32Vec x, float t) {
        int64_t i = -1;
        check(sp_testing_first_above(tier.c_str(), x.data(), (int64_t)x.shape(0), t, &i));
        return i;
    });
    t.def("round_f16", [](const std::string &tier, F32Vec x) {
        std::vector<float> y(x.data(), x.data() + x.shape(0));
        check(sp_testing_round_f16(tier.c_str(), y.data(), (int64_t)y.size()));
        return y;
    });
    t.def("max_f32", [](const std::string &tier, F32Vec x) {
        float mx = 0;
        bool bad = false;
        check(sp_testing_max_f32(tier.c_str(), x.data(), (int64_t)x.shape(0), &mx, &bad));
        return std::make_pair(mx, bad);
    });
    t.def("f32_to_f16", [](const std::string &tier, F32Vec x) {
        std::vector<uint16_t> y(x.shape(0));
        check(sp_testing_f32_to_f16(tier.c_str(), y.data(), x.data(), (int64_t)y.size()));
        return y;
    });
    // Validate a GGUF file: returns (status_name, message); ("SP_OK", "") when valid.
    t.def("gguf_validate", [](const std::string &path, bool use_mmap) {
        sp_status s;
        {
            nb::gil_scoped_release r;
            s = sp_testing_gguf_validate(path.c_str(), use_mmap);
        }
        return status_pair(s);
    }, "path"_a, "use_mmap"_a = true);
    t.def("gguf_validate_bytes", [](nb::bytes data) {
        return status_pair(sp_testing_gguf_validate_memory(data.c_str(), data.size()));
    });
    // The distribution Sampler.sample would draw from for these logits (after the whole pipeline), float32 [V].
    t.def("sampler_probs", [](Sampler &self, F32Vec logits) {
        if ((int64_t)logits.shape(0) != self.n_vocab)
            throw SparrowError("SP_ERR_INVALID_ARG: logits must have n_vocab entries");
        return new_f32({(size_t)self.n_vocab}, [&](float *out) {
            check(sp_testing_sampler_probs(self.get(), logits.data(), out));
        });
    });

    // The tokenizer straight from a GGUF file (no model load): tests compare it with llama.cpp.
    struct TestVocab {
        sp_testing_vocab *v = nullptr;
        explicit TestVocab(const std::string &path) { check(sp_testing_vocab_open(path.c_str(), &v)); }
        ~TestVocab() { sp_testing_vocab_close(v); }
    };
    nb::class_<TestVocab>(t, "Vocab")
        .def(nb::init<const std::string &>(), "path"_a)
        .def("tokenize", [](const TestVocab &self, nb::bytes text, bool add_special, bool parse_special) {
            const char *p = text.c_str();
            const size_t len = text.size();
            std::vector<int32_t> out(len + 8);
            size_t n = 0;
            sp_status s;
            {
                nb::gil_scoped_release r;
                s = sp_testing_vocab_tokenize(self.v, p, len, add_special, parse_special, out.data(), out.size(), &n);
                if (s == SP_ERR_INVALID_ARG && n > out.size()) {
                    out.resize(n);
                    s = sp_testing_vocab_tokenize(self.v, p, len, add_special, parse_special, out.data(), out.size(),
                                                  &n);
                }
            }
            check(s);
            out.resize(n);
            return out;
        }, "text"_a, "add_special"_a = true, "parse_special"_a = false)
        // (status name, n_out, tokens written) with an explicit capacity, for the capacity contract.
        .def("tokenize_capacity", [](const TestVocab &self, nb::bytes text, bool add_special, bool parse_special,
                                     size_t capacity) {
            std::vector<int32_t> out(capacity + 4, -7);
            size_t n = 0;
            sp_status s = sp_testing_vocab_tokenize(self.v, text.c_str(), text.size(), add_special, parse_special,
                                                    capacity ? out.data() : nullptr, capacity, &n);
            return std::make_pair(std::string(sp_status_string(s)), std::make_pair(n, out));
        })
        .def("token_to_piece", [](const TestVocab &self, int32_t token, bool render_special) {
            char buf[256];
            size_t n = 0;
            sp_status s = sp_testing_vocab_token_to_piece(self.v, token, render_special, buf, sizeof buf, &n);
            if (s == SP_ERR_INVALID_ARG && n > sizeof buf) {
                std::string big(n, '\0');
                check(sp_testing_vocab_token_to_piece(self.v, token, render_special, big.data(), n, &n));
                return nb::bytes(big.data(), n);
            }
            check(s);
            return nb::bytes(buf, n);
        }, "token"_a, "render_special"_a = false)
        .def("piece_capacity", [](const TestVocab &self, int32_t token, bool render_special, size_t capacity) {
            std::string buf(capacity + 4, '#');
            size_t n = 0;
            sp_status s = sp_testing_vocab_token_to_piece(self.v, token, render_special,
                                                          capacity ? buf.data() : nullptr, capacity, &n);
            return std::make_pair(std::string(sp_status_string(s)), std::make_pair(n, nb::bytes(buf.data(), buf.size())));
        })
        .def_prop_ro("n_tokens", [](const TestVocab &self) { return sp_testing_vocab_n_tokens(self.v); })
        .def_prop_ro("bos", [](const TestVocab &self) { return sp_testing_vocab_bos(self.v); })
        .def_prop_ro("eos", [](const TestVocab &self) { return sp_testing_vocab_eos(self.v); })
        .def_prop_ro("eot", [](const TestVocab &self) { return sp_testing_vocab_eot(self.v); })
        .def_prop_ro("add_bos", [](const TestVocab &self) { return sp_testing_vocab_add_bos(self.v); })
        .def("is_eog", [](const TestVocab &self, int32_t token) { return sp_testing_vocab_is_eog(self.v, token); });
    // One-shot: tokenize with the vocabulary of a GGUF file.
    t.def("tokenize", [](const std::string &path, nb::bytes text, bool add_special, bool parse_special) {
        TestVocab voc(path);
        std::vector<int32_t> out(text.size() * 3 + 8);
        size_t n = 0;
        check(sp_testing_vocab_tokenize(voc.v, text.c_str(), text.size(), add_special, parse_special, out.data(),
                                        out.size(), &n));
        out.resize(n);
        return out;
    }, "path"_a, "text"_a, "add_special"_a = true, "parse_special"_a = false);
    // Load a vocabulary from a GGUF image in memory: (status name, message), for bad-metadata tests.
    t.def("vocab_validate_bytes", [](nb::bytes data) {
        return status_pair(sp_testing_vocab_validate_memory(data.c_str(), data.size()));
    });
    // Load-time weight packing (kernels.h packed_size/pack/matmul_packed): the packed size (0 = the tier does not
    // pack this type/shape), the packed bytes, and y[T, N] computed from them for rows [r0, r1) (r1 = -1: N; other
    // rows of y are 0). r0 must be a multiple of the tier's pack_rows, r1 too unless it is N.
    t.def("pack_rows", [](const std::string &tier) {
        int32_t n = 0;
        check(sp_testing_pack_rows(tier.c_str(), &n));
        return n;
    });
    t.def("packed_size", [](const std::string &tier, uint32_t type, int64_t N, int64_t K) {
        size_t n = 0;
        check(sp_testing_packed_size(tier.c_str(), type, N, K, &n));
        return n;
    });
    t.def("pack", [](const std::string &tier, uint32_t type, nb::bytes w, int64_t N, int64_t K) {
        size_t n = 0;
        check(sp_testing_packed_size(tier.c_str(), type, N, K, &n));
        std::string out(n, '\0');
        check(sp_testing_pack(tier.c_str(), type, w.c_str(), w.size(), N, K, out.data()));
        return nb::bytes(out.data(), out.size());
    });
    t.def("matmul_packed", [](const std::string &tier, uint32_t type, nb::bytes w, int64_t N, F32Rows x, int64_t r0,
                              int64_t r1) {
        return new_f32({x.shape(0), (size_t)std::max<int64_t>(N, 0)}, [&](float *y) {
            check(sp_testing_matmul_packed(tier.c_str(), type, w.c_str(), w.size(), N, x.data(), (int64_t)x.shape(0),
                                           (int64_t)x.shape(1), r0, r1, y));
        });
    }, "tier"_a, "type"_a, "w"_a, "N"_a, "x"_a, "r0"_a = 0, "r1"_a = -1);
    // Benchmark hook: matmul_time on the packed copy of W (copies of the packed bytes, same spreading).
    t.def("matmul_packed_time", [matmul_time](const std::string &tier, uint32_t type, nb::bytes w, int64_t N,
                                              F32Rows x, int reps, int copies) {
        return matmul_time(tier, type, true, w, N, x, reps, copies);
    }, "tier"_a, "type"_a, "w"_a, "N"_a, "x"_a, "reps"_a, "copies"_a = 1);
}
