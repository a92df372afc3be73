package dev.sparrow;

/**
 * The drafter a generator speculates with: sp_drafter_kind, with its C values. A new kind in sparrow.h is one entry
 * here (plus, if it has settings, their fields in Generator.Params and in the JNI shim's field table).
 */
public enum Drafter {
    /** Plain decoding: one token per forward pass. */
    NONE(0),
    /** Drafts the continuation of an earlier occurrence of the context's last n-gram (ngram, minNgram, draftK). */
    PROMPT_LOOKUP(1),
    /** Token Recycling: a tree from each token's recyclingK best followers when last verified (branching, maxNodes);
     *  the matrix is kept across generations (Generator.saveDrafter / loadDrafter). */
    RECYCLING(2),
    /** Prompt lookup's chain (draftK) merged with the recycling tree. */
    HYBRID(3),
    /** A draft model (draftSession: a session of a model with the same vocabulary) drafts draftK tokens greedily. */
    DRAFT_MODEL(4),
    /** The hybrid, its tree pruned by the planner, behind a gate that drafts only where drafting measured faster than
     *  plain decoding on this device (probeEvery, maxProbeEvery, learnEvery). */
    ADAPTIVE(5);

    /** The sp_drafter_kind value. */
    public final int value;

    Drafter(int value) {
        this.value = value;
    }

    /** The kind with this C value (used by the JNI shim for the defaults). */
    public static Drafter fromValue(int value) {
        for (Drafter d : values()) {
            if (d.value == value) return d;
        }
        throw new IllegalArgumentException("unknown sp_drafter_kind " + value);
    }
}
