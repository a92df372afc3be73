package dev.sparrow;

import java.nio.charset.StandardCharsets;

/**
 * Weights and vocabulary of a GGUF model (sp_model): immutable, shareable by sessions and threads.
 *
 * <pre>
 * try (Model model = Model.load("model.gguf")) { ... }
 * </pre>
 * Closing it while sessions are open is allowed: the model cannot be used any more, and its memory is freed when the
 * last of its sessions closes (see NativeResource).
 */
public final class Model extends NativeResource {
    /** sp_model_params; the defaults come from sp_model_default_params(). */
    public static final class Params {
        public boolean useMmap;
        public boolean vocabOnly;
        public boolean repack;

        public Params() {
            Native.modelDefaults(this);
        }
    }

    /** A copy of sp_model_info, taken at load. */
    public static final class Info {
        public String architecture;
        public String name;
        public int nVocab, nCtxTrain, nEmbd, nLayer, nHead, nHeadKv, nFf;
        public int bosToken, eosToken, eotToken;  // -1 if none
        public boolean addBos;
        public long nParams, weightBytes;

        Info() {}
    }

    private final Info info = new Info();

    private Model(long handle) {
        super("Model", handle);
        Native.modelInfo(handle, info);
        info.architecture = utf8(Native.modelString(handle, 0));
        info.name = utf8(Native.modelString(handle, 1));
    }

    public static Model load(String path) {
        return load(path, new Params());
    }

    /** Loads a GGUF file; a missing or bad file throws SparrowException with the library's message. */
    public static Model load(String path, Params params) {
        if (path == null || params == null) throw new NullPointerException("path and params are required");
        long handle = Native.modelLoad(path.getBytes(StandardCharsets.UTF_8), params);
        try {
            return new Model(handle);
        } catch (RuntimeException | Error e) {
            Native.modelFree(handle);
            throw e;
        }
    }

    /** The library version, "MAJOR.MINOR.PATCH". */
    public static String libraryVersion() {
        return Native.version();
    }

    @Override
    void free(long handle) {
        Native.modelFree(handle);
    }

    public Info info() {
        acquire();
        release();
        return info;
    }

    public int nVocab() {
        return info().nVocab;
    }

    public int nCtxTrain() {
        return info().nCtxTrain;
    }

    public String name() {
        return info().name;
    }

    /**
     * The tokens of text. addSpecial prepends BOS when the vocabulary asks for it. Control-token markup in the text
     * ("&lt;|im_start|&gt;") is tokenized as plain characters, never turned into control tokens
     * (parse_special = false): user text cannot forge them.
     */
    public int[] tokenize(String text, boolean addSpecial) {
        byte[] bytes = text.getBytes(StandardCharsets.UTF_8);
        long h = acquire();
        try {
            return Native.tokenize(h, bytes, addSpecial);
        } finally {
            release();
        }
    }

    /** The raw bytes of a token's text: may be part of a UTF-8 sequence (see Utf8Stream). Control tokens give none. */
    public byte[] tokenBytes(int token) {
        return tokenBytes(token, false);
    }

    public byte[] tokenBytes(int token, boolean renderSpecial) {
        long h = acquire();
        try {
            return Native.tokenPiece(h, token, renderSpecial);
        } finally {
            release();
        }
    }

    /** The text of tokens, their bytes decoded as UTF-8 (invalid sequences become U+FFFD). */
    public String detokenize(int[] tokens) {
        long h = acquire();
        try {
            return utf8(Native.detokenize(h, tokens, false));
        } finally {
            release();
        }
    }

    /** End of generation (eos, eot, ...). */
    public boolean isEog(int token) {
        long h = acquire();
        try {
            return Native.isEog(h, token);
        } finally {
            release();
        }
    }

    /** A new session on this model (the same as new Session(this, params)). */
    public Session newSession(Session.Params params) {
        return new Session(this, params);
    }

    static String utf8(byte[] bytes) {
        return new String(bytes, StandardCharsets.UTF_8);
    }
}
