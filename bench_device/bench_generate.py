"""The C generator (issue 15, sp_generator) against the Python decode loops it is to replace, greedy, on the default
model (SmolLM2-135M-Instruct): tok/s side by side per prompt, and the C loop's own time per step outside the forward
passes.

    python -m sparrow.bench_device.bench_generate [--model GGUF] [--tokens 64] [--rounds 3] [--out FILE]

Engines, each on its own session of the same model, the KV cache cleared before every run (so each run evaluates its
prompt: the time counted is the decode after the prompt, from the first token to the last):
  python plain        runtime.native.generate_tokens (the Python loop over the C sampler)
  C plain             runtime.native.Generator, drafter "none"
  python lookup       runtime.speculative.speculative_tokens with PromptLookup (the Python speculative loop)
  C lookup            Generator with prompt lookup (verified in C, rolled back with truncate)
Prompts: bench_adaptive's unseen chat requests and its prompts where drafting pays, rendered as chat. Every engine's
tokens must equal "python plain"'s (greedy identity), else the benchmark stops. Rounds: per prompt the engines run
one after another in an order rotated per prompt and round; a ratio is an engine's tok/s over "python plain"'s on
the same prompt in the same round; per engine the median (min-max) of the per-prompt medians. The C loop's time per
step is sp_generator_stats' loop_s / steps (drafting, sampling, acceptance, rollback: everything but sp_eval).
Threads pinned; the CPU named; load averages before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

from .bench_adaptive import PAYS, UNSEEN_CHAT, cpu_name, pin_threads
from .bench_speculative import chat, loadavg

SCHEMA = "sparrow.bench.generate/1"
ENGINES = ("python plain", "C plain", "python lookup", "C lookup")


def _med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: the store's default model, pulled if needed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from ..runtime import Model
    from ..runtime.drafters import PromptLookup
    from ..runtime.native import Generator, Sampler, SamplerParams, generate_tokens
    from ..runtime.speculative import speculative_tokens

    pinned = pin_threads(a.threads)
    path = a.model
    if path is None:
        from ..runtime.store import Store

        store = Store()
        path = str(store.model_path(store.pull(store.default(), progress=True)))
    texts = UNSEEN_CHAT + PAYS
    report = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_name(), "threads": a.threads, "pinning": pinned, "model": Path(path).name,
              "tokens": a.tokens, "rounds": a.rounds, "prompts": texts, "load_before": loadavg()}
    print(f"{report['cpu']}; {pinned}; {Path(path).name}; {len(texts)} prompts x {a.tokens} tokens x {a.rounds} rounds")
    greedy = SamplerParams.greedy()
    with Model(path) as model:
        sessions = {e: model.session(n_ctx=1024, n_threads=a.threads) for e in ENGINES}
        prompts = [model.tokenize(chat(t), parse_special=True) for t in texts]

        def run(engine: str, prompt: list[int]) -> tuple[list[int], float, tuple[int, float] | None]:
            s = sessions[engine]
            s.truncate(0)
            out: list[int] = []
            loop = None
            t0 = None
            if engine.startswith("C"):
                with Generator(s, params=greedy, max_tokens=a.tokens,
                               drafter="none" if engine == "C plain" else "prompt-lookup") as g:
                    g.start(prompt)
                    for tok in g:
                        if t0 is None:
                            t0 = time.perf_counter()
                        out.append(tok)
                    st = g.stats()
                    loop = (st.steps, st.loop_s)
            else:
                it = generate_tokens(s, prompt, max_tokens=a.tokens, sampler=Sampler(model.info.n_vocab, greedy)) \
                    if engine == "python plain" else \
                    speculative_tokens(s, prompt, PromptLookup(), max_tokens=a.tokens, params=greedy)
                for tok in it:
                    if t0 is None:
                        t0 = time.perf_counter()
                    out.append(tok)
            return out, time.perf_counter() - t0, loop

        for i, p in enumerate(prompts):  # check: greedy identity (and warm-up)
            want = run("python plain", p)[0]
            for e in ENGINES[1:]:
                got = run(e, p)[0]
                if got != want:
                    raise SystemExit(f"{e} differs from python plain on prompt {i}: {got} != {want}")
        tok_s = {e: [[] for _ in prompts] for e in ENGINES}
        loops: dict[str, list[float]] = {"C plain": [], "C lookup": []}
        for r in range(a.rounds):
            for i, p in enumerate(prompts):
                k = (i + r) % len(ENGINES)
                for e in ENGINES[k:] + ENGINES[:k]:
                    toks, secs, loop = run(e, p)
                    tok_s[e][i].append((len(toks) - 1) / secs if len(toks) > 1 and secs > 0 else float("nan"))
                    if loop and loop[0]:
                        loops[e].append(loop[1] / loop[0] * 1e6)
        for s in sessions.values():
            s.close()
    ratios = {e: [statistics.median(x / b for x, b in zip(tok_s[e][i], tok_s["python plain"][i]))
                  for i in range(len(prompts))] for e in ENGINES}
    report["engines"] = {e: {"tok_s": _med([statistics.median(x) for x in tok_s[e]]),
                             "ratio_vs_python_plain": _med(ratios[e]),
                             **({"loop_us_per_step": _med(loops[e])} if e in loops else {})} for e in ENGINES}
    report["load_after"] = loadavg()
    for e, rec in report["engines"].items():
        lp = f"; C loop {rec['loop_us_per_step']['median']:.1f} us/step" if "loop_us_per_step" in rec else ""
        r = rec["ratio_vs_python_plain"]
        print(f"{e:14s} {rec['tok_s']['median']:7.1f} tok/s  x python plain {r['median']:.2f} "
              f"({r['min']:.2f}-{r['max']:.2f}){lp}")
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
