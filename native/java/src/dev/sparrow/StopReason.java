package dev.sparrow;

/** Why a generation ended: sp_gen_stop, with its C values. */
public enum StopReason {
    RUNNING(0),
    /** An end-of-generation token (not returned). */
    EOG(1),
    /** maxTokens tokens returned. */
    MAX_TOKENS(2),
    /** The text returned so far ends with a stop string (the token that completed it was returned). */
    STOP_STRING(3),
    /** The KV cache has no room for another token. */
    CONTEXT_FULL(4),
    /** The TokenCallback returned false (or threw). */
    CALLBACK(5);

    public final int value;

    StopReason(int value) {
        this.value = value;
    }

    static StopReason fromValue(int value) {
        for (StopReason r : values()) {
            if (r.value == value) return r;
        }
        throw new IllegalArgumentException("unknown sp_gen_stop " + value);
    }
}
