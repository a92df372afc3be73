"""Crash isolation for tests that run llama.cpp inside the test process (a pytest plugin, loaded by conftest.py).

llama.cpp is the oracle and the baseline, and it is third-party native code: a build for the wrong CPU, or a bug in
one of its kernels (its AMX matmul segfaults on Intel Xeon when built with native flags), kills the whole process.
A test marked `llama_cpp` therefore runs in a forked child: if the child dies, that one test fails with "killed by
signal N (SIGNAME)" and the run goes on. The child sends its reports back through a pipe, serialized by pytest's own
hooks (as pytest-xdist does). Tests that reach llama.cpp only through worker processes (the bench) report a dead
worker themselves and need no mark.

The parent process must never run llama.cpp's compute itself: its OpenMP thread pool does not survive a fork, so a
later forked test would hang. Every test that evaluates tokens with llama.cpp in-process carries the mark.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
from _pytest.reports import TestReport
from _pytest.runner import CallInfo, runtestprotocol

CAN_FORK = hasattr(os, "fork")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "llama_cpp: runs llama.cpp in this process; isolated in a forked child so a crash fails only it")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not (CAN_FORK and item.get_closest_marker("llama_cpp")):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = run_forked(item)
    # The parent still holds what earlier items set up (their module's fixtures): tear down what nextitem does not
    # need, as pytest's own protocol would after this item.
    call = CallInfo.from_call(lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown")
    if call.excinfo is not None:
        reports.append(TestReport.from_item_and_call(item, call))
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def run_forked(item: pytest.Item) -> list[TestReport]:
    """Run the item's setup, call and teardown in a forked child; its reports, or one failure saying how it died."""
    hook, config = item.config.hook, item.config
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the test, send the reports, leave without running the parent's exit handlers
        os.close(r)
        code = 0
        try:
            reports = runtestprotocol(item, log=False, nextitem=None)
            data = [hook.pytest_report_to_serializable(config=config, report=rep) for rep in reports]
            with os.fdopen(w, "w") as out:
                json.dump(data, out)
        except BaseException:  # noqa: BLE001  (anything, even an Exit, becomes the parent's failure report)
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as inp:
        payload = inp.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and payload:
        reports = [hook.pytest_report_from_serializable(config=config, data=d) for d in json.loads(payload)]
        for rep in reports:  # a skip's (path, line, reason): JSON made the tuple a list, which -rs cannot show
            if isinstance(rep.longrepr, list):
                rep.longrepr = tuple(rep.longrepr)
        return reports
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        how = f"killed by signal {sig} ({signal.Signals(sig).name})"
    else:
        how = f"exited with status {os.WEXITSTATUS(status)} before reporting"
    path, line = item.location[0], (item.location[1] or 0) + 1
    return [TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                       f"{path}:{line}: the test process (running llama.cpp) was {how}", "call")]


def pytest_report_header(config: pytest.Config) -> str:
    """Name the oracle's build: which SIMD paths llama.cpp was compiled with (AMX ones must be absent)."""
    try:
        import llama_cpp
    except ImportError:
        return "llama.cpp: not installed (its oracle tests are skipped)"
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    on = [part.split("=")[0].split()[-1] for part in info.split("|") if part.strip().endswith("= 1")]
    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__}): {' '.join(on) or info.strip()}"
