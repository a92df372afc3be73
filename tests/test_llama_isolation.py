"""A crash inside an oracle fails that test with its signal; the rest of the run goes on (tests/llama_isolation.py)."""
from __future__ import annotations

import signal
from pathlib import Path

pytest_plugins = ["pytester"]

INNER = '''
import ctypes
import pytest

@pytest.fixture(scope="module")
def shared():
    return 1

def test_before_the_crash(shared):   # sets up a module fixture in the parent, torn down after the forked tests
    assert shared == 1

@pytest.mark.llama_cpp
def test_oracle_segfaults():
    ctypes.string_at(0)          # a null read in native code, as a crashing llama.cpp kernel does

def test_after_the_crash():
    assert 1 + 1 == 2

@pytest.mark.llama_cpp
def test_forked_and_failing():
    assert 1 + 1 == 3, "a plain failure in the child comes back as itself"
'''


def test_a_crashing_oracle_fails_its_test_with_the_signal(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pytester.makeconftest("from llama_isolation import pytest_configure, pytest_runtest_protocol\n")
    pytester.makepyfile(test_inner=INNER)
    pytester.makepyfile(test_next='def test_next_module():\n    pass\n')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:faulthandler")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*a plain failure in the child comes back as itself*"])
    result.stdout.fnmatch_lines([f"*test_inner.py:*: the test process (running llama.cpp) was killed by signal "
                                 f"{int(signal.SIGSEGV)} (SIGSEGV)*", "FAILED test_inner.py::test_oracle_segfaults*"])
