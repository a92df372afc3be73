"""`sparrow bench --tune`: find the fastest decoding settings for a model on this device and keep them in the model
store, where `sparrow chat` and `sparrow generate` pick them up.

    sparrow bench --tune [MODEL] [--quick] [--threads N]
    python -m sparrow.bench_device.tune MODEL.gguf [--quick]          # search and print, store nothing

What is searched (small on purpose: about a minute for SmolLM2-135M on 2 cores, --quick about 15 s):
  1. threads, 1 .. physical cores, with plain greedy decoding (skipped when --threads pins one count);
  2. at the thread count stage 1 chose: no drafter, every drafter of runtime.drafters' registry (prompt lookup: k
     drafted; Token Recycling: chain or tree shape, max_nodes; hybrid) and, when the store registers a draft model
     for this model, the draft model (k drafted), each from a small set of sizes (SHAPES). The baseline is measured
     again in this stage, and so is the untuned default: what `sparrow chat` runs without tuned settings (physical
     cores and runtime.launch.default_drafter: the adaptive drafter), so the report shows what tuning gains over
     it.

The baseline every candidate is compared with is plain decoding (no drafter) on the physical cores: the one setting
every model and backend can run, and the reference the greedy outputs are checked against. It is not the untuned
default (which drafts); the stored record calls it "default" (schema runtime.store.TUNED_SCHEMA), the report
"baseline". When no candidate beats it beyond the noise, plain decoding is what gets stored.

How (DESIGN.md, "Performance method"; the same protocol as bench_device/bench_speculative.py):
  - check and warm-up pass: every candidate generates from every prompt once; its greedy tokens must equal plain
    greedy decoding at the same thread count, or the candidate is rejected (recorded with the reason, never
    chosen). The pass also warms Token Recycling's adjacency matrix, kept across generations as in a chat.
  - rounds: in each round every candidate runs every prompt, in an order rotated per prompt and per round
    (A B C, B C A, C A B ...), each run from the same state (the prompt minus its last token in the KV cache; the
    new tokens are timed). A candidate's sample for a round is its decode tok/s over all the prompts (tokens /
    seconds), so the spread between rounds is the machine's noise, not the prompts' differences. Every timed output
    is checked against plain decoding again.
  - choice: each candidate's tok/s over the baseline's in the same round (paired: drift of the machine between
    rounds cancels); the best median ratio wins, but replaces the baseline only if the gain is larger than the
    noise: the ratio is above 1 in every round (the min-max range of the paired ratios does not overlap 1) and at
    least MIN_GAIN at the median; otherwise the baseline stays. Stage 1 chooses the thread count by the same rule.
Every measurement goes into the stored record (STORE/tuned/NAME.json, schema runtime.store.TUNED_SCHEMA) with the
device fingerprint, the model's sha256 and the date.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..runtime.drafters import DRAFTERS, check_options
from ..runtime.launch import default_drafter
from ..runtime.store import TUNED_SCHEMA, Store, describe_device, device_fingerprint
from .sections import no_bar

# The prompts: chat requests (rendered with the model's chat template when it has one) that copy, rewrite and
# answer freely, and a plain continuation. --quick uses the first two.
PASSAGE = ("The old lighthouse stood at the edge of the cliff. Every night its keeper climbed the one hundred and "
           "twelve steps, lit the lamp, and wrote the weather in his logbook: wind from the west, sea calm, two "
           "ships passed.")
CODE = ("def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
        "    return 2 * (width + height)\n")
PROMPTS: list[tuple[str, str]] = [
    ("chat", f"Rewrite this code with type hints and a docstring for each function:\n{CODE}"),
    ("chat", "Explain in a few sentences why the sky is blue."),
    ("chat", f"Summarize this text, then repeat it word for word:\n{PASSAGE}"),
    ("text", "The history of the printing press begins"),
]
QUICK = {"prompts": 2, "tokens": 32, "rounds": 3}
FULL = {"prompts": 4, "tokens": 48, "rounds": 5}


# ---- candidates and measurements ----

@dataclass(frozen=True)
class Candidate:
    """One setting: a thread count, a drafter (a name in runtime.drafters.DRAFTERS or a draft model's store name)
    and its constructor options (sorted (key, value) pairs; lists as tuples, so candidates can be dict keys)."""

    threads: int
    drafter: str = "none"
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, threads: int, drafter: str = "none", **options: Any) -> Candidate:
        return cls(threads, drafter, tuple(sorted((k, tuple(v) if isinstance(v, list | tuple) else v)
                                                  for k, v in options.items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}

    def settings(self) -> dict[str, Any]:
        return {"threads": self.threads, "drafter": self.drafter, "drafter_options": self.kwargs}

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in self.options)
        return f"{self.threads}t {self.drafter}" + (f" {opts}" if opts else "")

    def runs_as(self, other: Candidate) -> bool:
        """Whether both run the same: equal once every drafter option left out takes its constructor's default
        ("prompt-lookup" and "prompt-lookup k=4" are one setting)."""
        return (self.threads, self.drafter, self._filled()) == (other.threads, other.drafter, other._filled())

    def _filled(self) -> tuple[tuple[str, Any], ...]:
        kind = DRAFTERS.get(self.drafter)
        if kind is None:
            return self.options
        params = inspect.signature(kind.cls).parameters
        defaults = {k: params[k].default for k in kind.options
                    if k in params and params[k].default is not inspect.Parameter.empty}
        return Candidate.make(self.threads, self.drafter, **{**defaults, **self.kwargs}).options


@dataclass
class Measurement:
    candidate: Candidate
    samples: list[float] = field(default_factory=list)  # decode tok/s over all prompts, one per round
    tokens: int = 0
    seconds: float = 0.0
    rejected: str | None = None                          # why the candidate does not count, if it does not

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else 0.0

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else 0.0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {**self.candidate.settings(), "label": self.candidate.label}
        if self.rejected:
            d["rejected"] = self.rejected
        else:
            d["decode_tok_s"] = {"median": self.median, "min": self.min, "max": self.max,
                                 "samples": [round(x, 3) for x in self.samples]}
        return d


class Runner(Protocol):
    """Runs one candidate's greedy generation of n new tokens after a prompt: (tokens, seconds of decoding)."""

    def run(self, candidate: Candidate, prompt: list[int], n: int) -> tuple[list[int], float]: ...


class NativeRunner:
    """The native runtime: one Model, a Session per thread count (created on first use with n_ctx tokens; set n_ctx
    before the first run), a drafter per candidate kept across runs (Token Recycling keeps learning, as in a chat).
    drafter_factory(candidate, runner) builds a candidate's drafter (default: runtime.drafters.make_drafter, with
    draft model store names resolved through draft_models)."""

    def __init__(self, model_path: str | Path, *, draft_models: dict[str, Path] | None = None, n_ctx: int = 1024,
                 drafter_factory: Callable[[Candidate, NativeRunner], Any] | None = None):
        from ..runtime import Model

        self.model = Model(model_path)
        self.n_ctx = n_ctx
        self.draft_models = dict(draft_models or {})
        self.factory = drafter_factory or (lambda cand, runner: runner.make_drafter(cand))
        self.sessions: dict[int, Any] = {}
        self.drafters: dict[Candidate, Any] = {}

    def make_drafter(self, cand: Candidate):
        from ..runtime.drafters import make_drafter

        source = str(self.draft_models.get(cand.drafter, cand.drafter))
        return make_drafter(source, self.model, n_threads=cand.threads, n_ctx=self.n_ctx, **cand.kwargs)

    def prompt_tokens(self, kind: str, text: str) -> list[int]:
        """A prompt as `sparrow chat` would send it ("chat": the model's chat template, if it has one) or as text."""
        template = self.model.meta("tokenizer.chat_template")
        if kind != "chat" or not template:
            return self.model.tokenize(text)
        from ..runtime.chat_template import render

        def special(token: int) -> str:
            return "" if token < 0 else self.model.token_bytes(token, render_special=True).decode("utf-8", "replace")

        rendered = render(template, [{"role": "user", "content": text}], add_generation_prompt=True,
                          bos_token=special(self.model.info.bos_token), eos_token=special(self.model.info.eos_token))
        return self.model.tokenize(rendered, add_special=True, parse_special=True)

    def run(self, cand: Candidate, prompt: list[int], n: int) -> tuple[list[int], float]:
        from ..runtime import generate_tokens
        from ..runtime.speculative import speculative_tokens

        s = self.sessions.get(cand.threads)
        if s is None:
            s = self.sessions[cand.threads] = self.model.session(n_ctx=self.n_ctx, n_threads=cand.threads)
        kept = s.reuse_prefix(prompt)  # the same start for every run: the prompt minus its last token is cached
        if kept < len(prompt) - 1:
            s.prefill(prompt[kept:-1])
        if cand.drafter == "none":
            t0 = time.perf_counter()
            out = list(generate_tokens(s, prompt, max_tokens=n, stop_at_eog=False))
        else:
            d = self.drafters.get(cand)
            if d is None:
                d = self.drafters[cand] = self.factory(cand, self)
            t0 = time.perf_counter()
            out = list(speculative_tokens(s, prompt, d, max_tokens=n, stop_at_eog=False))
        return out, time.perf_counter() - t0

    def close(self) -> None:
        for d in self.drafters.values():
            d.close()
        for s in self.sessions.values():
            s.close()
        self.model.close()


def measure(runner: Runner, candidates: Sequence[Candidate], prompts: Sequence[list[int]], *, tokens: int,
            rounds: int, progress: Callable[[int], None] | None = None) -> dict[Candidate, Measurement]:
    """Check every candidate against plain greedy decoding, then time them in rotated rounds (module docstring).
    progress(n) counts runs, runs(len(candidates), len(prompts), rounds) in all (a rejected candidate's runs that
    are skipped are counted at the end)."""
    tick = progress or (lambda n: None)
    done = 0
    out = {c: Measurement(c) for c in candidates}
    # 1. check and warm up: the reference is plain decoding at the candidate's thread count
    refs: dict[tuple[int, int], list[int]] = {}
    for i, prompt in enumerate(prompts):
        for t in sorted({c.threads for c in candidates}):
            refs[t, i], _ = runner.run(Candidate(t), prompt, tokens)
            if Candidate(t) in out:
                tick(1)
                done += 1
        for c in candidates:
            if c.drafter != "none" and out[c].rejected is None:
                got, _ = runner.run(c, prompt, tokens)
                tick(1)
                done += 1
                _check(out[c], got, refs[c.threads, i], i)
    # 2. timed rounds, the order rotated per prompt and per round
    order = list(candidates)
    for r in range(rounds):
        n_tok = dict.fromkeys(order, 0)
        secs = dict.fromkeys(order, 0.0)
        for i, prompt in enumerate(prompts):
            shift = (r * len(prompts) + i) % len(order)
            for c in order[shift:] + order[:shift]:
                if out[c].rejected is not None:
                    continue
                got, dt = runner.run(c, prompt, tokens)
                tick(1)
                done += 1
                if _check(out[c], got, refs[c.threads, i], i):
                    n_tok[c] += len(got)
                    secs[c] += dt
        for c in order:
            if out[c].rejected is None:
                out[c].samples.append(n_tok[c] / secs[c] if secs[c] > 0 else 0.0)
                out[c].tokens += n_tok[c]
                out[c].seconds += secs[c]
    for m in out.values():
        if m.rejected:
            m.samples.clear()
    tick(runs(len(candidates), len(prompts), rounds) - done)
    return out


def runs(n_candidates: int, n_prompts: int, rounds: int) -> int:
    """How many runs measure() counts: one check run and `rounds` timed runs per candidate and prompt."""
    return n_prompts * n_candidates * (1 + rounds)


def _check(m: Measurement, got: list[int], ref: list[int], prompt: int) -> bool:
    if got == ref:
        return True
    j = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    m.rejected = (f"greedy output differs from plain decoding on prompt {prompt} at token {j} "
                  f"({len(got)} vs {len(ref)} tokens)")
    return False


MIN_GAIN = 1.02  # a change of settings must also be worth it: 2% faster by the median paired ratio


def paired_ratios(m: Measurement, default: Measurement) -> list[float]:
    """m's tok/s over the default's in the same round (the runs alternated, so drift of the machine cancels)."""
    return [a / b for a, b in zip(m.samples, default.samples) if b > 0]


def choose(ms: dict[Candidate, Measurement], default: Candidate) -> tuple[Candidate, str]:
    """The candidate (not rejected) with the best median speed relative to the baseline `default` (plain decoding;
    the median of its paired ratios, which drift between rounds does not move), if it beats the baseline beyond the
    noise: faster in every round (the min-max range of its paired ratios lies above 1) and by MIN_GAIN at the
    median. Otherwise the baseline. Returns (choice, why)."""
    d = ms[default]
    ratios = {c: r for c, m in ms.items() if m.rejected is None and (r := paired_ratios(m, d))}
    if default not in ratios:
        return default, f"the baseline ({default.label}) produced no timing to compare with: keeping it"
    best = max(ratios, key=lambda c: statistics.median(ratios[c]))
    if best == default:
        return default, f"the baseline ({default.label}, plain decoding) was the fastest"
    r = ratios[best]
    x, lo, hi = statistics.median(r), min(r), max(r)
    spread = f"{x:.2f}x the baseline by median, {lo:.2f}-{hi:.2f}x over {len(r)} rounds"
    if lo > 1.0 and x >= MIN_GAIN:
        return best, f"{best.label}: {spread}, faster in every round"
    return default, (f"the fastest, {best.label} ({spread}), is not faster than the baseline beyond the noise "
                     f"(needs every round > 1.00x and the median >= {MIN_GAIN:.2f}x): keeping the baseline, "
                     f"{default.label} (plain decoding)")


# ---- the search ----

def thread_options(physical: int) -> list[int]:
    """1 .. physical cores; above 6 cores, a geometric-ish subset that always includes 1 and all cores."""
    if physical <= 6:
        return list(range(1, physical + 1))
    return sorted({t for t in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64) if t < physical} | {physical})


