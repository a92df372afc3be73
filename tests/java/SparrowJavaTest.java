import dev.sparrow.Drafter;
import dev.sparrow.Generator;
import dev.sparrow.Model;
import dev.sparrow.Session;
import dev.sparrow.SparrowException;
import dev.sparrow.StopReason;
import dev.sparrow.Utf8Stream;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

/**
 * The Java binding driven by tests/test_java.py. Input file (one item a line):
 *   model KEY PATH | drafters KEY DRAFTER... | ntokens N | workdir PATH | prompt KEY TOKEN... | text HEX(UTF-8)
 * Output (stdout), checked by the Python side:
 *   info KEY n_vocab n_ctx_train HEX(name)
 *   gen KEY DRAFTER INDEX STOP TOKEN...   greedy tokens of each prompt, per drafter
 *   npy PATH                              Token Recycling's matrix as saved
 *   stats KEY DRAFTER steps drafted accepted tokens
 *   tok KEY INDEX TOKEN...                Model.tokenize(text, true) of each text
 *   badpath STATUS HEX(getMessage(): "STATUS: message") HEX(path)
 *   check NAME ok | check NAME FAIL reason
 *   time NAME SECONDS
 */
public final class SparrowJavaTest {
    static final Map<String, String> models = new LinkedHashMap<>();
    static final Map<String, List<int[]>> prompts = new LinkedHashMap<>();
    static final List<String> texts = new ArrayList<>();
    static final Map<String, List<String>> drafters = new LinkedHashMap<>();
    static String workdir;
    static int nTokens = 16;

    interface Check {
        void run() throws Exception;
    }

    static void check(String name, Check c) {
        long t0 = System.nanoTime();
        try {
            c.run();
            System.out.println("check " + name + " ok");
        } catch (Throwable t) {
            System.out.println("check " + name + " FAIL " + t.toString().replace('\n', ' '));
        }
        System.out.printf("time %s %.2f%n", name, (System.nanoTime() - t0) / 1e9);
    }

