"""Speculation must never make decoding slower (issue 23): the default path (runtime.launch.DEFAULT_DRAFTER, the
adaptive drafter) against plain decoding, on chat prompts it has not seen and where drafting pays, greedy and with
chat's sampling defaults.

    python -m sparrow.bench_device.bench_adaptive [--model GGUF] [--tokens 96] [--rounds 5] [--quick] [--out FILE]

Engines, each on its own session of the same model, from the same state (the prompt minus its last token in the KV
cache; N new tokens timed):
  plain      runtime.native.generate_tokens with the C sampler: what `--draft none` runs
  adaptive   speculative_tokens with the default drafter, as `sparrow chat` runs it untuned
  hybrid     the hybrid drafter, drafting every step (the default before issue 23), for reference
  gate shut  speculative_tokens with a gate that never drafts: every step the adaptive path's plain step, so its
             ratio is what drafting nothing costs over plain decoding

Prompt sets: "chat" (UNSEEN_CHAT: chat requests written for this benchmark and used nowhere else, so no drafter, planner
or gate setting was chosen on them) and "pays" (PAYS: repetitive text and code edits, where drafting pays). Modes:
greedy, and sampling with SamplerParams.chat() (temperature 0.2, top-p 0.9, repetition penalty 1.1) seeded per prompt
and round, the same seed for every engine (the adaptive path's plain steps then draw what plain decoding draws until
its first drafting step).

Method (DESIGN.md, "Performance method"), per mode and prompt set, with fresh drafters: a check pass runs every engine
on every prompt once (each engine's tokens must equal plain decoding's, greedy; sampling, the shut gate's: else the
benchmark stops; the pass also warms the drafters' state, kept across prompts as in a chat). Then rounds: per prompt,
the engines generate side by side, in turns of --chunk tokens (A B C D A B C D ..., the order rotated per prompt and
reversed every other round; a 1 ms pause between turns), each engine's time the sum of its own calls: the machine's slow moments (a shared VM's) fall on every
engine alike, where whole runs one after another (~0.5 s each) put one engine's run 10-20% off another's on the
same prompt. A ratio is an engine's tok/s over plain decoding's on the same prompt in the same round. Reported per
prompt: the median (min-max) of its ratios over the rounds; per set and engine: the median and the lowest of those
per-prompt medians, and the overall ratio (all the set's tokens over all its decode time, per round; median, min-max
over rounds); the adaptive path's plain and drafting steps and what its gate decided. Threads pinned (--threads, and
the process's CPU affinity where the OS allows); the load average before and after each part.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .bench_speculative import chat, loadavg
from .profile import summary

SCHEMA = "sparrow.bench.adaptive/1"

# Chat requests written for this benchmark: open answers, little to copy from the prompt.
UNSEEN_CHAT = [
    "What should I pack for a three-day hiking trip in the mountains?",
    "Write a short story about a cat who learns to play the piano.",
    "How do vaccines train the immune system?",
    "Give me some advice for my first job interview.",
    "Compare electric cars and petrol cars for a family with two children.",
    "Describe how a bill becomes a law in a parliament.",
    "What are the benefits of learning to play a musical instrument as an adult?",
    "Plan a vegetarian dinner menu for six guests.",
    "Explain the difference between weather and climate.",
    "Write a polite email asking my landlord to fix the heating.",
    "How does a compiler turn source code into a running program?",
    "Suggest some ways to stay focused while working from home.",
]
_STORY = ("Mira kept bees on the roof of an old bakery. Each morning she lifted the lids, counted the frames, and "
          "listened to the hum change with the weather. In June the hives grew heavy with honey, and the whole street "
          "smelled of lime blossom and warm bread.")
_CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n\n"
         "def spread(values):\n    total = max(values) - min(values)\n    return total\n")
_TYPOS = ("Our team will meet on Tuesday to disscuss the new budjet. Please bring your notes and a list of questons. "
          "The meeting will start at ten and should finish befor lunch.")
# Where drafting pays: the answer repeats the prompt, or edits it a little.
PAYS = [
    f"Repeat the following text exactly:\n{_STORY}",
    f"Add type hints to these functions and print the whole code:\n{_CODE}",
    f"Rename the variable total to result in this code and show the full code:\n{_CODE}",
    f"Fix the spelling mistakes and print the corrected paragraph:\n{_TYPOS}",
    ('Copy this JSON and change the city to Madrid: {"name": "Ana", "age": 31, "city": "Lisbon", '
     '"languages": ["Portuguese", "English"], "member": true}'),
    ("Here are my tasks: water the plants, call the dentist, buy stamps, return the library books, book the train "
     "tickets, clean the bike. Write them as a numbered list, keeping the wording."),
]
ENGINES = ("plain", "adaptive", "hybrid", "gate shut")
PAUSE_S = 0.001  # between engines' turns


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (AMD family 25 model 17: Zen 4)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    import platform

    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {os.cpu_count()} CPUs"


def pin_threads(threads: int) -> str:
    """Pin the process to `threads` CPUs where the OS allows (the thread pool's workers inherit it)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)
        return f"{threads} threads on CPUs {cpus}"
    except (AttributeError, OSError) as e:
        return f"{threads} threads, affinity not set ({e})"


@dataclass
class Part:
    """One mode x prompt set: the engines' paired measurements."""

    ratios: dict[str, list[list[float]]] = field(default_factory=dict)   # engine -> [prompt][round]
    tok_s: dict[str, list[list[float]]] = field(default_factory=dict)    # engine -> [prompt][round]
    totals: dict[str, list[list[float]]] = field(default_factory=dict)   # engine -> [round] -> [tokens, seconds]


def run_part(model, prompts: list[list[int]], *, greedy: bool, tokens: int, rounds: int, seed0: int, threads: int,
             chunk: int, echo: Callable[[str], None]) -> dict:
    from ..runtime import Sampler, SamplerParams, generate_tokens
    from ..runtime.drafters import Drafter, make_drafter
    from ..runtime.launch import DEFAULT_DRAFTER
    from ..runtime.planner import DraftGate
    from ..runtime.speculative import SpecStats, speculative_tokens

    class Shut(DraftGate):
        def drafts(self) -> bool:
            return False

    V = model.info.n_vocab
    shut = Drafter()
    shut.gate = Shut()
    drafters = {"adaptive": make_drafter(DEFAULT_DRAFTER, model), "hybrid": make_drafter("hybrid", model),
                "gate shut": shut}
    stats = {name: SpecStats() for name in drafters}
    sessions = {name: model.session(n_ctx=1024, n_batch=64, n_threads=threads) for name in ENGINES}

    def params(seed: int) -> SamplerParams:
        return SamplerParams.greedy() if greedy else SamplerParams.chat(seed=seed)

    def start(name: str, toks: list[int], seed: int) -> Iterator[int]:
        s = sessions[name]
        s.truncate(0)
        s.prefill(toks[:-1])
        if name == "plain":
            return generate_tokens(s, toks, max_tokens=tokens, sampler=Sampler(V, params(seed)))
        return speculative_tokens(s, toks, drafters[name], max_tokens=tokens, params=params(seed), stats=stats[name])

    def race(order: tuple[str, ...], toks: list[int], seed: int) -> dict[str, tuple[list[int], float]]:
        """Every engine generates from toks, in turns of `chunk` tokens (A B C D A B C D ...); each engine's time is
        the sum of its own calls. Between turns a pause (untimed) lets the last engine's idle workers stop spinning
        (runtime thread pool: ~0.1-0.2 ms, then they sleep), so no engine's turn starts against another's spinning
        threads: each starts by waking its own, as each does after a pause of its user."""
        gens = {name: start(name, toks, seed) for name in order}
        out: dict[str, list[int]] = {name: [] for name in order}
        secs = dict.fromkeys(order, 0.0)
        live = list(order)
        while live:
            for name in list(live):
                time.sleep(PAUSE_S)
                g = gens[name]
                for _ in range(chunk):
                    t0 = time.perf_counter()
                    tok = next(g, None)
                    secs[name] += time.perf_counter() - t0
                    if tok is None:
                        live.remove(name)
                        break
                    out[name].append(tok)
        return {name: (out[name], secs[name]) for name in order}

    agreement: dict[str, list[int]] = {name: [] for name in drafters}
    for i, toks in enumerate(prompts):  # check, and warm the drafters
        outs = {name: o for name, (o, _) in race(ENGINES, toks, seed0 + i).items()}
        for name in drafters:
            same = next((j for j, (a, b) in enumerate(zip(outs[name], outs["plain"])) if a != b),
                        min(len(outs[name]), len(outs["plain"])))
            agreement[name].append(same)
            if (greedy or name == "gate shut") and outs[name] != outs["plain"]:
                raise RuntimeError(f"{name} differs from plain decoding on prompt {i}")
    echo(f"  checked: {'every engine' if greedy else 'the shut gate'}'s tokens equal plain decoding's on all "
         f"{len(prompts)} prompts")
    for st in stats.values():
        st.__init__()  # count the timed runs only
    part = Part({n: [[] for _ in prompts] for n in ENGINES}, {n: [[] for _ in prompts] for n in ENGINES},
                {n: [] for n in ENGINES})
    for r in range(rounds):
        tot = {n: [0.0, 0.0] for n in ENGINES}
        for i, toks in enumerate(prompts):
            k = (r + i) % len(ENGINES)
            order = ENGINES[k:] + ENGINES[:k]
            res = race(order[::-1] if r % 2 else order, toks, seed0 + 1000 * (r + 1) + i)
            for name, (o, dt) in res.items():
                tot[name][0] += len(o)
                tot[name][1] += dt
                part.tok_s[name][i].append(len(o) / dt)
            for name in ENGINES:
                part.ratios[name][i].append(part.tok_s[name][i][-1] / part.tok_s["plain"][i][-1])
        for name in ENGINES:
            part.totals[name].append(tot[name])
        x = {n: (tot[n][0] / tot[n][1]) / (tot["plain"][0] / tot["plain"][1]) for n in ENGINES[1:]}
        echo(f"  round {r + 1}/{rounds}: overall x plain: " + ", ".join(f"{n} {v:.3f}" for n, v in x.items())
             + f"; load average {loadavg()}")
    out: dict = {}
    for name in ENGINES:
        per_prompt = [{"ratio": summary(part.ratios[name][i]), "tok_s": summary(part.tok_s[name][i])}
                      for i in range(len(prompts))]
        overall = [(t[0] / t[1]) / (p[0] / p[1]) for t, p in zip(part.totals[name], part.totals["plain"])]
        medians = [p["ratio"]["median"] for p in per_prompt]
        row = {"per_prompt": per_prompt, "overall_ratio": summary(overall),
               "median_of_prompt_medians": statistics.median(medians), "lowest_prompt_median": min(medians),
               "tok_s": summary([x for xs in part.tok_s[name] for x in xs])}
        if name in drafters:
            d = drafters[name]
            row["speculative"] = stats[name].as_dict()
            row["greedy_agreement_tokens_min"] = min(agreement[name])
            if d.planner is not None:
                row["planner"] = d.planner.as_dict()
            if d.gate is not None and name != "gate shut":
                row["gate"] = d.gate.as_dict()
                row["gate_summary"] = d.gate.summary()
        out[name] = row
    for d in drafters.values():
        d.close()
    for s in sessions.values():
        s.close()
    return out


def print_part(title: str, labels: list[str], rep: dict, echo: Callable[[str], None] = print) -> None:
    echo(f"\n{title}")
    echo(f"{'prompt':<44} {'plain tok/s':>11} {'adaptive x plain':>22} {'hybrid x plain':>22} "
         f"{'gate shut x plain':>22}")
    for i, label in enumerate(labels):
        cells = []
        for name in ENGINES[1:]:
            r = rep[name]["per_prompt"][i]["ratio"]
            cells.append(f"{r['median']:.3f} ({r['min']:.2f}-{r['max']:.2f})")
        label = label.splitlines()[0][:44]
        echo(f"{label:<44} {rep['plain']['per_prompt'][i]['tok_s']['median']:>11.1f} "
             + " ".join(f"{c:>22}" for c in cells))
    for name in ENGINES[1:]:
        o = rep[name]["overall_ratio"]
        sp = rep[name]["speculative"]
        echo(f"{name}: overall {o['median']:.3f}x ({o['min']:.3f}-{o['max']:.3f}), median of prompt medians "
             f"{rep[name]['median_of_prompt_medians']:.3f}x, lowest prompt median {rep[name]['lowest_prompt_median']:.3f}x; "
             f"steps {sp['steps']}: {sp['draft_steps']} drafting, {sp['plain_steps']} plain; "
             f"{sp['tokens_per_step']:.2f} tokens/step")
        if "gate_summary" in rep[name]:
            echo(f"  {rep[name]['gate_summary']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: the store's default model, pulled if needed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8, help="tokens an engine generates per turn")
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampling"], choices=["greedy", "sampling"])
    ap.add_argument("--sets", nargs="+", default=["chat", "pays"], choices=["chat", "pays"])
    ap.add_argument("--quick", action="store_true", help="4 prompts per set, 2 rounds, 48 tokens")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens = 2, 48
    from ..runtime import Model
    from ..runtime.launch import DEFAULT_DRAFTER

    pinned = pin_threads(args.threads)
    path = args.model
    if path is None:
        from ..runtime.store import Store

        store = Store()
        path = str(store.model_path(store.pull(store.default(), progress=True)))
    texts = {"chat": UNSEEN_CHAT, "pays": PAYS}
    n = 4 if args.quick else None
    report = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_name(), "threads": args.threads, "pinning": pinned, "model": Path(path).name,
              "default_drafter": DEFAULT_DRAFTER, "tokens": args.tokens, "rounds": args.rounds, "chunk": args.chunk,
              "prompts": {k: v[:n] for k, v in texts.items() if k in args.sets}, "load_before": loadavg(), "parts": {}}
    print(f"{report['cpu']}; {pinned}; {Path(path).name}; {args.tokens} tokens x {args.rounds} rounds; "
          f"default drafter {DEFAULT_DRAFTER}; load average {report['load_before']}")
    model = Model(path)
    for mode in args.modes:
        for key in args.sets:
            prompts = [model.tokenize(chat(t), parse_special=True) for t in texts[key][:n]]
            before = loadavg()
            print(f"\n{mode}, {key} prompts ({len(prompts)}):")
            rep = run_part(model, prompts, greedy=mode == "greedy", tokens=args.tokens, rounds=args.rounds, seed0=17,
                           threads=args.threads, chunk=args.chunk, echo=print)
            report["parts"][f"{mode}/{key}"] = {"load_before": before, "load_after": loadavg(), "engines": rep}
            print_part(f"{mode}, {key} prompts: paired ratios to plain decoding, median (min-max) over rounds",
                       texts[key][:n], rep)
    model.close()
    report["load_after"] = loadavg()
    chat_parts = [p["engines"]["adaptive"] for k, p in report["parts"].items() if k.endswith("/chat")]
    report["targets"] = {
        "every chat prompt's median >= 0.98x plain": all(p["lowest_prompt_median"] >= 0.98 for p in chat_parts),
        "overall >= 1.0x plain on chat prompts": all(p["overall_ratio"]["median"] >= 1.0 for p in chat_parts),
    }
    print(f"\ntargets: {report['targets']}")
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
