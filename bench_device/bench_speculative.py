"""Speculative decoding end to end: plain decode vs every drafter, same model, same threads, one run.

    python -m sparrow.bench_device.bench_speculative [--quick] [--sections a b c] [--out spec.json]

Three sections (issue 6):
  (a) the shipped trained BlockFFN model (models/blockffn-tiny) with its draft model: plain dense decode, plain sparse
      decode, and sparse + each drafter (draft model, Token Recycling chain, a fixed recycling tree, the same tree
      pruned by the sparsity-aware planner, prompt lookup). Real acceptance, real routing.
  (b) REPLAYED: larger BlockFFN configurations (released 0.5B and 1.2B shapes, random weights, synthetic routing at
      TLS 80% / CLS-8 70%; bench_device/bench_synthetic.py) where the verification step is measured for real and the
      accepted lengths are replayed from the distribution measured in (a): tok/s of sparse + speculation vs plain
      dense decode of the same configuration.
  (c) SmolLM2-135M (dense, the default model): Token Recycling and prompt lookup vs plain decode and vs llama.cpp
      (llama-cpp-python in this process, same GGUF, same threads), real end to end.

Method, per section: every engine's greedy tokens are checked first (each drafter, and sparse decoding, against plain
dense greedy decoding; llama.cpp's agreement with Sparrow is recorded); this pass also warms Token Recycling's
adjacency matrix and the planner, which, as in the paper, are kept across generations. Then rounds of A B C ... over
the engines (order rotated each round), each run from the same state (the prompt minus its last token in the KV
cache, then N new tokens timed). Reported: decode tok/s (median, min, max over prompt x round), the median of the
paired ratios against plain decode on the same prompt and round, tokens per verification step, the accepted-length
distribution, experts read per step and per token, the time split (draft / verify attention / verify FFN / verify
LM head / sampling / accept), and the machine's load average before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .profile import summary

PLAIN = [
    "The history of the printing press begins",
    "def quicksort(arr):\n",
    "The three laws of thermodynamics are",
    "Once upon a time there was a little robot who",
    "Here is a recipe for pancakes:\n",
    "The main differences between Python and C are",
    "In the beginning of the twentieth century,",
    "A list of the ten largest cities in Europe:\n1.",
    "import json\n\ndef load_config(path):\n",
    "The water cycle consists of",
]
PASSAGE = ("The old lighthouse stood at the edge of the cliff. Every night its keeper climbed the one hundred and "
           "twelve steps, lit the lamp, and wrote the weather in his logbook: wind from the west, sea calm, two "
           "ships passed. ")
CODE = ("def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
        "    return 2 * (width + height)\n")
CHAT = [
    f"Repeat the following text exactly:\n{PASSAGE}",
    f"Copy this paragraph and then say 'done':\n{PASSAGE}",
    f"Rewrite this code with type hints:\n{CODE}",
    f"Here is some code:\n{CODE}\nAdd a docstring to each function and print the whole code.",
    ("My shopping list: eggs, milk, bread, butter, cheese, apples, tomatoes. Repeat my shopping list as a "
     "numbered list."),
    f"Summarize this text in one sentence:\n{PASSAGE}{PASSAGE}",
    "Write the numbers from one to twenty in words, separated by commas.",
    "Explain what a lighthouse is.",
    f"Translate to French: {PASSAGE}",
    "Write a Python function that reverses a string, then show an example call.",
]
# Prompts for the shipped BlockFFN model (trained on Python's documentation and man pages; no chat template).
DOC_PROMPTS = [
    "The os module provides",
    "def read_file(path):\n",
    "NAME\n       ls - list directory contents\n\nSYNOPSIS\n",
    "Return a new list containing",
    "This function raises ValueError if",
    "class Stack:\n    def __init__(self):\n",
    "The following example shows how to",
    "If the file does not exist,",
    "OPTIONS\n       -a, --all\n",
    "import sys\nimport os\n\n",
] + [PASSAGE, CODE]
SHIPPED = Path(__file__).resolve().parent.parent / "models"
SCHEMA = "sparrow.bench.speculative/1"


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = PLAIN + [chat(t) for t in CHAT]


def parse_spec(spec: str) -> tuple[str, dict]:
    """'recycling:max_nodes=8,branching=2-1' -> ('recycling', {'max_nodes': 8, 'branching': (2, 1)})."""
    name, _, opts = spec.partition(":")
    kw: dict = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        kw[k] = tuple(int(x) for x in v.split("-")) if "-" in v or k == "branching" else int(v)
    return name, kw


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Engine:
    """One way of decoding: `generate(tokens, n) -> (new tokens, seconds of decoding)`, run after `prepare(tokens)`
    left the prompt minus its last token in the engine's cache. stats: a SpecStats for speculative engines."""

    name: str
    prepare: Callable[[list[int]], None]
    generate: Callable[[list[int], int], list[int]]
    stats: object = None
    planner: object = None
    baseline: str = ""          # the engine whose output must equal this one's ("": the agreement is only recorded)


