"""The C generator (issue 15, sp_generator) with every drafter, against plain decoding and the Python speculative loop
it replaces, on the default model (SmolLM2-135M-Instruct): tok/s side by side per prompt, greedy and with chat's
sampling defaults, and the C loop's own time per step outside the forward passes.

    python -m sparrow.bench_device.bench_generate [--model GGUF] [--tokens 64] [--rounds 3] [--chunk 8] [--out FILE]

Engines, each on its own session of the same model, from the same state (the prompt but its last token in the KV
cache; the new tokens timed):
  python plain       runtime.native.generate_tokens (the Python loop over the C sampler): `--draft none`, the baseline
  C plain            runtime.native.Generator, drafter "none"
  python adaptive    runtime.speculative.speculative_tokens with the adaptive drafter (the Python loop that chat ran
                     before it moved into C)
  C lookup, C recycling, C hybrid, C adaptive
                     Generator with that drafter and its defaults (sp_generator_default_params_for): prompt lookup;
                     Token Recycling (a chain of 4); the hybrid (lookup chain of 8 + a (4, 2, 2, 1) recycling tree,
                     pruned by the planner); adaptive (the hybrid behind the draft gate, what chat runs)
Modes: greedy (every engine); sampling with SamplerParams.chat(seed=7) (python plain, C plain, python adaptive,
C adaptive; every generation starts its sampler from that seed). Prompts: bench_adaptive's unseen chat requests and its prompts where drafting pays,
rendered as chat.

Method (DESIGN.md, "Performance method"): a check pass runs every engine on every prompt once (greedy: each engine's
tokens must equal python plain's; sampling: C plain's must equal python plain's (same seed), else the benchmark
stops; the pass also warms Token Recycling's matrix and the planners, kept across prompts as in a chat). Then rounds:
per prompt the engines generate side by side in turns of --chunk tokens (the order rotated per prompt and round),
each engine's time the sum of its own turns, so a shared machine's slow moments fall on every engine alike. A ratio is
an engine's tok/s over python plain's on the same prompt in the same round; per engine: the median (min-max) of the
per-prompt medians over rounds. The C loop's time per step is sp_generator_stats' loop_s / steps over the rounds
(drafting, sampling, acceptance, rollback, Token Recycling's refresh: everything but sp_eval). Threads pinned; the CPU
named; load averages before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .bench_adaptive import PAYS, UNSEEN_CHAT, cpu_name, pin_threads
from .bench_speculative import chat, loadavg

SCHEMA = "sparrow.bench.generate/2"
C_ENGINES = {"C plain": "none", "C lookup": "prompt-lookup", "C recycling": "recycling", "C hybrid": "hybrid",
             "C adaptive": "adaptive"}
GREEDY = ("python plain", "C plain", "python adaptive", "C lookup", "C recycling", "C hybrid", "C adaptive")
SAMPLING = ("python plain", "C plain", "python adaptive", "C adaptive")


def _med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: the store's default model, pulled if needed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8, help="tokens per turn")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from ..runtime import Model
    from ..runtime.drafters import make_drafter
    from ..runtime.native import Generator, Sampler, SamplerParams, generate_tokens
    from ..runtime.planner import gate_summary
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
              "tokens": a.tokens, "rounds": a.rounds, "chunk": a.chunk, "prompts": texts, "load_before": loadavg(),
              "modes": {}}
    print(f"{report['cpu']}; {pinned}; {Path(path).name}; {len(texts)} prompts x {a.tokens} tokens x {a.rounds} "
          f"rounds, turns of {a.chunk}")
    with Model(path) as model:
        V = model.info.n_vocab
        prompts = [model.tokenize(chat(t), parse_special=True) for t in texts]
        for mode, engines in (("greedy", GREEDY), ("sampling", SAMPLING)):
            params = SamplerParams.greedy() if mode == "greedy" else SamplerParams.chat(seed=7)
            sessions = {e: model.session(n_ctx=1024, n_threads=a.threads) for e in engines}
            gens = {e: Generator(sessions[e], params=params, max_tokens=a.tokens, drafter=C_ENGINES[e],
                                 stop_at_eog=False) for e in engines if e in C_ENGINES}
            py_drafter = make_drafter("adaptive", model)

            def start(engine: str, prompt: list[int]) -> Callable[[], int | None]:
                """The engine ready to generate from prompt (its prompt but the last token evaluated, untimed);
                returns a function giving the next token (None at the end)."""
                s = sessions[engine]
                s.truncate(0)
                if engine in gens:
                    gens[engine].start(prompt)
                    return gens[engine].next
                s.prefill(prompt[:-1])
                it: Iterator[int] = (
                    generate_tokens(s, prompt, max_tokens=a.tokens, sampler=Sampler(V, params), stop_at_eog=False)
                    if engine == "python plain" else
                    speculative_tokens(s, prompt, py_drafter, max_tokens=a.tokens, params=params, stop_at_eog=False))
                return lambda: next(it, None)

            # check pass (and warm-up)
            for i, p in enumerate(prompts):
                outs = {}
                for e in engines:
                    nxt = start(e, p)
                    outs[e] = [t for t in iter(nxt, None)]
                want = outs["python plain"]
                same = engines if mode == "greedy" else ("C plain",)
                for e in same:
                    if outs[e] != want:
                        raise SystemExit(f"{mode}: {e} differs from python plain on prompt {i}")
            for g in gens.values():
                g.reset_stats()
            tok_s = {e: [[] for _ in prompts] for e in engines}
            for r in range(a.rounds):
                for i, p in enumerate(prompts):
                    k = (i + r) % len(engines)
                    order = engines[k:] + engines[:k]
                    nexts = {e: start(e, p) for e in order}
                    secs = {e: 0.0 for e in order}
                    count = {e: 0 for e in order}
                    live = list(order)
                    while live:
                        for e in list(live):
                            t0 = time.perf_counter()
                            got = 0
                            for _ in range(a.chunk):
                                if nexts[e]() is None:
                                    live.remove(e)
                                    break
                                got += 1
                            secs[e] += time.perf_counter() - t0
                            count[e] += got
                    for e in order:
                        tok_s[e][i].append(count[e] / secs[e])
            ratios = {e: [statistics.median(x / b for x, b in zip(tok_s[e][i], tok_s["python plain"][i]))
                          for i in range(len(prompts))] for e in engines}
            ratios_c = {e: [statistics.median(x / b for x, b in zip(tok_s[e][i], tok_s["C plain"][i]))
                            for i in range(len(prompts))] for e in engines}
            out = {}
            for e in engines:
                rec = {"tok_s": _med([statistics.median(x) for x in tok_s[e]]),
                       "ratio_vs_python_plain": _med(ratios[e]), "ratio_vs_c_plain": _med(ratios_c[e])}
                if e in gens:
                    st = gens[e].stats()
                    rec["loop_us_per_step"] = st.loop_s / max(st.steps, 1) * 1e6
                    rec["tokens_per_step"] = st.tokens / max(st.steps, 1)
                    rec["plain_steps_fraction"] = st.plain_steps / max(st.steps, 1)
                    if e == "C adaptive":
                        rec["gate"] = gate_summary(st.gate_drafting, st.gate_probes, st.gate_paid)
                out[e] = rec
                lp = f"; C loop {rec['loop_us_per_step']:.1f} us/step, {rec['tokens_per_step']:.2f} tok/step" \
                    if "loop_us_per_step" in rec else ""
                rp, rc = rec["ratio_vs_python_plain"], rec["ratio_vs_c_plain"]
                print(f"{mode:8s} {e:15s} {rec['tok_s']['median']:7.1f} tok/s  x python plain {rp['median']:.2f} "
                      f"({rp['min']:.2f}-{rp['max']:.2f})  x C plain {rc['median']:.2f}{lp}")
            report["modes"][mode] = out
            for g in gens.values():
                g.close()
            py_drafter.close()
            for s in sessions.values():
                s.close()
    report["load_after"] = loadavg()
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
