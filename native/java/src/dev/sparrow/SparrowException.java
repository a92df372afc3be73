package dev.sparrow;

import java.nio.charset.StandardCharsets;

/** A failure reported by libsparrow: the sp_status name (e.g. "SP_ERR_IO") and sp_last_error()'s message. */
public class SparrowException extends RuntimeException {
    private static final long serialVersionUID = 1L;
    private final String status;

    public SparrowException(String status, String message) {
        super(status + ": " + message);
        this.status = status;
    }

    /** Called by the JNI shim: the message crosses as UTF-8 bytes (NewStringUTF would mangle 4-byte characters). */
    SparrowException(String status, byte[] messageUtf8) {
        this(status, new String(messageUtf8, StandardCharsets.UTF_8));
    }

    /** The sp_status name, e.g. "SP_ERR_INVALID_ARG". */
    public String status() {
        return status;
    }
}
