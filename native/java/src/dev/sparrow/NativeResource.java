package dev.sparrow;

import java.util.concurrent.locks.ReentrantReadWriteLock;

/**
 * One native handle (sp_model, sp_session or sp_generator) made safe to share between Java threads.
 *
 * <p>Every call holds the read lock while it is in C, so calls on one object may run at once and the C library
 * refuses what it cannot share (a second thread on a generator or session gets a SparrowException,
 * "in use by another thread"). close() takes the write lock: it waits for the calls in flight, then marks the object
 * closed; every later call throws IllegalStateException.
 *
 * <p>Closing never frees memory still in use: a model stays allocated until its sessions are closed, a session until
 * its generators are (each holds a reference to its parents: a generator also to its draft model's session). So a
 * model may be closed before its sessions; it just cannot be used any more, and its memory goes with the last session.
 */
abstract class NativeResource implements AutoCloseable {
    private final ReentrantReadWriteLock lock = new ReentrantReadWriteLock();
    private final NativeResource[] parents;
    private final String kind;
    private boolean closed;  // guarded by lock
    private long handle;     // guarded by this
    private int refs = 1;    // itself until closed, plus each open dependent; guarded by this

    /** Owns one reference on each parent, which the caller took with retain() while creating the handle. */
    NativeResource(String kind, long handle, NativeResource... parents) {
        this.kind = kind;
        this.handle = handle;
        this.parents = parents;
    }

    /** Frees the native handle; called once, when closed and no dependent is left. */
    abstract void free(long handle);

    /** The handle, held until release(); throws IllegalStateException once closed. */
    final long acquire() {
        lock.readLock().lock();
        if (closed) {
            lock.readLock().unlock();
            throw new IllegalStateException(kind + " is closed");
        }
        synchronized (this) {
            return handle;
        }
    }

    final void release() {
        lock.readLock().unlock();
    }

    /** A dependent was created (call between acquire() and release(), so this cannot close meanwhile). */
    final synchronized void retain() {
        refs++;
    }

    public final boolean isClosed() {
        lock.readLock().lock();
        try {
            return closed;
        } finally {
            lock.readLock().unlock();
        }
    }

    /** Waits for calls in flight, then closes; closing again does nothing. Frees when no dependent is open. */
    @Override
    public final void close() {
        if (lock.getReadHoldCount() > 0) {  // the write lock would wait for this thread forever
            throw new IllegalStateException(kind + ".close() called from inside a call on it (a callback?)");
        }
        lock.writeLock().lock();
        try {
            if (closed) return;
            closed = true;
        } finally {
            lock.writeLock().unlock();
        }
        unref();
    }

    private void unref() {
        long h;
        synchronized (this) {
            if (--refs > 0) return;
            h = handle;
            handle = 0;
        }
        free(h);  // closed, so no call holds it; no dependent left, so none uses it
        for (NativeResource p : parents) {
            if (p != null) p.unref();
        }
    }
}
