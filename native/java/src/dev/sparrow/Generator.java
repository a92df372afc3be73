package dev.sparrow;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * The decode loop inside the library (sp_generator), with optional speculative decoding: prompt tokens in, tokens out,
 * pulled with next() or pushed to a callback with generate(). Greedy output (temperature &lt;= 0) is exactly plain
 * greedy decoding's, whatever the drafter.
 *
 * <pre>
 * Generator.Params p = new Generator.Params();
 * p.temperature = 0; p.maxTokens = 64; p.drafter = Drafter.PROMPT_LOOKUP;
 * try (Generator gen = new Generator(session, p)) {
 *     gen.start(model.tokenize("The capital of France is", true));
 *     for (int t = gen.next(); t >= 0; t = gen.next()) { ... }
 *     System.out.println(gen.stopReason());
 * }
 * </pre>
 * One thread at a time: a second thread calling in meanwhile gets a SparrowException ("in use by another thread").
 */
public final class Generator extends NativeResource {
    /** sp_generator_params; the defaults come from sp_generator_default_params(). */
    public static final class Params {
        /** Tokens per generation, &gt;= 0. */
        public int maxTokens;
        /** Sampling (sp_sampler_params): temperature &lt;= 0 is greedy; topK &lt;= 0, topP 1, minP 0 and
         *  repeatPenalty 1 are off. The seed is an unsigned 64-bit value in a long. */
        public float temperature, topP, minP, repeatPenalty;
        public int topK, repeatLastN;
        public long seed;
        /** End at an end-of-generation token, which is not returned. */
        public boolean stopAtEog;
        public Drafter drafter;
        /** PROMPT_LOOKUP: n-gram lengths tried, from ngram down to minNgram (1 &lt;= minNgram &lt;= ngram &lt;= 16),
         *  and tokens drafted per step (1 .. nBatch - 1). */
        public int ngram, minNgram, draftK;
        /** RECYCLING, HYBRID: candidates kept per token (1..32), children per node by depth (1..16 entries, each
         *  1..recyclingK, the last repeating; {1}: a chain), and nodes of the recycling tree (1 .. nBatch - 1). */
        public int recyclingK, maxNodes;
        public int[] branching;
        /** RECYCLING, HYBRID: prune each step's tree with the sparsity-aware planner (always on for ADAPTIVE). */
        public boolean plan;
        /** ADAPTIVE: plain steps before a probe after drafting paid, its cap, and how often Token Recycling learns
         *  from plain steps. */
        public int probeEvery, maxProbeEvery, learnEvery;
        /** DRAFT_MODEL: a session of a model with the target's vocabulary, not the target's session; the generator
         *  keeps it allocated until the generator closes, and nothing else should use it meanwhile. */
        public Session draftSession;
        /** Stop strings (at most 8, 1..64 UTF-8 bytes each): generation ends after the token that completes one. */
        public final List<String> stop = new ArrayList<>();

        public Params() {
            Native.generatorDefaults(this, -1);
        }

        /** The defaults with a drafter and its tuned settings (sp_generator_default_params_for). */
        public static Params forDrafter(Drafter drafter) {
            Params p = new Params();
            Native.generatorDefaults(p, drafter.value);
            return p;
        }

        public Params maxTokens(int n) { maxTokens = n; return this; }
        public Params temperature(float t) { temperature = t; return this; }
        public Params topK(int k) { topK = k; return this; }
        public Params topP(float p) { topP = p; return this; }
        public Params minP(float p) { minP = p; return this; }
        public Params repeatPenalty(float p) { repeatPenalty = p; return this; }
        public Params seed(long s) { seed = s; return this; }
        public Params stopAtEog(boolean b) { stopAtEog = b; return this; }
        public Params drafter(Drafter d) { drafter = d; return this; }
        public Params promptLookup(int ngram, int minNgram, int draftK) {
            drafter = Drafter.PROMPT_LOOKUP;
            this.ngram = ngram;
            this.minNgram = minNgram;
            this.draftK = draftK;
            return this;
        }
        public Params recycling(int recyclingK, int maxNodes, int... branching) {
            drafter = Drafter.RECYCLING;
            this.recyclingK = recyclingK;
            this.maxNodes = maxNodes;
            this.branching = branching.clone();
            return this;
        }
        public Params draftModel(Session draftSession, int draftK) {
            drafter = Drafter.DRAFT_MODEL;
            this.draftSession = draftSession;
            this.draftK = draftK;
            return this;
        }
        public Params stop(String s) { stop.add(s); return this; }
    }

