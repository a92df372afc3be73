package dev.sparrow;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;

/**
 * Turns a stream of token byte pieces into text, whole characters at a time: a token may end inside a UTF-8
 * sequence (an emoji is often split over several tokens), so push() holds back an unfinished sequence until the
 * bytes that complete it arrive. Invalid bytes become U+FFFD. Not thread-safe.
 *
 * <pre>
 * Utf8Stream text = new Utf8Stream();
 * gen.generate(t -&gt; { System.out.print(text.push(model.tokenBytes(t))); return true; });
 * System.out.print(text.finish());
 * </pre>
 */
public final class Utf8Stream {
    private final ByteArrayOutputStream pending = new ByteArrayOutputStream();

    /** Adds a piece; returns the text it completes (maybe ""). */
    public String push(byte[] piece) {
        pending.write(piece, 0, piece.length);
        byte[] b = pending.toByteArray();
        int n = completeLength(b);
        pending.reset();
        pending.write(b, n, b.length - n);
        return new String(b, 0, n, StandardCharsets.UTF_8);
    }

    /** The bytes still held back, decoded (an unfinished sequence becomes U+FFFD); the stream is then empty. */
    public String finish() {
        String s = new String(pending.toByteArray(), StandardCharsets.UTF_8);
        pending.reset();
        return s;
    }

    /** The length of b without a trailing unfinished UTF-8 sequence (a lead byte followed by too few continuations). */
    static int completeLength(byte[] b) {
        int n = b.length;
        for (int back = 1; back <= 3 && back <= n; back++) {
            int c = b[n - back] & 0xFF;
            if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back for its lead
            int need = c >= 0xF5 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 1;  // 1: ASCII or invalid
            return need > back ? n - back : n;  // lead of an unfinished sequence: hold it back
        }
        return n;
    }
}