# The shapes tried per drafter of the registry (runtime.drafters.DRAFTERS), and for a registered draft model: (in
# every search, added in a full search). Around the drafters' defaults (prompt lookup k=4, Token Recycling a chain of
# 4); the wide trees of the Token Recycling paper lose on CPUs where a T-token pass costs several decode steps
# (README, Speculative decoding), so only small fixed trees are tried, plus the hybrid drafter at its defaults, whose
# wide tree the sparsity-aware planner prunes each step, and the adaptive drafter (chat's untuned default: the hybrid
# where it measures faster than plain decoding). A registered drafter not named here is tried at its defaults.
SHAPES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "prompt-lookup": ([{"k": 4}], [{"k": 8}]),
    "recycling": ([{"branching": [1], "max_nodes": 4}],
                  [{"branching": [1], "max_nodes": 2}, {"branching": [1], "max_nodes": 6},
                   {"branching": [2, 1], "max_nodes": 6}]),
    "hybrid": ([{}], []),
    "adaptive": ([{}], []),
}
DRAFT_MODEL_SHAPES: tuple[list[dict[str, Any]], list[dict[str, Any]]] = (
    [{"k": 4}], [{"k": 2}, {"k": 3, "alternatives": 2}])


def drafter_candidates(threads: int, *, quick: bool, draft_model: str | None = None) -> list[Candidate]:
    """The drafters and shapes tried at one thread count: every drafter of the registry but "none" (plain decoding
    is the default, measured anyway) in its SHAPES, then the draft model's; a full search adds the larger sets.
    Each shape's options are checked against the registry, so tuning never stores settings the store rejects."""
    named = [(name, SHAPES.get(name, ([{}], []))) for name in DRAFTERS if name != "none"]
    if draft_model:
        named.append((draft_model, DRAFT_MODEL_SHAPES))
    shapes = [(name, opts) for name, (first, _) in named for opts in first]
    if not quick:
        shapes += [(name, opts) for name, (_, more) in named for opts in more]
    return [Candidate.make(threads, name, **check_options(name, opts)) for name, opts in shapes]