    /** sp_generator_stats since creation (or resetStats). */
    public static final class Stats {
        public long steps, drafted, accepted, tokens, promptTokens;
        public double evalSeconds, loopSeconds;
        /** Of loopSeconds: the draft model's forward passes (DRAFT_MODEL). */
        public double draftEvalSeconds;
        /** Of steps: those the ADAPTIVE gate ran plain (no draft). */
        public long plainSteps;

        Stats() {}

        @Override
        public String toString() {
            return "Stats{steps=" + steps + ", drafted=" + drafted + ", accepted=" + accepted + ", tokens=" + tokens
                    + ", promptTokens=" + promptTokens + ", evalSeconds=" + evalSeconds + ", loopSeconds="
                    + loopSeconds + ", draftEvalSeconds=" + draftEvalSeconds + ", plainSteps=" + plainSteps + "}";
        }
    }

    private volatile StopReason stop = StopReason.RUNNING;

    /** Fails with SparrowException (nothing allocated) on bad params. The params are copied: later changes to them
     *  do not reach this generator. */
    public Generator(Session session, Params params) {
        this(session, params, params.draftSession);  // read once: the reference taken is the one released
    }

    private Generator(Session session, Params params, Session draft) {
        super("Generator", open(session, params, draft), session, draft);
    }

    private static long open(Session session, Params params, Session draft) {
        byte[][] stops = new byte[params.stop.size()][];
        for (int i = 0; i < stops.length; i++) {
            stops[i] = params.stop.get(i).getBytes(StandardCharsets.UTF_8);
        }
        long s = session.acquire();
        try {
            long d = draft != null ? draft.acquire() : 0;
            try {
                long h = Native.generatorNew(s, params, stops, d);
                session.retain();
                if (draft != null) draft.retain();
                return h;
            } finally {
                if (draft != null) draft.release();
            }
        } finally {
            session.release();
        }
    }

    @Override
    void free(long handle) {
        Native.generatorFree(handle);
    }

    /** Begins a generation from prompt (at least one token), reusing the prefix this generator left in the cache. */
    public void start(int[] prompt) {
        long h = acquire();
        try {
            Native.generatorStart(h, prompt);
            stop = StopReason.RUNNING;
        } finally {
            release();
        }
    }

    /** The next token, or -1 once the generation has ended (then stopReason() says why). */
    public int next() {
        long h = acquire();
        try {
            int r = Native.generatorNext(h);
            if (r >= 0) return r;
            stop = StopReason.fromValue(-r);
            return -1;
        } finally {
            release();
        }
    }

    /**
     * Runs the generation to its end, passing each token to cb (null: none) until it returns false. An exception
     * thrown by cb stops the generation and is rethrown here. The callback must not close this generator.
     */
    public StopReason generate(TokenCallback cb) {
        long h = acquire();
        try {
            stop = StopReason.fromValue(Native.generate(h, cb));
            return stop;
        } catch (SparrowException e) {
            throw e;
        } catch (RuntimeException | Error e) {  // thrown by the callback, which stopped the generation
            stop = StopReason.CALLBACK;
            throw e;
        } finally {
            release();
        }
    }

    /** RUNNING until next() returned -1 or generate() returned. */
    public StopReason stopReason() {
        acquire();
        release();
        return stop;
    }

    public Stats stats() {
        Stats s = new Stats();
        long h = acquire();
        try {
            Native.generatorStats(h, s);
            return s;
        } finally {
            release();
        }
    }

    public void resetStats() {
        long h = acquire();
        try {
            Native.generatorResetStats(h);
        } finally {
            release();
        }
    }

    /** Writes Token Recycling's matrix (RECYCLING, HYBRID) to a .npy file (int32 [nVocab, recyclingK]). */
    public void saveDrafter(String path) {
        byte[] p = path.getBytes(StandardCharsets.UTF_8);
        long h = acquire();
        try {
            Native.generatorSaveDrafter(h, p);
        } finally {
            release();
        }
    }

    /** Reads a matrix saveDrafter (or runtime/drafters.py) wrote; a bad file leaves the current one unchanged. */
    public void loadDrafter(String path) {
        byte[] p = path.getBytes(StandardCharsets.UTF_8);
        long h = acquire();
        try {
            Native.generatorLoadDrafter(h, p);
        } finally {
            release();
        }
    }

    /** Every token of the current generation so far: the prompt, then the generated tokens. */
    public int[] context() {
        long h = acquire();
        try {
            return Native.generatorContext(h);
        } finally {
            release();
        }
    }
}
