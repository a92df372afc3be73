"""What `sparrow models info`, `chat` and `generate` report about a run, on the shipped BlockFFN model (no download):
the drafter chat would use and why (runtime/launch.py's policy, the same one `sparrow.load` runs), the actual thread
count, one speed per answer with the speculative line counting that answer only, and a marker when --max-tokens cut
an answer."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from sparrow.cli import sparrow
from sparrow.runtime.launch import DEFAULT_DRAFTER, open_model
from sparrow.runtime.store import SHIPPED_DIR, Store, device_fingerprint

pytestmark = pytest.mark.skipif(not (SHIPPED_DIR / "blockffn-tiny.Q8_0.gguf").exists(),
                                reason="shipped BlockFFN model not built")
GREEDY = ["--temperature", "0"]
SPEC = re.compile(r"\[speculative: (\d+) steps, (\d+) tokens, ([\d.]+) tokens/step")
SPEED = re.compile(r"\d tok/s")


def run(*args: str, input: str | None = None):
    r = CliRunner().invoke(sparrow, list(args), input=input, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def test_models_info_names_the_drafter_chat_uses_and_why(home):
    info = run("models", "info", "blockffn-tiny").output
    drafter = DEFAULT_DRAFTER  # the adaptive drafter, for every model without tuned settings
    assert f"drafter:       {drafter}, the default without tuned settings" in info
    assert "draft model:   blockffn-tiny-draft" in info  # the registered draft model, named as what it is
    assert f"threads:       {device_fingerprint()['physical_cores']}, physical cores" in info
    data = json.loads(run("models", "info", "blockffn-tiny", "--json").output)
    assert data["run"]["drafter"] == drafter
    # the same policy as chat: what open_model runs is what info says
    _, backend, settings = open_model("blockffn-tiny", n_ctx=256)
    try:
        assert (settings.draft, backend.drafter.name) == (drafter, drafter)
    finally:
        backend.close()

    # a file path gets the same default
    path = str(Store().resolve("blockffn-tiny"))
    assert f"drafter:       {DEFAULT_DRAFTER}, the default without tuned settings" in run("models", "info", path).output


def test_generate_reports_the_thread_count_it_runs_with(home):
    out = json.loads(run("generate", "-m", "blockffn-tiny", "--json", *GREEDY, "--max-tokens", "4", "def").output)
    assert out["threads"] == device_fingerprint()["physical_cores"] and out["tuned"] is None
    out = json.loads(run("generate", "-m", "blockffn-tiny", "--json", "--threads", "1", "--max-tokens", "4",
                         "def").output)
    assert out["threads"] == 1


def test_stats_print_one_speed_and_the_speculative_line_counts_one_answer(home):
    r = run("generate", "-m", "blockffn-tiny", *GREEDY, "--stats", "--max-tokens", "12", "--draft", "prompt-lookup",
            "def parse(text):")
    lines = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert sum(bool(SPEED.search(line)) for line in lines if "generated" in line or "speculative" in line) == 1
    spec = SPEC.search(r.stderr)
    assert spec and int(spec.group(2)) == 12

    # chat: each answer's speculative line counts that answer's tokens, not the session's
    r = run("chat", "blockffn-tiny", *GREEDY, "--stats", "--max-tokens", "10", "--draft", "prompt-lookup",
            input="def f(x):\ndef g(y):\n/exit\n")
    tokens = [int(m.group(2)) for m in SPEC.finditer(r.stderr)]
    assert tokens == [10, 10], r.stderr
    assert not any(SPEED.search(line) for line in r.stderr.splitlines() if line.startswith("[speculative"))


def test_an_answer_cut_by_max_tokens_says_so(home):
    r = run("generate", "-m", "blockffn-tiny", *GREEDY, "--max-tokens", "5", "def parse(text):")
    assert "[stopped at --max-tokens 5]" in r.stderr and "[stopped" not in r.stdout
    r = run("chat", "blockffn-tiny", *GREEDY, "--max-tokens", "6", input="def f(x):\n/exit\n")
    assert "[stopped at --max-tokens 6]" in r.stderr


def test_stats_say_how_many_steps_drafted_and_how_many_ran_plain(home):
    """The default (adaptive) drafter runs plain decoding steps where drafting does not pay: --stats and --json
    count both kinds of step, and say what the gate decided per arm."""
    r = run("generate", "-m", "blockffn-tiny", *GREEDY, "--stats", "--max-tokens", "24", "def parse(text):")
    m = re.search(r"\[speculative: (\d+) steps, \d+ tokens, [\d.]+ tokens/step \((\d+) drafted: .*; (\d+) plain\)",
                  r.stderr)
    assert m and int(m[2]) + int(m[3]) == int(m[1]) and int(m[3]) > 0, r.stderr
    assert "gate: no match: " in r.stderr
    out = json.loads(run("generate", "-m", "blockffn-tiny", *GREEDY, "--json", "--max-tokens", "24",
                         "def parse(text):").output)
    spec = out["speculative"]
    assert out["draft"] == DEFAULT_DRAFTER and spec["plain_steps"] > 0
    assert spec["draft_steps"] + spec["plain_steps"] == spec["steps"] and "probes" in spec["gate"]