@dataclass
class TuneResult:
    chosen: Candidate
    default: Candidate                              # the baseline: plain decoding on the physical cores
    reason: str
    final: dict[Candidate, Measurement]             # the last stage's measurements (chosen and baseline among them)
    stages: list[dict[str, Any]]                    # every stage: candidates measured, choice, reason
    settings: dict[str, Any] = field(default_factory=dict)  # tokens, rounds, prompts, load averages
    untuned: Candidate | None = None                # what chat runs without tuned settings, as measured in `final`

    @property
    def changed(self) -> bool:
        return self.chosen != self.default

    @property
    def speedup(self) -> float:
        """The chosen setting's median paired ratio to the baseline (1.0 when the baseline stays)."""
        r = paired_ratios(self.final[self.chosen], self.final[self.default])
        return statistics.median(r) if r else 1.0

    def untuned_ratio(self) -> dict[str, float] | None:
        """The untuned default's paired ratio to the baseline (median, min, max), if it was measured."""
        m = self.final.get(self.untuned) if self.untuned is not None else None
        r = paired_ratios(m, self.final[self.default]) if m is not None and not m.rejected else []
        return {"median": statistics.median(r), "min": min(r), "max": max(r)} if r else None


ProgressBar = Callable[[int, str], Any]  # (length, label) -> context manager with .update(n), like click.progressbar


