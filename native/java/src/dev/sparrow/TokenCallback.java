package dev.sparrow;

/** Receives each generated token from Generator.generate; return false to stop (StopReason.CALLBACK). */
@FunctionalInterface
public interface TokenCallback {
    boolean onToken(int token);
}