def native_engines(session_dense, session_sparse, drafters: dict) -> list[Engine]:
    """Plain dense, plain sparse (when session_sparse is given) and speculative engines over the sparse session (or
    the only one); a drafter's planner (drafter.planner) prunes its trees."""
    from ..runtime import generate_tokens
    from ..runtime.speculative import SpecStats, speculative_tokens

    def prep(session):
        def f(toks):
            session.truncate(0)
            if len(toks) > 1:
                session.prefill(toks[:-1])
        return f

    def plain(session):
        return lambda toks, n: list(generate_tokens(session, toks, max_tokens=n))

    out = [Engine("plain" if session_sparse is None else "dense plain", prep(session_dense), plain(session_dense))]
    spec_session = session_sparse or session_dense
    if session_sparse is not None:
        out.append(Engine("sparse plain", prep(session_sparse), plain(session_sparse), baseline=out[0].name))
    for name, d in drafters.items():
        st = SpecStats()

        def gen(toks, n, d=d, st=st):
            return list(speculative_tokens(spec_session, toks, d, max_tokens=n, stats=st))
        label = name if session_sparse is None else f"sparse + {name}"
        out.append(Engine(label, prep(spec_session), gen, st, d.planner, baseline=out[0].name))
    return out


def llama_cpp_engine(path: str, threads: int, n_ctx: int) -> Engine | None:
    try:
        from .bench_decode import LlamaCppEngine

        e = LlamaCppEngine(path, threads, n_ctx)
    except ImportError:
        return None

    def prepare(toks):
        e.reset()
        if len(toks) > 1:
            e.eval(toks[:-1])

    def generate(toks, n):
        out = []
        last = toks[-1]
        for _ in range(n):
            e.eval([last])
            last = e.argmax_last(None)
            out.append(last)
        return out
    return Engine("llama.cpp plain", prepare, generate, baseline="")


def run_engines(engines: list[Engine], prompts: list[list[int]], *, tokens: int, rounds: int,
                echo: Callable[[str], None] = print, progress: Callable[[int], None] | None = None) -> dict:
    """Check, then time, the engines on the prompts (module docstring); returns the section's report.
    progress(1) is called after each prompt of the check pass and of every round: len(prompts) * (1 + rounds)."""
    progress = progress or (lambda n: None)
    base = engines[0].name
    agreement: dict[str, list[int]] = {e.name: [] for e in engines[1:] if e.baseline == ""}
    for i, toks in enumerate(prompts):
        outs = {}
        for e in engines:
            e.prepare(toks)
            outs[e.name] = e.generate(toks, tokens)
        for e in engines[1:]:
            ref = outs[e.baseline or base]
            if e.baseline:
                if outs[e.name] != ref:
                    raise RuntimeError(f"{e.name} differs from {e.baseline} greedy decoding on prompt {i}")
            else:
                same = next((j for j, (a, b) in enumerate(zip(outs[e.name], ref)) if a != b), len(ref))
                agreement[e.name].append(same)
        progress(1)
    echo(f"  checked: every Sparrow engine's greedy tokens equal {base}'s on all {len(prompts)} prompts")
    for e in engines:
        if e.stats is not None:
            e.stats.__init__()  # count the timed runs only
    speed: dict[str, list[float]] = {e.name: [] for e in engines}
    ratio: dict[str, list[float]] = {e.name: [] for e in engines if e.name != base}
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for toks in prompts:
            tps = {}
            for e in order:
                e.prepare(toks)
                t0 = time.perf_counter()
                out = e.generate(toks, tokens)
                tps[e.name] = len(out) / (time.perf_counter() - t0)
                speed[e.name].append(tps[e.name])
            for name, rs in ratio.items():
                rs.append(tps[name] / tps[base])
            progress(1)
        echo(f"  round {r + 1}/{rounds}, load average {loadavg()}")
    report = {}
    for e in engines:
        row = {"tok_s": summary(speed[e.name])}
        if e.name in ratio:
            row["ratio_vs_" + base.replace(" ", "_")] = summary(ratio[e.name])
        if e.name in agreement:
            row["greedy_agreement_tokens_min"] = min(agreement[e.name]) if agreement[e.name] else None
        if e.stats is not None:
            row["speculative"] = e.stats.as_dict()
        if e.planner is not None:
            row["planner"] = e.planner.as_dict()
        report[e.name] = row
    return report


