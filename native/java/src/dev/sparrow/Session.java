package dev.sparrow;

/**
 * The per-conversation state of a model (sp_session): KV cache, scratch buffers and worker threads. One thread at a
 * time: a second thread calling in meanwhile gets a SparrowException ("in use by another thread"). Closing it while a
 * generator of it is open frees it when that generator closes.
 */
public final class Session extends NativeResource {
    /** sp_session_params; the defaults come from sp_session_default_params(). */
    public static final class Params {
        /** KV cache capacity in tokens (0 = the model's training context). */
        public int nCtx;
        /** Max tokens per forward pass (a drafter's chain must fit: draftK < nBatch). */
        public int nBatch;
        /** Worker threads including the caller (default: physical cores). */
        public int nThreads;
        /** 0: the CPU (default); k = 1..deviceCount(): GPU device k (Vulkan; one sequence, grouped-query attention). */
        public int device;

        public Params() {
            Native.sessionDefaults(this);
        }

        public Params nCtx(int n) { nCtx = n; return this; }
        public Params nBatch(int n) { nBatch = n; return this; }
        public Params nThreads(int n) { nThreads = n; return this; }
        public Params device(int d) { device = d; return this; }
    }

    /** GPU devices a session can run on (numbered from 1; 0 without the Vulkan backend, loader or device). */
    public static int deviceCount() {
        return Native.deviceCount();
    }

    /** The name of GPU device k (1..deviceCount()). */
    public static String deviceName(int device) {
        return new String(Native.deviceName(device), java.nio.charset.StandardCharsets.UTF_8);
    }

    private final Model model;

    public Session(Model model, Params params) {
        super("Session", open(model, params), model);
        this.model = model;
    }

    private static long open(Model model, Params params) {
        if (params == null) throw new NullPointerException("params");
        long m = model.acquire();
        try {
            long h = Native.sessionNew(m, params);
            model.retain();
            return h;
        } finally {
            model.release();
        }
    }

    @Override
    void free(long handle) {
        Native.sessionFree(handle);
    }

    public Model model() {
        return model;
    }

    /** KV cache capacity in tokens. */
    public int nCtx() {
        long h = acquire();
        try {
            return Native.sessionNCtx(h);
        } finally {
            release();
        }
    }

    /** Tokens in the KV cache. */
    public int nPast() {
        long h = acquire();
        try {
            return Native.sessionNPast(h);
        } finally {
            release();
        }
    }

    /** Keeps the first n tokens of the KV cache. */
    public void truncate(int n) {
        long h = acquire();
        try {
            Native.sessionTruncate(h, n);
        } finally {
            release();
        }
    }
}