def tune(runner: Runner, prompts: Sequence[list[int]], *, threads: Sequence[int], default: Candidate,
         drafters: Callable[[int], list[Candidate]], tokens: int, rounds: int,
         progressbar: ProgressBar | None = None, untuned: Candidate | None = None) -> TuneResult:
    """Stage 1 chooses the thread count among `threads` (plain decoding; skipped for one count), stage 2 the drafter
    among drafters(threads) at that count, both against the baseline `default` (which must be plain decoding).
    `untuned` (what runs without tuned settings) is measured in stage 2 too, unless a candidate runs as it does."""
    if default.drafter != "none":
        raise ValueError("the default must be plain decoding (drafter 'none')")
    if not prompts or tokens < 1 or rounds < 1:
        raise ValueError("tuning needs at least one prompt, one token and one round")
    stages: list[dict[str, Any]] = []
    load_before = _loadavg()

    def stage(name: str, cands: list[Candidate]) -> tuple[dict[Candidate, Measurement], Candidate, str]:
        cands = list(dict.fromkeys(cands))  # unique, in order
        with _bar(progressbar, runs(len(cands), len(prompts), rounds), name) as bar:
            ms = measure(runner, cands, prompts, tokens=tokens, rounds=rounds, progress=bar.update)
        choice, why = choose(ms, default)
        rows = []
        for m in ms.values():
            row = m.as_dict()
            if not m.rejected and (r := paired_ratios(m, ms[default])):
                row["ratio_vs_default"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
            rows.append(row)
        stages.append({"stage": name, "chosen": choice.label, "reason": why, "candidates": rows})
        return ms, choice, why

    best_threads = threads[0] if len(threads) == 1 else default.threads
    if len(threads) > 1:
        _, choice, _ = stage("threads (plain decoding)", [default] + [Candidate(t) for t in threads])
        best_threads = choice.threads
    cands = [default, Candidate(best_threads)] + drafters(best_threads)
    if untuned is not None:
        untuned = next((c for c in cands if c.runs_as(untuned)), untuned)
        cands += [untuned] if untuned not in cands else []
    ms, choice, why = stage(f"drafters at {best_threads} thread{'s' if best_threads != 1 else ''}", cands)
    return TuneResult(chosen=choice, default=default, reason=why, final=ms, stages=stages,
                      settings={"tokens": tokens, "rounds": rounds, "prompts": len(prompts),
                                "threads_searched": list(threads), "load_before": load_before,
                                "load_after": _loadavg()}, untuned=untuned)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _bar(progressbar: ProgressBar | None, length: int, label: str):
    return no_bar(length, label) if progressbar is None else progressbar(length, label)


# ---- the stored record and the report ----

def record(result: TuneResult, *, model: str, model_sha256: str, quick: bool, prompts: Sequence[str]) -> dict:
    """The JSON stored in the model store (runtime.store.TunedSettings reads it)."""
    chosen, default = result.final[result.chosen], result.final[result.default]

    def summary(m: Measurement) -> dict:
        return {"median": m.median, "min": m.min, "max": m.max}

    return {
        "schema": TUNED_SCHEMA,
        "model": model,
        "model_sha256": model_sha256,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_fingerprint(),
        "settings": result.chosen.settings(),
        "default": result.default.settings(),  # the baseline: plain decoding on the physical cores
        "changed_from_default": result.changed,
        "reason": result.reason,
        "decode_tok_s": {"chosen": summary(chosen), "default": summary(default)},
        "speedup_median": result.speedup,  # median over rounds of chosen / baseline tok/s in the same round
        # what chat runs without tuned settings, and its paired ratio to the baseline (None: not measured)
        "untuned_default": None if result.untuned is None else {
            **result.untuned.settings(), "label": result.untuned.label, "ratio_vs_default": result.untuned_ratio()},
        "search": {"mode": "quick" if quick else "full", **result.settings, "prompt_texts": list(prompts),
                   "method": ("greedy decode tok/s per round over all prompts, candidates rotated per prompt and "
                              "round, outputs checked against plain greedy decoding; median, min-max over rounds; "
                              "ratios paired by round")},
        "stages": result.stages,
    }


def format_result(result: TuneResult) -> str:
    lines = []
    for st in result.stages:
        header = f"  {'setting':<44} {'tok/s median':>12} {'(min-max)':>15}   x baseline (min-max, paired by round)"
        lines += [f"{st['stage']}:", header]
        for c in st["candidates"]:
            marks = [m for m, label in (("baseline", result.default.label),
                                        ("untuned default", result.untuned.label if result.untuned else None))
                     if c["label"] == label]
            name = c["label"] + (f" ({', '.join(marks)})" if marks else "")
            if "rejected" in c:
                lines.append(f"  {name:<44} rejected: {c['rejected']}")
                continue
            t, x = c["decode_tok_s"], c.get("ratio_vs_default")
            ratio = f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})" if x else "-"
            mark = "  <- chosen" if c["label"] == st["chosen"] else ""
            lines.append(f"  {name:<44} {t['median']:>12.1f} {t['min']:>7.1f}-{t['max']:<7.1f}   {ratio:<36}{mark}")
        lines.append(f"  {st['reason']}")
    lines.append(f"baseline: {result.default.label}, plain decoding on the physical cores"
                 + (f"; untuned default (what chat runs without tuned settings): {result.untuned.label}"
                    if result.untuned is not None else ""))
    s = result.settings
    lines.append(f"{s['prompts']} prompts x {s['tokens']} tokens x {s['rounds']} rounds; load average before "
                 f"{s['load_before']}, after {s['load_after']}")
    return "\n".join(lines)