def print_section(title: str, rep: dict, echo: Callable[[str], None] = print) -> None:
    echo(f"\n{title}")
    echo(f"{'engine':<34} {'tok/s median':>12} {'min':>7} {'max':>7} {'x base':>7} {'tok/step':>8} "
         f"{'MB exp/tok':>10}  time split draft/attn/ffn/head/sample/accept s")
    for name, row in rep.items():
        t = row["tok_s"]
        x = next((v for k, v in row.items() if k.startswith("ratio_vs_")), None)
        line = f"{name:<34} {t['median']:>12.1f} {t['min']:>7.1f} {t['max']:>7.1f} " + \
            (f"{x['median']:>7.2f}" if x else f"{'1.00':>7}")
        sp = row.get("speculative")
        if sp:
            mb = sp["expert_bytes_per_token"] / 1e6
            line += (f" {sp['tokens_per_step']:>8.2f} {mb:>10.3f}  {sp['draft_s']:.2f}/{sp['verify_attention_s']:.2f}/"
                     f"{sp['verify_ffn_s']:.2f}/{sp['verify_head_s']:.2f}/{sp['sample_s']:.2f}/{sp['accept_s']:.2f}")
        if "speed_vs_llama_cpp" in row:
            line += f"   ({row['speed_vs_llama_cpp']:.2f}x llama.cpp)"
        echo(line)


def train_free_drafters(V: int) -> dict:
    """The drafters every model can use: prompt lookup, Token Recycling (the default chain, the paper-style 24-node
    tree verified whole, the same tree pruned by the planner) and the hybrid (lookup + recycling tree, planned)."""
    from ..runtime.drafters import Hybrid, PromptLookup, Recycling

    tree = {"branching": (4, 2, 2, 1), "max_nodes": 24}
    return {"prompt-lookup": PromptLookup(), "recycling (chain 4)": Recycling(V),
            "recycling (tree 24, fixed)": Recycling(V, **tree),
            "recycling (tree 24, planned)": Recycling(V, **tree, plan=True),
            "hybrid (lookup + tree 24, planned)": Hybrid(V)}


def section_c(model_path: str, *, threads: int, tokens: int, rounds: int, n_prompts: int, llama_cpp: bool,
              echo=print, prompts: list[str] | None = None, drafters: list[str] | None = None,
              progress: Callable[[int], None] | None = None) -> dict:
    """prompts: the texts to use (default: the first n_prompts of PROMPTS); drafters: names of
    train_free_drafters to run (default: all)."""
    from ..runtime import Model

    model = Model(model_path)
    session = model.session(n_ctx=1024, n_batch=64, n_threads=threads)
    prompts = [model.tokenize(p, parse_special=True) for p in (PROMPTS[:n_prompts] if prompts is None else prompts)]
    every = train_free_drafters(model.info.n_vocab)
    unknown = set(drafters or ()) - set(every)
    if unknown:
        raise ValueError(f"unknown drafters {sorted(unknown)}; known: {list(every)}")
    engines = native_engines(session, None, {k: v for k, v in every.items() if drafters is None or k in drafters})
    ll = llama_cpp_engine(model_path, threads, 1024) if llama_cpp else None
    if ll is not None:
        engines.append(ll)
    echo(f"(c) {Path(model_path).name}: {len(prompts)} prompts x {tokens} tokens x {rounds} rounds, {threads} threads")
    rep = run_engines(engines, prompts, tokens=tokens, rounds=rounds, echo=echo, progress=progress)
    if ll is not None:
        for name, row in rep.items():
            if name != ll.name:
                row["speed_vs_llama_cpp"] = row["tok_s"]["median"] / rep[ll.name]["tok_s"]["median"]
    session.close()
    model.close()
    return {"model": str(model_path), "engines": rep, "llama_cpp": "ran" if ll else "not run"}


