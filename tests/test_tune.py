"""`sparrow bench --tune`: the search picks a setting that is measurably faster (real timing on a tiny model with a
drafter whose accept rate the test controls), keeps the default when a gain is within the noise, rejects candidates
whose greedy output differs from plain decoding; the settings round-trip through the store with the device
fingerprint, corrupt or foreign settings fall back to the defaults with a warning, and chat/generate use them unless
flags say otherwise."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from sparrow.bench_device.tune import (
    Candidate,
    NativeRunner,
    choose,
    drafter_candidates,
    format_result,
    measure,
    paired_ratios,
    record,
    run_tune,
    thread_options,
    tune,
)
from sparrow.cli import sparrow
from sparrow.runtime import Model, generate_tokens
from sparrow.runtime.drafters import Drafter
from sparrow.runtime.store import TUNED_SCHEMA, Store, TunedSettings, device_fingerprint
from sparrow.runtime.tree import Draft
from tiny_llama import TinyConfig, write_tiny_llama

SHIPPED = Path(__file__).parent.parent / "models"


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(sparrow, list(args), input=input, catch_exceptions=False)


# ---- the search on a constructed case: real timing, a drafter with a controlled accept rate ----

class Oracle(Drafter):
    """Drafts k tokens of the known plain greedy continuation, the first round(accept * k) of them right and the rest
    wrong: accept=1 makes every step emit k + 1 tokens, accept=0 makes every draft a wasted verification."""

    name = "oracle"

    def __init__(self, refs: dict[tuple[int, ...], list[int]], n_vocab: int, *, k: int, accept: float):
        self.refs, self.V, self.k, self.good = refs, n_vocab, k, round(accept * k)

    def begin(self, ctx, params, rng):
        self.start, self.ref = len(ctx), self.refs[tuple(ctx)]

    def propose(self, ctx, max_nodes):
        pos = len(ctx) - self.start  # tokens generated so far; the draft continues after them
        want = self.ref[pos:pos + min(self.k, max_nodes)]
        return Draft.chain([t if i < self.good else (t + 1) % self.V for i, t in enumerate(want)])


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory) -> Path:
    """A tiny llama wide enough (F32, ~17 MB of weights) that a forward pass, not Python, is most of a decode step."""
    path = tmp_path_factory.mktemp("tune") / "wide.gguf"
    return write_tiny_llama(path, TinyConfig(n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=1024, seed=3))


def test_tuning_picks_the_drafter_that_is_measurably_faster(wide_tiny):
    prompts = [[1, 270, 261, 40, 50, 270, 261], [1, 100, 101, 102, 103]]
    N = 48
    with Model(wide_tiny) as m, m.session(n_ctx=128, n_threads=1) as s:
        refs = {}
        for p in prompts:
            s.truncate(0)
            refs[tuple(p)] = list(generate_tokens(s, p, max_tokens=N, stop_at_eog=False))
        V = m.info.n_vocab
    good, bad = Candidate.make(1, "oracle", k=8, accept=1.0), Candidate.make(1, "oracle", k=8, accept=0.0)
    runner = NativeRunner(wide_tiny, n_ctx=128, drafter_factory=lambda c, r: Oracle(refs, V, **c.kwargs))
    try:
        result = tune(runner, prompts, threads=[1], default=Candidate(1), drafters=lambda t: [bad, good],
                      tokens=N, rounds=3)
    finally:
        runner.close()
    assert result.chosen == good and result.changed, result.reason
    ms = result.final
    assert all(m.rejected is None and len(m.samples) == 3 for m in ms.values())
    assert min(paired_ratios(ms[good], ms[Candidate(1)])) > 1.3  # 9 tokens per pass (measured here: 1.7x-4.7x)
    assert max(paired_ratios(ms[bad], ms[Candidate(1)])) < 1.0   # a wasted 9-token pass per token (0.25x-0.55x)
    assert result.speedup > 1.3 and "faster in every round" in result.reason
    assert [st["stage"] for st in result.stages] == ["drafters at 1 thread"]  # one thread count: no thread stage


# ---- the decision rules on a fake runner with set speeds ----

class FakeRunner:
    """Greedy output = the prompt reversed (wrong for candidates in `wrong`); decoding speed per candidate and round
    from `speed` (tok/s; one value for every round, or a list per round). Records the order of the calls."""

    def __init__(self, speed: dict[Candidate, float | list[float]], wrong: tuple[Candidate, ...] = ()):
        self.speed, self.wrong, self.calls = speed, wrong, []
        self.count: dict[tuple[Candidate, int], int] = {}

    def run(self, cand, prompt, n):
        key = (cand, len(prompt))
        k = self.count[key] = self.count.get(key, -1) + 1  # 0: the check run, then rounds 0, 1, ...
        self.calls.append(cand)
        v = self.speed[cand]
        tps = v[max(k - 1, 0)] if isinstance(v, list) else v
        out = [t + (cand in self.wrong) for t in reversed(prompt)][:n]
        return out, len(out) / tps


PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_a_gain_within_the_noise_keeps_the_default():
    d, pl = Candidate(2), Candidate.make(2, "prompt-lookup", k=4)
    # Faster by median (1.2x) but slower than the default in one round: not beyond the noise.
    runner = FakeRunner({d: 100.0, pl: [120.0, 130.0, 90.0]})
    ms = measure(runner, [d, pl], PROMPTS, tokens=4, rounds=3)
    assert choose(ms, d)[0] == d and "beyond the noise" in choose(ms, d)[1]
    # Faster in every round: chosen.
    runner = FakeRunner({d: 100.0, pl: [120.0, 130.0, 101.0]})
    ms = measure(runner, [d, pl], PROMPTS, tokens=4, rounds=3)
    assert choose(ms, d)[0] == pl
    # Faster in every round, but by less than MIN_GAIN at the median: not worth a change.
    runner = FakeRunner({d: 100.0, pl: 101.0})
    assert choose(measure(runner, [d, pl], PROMPTS, tokens=4, rounds=3), d)[0] == d


def test_paired_ratios_cancel_drift_between_rounds():
    """The machine slows down 3x in round 2 for everyone: min/max of the raw speeds overlap, the paired ratios do not."""
    d, rec = Candidate(2), Candidate.make(2, "recycling", branching=[1], max_nodes=4)
    runner = FakeRunner({d: [100.0, 33.0, 100.0], rec: [130.0, 43.0, 125.0]})
    ms = measure(runner, [d, rec], PROMPTS, tokens=4, rounds=3)
    assert ms[rec].min < ms[d].max
    assert choose(ms, d)[0] == rec


def test_a_candidate_whose_greedy_output_differs_is_rejected_and_never_chosen():
    d, fast_wrong, ok = Candidate(2), Candidate.make(2, "recycling", max_nodes=4), Candidate.make(2, "prompt-lookup")
    runner = FakeRunner({d: 100.0, fast_wrong: 500.0, ok: 150.0}, wrong=(fast_wrong,))
    ms = measure(runner, [d, fast_wrong, ok], PROMPTS, tokens=4, rounds=2)
    assert "differs from plain decoding on prompt 0 at token 0" in ms[fast_wrong].rejected
    assert ms[fast_wrong].samples == [] and fast_wrong not in runner.calls[-4:]
    assert choose(ms, d)[0] == ok
    assert ms[fast_wrong].as_dict()["rejected"] and "decode_tok_s" not in ms[fast_wrong].as_dict()


def test_runs_alternate_and_rotate():
    a, b, c = Candidate(1), Candidate(2), Candidate(3)
    runner = FakeRunner({a: 1.0, b: 1.0, c: 1.0})
    measure(runner, [a, b, c], PROMPTS, tokens=2, rounds=2)
    timed = runner.calls[6:]  # after the check pass (3 references x 2 prompts)
    assert timed == [a, b, c, b, c, a, c, a, b, a, b, c]


def test_thread_stage_then_drafters_at_the_chosen_thread_count():
    one, two = Candidate(1), Candidate(2)
    pl1 = Candidate.make(1, "prompt-lookup", k=4)
    runner = FakeRunner({one: 150.0, two: 100.0, pl1: 200.0})
    bars = []

    class Bar:
        def __init__(self, length, label):
            self.length, self.label, self.n = length, label, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def update(self, n):
            self.n += n

    result = tune(runner, PROMPTS, threads=[1, 2], default=two, drafters=lambda t: [Candidate.make(t, "prompt-lookup", k=4)],
                  tokens=4, rounds=3, progressbar=Bar)
    assert result.chosen == pl1 and result.default == two
    assert [st["stage"] for st in result.stages] == ["threads (plain decoding)", "drafters at 1 thread"]
    assert [b.n for b in bars] == [b.length for b in bars] == [2 * 2 * 4, 3 * 2 * 4]
    with pytest.raises(ValueError, match="plain decoding"):
        tune(runner, PROMPTS, threads=[1], default=pl1, drafters=lambda t: [], tokens=4, rounds=1)


def test_search_space():
    assert thread_options(1) == [1] and thread_options(4) == [1, 2, 3, 4]
    assert thread_options(16) == [1, 2, 4, 6, 8, 12, 16]
    quick = drafter_candidates(2, quick=True)
    full = drafter_candidates(2, quick=False, draft_model="tiny-draft")
    assert {c.drafter for c in quick} == {"prompt-lookup", "recycling", "hybrid", "adaptive"}
    assert len(quick) < len(full)
    assert {c.drafter for c in full} == {"prompt-lookup", "recycling", "hybrid", "adaptive", "tiny-draft"}
    assert all(c.threads == 2 for c in full) and len(set(full)) == len(full)


# ---- the stored settings ----

def make_record(name: str = "tiny", sha: str = "ab" * 32, **settings) -> dict:
    s = {"threads": 1, "drafter": "prompt-lookup", "drafter_options": {"k": 3}, **settings}
    return {"schema": TUNED_SCHEMA, "model": name, "model_sha256": sha, "created": "2025-01-01T00:00:00+00:00",
            "device": device_fingerprint(), "settings": s, "decode_tok_s": {"chosen": {"median": 150.0},
                                                                           "default": {"median": 100.0}}}


def test_settings_round_trip_through_the_store(home):
    store = Store()
    path = store.save_tuned("tiny", make_record(drafter="recycling", drafter_options={"branching": [2, 1],
                                                                                      "max_nodes": 6}))
    assert path == home / "tuned" / "tiny.json" and [p.name for p in path.parent.iterdir()] == ["tiny.json"]
    t, warning = store.load_tuned("tiny", sha256="ab" * 32)
    assert warning is None and isinstance(t, TunedSettings)
    assert (t.threads, t.drafter, t.drafter_options) == (1, "recycling", {"branching": [2, 1], "max_nodes": 6})
    assert t.describe() == "1 thread, recycling (branching=[2, 1], max_nodes=6)"
    assert store.load_tuned("other") == (None, None)


def test_settings_from_another_device_or_file_are_not_used(home):
    store = Store()
    rec = make_record()
    rec["device"] = {**rec["device"], "cpu_model": "Some Other CPU 9000", "physical_cores": 64}
    store.save_tuned("tiny", rec)
    t, warning = store.load_tuned("tiny", sha256="ab" * 32)
    assert t is None and "another device" in warning and "Some Other CPU 9000" in warning
    assert "sparrow bench --tune tiny" in warning
    store.save_tuned("tiny", make_record())
    t, warning = store.load_tuned("tiny", sha256="cd" * 32)
    assert t is None and "another file" in warning


@pytest.mark.parametrize("text, why", [
    ("{not json", "Expecting property name"),
    ("[]", "not a JSON object"),
    (json.dumps({**make_record(), "schema": "sparrow.tuned/99"}), "schema"),
    (json.dumps(make_record(threads=0)), "threads must be an integer"),
    (json.dumps(make_record(threads="2")), "threads must be an integer"),
    (json.dumps(make_record(drafter="../../etc/passwd")), "drafter must be"),
    (json.dumps(make_record(drafter_options={"k": 3, "shape": 1})), "unknown option 'shape'"),
    (json.dumps(make_record(drafter_options={"k": -1})), "positive integer"),
    (json.dumps(make_record(drafter="recycling", drafter_options={"branching": [9]})), "branching factor"),
    (json.dumps(make_record(drafter="none", drafter_options={"k": 3})), "takes no options"),
])
def test_corrupt_settings_warn_and_fall_back_leaving_the_file(home, text, why):
    store = Store()
    path = store.tuned_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    t, warning = store.load_tuned("tiny")
    assert t is None and why in warning and str(path) in warning and "Using the defaults" in warning
    assert path.read_text() == text  # nothing lost: the file stays for the user to look at


def test_invalid_settings_are_not_written(home):
    with pytest.raises(Exception, match="threads"):
        Store().save_tuned("tiny", make_record(threads=-3))
    assert not Store().tuned_path("tiny").exists()


# ---- chat and generate use the tuned settings ----

@pytest.fixture
def pulled_tiny(home, tmp_path) -> str:
    src = write_tiny_llama(tmp_path / "tiny.gguf", TinyConfig())
    Store().pull(str(src), name="tiny", progress=False)
    return "tiny"


def generate_json(*flags: str) -> tuple[dict, str]:
    r = CliRunner().invoke(sparrow, ["generate", "-m", "tiny", "--json", "--temperature", "0", "--max-tokens", "8",
                                     *flags, "the"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), r.stderr


def test_generate_and_chat_use_tuned_settings_unless_flags_say_otherwise(pulled_tiny):
    store = Store()
    plain, _ = generate_json()
    physical = device_fingerprint()["physical_cores"]  # untuned: the actual thread count, not 0
    assert (plain["threads"], plain["draft"], plain["tuned"]) == (physical, "adaptive", None)
    store.save_tuned("tiny", make_record(sha=store.info("tiny").sha256))

    tuned, err = generate_json()
    assert (tuned["threads"], tuned["draft"]) == (1, "prompt-lookup") and tuned["speculative"]["steps"] > 0
    assert tuned["tuned"] == "1 thread, prompt-lookup (k=3)" and not err
    assert tuned["tokens"] == plain["tokens"]  # speculative greedy = plain greedy

    explicit, _ = generate_json("--threads", "2", "--draft", "none")
    assert (explicit["threads"], explicit["draft"], explicit["tuned"]) == (2, "none", None)
    partly, _ = generate_json("--draft", "recycling")  # tuned threads; the prompt-lookup shape is not applied
    assert (partly["threads"], partly["draft"]) == (1, "recycling") and partly["tuned"] == "1 thread, recycling"

    r = run("chat", "tiny", "--temperature", "0", "--max-tokens", "4", "--stats", input="hi\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "tuned: 1 thread, prompt-lookup (k=3)" in r.output and "[speculative:" in r.output

    row = next(line for line in run("models", "list").output.splitlines() if " tiny " in line)
    assert " 1t prompt-lookup " in row
    info = run("models", "info", "tiny")
    assert ("tuned:         1 thread, prompt-lookup (k=3); 150.0 tok/s vs 100.0 with plain decoding (1.50x)"
            in info.output)
    assert "drafter:       prompt-lookup (k=3), tuned on this device" in info.output
    assert json.loads(run("models", "info", "tiny", "--json").output)["tuned"]["settings"]["threads"] == 1


def test_corrupt_settings_warn_and_chat_still_runs_with_defaults(pulled_tiny):
    path = Store().tuned_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": "sparrow.tuned/1", "settings": ')
    out, err = generate_json()
    assert (out["threads"], out["draft"], out["tuned"]) == (device_fingerprint()["physical_cores"], "adaptive",
                                                            None)
    assert "warning: ignoring the tuned settings" in err and "Using the defaults" in err
    assert path.exists()
    r = run("chat", "tiny", "--temperature", "0", "--max-tokens", "4", input="hi\n/exit\n")
    assert r.exit_code == 0 and "warning: ignoring the tuned settings" in r.output
    assert "none usable here" in run("models", "info", "tiny").output


def test_a_tuned_draft_model_that_is_gone_falls_back_to_plain_decoding(pulled_tiny):
    store = Store()
    store.save_tuned("tiny", make_record(sha=store.info("tiny").sha256, drafter="removed-draft",
                                         drafter_options={"k": 2}))
    out, err = generate_json()
    assert out["draft"] == "none" and "the tuned drafter removed-draft cannot be used" in err


def test_removing_a_model_removes_its_settings(pulled_tiny):
    store = Store()
    store.save_tuned("tiny", make_record(sha=store.info("tiny").sha256))
    assert run("models", "rm", "tiny").exit_code == 0
    assert not store.tuned_path("tiny").exists()


# ---- end to end ----

def test_bench_tune_quick_stores_settings_that_generate_then_uses(pulled_tiny):
    r = run("bench", "tiny", "--tune", "--quick", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "chosen for tiny:" in r.output and "drafters at 1 thread" in r.output
    rec = json.loads(Store().tuned_path("tiny").read_text())
    t = TunedSettings.from_record(rec)
    assert rec["device"] == device_fingerprint() and rec["model_sha256"] == Store().info("tiny").sha256
    assert rec["search"]["mode"] == "quick" and rec["stages"][0]["candidates"]
    labels = {c["label"] for c in rec["stages"][-1]["candidates"]}
    assert {"1t none", "1t prompt-lookup k=4", "1t recycling branching=1,max_nodes=4"} <= labels
    assert all("decode_tok_s" in c for c in rec["stages"][-1]["candidates"])  # none rejected
    # the baseline is plain decoding, and named so; what chat runs untuned (the adaptive drafter on the physical
    # cores) is measured beside it and marked
    physical = device_fingerprint()["physical_cores"]
    assert f"{physical}t none (baseline)" in r.output and f"{physical}t adaptive (untuned default)" in r.output
    assert f"{physical}t adaptive" in labels and rec["untuned_default"]["drafter"] == "adaptive"
    assert rec["untuned_default"]["ratio_vs_default"]["median"] > 0
    out, _ = generate_json()
    assert (out["threads"], out["draft"]) == (t.threads, t.drafter)


def test_bench_tune_refuses_what_the_native_runtime_does_not_run(pulled_tiny, monkeypatch):
    monkeypatch.setenv("SPARROW_BACKEND", "llama.cpp")
    r = run("bench", "tiny", "--tune", "--quick")
    assert r.exit_code == 1 and "--tune measures Sparrow's native runtime" in r.output
    assert not Store().tuned_path("tiny").exists()


@pytest.mark.skipif(not (SHIPPED / "blockffn-tiny.Q8_0.gguf").exists(), reason="shipped BlockFFN model not built")
def test_the_registered_draft_model_is_a_candidate(home):
    store = Store()
    result, saved = run_tune(store, "blockffn-tiny", store.resolve("blockffn-tiny"), quick=True, threads=1,
                             echo=lambda m: None)
    draft = Candidate.make(1, "blockffn-tiny-draft", k=4)
    assert draft in result.final and result.final[draft].rejected is None
    assert saved == store.tuned_path("blockffn-tiny")
    assert store.load_tuned("blockffn-tiny", sha256=store.info("blockffn-tiny").sha256)[0] is not None


def test_the_untuned_default_is_measured_once_and_named():
    """A candidate that runs as the untuned default (a drafter option left at its constructor's default counts as
    the same setting) is marked as it, not measured twice; the record gives its ratio to the baseline."""
    assert Candidate.make(2, "prompt-lookup").runs_as(Candidate.make(2, "prompt-lookup", k=4))
    assert not Candidate.make(2, "prompt-lookup").runs_as(Candidate.make(2, "prompt-lookup", k=8))
    assert not Candidate.make(2, "prompt-lookup").runs_as(Candidate.make(1, "prompt-lookup"))
    d, pl = Candidate(2), Candidate.make(2, "prompt-lookup", k=4)
    result = tune(FakeRunner({d: 100.0, pl: 120.0}), PROMPTS, threads=[2], default=d, drafters=lambda t: [pl],
                  tokens=4, rounds=2, untuned=Candidate.make(2, "prompt-lookup"))
    assert result.untuned == pl and list(result.final) == [d, pl]
    assert result.untuned_ratio()["median"] == pytest.approx(1.2)
    text = format_result(result)
    assert "2t none (baseline)" in text and "2t prompt-lookup k=4 (untuned default)" in text
    rec = record(result, model="m", model_sha256="00" * 32, quick=True, prompts=["a", "b"])
    assert rec["untuned_default"]["label"] == pl.label
    assert rec["untuned_default"]["ratio_vs_default"]["median"] == pytest.approx(1.2)


def test_record_is_readable_by_the_store():
    d, pl = Candidate(2), Candidate.make(2, "prompt-lookup", k=4)
    result = tune(FakeRunner({d: 100.0, pl: 130.0}), PROMPTS, threads=[2], default=d,
                  drafters=lambda t: [Candidate.make(t, "prompt-lookup", k=4)], tokens=4, rounds=2)
    rec = record(result, model="m", model_sha256="00" * 32, quick=True, prompts=["a", "b"])
    t = TunedSettings.from_record(json.loads(json.dumps(rec)))
    assert (t.threads, t.drafter, t.drafter_options) == (2, "prompt-lookup", {"k": 4})
    assert rec["changed_from_default"] and rec["speedup_median"] == pytest.approx(1.3)
    assert rec["decode_tok_s"]["default"]["median"] == pytest.approx(100.0)


def _drafter_of(backend) -> str:
    return backend.drafter.name if hasattr(backend, "drafter") else "none"


def test_the_python_api_and_the_cli_choose_the_same_settings(pulled_tiny):
    """`sparrow.load` runs the same policy as `sparrow generate`/`chat` (runtime/launch.py): the same threads and
    drafter, untuned (the defaults) and tuned (the stored settings), and explicit arguments win in both."""
    import sparrow

    store = Store()
    cases = [((), {}), (("--threads", "2", "--draft", "none"), {"threads": 2, "draft": "none"})]
    for tuned in (False, True):
        if tuned:
            store.save_tuned("tiny", make_record(sha=store.info("tiny").sha256))
        for flags, kwargs in cases:
            cli, _ = generate_json(*flags)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # usable tuned settings: no warning from the library either
                backend = sparrow.load("tiny", **kwargs)
            try:
                assert (backend.n_threads, _drafter_of(backend)) == (cli["threads"], cli["draft"]), (tuned, flags)
            finally:
                backend.close()
    assert cli["threads"] == 2 and cli["draft"] == "none"
    backend = sparrow.load("tiny")
    try:
        assert (backend.n_threads, _drafter_of(backend), backend.drafter.k) == (1, "prompt-lookup", 3)
    finally:
        backend.close()