    static void require(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    /** Runs r and requires it to throw IllegalStateException. */
    static void closedThrows(String what, Runnable r) {
        try {
            r.run();
        } catch (IllegalStateException e) {
            return;
        }
        throw new AssertionError(what + ": no IllegalStateException after close");
    }

    static String hex(byte[] b) {
        StringBuilder s = new StringBuilder();
        for (byte x : b) s.append(String.format("%02x", x & 0xFF));
        return s.length() == 0 ? "-" : s.toString();
    }

    static byte[] unhex(String h) {
        byte[] b = new byte[h.length() / 2];
        for (int i = 0; i < b.length; i++) b[i] = (byte) Integer.parseInt(h.substring(2 * i, 2 * i + 2), 16);
        return b;
    }

    static String join(int[] t) {
        StringBuilder s = new StringBuilder();
        for (int x : t) s.append(' ').append(x);
        return s.toString();
    }

    static Session.Params sessionParams() {
        return new Session.Params().nCtx(512).nThreads(2);
    }

    static Generator.Params greedy(Drafter d) {
        return new Generator.Params().temperature(0).maxTokens(nTokens).drafter(d);
    }

    /** Pulls a whole generation with next(). */
    static int[] pull(Generator gen, int[] prompt) {
        gen.start(prompt);
        List<Integer> out = new ArrayList<>();
        for (int t = gen.next(); t >= 0; t = gen.next()) out.add(t);
        int[] a = new int[out.size()];
        for (int i = 0; i < a.length; i++) a[i] = out.get(i);
        return a;
    }

    public static void main(String[] args) throws Exception {
        for (String line : Files.readAllLines(Paths.get(args[0]), StandardCharsets.UTF_8)) {
            String[] f = line.trim().split(" ");
            if (f[0].equals("model")) models.put(f[1], f[2]);
            else if (f[0].equals("ntokens")) nTokens = Integer.parseInt(f[1]);
            else if (f[0].equals("workdir")) workdir = f[1];
            else if (f[0].equals("drafters")) drafters.put(f[1], java.util.Arrays.asList(f).subList(2, f.length));
            else if (f[0].equals("text")) texts.add(new String(unhex(f[1]), StandardCharsets.UTF_8));
            else if (f[0].equals("prompt")) {
                int[] t = new int[f.length - 2];
                for (int i = 0; i < t.length; i++) t[i] = Integer.parseInt(f[i + 2]);
                prompts.computeIfAbsent(f[1], k -> new ArrayList<>()).add(t);
            }
        }
        for (Map.Entry<String, String> m : models.entrySet()) {
            long t0 = System.nanoTime();
            greedyRuns(m.getKey(), m.getValue());
            System.out.printf("time greedy_%s %.2f%n", m.getKey(), (System.nanoTime() - t0) / 1e9);
        }
        String smollm = models.getOrDefault("smollm", models.get("tiny"));
        String key = models.containsKey("smollm") ? "smollm" : "tiny";
        check("emoji_round_trip", () -> emoji(smollm));
        check("utf8_stream_bytewise", SparrowJavaTest::utf8Bytewise);
        check("use_after_close", () -> useAfterClose(smollm));
        check("model_closed_before_session", () -> modelClosedFirst(smollm, prompts.get(key).get(0)));
        badPath();
        check("callback_stop", () -> callbackStop(smollm, prompts.get(key).get(0)));
        check("callback_throws", () -> callbackThrows(smollm, prompts.get(key).get(0)));
        check("stop_string", () -> stopString(smollm, prompts.get(key).get(0)));
        check("bad_params", () -> badParams(smollm));
        check("two_threads_one_generator", () -> twoThreads(smollm, prompts.get(key).get(1)));
        check("close_while_generating", () -> closeRace(smollm, prompts.get(key).get(2)));
        System.out.println("devices " + Session.deviceCount());
        check("gpu_session", () -> gpuSession(models.get("tiny"), prompts.get("tiny")));
        System.out.println("done");
    }

    /** A session on GPU device 1 (when there is one): prompt lookup's greedy tokens equal plain greedy decoding's on
     *  the same device, for the first prompts; a device that does not exist is a SparrowException. */
    static void gpuSession(String path, List<int[]> ps) {
        if (Session.deviceCount() > 0) {
            require(!Session.deviceName(1).isEmpty(), "device 1 has a name");
            try (Model model = Model.load(path); Session gpu = new Session(model, sessionParams().device(1))) {
                for (int i = 0; i < 4; i++) {
                    int[] plain, drafted;
                    gpu.truncate(0);
                    try (Generator g = new Generator(gpu, greedy(Drafter.NONE))) { plain = pull(g, ps.get(i)); }
                    gpu.truncate(0);
                    try (Generator g = new Generator(gpu, greedy(Drafter.PROMPT_LOOKUP))) { drafted = pull(g, ps.get(i)); }
                    require(java.util.Arrays.equals(plain, drafted), "prompt lookup on the GPU equals plain decoding");
                }
            }
        }
        try (Model model = Model.load(path)) {
            new Session(model, sessionParams().device(99)).close();
            throw new AssertionError("device 99 accepted");
        } catch (SparrowException e) {
            require(e.getMessage().contains("device 99"), "device 99's error names it: " + e.getMessage());
        }
    }

    static void greedyRuns(String key, String path) {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams())) {
            Model.Info info = model.info();
            System.out.println("info " + key + " " + model.nVocab() + " " + model.nCtxTrain() + " "
                    + hex(model.name().getBytes(StandardCharsets.UTF_8)) + " " + info.architecture);
            for (int i = 0; i < texts.size(); i++) System.out.println("tok " + key + " " + i + join(model.tokenize(texts.get(i), true)));
            for (String d : drafters.get(key)) {
                Session draft = d.equals("DRAFT_MODEL") ? new Session(model, sessionParams()) : null;
                try (Generator gen = new Generator(session, drafterParams(d, draft))) {
                    if (draft != null) draft.close();  // the generator keeps it until it closes
                    List<int[]> ps = prompts.get(key);
                    for (int i = 0; i < ps.size(); i++) {
                        session.truncate(0);
                        int[] got = pull(gen, ps.get(i));
                        System.out.println("gen " + key + " " + d + " " + i + " " + gen.stopReason() + join(got));
                    }
                    Generator.Stats s = gen.stats();
                    System.out.println("stats " + key + " " + d + " " + s.steps + " " + s.drafted + " " + s.accepted
                            + " " + s.tokens);
                    if (d.equals("RECYCLING")) check("drafter_file_" + key, () -> drafterFile(gen, session));
                }
            }
        }
    }

    /** Greedy params for a drafter by name (trees for the recycling ones; a draft model of the same weights). */
    static Generator.Params drafterParams(String name, Session draft) {
        Drafter d = Drafter.valueOf(name);
        switch (d) {
            case RECYCLING:
                return greedy(d).recycling(8, 8, 2, 2, 1);
            case HYBRID:
                return greedy(d).recycling(8, 6, 2, 1).drafter(Drafter.HYBRID);
            case DRAFT_MODEL:
                return greedy(d).draftModel(draft, 4);
            case ADAPTIVE:  // the tuned defaults (a lookup chain and a planned recycling tree behind the gate)
                return Generator.Params.forDrafter(d).temperature(0).maxTokens(nTokens);
            default:
                return greedy(d);
        }
    }

    /** Token Recycling's matrix saved, loaded into another generator; bad files and other drafters refused. */
    static void drafterFile(Generator gen, Session session) throws Exception {
        String path = workdir + "/recycling.npy";
        gen.saveDrafter(path);
        System.out.println("npy " + path);
        try (Generator other = new Generator(session, drafterParams("RECYCLING", null));
             Generator plain = new Generator(session, greedy(Drafter.NONE))) {
            other.loadDrafter(path);
            try {
                other.loadDrafter(workdir + "/input.txt");
                throw new AssertionError("a text file loaded as a matrix");
            } catch (SparrowException e) {
                require(!e.status().equals("SP_OK"), e.toString());
            }
            expectInvalid("saveDrafter without recycling", () -> plain.saveDrafter(workdir + "/none.npy"));
            require(!Files.exists(Paths.get(workdir, "none.npy")), "a file written for a generator without recycling");
        }
    }

    static void emoji(String path) {
        String text = "héllo 👋 世界";
        try (Model model = Model.load(path)) {
            int[] toks = model.tokenize(text, false);
            String back = model.detokenize(toks);
            require(back.equals(text), "detokenize gave " + back);
            Utf8Stream stream = new Utf8Stream();
            StringBuilder out = new StringBuilder();
            int partial = 0;
            for (int t : toks) {
                byte[] piece = model.tokenBytes(t);
                if (Utf8StreamProbe.endsInside(piece)) partial++;
                String s = stream.push(piece);
                require(s.indexOf('\uFFFD') < 0, "a streamed chunk holds U+FFFD");
                out.append(s);
            }
            out.append(stream.finish());
            require(out.toString().equals(text), "streamed " + out);
            System.out.println("emoji_tokens " + toks.length + " partial_pieces " + partial);
        }
    }

    static final class Utf8StreamProbe {
        /** Whether the piece's own bytes are not valid UTF-8 on their own (a character split over tokens). */
        static boolean endsInside(byte[] piece) {
            String s = new String(piece, StandardCharsets.UTF_8);
            return s.indexOf('\uFFFD') >= 0;
        }
    }

    static void utf8Bytewise() {
        String text = "aé€👋z";
        byte[] b = text.getBytes(StandardCharsets.UTF_8);
        Utf8Stream stream = new Utf8Stream();
        StringBuilder out = new StringBuilder();
        for (byte x : b) {
            String s = stream.push(new byte[] {x});
            require(s.indexOf('\uFFFD') < 0, "bytewise chunk holds U+FFFD");
            out.append(s);
        }
        out.append(stream.finish());
        require(out.toString().equals(text), "bytewise gave " + out);
        Utf8Stream bad = new Utf8Stream();  // invalid bytes come out as U+FFFD, an unfinished tail at finish()
        require(bad.push(new byte[] {(byte) 0xFF, 'a'}).equals("\uFFFDa"), "invalid byte");
        require(bad.push(new byte[] {(byte) 0xF0, (byte) 0x9F}).isEmpty(), "held back");
        require(bad.finish().equals("\uFFFD"), "unfinished tail at finish");
    }

    static void useAfterClose(String path) {
        Model model = Model.load(path);
        Session session = new Session(model, sessionParams());
        Generator gen = new Generator(session, greedy(Drafter.NONE));
        gen.close();
        gen.close();  // again: nothing
        closedThrows("Generator.next", gen::next);
        closedThrows("Generator.start", () -> gen.start(new int[] {1}));
        closedThrows("Generator.generate", () -> gen.generate(null));
        closedThrows("Generator.stats", gen::stats);
        closedThrows("Generator.stopReason", gen::stopReason);
        session.close();
        closedThrows("Session.nPast", session::nPast);
        closedThrows("Session.truncate", () -> session.truncate(0));
        closedThrows("new Generator(closed session)", () -> new Generator(session, greedy(Drafter.NONE)));
        model.close();
        closedThrows("Model.tokenize", () -> model.tokenize("x", true));
        closedThrows("Model.nVocab", model::nVocab);
        closedThrows("Model.tokenBytes", () -> model.tokenBytes(0));
        closedThrows("Model.detokenize", () -> model.detokenize(new int[] {0}));
        closedThrows("new Session(closed model)", () -> new Session(model, sessionParams()));
        require(model.isClosed() && session.isClosed() && gen.isClosed(), "isClosed");
    }

    /** Closing the model first is allowed: its memory stays until the session (and its generator) close. */
    static void modelClosedFirst(String path, int[] prompt) {
        int[] ref;
        try (Model model = Model.load(path); Session s = new Session(model, sessionParams());
             Generator g = new Generator(s, greedy(Drafter.NONE))) {
            ref = pull(g, prompt);
        }
        Model model = Model.load(path);
        Session session = new Session(model, sessionParams());
        model.close();
        closedThrows("Model.tokenize after close", () -> model.tokenize("x", true));
        Generator gen = new Generator(session, greedy(Drafter.PROMPT_LOOKUP));
        session.close();  // the generator still holds it
        require(java.util.Arrays.equals(pull(gen, prompt), ref), "generation after the model and session closed");
        gen.close();  // frees the generator, then the session, then the model
    }

    static void badPath() {
        String path = "/nonexistent/dïr 👋/model.gguf";
        try {
            Model.load(path).close();
            System.out.println("check bad_path FAIL no exception");
        } catch (SparrowException e) {
            System.out.println("badpath " + e.status() + " " + hex(e.getMessage().getBytes(StandardCharsets.UTF_8)) + " "
                    + hex(path.getBytes(StandardCharsets.UTF_8)));
        }
        check("nul_in_path", () -> {
            try {
                Model.load("/tmp/a\0b.gguf").close();
                throw new AssertionError("no exception");
            } catch (SparrowException e) {
                require(e.status().equals("SP_ERR_INVALID_ARG"), e.status());
            }
        });
    }

    static void callbackStop(String path, int[] prompt) {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams());
             Generator gen = new Generator(session, greedy(Drafter.PROMPT_LOOKUP))) {
            int[] ref = pull(gen, prompt);
            List<Integer> seen = new ArrayList<>();
            gen.start(prompt);
            StopReason r = gen.generate(t -> {
                seen.add(t);
                return seen.size() < 3;
            });
            require(r == StopReason.CALLBACK && gen.stopReason() == StopReason.CALLBACK, "stop reason " + r);
            require(seen.size() == 3, "callback saw " + seen.size() + " tokens");
            for (int i = 0; i < 3; i++) require(seen.get(i) == ref[i], "token " + i);
            require(gen.next() == -1, "next() after the end");
            gen.start(prompt);  // to the end with no callback: the same tokens as pulled
            require(gen.generate(null) == StopReason.MAX_TOKENS, "generate(null)");
            int[] ctx = gen.context();
            require(java.util.Arrays.equals(java.util.Arrays.copyOfRange(ctx, prompt.length, ctx.length), ref),
                    "context after generate(null)");
        }
    }

    static void callbackThrows(String path, int[] prompt) {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams());
             Generator gen = new Generator(session, greedy(Drafter.NONE))) {
            gen.start(prompt);
            try {
                gen.generate(t -> {
                    throw new IllegalArgumentException("from the callback");
                });
                throw new AssertionError("the callback's exception was lost");
            } catch (IllegalArgumentException e) {
                require(e.getMessage().equals("from the callback"), e.getMessage());
            }
            require(gen.stopReason() == StopReason.CALLBACK, "stop reason " + gen.stopReason());
            AtomicReference<Throwable> inside = new AtomicReference<>();
            gen.start(prompt);
            gen.generate(t -> {  // closing from inside its own call is refused, not a deadlock
                try {
                    gen.close();
                } catch (Throwable e) {
                    inside.set(e);
                }
                return false;
            });
            require(inside.get() instanceof IllegalStateException, "close inside the callback: " + inside.get());
            require(!gen.isClosed(), "closed from inside");
            gen.start(prompt);  // the generator from inside its own callback: refused by the library
            try {
                gen.generate(t -> gen.next() >= 0);
                throw new AssertionError("next() inside the callback was accepted");
            } catch (SparrowException e) {
                require(e.status().equals("SP_ERR_INVALID_ARG"), e.toString());
            }
            gen.start(prompt);  // the session's cache changed behind the generator's back: an error, or nothing
            try {
                gen.generate(t -> {
                    session.truncate(0);
                    return true;
                });
            } catch (SparrowException e) {
                // the generator noticed
            }
            session.truncate(0);
            require(pull(gen, prompt).length > 0, "the generator after a failed generation");
        }
    }

    static void stopString(String path, int[] prompt) {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams())) {
            int[] ref;
            try (Generator g = new Generator(session, greedy(Drafter.NONE))) {
                ref = pull(g, prompt);
            }
            int k = -1;  // the first generated token with printable text: stop on its text
            for (int i = 0; i < ref.length && k < 0; i++) {
                String s = new String(model.tokenBytes(ref[i]), StandardCharsets.UTF_8).trim();
                if (!s.isEmpty() && s.indexOf('\uFFFD') < 0) k = i;
            }
            require(k >= 0, "no printable token in " + join(ref));
            String stop = new String(model.tokenBytes(ref[k]), StandardCharsets.UTF_8).trim();
            try (Generator g = new Generator(session, greedy(Drafter.PROMPT_LOOKUP).stop(stop))) {
                int[] got = pull(g, prompt);
                require(g.stopReason() == StopReason.STOP_STRING, "stop reason " + g.stopReason());
                require(got.length <= k + 1, "went past the stop string");
                require(java.util.Arrays.equals(got, java.util.Arrays.copyOf(ref, got.length)), "tokens");
                require(model.detokenize(got).endsWith(stop), "text does not end with the stop string");
            }
        }
    }

    static void badParams(String path) {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams())) {
            expectInvalid("draftK 0", () -> new Generator(session, greedy(Drafter.NONE).promptLookup(3, 2, 0)));
            expectInvalid("drafter null", () -> new Generator(session, greedy(null)));
            Generator.Params many = greedy(Drafter.NONE);
            for (int i = 0; i < 9; i++) many.stop("s" + i);
            expectInvalid("9 stop strings", () -> new Generator(session, many));
            expectInvalid("empty stop string", () -> new Generator(session, greedy(Drafter.NONE).stop("")));
            expectInvalid("nCtx < 0", () -> new Session(model, sessionParams().nCtx(-5)));
            try (Generator g = new Generator(session, greedy(Drafter.NONE))) {
                expectInvalid("empty prompt", () -> g.start(new int[0]));
                expectInvalid("token outside the vocabulary", () -> g.start(new int[] {1, model.nVocab() + 7}));
                expectInvalid("tokenBytes outside", () -> model.tokenBytes(-3));
            }
        }
    }

    static void expectInvalid(String what, Runnable r) {
        try {
            r.run();
        } catch (SparrowException e) {
            require(e.status().equals("SP_ERR_INVALID_ARG") || e.status().equals("SP_ERR_CONTEXT_FULL"),
                    what + ": " + e);
            return;
        }
        throw new AssertionError(what + ": accepted");
    }

    /** Two threads pulling from one generator: the C library refuses the one that comes while the other is inside. */
    static void twoThreads(String path, int[] prompt) throws Exception {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams());
             Generator gen = new Generator(session, greedy(Drafter.NONE).maxTokens(32).stopAtEog(false))) {
            AtomicInteger refused = new AtomicInteger(), tokens = new AtomicInteger();
            AtomicReference<Throwable> other = new AtomicReference<>();
            for (int round = 0; round < 3; round++) {
                gen.start(prompt);
                CountDownLatch go = new CountDownLatch(1);
                Thread[] th = new Thread[2];
                for (int i = 0; i < 2; i++) {
                    th[i] = new Thread(() -> {
                        try {
                            go.await();
                            while (true) {
                                try {
                                    if (gen.next() < 0) return;
                                    tokens.incrementAndGet();
                                } catch (SparrowException e) {
                                    if (!e.status().equals("SP_ERR_INVALID_ARG")
                                            || !e.getMessage().contains("in use by another thread")) throw e;
                                    refused.incrementAndGet();
                                    Thread.sleep(1);  // the other thread is inside: let it work
                                }
                            }
                        } catch (Throwable t) {
                            other.compareAndSet(null, t);
                        }
                    });
                    th[i].start();
                }
                go.countDown();
                for (Thread t : th) t.join();
            }
            require(other.get() == null, "unexpected: " + other.get());
            require(tokens.get() == 3 * 32, "tokens " + tokens.get());
            System.out.println("threads refused " + refused.get() + " tokens " + tokens.get());
        }
    }

    /** close() from another thread while generating: it waits for the call in flight; later calls throw. */
    static void closeRace(String path, int[] prompt) throws Exception {
        try (Model model = Model.load(path); Session session = new Session(model, sessionParams())) {
            for (int round = 0; round < 3; round++) {
                Generator gen = new Generator(session, greedy(Drafter.PROMPT_LOOKUP).maxTokens(100).stopAtEog(false));
                AtomicReference<Throwable> failure = new AtomicReference<>();
                AtomicInteger n = new AtomicInteger();
                session.truncate(0);
                gen.start(prompt);
                Thread user = new Thread(() -> {
                    try {
                        while (gen.next() >= 0) n.incrementAndGet();
                    } catch (IllegalStateException e) {
                        // closed under it: expected
                    } catch (Throwable t) {
                        failure.set(t);
                    }
                });
                user.start();
                while (n.get() < 2 * round) Thread.onSpinWait();
                gen.close();
                user.join();
                require(failure.get() == null, "unexpected: " + failure.get());
                closedThrows("next after close", gen::next);
            }
            require(session.nPast() >= 0, "session usable after its generator closed");
        }
    }
}