def section_a(target: Path, draft: Path, *, threads: int, tokens: int, rounds: int, n_prompts: int,
              echo=print, progress: Callable[[int], None] | None = None) -> dict:
    from ..runtime import Model
    from ..runtime.drafters import DraftModel

    model = Model(target)
    dense = model.session(n_ctx=512, n_threads=threads, ffn_mode="dense")
    sparse = model.session(n_ctx=512, n_threads=threads)
    dm = Model(draft)
    drafters = {"draft-model (chain 4)": DraftModel(dm, k=4, n_ctx=512, n_threads=threads),
                "draft-model (tree: chain 3 + 2 runners-up each)": DraftModel(dm, k=3, n_ctx=512, n_threads=threads,
                                                                             alternatives=2),
                **train_free_drafters(model.info.n_vocab)}
    engines = native_engines(dense, sparse, drafters)
    prompts = [model.tokenize(p) for p in DOC_PROMPTS[:n_prompts]]
    echo(f"(a) {target.name} + {draft.name}: {len(prompts)} prompts x {tokens} tokens x {rounds} rounds, "
         f"{threads} threads")
    rep = run_engines(engines, prompts, tokens=tokens, rounds=rounds, echo=echo, progress=progress)
    st = sparse.sparsity()
    out = {"model": str(target), "draft": str(draft), "engines": rep,
           "routing": {"tls": st.tls, "cls8": st.cls[8], "dense_expert_bytes_per_token": st.dense_bytes_per_token}}
    drafters["draft-model (chain 4)"].close()
    drafters["draft-model (tree: chain 3 + 2 runners-up each)"].close()
    for x in (dense, sparse, model, dm):
        x.close()
    return out


def section_b(a: dict, *, shapes: list[str], threads: int, repeats: int, echo=print) -> dict:
    """Replay the accepted lengths of (a)'s chain drafters (up to 4 nodes) on synthetic configurations of the released
    shapes, each step verifying a chain of 4 (prompt lookup's shorter drafts are charged the full chain: a bound)."""
    from .bench_synthetic import PAPER, replayed_speculation

    out = {"label": "REPLAYED: synthetic weights and routing, accepted lengths from (a)",
           "routing": {"tls": PAPER.tls, "cls": PAPER.cls, "k": PAPER.k}, "runs": []}
    for shape in shapes:
        for name in ("draft-model (chain 4)", "recycling (chain 4)", "prompt-lookup"):  # (a)'s chain drafters
            sp = a["engines"][f"sparse + {name}"]["speculative"]
            hist = {int(k): v for k, v in sp["accepted_hist"].items()}
            echo(f"(b) {shape}, replaying {name}: accepted-length distribution {hist}")
            draft_s = sp["draft_s"] / max(sp["steps"], 1)  # the real drafter's time per step, measured in (a)
            r = replayed_speculation(shape, hist, 4, threads=threads, repeats=repeats, draft_s_per_step=draft_s)
            out["runs"].append({"shape": shape, "replayed_from": name, **r})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--smollm", help="SmolLM2 GGUF for (c) (default: the store's default model, pulled if needed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=0, help="use the first N prompts (default: all)")
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.2b"], help="synthetic shapes for (b)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 1 round, 24 tokens, shape 0.1b for (b)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.rounds, args.tokens, args.shapes = args.prompts or 4, 1, 24, ["0.1b"]

    report = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds, "load_before": loadavg()}
    n = args.prompts or 10**9
    if "a" in args.sections or "b" in args.sections:
        report["a"] = section_a(SHIPPED / "blockffn-tiny.Q8_0.gguf", SHIPPED / "blockffn-tiny-draft.Q8_0.gguf",
                                threads=args.threads, tokens=args.tokens, rounds=args.rounds, n_prompts=n)
        print_section("(a) shipped BlockFFN, real acceptance and routing", report["a"]["engines"])
    if "b" in args.sections:
        report["b"] = section_b(report["a"], shapes=args.shapes, threads=args.threads, repeats=3 if args.quick else 7)
        for r in report["b"]["runs"]:
            print(f"(b) REPLAYED {r['shape']} from {r['replayed_from']}: " + json.dumps(
                {k: v for k, v in r.items() if "speedup" in k or "tok_s" in k}))
    if "c" in args.sections:
        path = args.smollm
        if path is None:
            from ..runtime.store import Store

            store = Store()
            path = str(store.model_path(store.pull(store.default(), progress=True)))
        report["c"] = section_c(path, threads=args.threads, tokens=args.tokens, rounds=args.rounds, n_prompts=n,
                                llama_cpp=not args.no_llama_cpp)
        print_section("(c) SmolLM2, real end to end", report["c"]["engines"])
    report["load_after"] = loadavg()
    print(f"\nload average before {report['load_before']}, after {report['load_after']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