def run_tune(store: Store, name: str, path: Path, *, quick: bool = False, threads: int = 0,
             echo: Callable[[str], None] = print, progressbar: ProgressBar | None = None,
             save: bool = True) -> tuple[TuneResult, Path | None]:
    """Tune model `name` (a store name, or a file path when it is not in the store) and store the choice. Returns
    the result (format_result prints it) and where it was stored (None for a file outside the store, or
    save=False). echo gets what is said along the way."""
    cfg = QUICK if quick else FULL
    manifest = store.get(name)
    fingerprint = device_fingerprint()
    physical = int(fingerprint["physical_cores"])
    if threads < 0:
        raise ValueError(f"--threads must be positive, got {threads}")
    draft_models: dict[str, Path] = {}
    if manifest is not None and manifest.drafter:
        draft = store.get(manifest.drafter)
        if draft is not None:
            draft_models[draft.name] = store.model_path(draft)
        else:
            echo(f"note: the draft model {manifest.drafter} registered for {name} is not in the store; not tried")
    draft_name = next(iter(draft_models), None)
    runner = NativeRunner(path, draft_models=draft_models)
    try:
        specs = PROMPTS[:cfg["prompts"]]
        prompts = [runner.prompt_tokens(kind, text) for kind, text in specs]
        runner.n_ctx = max(len(p) for p in prompts) + cfg["tokens"] + 64
        echo(f"Tuning {name} on {describe_device(fingerprint)}: greedy decoding of {len(prompts)} prompts x "
             f"{cfg['tokens']} tokens, {cfg['rounds']} rounds per stage")
        result = tune(runner, prompts, threads=[threads] if threads else thread_options(physical),
                      default=Candidate(physical), tokens=cfg["tokens"], rounds=cfg["rounds"],
                      drafters=lambda t: drafter_candidates(t, quick=quick, draft_model=draft_name),
                      progressbar=progressbar, untuned=Candidate.make(physical, default_drafter(name)[0]))
    finally:
        runner.close()
    if not save:
        return result, None
    if manifest is None:
        echo(f"not stored: {path} is not in the model store (pull it with `sparrow models pull {path} --name NAME` "
             "and tune it by name to keep the settings)")
        return result, None
    rec = record(result, model=manifest.name, model_sha256=manifest.sha256, quick=quick,
                 prompts=[t for _, t in specs])
    return result, store.save_tuned(manifest.name, rec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Search threads and drafter for a GGUF model on this device "
                                             "(prints the result; `sparrow bench --tune` also stores it).")
    ap.add_argument("model", help="a GGUF file or a store name")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="tune at this thread count only")
    args = ap.parse_args(argv)
    store = Store()
    result, _ = run_tune(store, args.model, store.resolve(args.model), quick=args.quick, threads=args.threads,
                         save=False)
    print(format_result(result))


if __name__ == "__main__":
    main()
