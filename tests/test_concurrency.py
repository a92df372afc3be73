"""A model or session in use by one thread cannot be freed by another, and one session refuses concurrent calls.

The binding releases the GIL while C works, so before these guards Model.close() during another thread's tokenize()
crashed, Session.close() during another thread's eval() wrote to freed memory, and two threads in eval() on one
session deadlocked in its thread pool. Each case runs in a subprocess with a timeout: a crash or a hang fails the test
(with the child's output) instead of taking pytest down."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import package_root

TIMEOUT_S = 150  # generous: the suite also runs against an ASan build on a loaded machine

# Shared by every child: a thread that records how it ended, and a join that reports a hang.
PRELUDE = """
import sys, threading, time
from sparrow.runtime import Model, SparrowError
path = sys.argv[1]
ended = []

def run(fn):
    def body():
        try:
            fn()
            ended.append("done")
        except SparrowError as e:
            ended.append(str(e))
    th = threading.Thread(target=body, daemon=True)
    th.start()
    return th

def join(th):
    th.join(90)
    assert not th.is_alive(), "the worker thread hangs"
"""


def _child(script: str, model_path) -> str:
    code = PRELUDE + textwrap.dedent(script)
    try:
        r = subprocess.run([sys.executable, "-c", code, str(model_path)], cwd=package_root(), capture_output=True,
                           text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child hung (killed after {TIMEOUT_S} s); output: {e.stdout!r} {e.stderr!r}")
    assert r.returncode == 0, f"child exit {r.returncode} (negative: killed by that signal)\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_model_close_during_tokenize_waits_for_the_call(smollm_path):
    out = _child("""
        m = Model(path, vocab_only=True)
        text = ("The quick brown fox jumps over the lazy dog. " * 2000).encode()
        started = threading.Event()
        def hammer():
            while True:
                started.set()
                assert len(m.tokenize(text)) > 1000
        th = run(hammer)
        for _ in range(20):  # close while a tokenize is in flight (each takes milliseconds), many times over
            started.wait(); time.sleep(0.003)
            m.close()
            join(th)
            assert "closed" in ended[-1], ended
            m = Model(path, vocab_only=True)
            started.clear()
            th = run(hammer)
        m.close(); join(th)
        print("ok", len(ended))
    """, smollm_path)
    assert "ok 21" in out


def test_session_close_during_eval_frees_after_the_call(smollm_path):
    out = _child("""
        m = Model(path)
        toks = m.tokenize("The old lighthouse keeper looked out at the sea " * 8)[:64]
        for _ in range(5):
            s = m.session(n_ctx=1024, n_batch=64, n_threads=2)
            started = threading.Event()
            def hammer():
                while True:
                    if s.n_past + 64 > s.n_ctx: s.truncate(0)
                    started.set()
                    s.eval(toks)
            th = run(hammer)
            started.wait(); time.sleep(0.02)
            s.close()
            join(th)
            assert "closed" in ended[-1], ended
        m.close()
        print("ok")
    """, smollm_path)
    assert "ok" in out


def test_two_threads_in_eval_on_one_session_get_a_clear_error(smollm_path):
    out = _child("""
        m = Model(path)
        toks = m.tokenize("The old lighthouse keeper looked out at the sea " * 8)[:64]
        s = m.session(n_ctx=1024, n_batch=64, n_threads=2)
        stop = threading.Event()
        started = threading.Event()
        def hammer():
            while not stop.is_set():
                s.truncate(0)
                started.set()
                s.eval(toks)
        th = run(hammer)
        started.wait()
        refused = None
        deadline = time.time() + 30
        while refused is None and time.time() < deadline:
            try:
                s.eval(toks[:1])
                s.truncate(0)
            except SparrowError as e:
                refused = str(e)
        stop.set()
        join(th)
        assert refused and "in use by another thread" in refused, refused
        assert ended == ["done"], ended  # the thread that held the session was not disturbed
        s.close()
        m.close()
        print("ok")
    """, smollm_path)
    assert "ok" in out


def test_model_close_while_its_session_evaluates_keeps_the_weights(smollm_path):
    out = _child("""
        m = Model(path)
        toks = m.tokenize("The old lighthouse keeper looked out at the sea " * 8)[:16]
        s = m.session(n_ctx=1024, n_batch=64, n_threads=2)
        ref = s.eval(toks).copy()
        n = [0]
        started = threading.Event()
        def hammer():
            for _ in range(10):
                s.truncate(0)
                started.set()
                out = s.eval(toks)
                assert abs(out - ref).max() == 0  # weights still there and unchanged
                n[0] += 1
        th = run(hammer)
        started.wait(); time.sleep(0.01)
        m.close()  # the model is unusable from Python at once, its memory stays while the session lives
        join(th)
        assert ended == ["done"] and n[0] == 10, ended
        try:
            m.tokenize("hi")
            raise AssertionError("a closed model tokenized")
        except SparrowError as e:
            assert "closed" in str(e)
        s.close()  # the last user: the model's memory goes now
        print("ok")
    """, smollm_path)
    assert "ok" in out
