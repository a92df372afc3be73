package dev.sparrow;

/**
 * The JNI shim (native/java/jni/sparrow_jni.c): one static method per C call. Handles are the C pointers as longs;
 * text crosses as UTF-8 byte arrays. Failures throw SparrowException from C.
 *
 * <p>Loads libsparrow_jni from java.library.path (System.loadLibrary; on Android, from the app's jniLibs), or from the
 * file named by the system property sparrow.jni.library.
 */
final class Native {
    static {
        String path = System.getProperty("sparrow.jni.library");
        if (path != null) {
            System.load(path);
        } else {
            System.loadLibrary("sparrow_jni");
        }
    }

    private Native() {}

    static native String version();

    static native void modelDefaults(Model.Params out);
    static native long modelLoad(byte[] pathUtf8, Model.Params params);
    static native void modelFree(long model);
    static native void modelInfo(long model, Model.Info out);
    /** which: 0 architecture, 1 general.name. */
    static native byte[] modelString(long model, int which);
    static native int[] tokenize(long model, byte[] textUtf8, boolean addSpecial);
    static native byte[] tokenPiece(long model, int token, boolean renderSpecial);
    static native byte[] detokenize(long model, int[] tokens, boolean renderSpecial);
    static native boolean isEog(long model, int token);

    static native int deviceCount();
    static native byte[] deviceName(int device);
    static native void sessionDefaults(Session.Params out);
    static native long sessionNew(long model, Session.Params params);
    static native void sessionFree(long session);
    static native int sessionNCtx(long session);
    static native int sessionNPast(long session);
    static native void sessionTruncate(long session, int n);

    /** drafter: -1 for sp_generator_default_params(), else sp_generator_default_params_for(drafter). */
    static native void generatorDefaults(Generator.Params out, int drafter);
    static native long generatorNew(long session, Generator.Params params, byte[][] stopUtf8, long draftSession);
    static native void generatorFree(long generator);
    static native void generatorStart(long generator, int[] prompt);
    /** The next token (>= 0), or -(sp_gen_stop) once the generation has ended. */
    static native int generatorNext(long generator);
    /** Runs to the end, calling cb (may be null) per token; returns the sp_gen_stop value. */
    static native int generate(long generator, TokenCallback cb);
    static native void generatorStats(long generator, Generator.Stats out);
    static native void generatorResetStats(long generator);
    static native int[] generatorContext(long generator);
    static native void generatorSaveDrafter(long generator, byte[] pathUtf8);
    static native void generatorLoadDrafter(long generator, byte[] pathUtf8);
}
