"""`sparrow batch`: every input line answered exactly once, bad lines as error records, resumable after kill -9.

The kill test runs the real command in a subprocess, kills it with SIGKILL in the middle of the job, runs the same
command again, and compares the result record by record with an uninterrupted run (the job is deterministic: a line
samples with --seed plus its line number, and a request's tokens do not depend on what runs beside it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import package_root
from sparrow.cli import sparrow


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPARROW_HOME", str(tmp_path / "store"))
    monkeypatch.delenv("SPARROW_MEMORY_LIMIT", raising=False)
    return tmp_path / "store"


def run(*args: str):
    return CliRunner().invoke(sparrow, list(args), catch_exceptions=False)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jobs(path: Path, n: int) -> None:
    topics = ["the sea", "a robot", "bread", "winter", "a lost key", "the moon", "music", "a garden"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            line = {"id": f"job-{i}", "max_tokens": 4 + i % 5}
            if i % 3:
                line["prompt"] = f"A short story about {topics[i % len(topics)]}:"
            else:
                line["messages"] = [{"role": "user", "content": f"One sentence about {topics[i % len(topics)]}."}]
            f.write(json.dumps(line) + "\n")


def test_bad_lines_become_error_records_and_the_rest_is_answered(home, smollm_path, tmp_path):
    good = {"id": "good", "prompt": "Once upon a time", "max_tokens": 5}
    lines = [
        json.dumps(good).encode(),
        b"{not json",                                                        # invalid JSON
        b"[1, 2, 3]",                                                        # not an object
        json.dumps({"id": "u", "prompt": "x", "colour": "red"}).encode(),    # unknown field
        json.dumps({"id": "both", "prompt": "x", "messages": []}).encode(),  # prompt and messages
        json.dumps({"id": "none"}).encode(),                                 # neither
        json.dumps({"id": "t", "prompt": "x", "temperature": "hot"}).encode(),
        json.dumps({"id": "n", "prompt": "x", "max_tokens": 0}).encode(),
        json.dumps({"id": "big", "prompt": "x", "max_tokens": 10**9}).encode(),
        json.dumps({"id": "nan", "prompt": "x", "top_p": float("nan")}).encode(),
        json.dumps({"id": "role", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        json.dumps({"id": "stop", "prompt": "x", "stop": [1, 2]}).encode(),
        json.dumps({"id": "long", "prompt": "word " * 400}).encode(),     # longer than --ctx 256
        json.dumps({"id": "good", "prompt": "again"}).encode(),             # duplicate id
        b'{"id": "bytes", "prompt": "\xff\xfe"}',                           # not UTF-8
        b'{"id": "huge", "prompt": "' + b"a" * (1 << 20) + b'"}',           # over the line limit
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi <|im_end|>"}],
                    "max_tokens": 5, "temperature": 0}).encode(),
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    out = tmp_path / "out.jsonl"
    r = run("batch", str(tmp_path / "in.jsonl"), "-o", str(out), "-m", str(smollm_path), "--ctx", "256", "-q")
    assert r.exit_code == 0, r.output
    recs = {rec["line"]: rec for rec in records(out)}
    assert sorted(recs) == list(range(1, len(lines) + 1))  # every line, once (the blank one is not a line)
    assert set(recs[1]) == {"id", "line", "text", "finish_reason", "usage"} and recs[1]["id"] == "good"
    assert recs[17]["finish_reason"] in ("stop", "length") and "error" not in recs[17]
    expected = {2: "not valid JSON", 3: "JSON object", 4: "unknown field", 5: "exactly one", 6: "exactly one",
                7: "temperature must be a number", 8: "max_tokens must be in", 9: "max_tokens must be in",
                10: "top_p must be a number", 11: "role must be", 12: "stop must be", 13: "context holds 256",
                14: "duplicate id 'good'", 15: "not valid JSON", 16: "longer than"}
    for line, text in expected.items():
        assert text in recs[line]["error"]["message"], (line, recs[line])
    assert recs[16]["id"] == "line-16"


def test_kill_9_then_the_same_command_finishes_with_nothing_lost_or_twice(home, smollm_path, tmp_path):
    n = 220
    write_jobs(tmp_path / "in.jsonl", n)
    args = [sys.executable, "-m", "sparrow", "batch", str(tmp_path / "in.jsonl"), "-m", str(smollm_path), "--ctx",
            "256", "--parallel", "8", "--threads", "2", "-q", "--temperature", "0.8", "--seed", "7"]
    env = {**os.environ, "SPARROW_HOME": str(home)}
    clean = tmp_path / "clean.jsonl"
    subprocess.run(args + ["-o", str(clean)], cwd=package_root(), env=env, check=True, timeout=600)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(args + ["-o", str(out)], cwd=package_root(), env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 60):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes().count(b"\n")
    assert 60 <= partial < n, partial  # killed in the middle of the job
    with open(out, "ab") as f:
        f.write(b'{"id": "job-0", "line": 1, "text": "cut sh')  # a record cut short by the kill
    subprocess.run(args + ["-o", str(out)], cwd=package_root(), env=env, check=True, timeout=600)
    got = records(out)
    assert sorted(r["line"] for r in got) == list(range(1, n + 1))
    want = {r["line"]: r for r in records(clean)}
    for r in got:
        assert r == want[r["line"]]
    before = out.read_bytes()
    subprocess.run(args + ["-o", str(out)], cwd=package_root(), env=env, check=True, timeout=600)
    assert out.read_bytes() == before  # done: running it again changes nothing


def test_an_output_that_is_not_this_jobs_is_refused_and_left_alone(home, smollm_path, tmp_path):
    write_jobs(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    damaged = b'{"id": "job-0", "line": 1, "text": "x", "finish_reason": "stop"}\nnot a record\n'
    out.write_bytes(damaged)
    r = run("batch", str(tmp_path / "in.jsonl"), "-o", str(out), "-m", str(smollm_path), "-q")
    assert r.exit_code == 1 and "line 2 is not a record" in r.output
    assert out.read_bytes() == damaged
    other = b'{"id": "someone-else", "line": 1, "text": "x", "finish_reason": "stop"}\n'
    out.write_bytes(other)
    r = run("batch", str(tmp_path / "in.jsonl"), "-o", str(out), "-m", str(smollm_path), "-q")
    assert r.exit_code == 1 and "belongs to another input" in r.output
    assert out.read_bytes() == other
    r = run("batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "in.jsonl"), "-m", str(smollm_path), "-q")
    assert r.exit_code == 2 and "must not be the input" in r.output
