"""Speculative decoding end to end: plain greedy decode vs each drafter, same model, same session, same threads.

    python -m bench_device.bench_speculative MODEL.gguf --threads 2 --rounds 2 --out spec.json

Per prompt (plain continuations and chat prompts that repeat their context, where prompt lookup shines):
  1. correctness first: every drafter's greedy tokens must equal plain greedy decoding (runtime.native.
     generate_tokens); the benchmark stops if not. This pass also warms Token Recycling's adjacency matrix, which,
     as in the paper, is kept across generations.
  2. timing: rounds of A B C ... over the engines (order rotated each round), each run from the same state: the
     prompt minus its last token already in the KV cache, then N new tokens timed (the first step evaluates the last
     prompt token for every engine).
Reports decode tok/s per engine (median, min, max over prompt x round), the median of the paired speed ratios
against plain decode on the same prompt and round, tokens per verification step, the accepted-length distribution,
the time split (draft / verify / accept), and the machine's load average before and after.

Drafter specs: "prompt-lookup", "recycling", or with options "recycling:max_nodes=8,branching=2-1",
"prompt-lookup:ngram=4,k=6" (lists separated by '-').
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

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


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = PLAIN + [chat(t) for t in CHAT]


def parse_spec(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    kw: dict = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        kw[k] = tuple(int(x) for x in v.split("-")) if "-" in v or k == "branching" else int(v)
    return name, kw


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file (e.g. SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--drafters", nargs="+", default=["prompt-lookup", "recycling"])
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()

    from runtime import Model, generate_tokens
    from runtime.drafters import make_drafter
    from runtime.speculative import SpecStats, speculative_tokens

    load_before = loadavg()
    model = Model(args.model)
    session = model.session(n_ctx=1024, n_batch=64, n_threads=args.threads)
    prompts = [model.tokenize(p, parse_special=True) for p in PROMPTS[:args.prompts]]
    drafters = {spec: make_drafter(parse_spec(spec)[0], model, **parse_spec(spec)[1]) for spec in args.drafters}
    engines = ["plain"] + list(drafters)

    def run(engine: str, toks: list[int], stats: SpecStats | None = None) -> tuple[list[int], float]:
        session.truncate(0)
        if len(toks) > 1:
            session.prefill(toks[:-1])
        t0 = time.perf_counter()
        if engine == "plain":
            out = list(generate_tokens(session, toks, max_tokens=args.tokens))
        else:
            out = list(speculative_tokens(session, toks, drafters[engine], max_tokens=args.tokens, stats=stats))
        return out, time.perf_counter() - t0

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"load average {load_before}; {len(prompts)} prompts x {args.tokens} tokens x {args.rounds} rounds",
          flush=True)
    # 1. correctness (and Token Recycling warm-up)
    for i, toks in enumerate(prompts):
        ref, _ = run("plain", toks)
        for e in drafters:
            got, _ = run(e, toks)
            if got != ref:
                raise SystemExit(f"{e} differs from plain greedy decoding on prompt {i}: {got} != {ref}")
    print("greedy outputs of every drafter equal plain decoding on every prompt", flush=True)

    # 2. timing, A B C ... with the order rotated each round
    speed: dict[str, list[float]] = {e: [] for e in engines}
    ratio: dict[str, list[float]] = {e: [] for e in drafters}
    stats = {e: SpecStats() for e in drafters}
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for toks in prompts:
            tps = {}
            for e in order:
                out, dt = run(e, toks, stats.get(e))
                tps[e] = len(out) / dt
                speed[e].append(tps[e])
            for e in drafters:
                ratio[e].append(tps[e] / tps["plain"])
        print(f"round {r + 1}/{args.rounds} done, load average {loadavg()}", flush=True)

    load_after = loadavg()
    report = {"model": str(args.model), "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
              "prompts": len(prompts), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "load_before": load_before, "load_after": load_after, "engines": {}}
    print(f"\n{'engine':<36} {'tok/s median':>12} {'min':>7} {'max':>7} {'x plain':>8} {'tok/step':>9} "
          f"{'draft/verify/accept s':>22}")
    for e in engines:
        s = speed[e]
        row = {"tok_s_median": statistics.median(s), "tok_s_min": min(s), "tok_s_max": max(s)}
        line = f"{e:<36} {row['tok_s_median']:>12.1f} {min(s):>7.1f} {max(s):>7.1f}"
        if e in drafters:
            st = stats[e]
            row.update({"ratio_median": statistics.median(ratio[e]), "ratio_min": min(ratio[e]),
                        "ratio_max": max(ratio[e]), **st.as_dict()})
            line += (f" {row['ratio_median']:>8.2f} {st.tokens_per_step:>9.2f} "
                     f"{st.draft_s:>6.2f}/{st.verify_s:.2f}/{st.accept_s:.2f}")
        report["engines"][e] = row
        print(line)
    for e in drafters:
        hist = stats[e].accepted_hist
        total = sum(hist.values())
        print(f"{e}: accepted draft tokens per step: " +
              " ".join(f"{k}:{v / total:.0%}" for k, v in sorted(hist.items())))
    print(f"load average before {load_before}, after {load_after} (the machine is shared: figures move with it)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
