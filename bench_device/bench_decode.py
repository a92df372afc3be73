"""Decode, prefill and batch-cost benchmark: Sparrow's native runtime vs llama.cpp (llama-cpp-python), same GGUF.

Each engine lives in its own worker process (so its peak RSS is its own); the parent asks them in turn, A B A B ...,
so drift of the machine does not bias the ratio. Threads are pinned to the same count for both. Before timing, each
engine's greedy continuation of the prompt is checked against the other's (they must agree on the first tokens).

    python -m bench_device.bench_decode MODEL.gguf --threads 2 --repeats 5 --out result.json

--compare-repack adds a third engine, "sparrow-norepack" (Model(repack=False): weights read as file views by the
unpacked kernels), asked in the same rounds, so the gain of load-time repacking is measured side by side.

Measures, per engine: decode tok/s (greedy, one token per call), prefill tok/s (one batch of the prompt), peak RSS,
and the cost of evaluating T tokens in one call relative to one token, for T = 1, 2, 4, 8, 16, 64 (the number that
decides whether speculative decoding pays on a CPU; see DESIGN.md).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from pathlib import Path

BATCH_SIZES = (1, 2, 4, 8, 16, 64)
PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, and what the message says.<|im_end|>\n<|im_start|>assistant\n")


class NativeEngine:
    name = "sparrow"

    def __init__(self, path: str, threads: int, n_ctx: int, repack: bool = True):
        from runtime import Model

        self.model = Model(path, repack=repack)
        self.session = self.model.session(n_ctx=n_ctx, n_batch=64, n_threads=threads)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, parse_special=True)

    def reset(self, n: int = 0) -> None:
        self.session.truncate(n)

    def eval(self, tokens: list[int]):
        return self.session.eval(tokens, logits="last")

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.reset()
        logits = self.session.prefill(prompt)
        out = []
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = self.session.eval([out[-1]])
        return out


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.np = __import__("numpy")

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def reset(self, n: int = 0) -> None:
        self.llm.n_tokens = n  # the next eval removes KV entries from position n on

    def eval(self, tokens: list[int]):
        self.llm.eval(tokens)  # computes the last token's logits, as the native engine is asked to

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(self.np.argmax(self.last_logits())))
            self.llm.eval([out[-1]])
        return out

    def last_logits(self):
        # llama-cpp-python >= 0.3 no longer copies logits into llm.scores unless logits_all=True; read the context's
        # output row (the last token of the last eval) directly
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM (Linux) starts afresh at exec; ru_maxrss survives exec, so a worker spawned by
    a parent that once held more memory would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(engine_name: str, path: str, threads: int, n_ctx: int, conn) -> None:
    if engine_name.startswith("sparrow"):
        engine = NativeEngine(path, threads, n_ctx, repack=engine_name != "sparrow-norepack")
    else:
        engine = LlamaCppEngine(path, threads, n_ctx)
    prompt = engine.tokenize(PROMPT)
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            conn.send(None)
            return
        if cmd == "greedy":
            conn.send(engine.greedy(prompt, arg))
        elif cmd == "prefill":  # seconds for the whole prompt in one batch (<= 64 tokens per call)
            engine.reset()
            t0 = time.perf_counter()
            for i in range(0, len(prompt), 64):
                engine.eval(prompt[i:i + 64])
            conn.send((time.perf_counter() - t0, len(prompt)))
        elif cmd == "decode":  # seconds per token over `arg` single-token steps after the prompt
            engine.reset()
            for i in range(0, len(prompt), 64):
                engine.eval(prompt[i:i + 64])
            tok = prompt[-1]
            t0 = time.perf_counter()
            for _ in range(arg):
                engine.eval([tok])
            conn.send((time.perf_counter() - t0) / arg)
        elif cmd == "batch":  # seconds for one call of T tokens after the prompt, median of 5
            engine.reset()
            engine.eval((prompt * 4)[:64])  # 64 cached tokens (the prompt is shorter)
            times = []
            for _ in range(5):
                engine.reset(64)
                t0 = time.perf_counter()
                engine.eval((prompt * 4)[:arg])
                times.append(time.perf_counter() - t0)
            conn.send(statistics.median(times))
        elif cmd == "rss":
            conn.send(peak_rss_bytes())


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run(model: str, *, threads: int = 2, repeats: int = 5, decode_tokens: int = 64,
        engine_names: tuple[str, ...] = ("sparrow", "llama.cpp"), batch_sizes: tuple[int, ...] = BATCH_SIZES,
        n_ctx: int = 1024, min_agreement: int = 8, progress=None) -> dict:
    """The benchmark as a library call: engines in worker processes, asked in turn each repeat. Raises RuntimeError
    when two engines disagree on the greedy continuation before `min_agreement` tokens. `progress(step)` is called
    after every measurement (repeats * engines * (2 + len(batch_sizes)) steps in all)."""
    ctx = mp.get_context("spawn")
    engines = {}
    try:
        for name in engine_names:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(name, model, threads, n_ctx, child), daemon=True)
            proc.start()
            engines[name] = (proc, parent)

        def ask(name, cmd, arg=None):
            conn = engines[name][1]
            conn.send((cmd, arg))
            try:
                return conn.recv()
            except EOFError:
                raise RuntimeError(f"the {name} worker died (exit code {engines[name][0].exitcode})") from None

        # correctness first: every engine must agree with the first on the greedy continuation's first tokens
        n_check = max(16, min_agreement)
        outs = {name: ask(name, "greedy", n_check) for name in engines}
        ref = outs[engine_names[0]]
        agree = min(next((i for i, (a, b) in enumerate(zip(ref, o)) if a != b), n_check) for o in outs.values())
        if len(engines) > 1 and agree < min_agreement:
            raise RuntimeError(f"engines disagree at greedy token {agree}: {outs}")

        res = {name: {"decode_s": [], "prefill_s": [], "batch_s": {t: [] for t in batch_sizes}} for name in engines}
        n_prompt = 0
        for _ in range(repeats):
            for name in engines:  # alternate engines within every repeat
                res[name]["decode_s"].append(ask(name, "decode", decode_tokens))
                if progress:
                    progress(1)
                secs, n_prompt = ask(name, "prefill")
                res[name]["prefill_s"].append(secs)
                if progress:
                    progress(1)
                for t in batch_sizes:
                    res[name]["batch_s"][t].append(ask(name, "batch", t))
                    if progress:
                        progress(1)
        report = {"schema": "sparrow.bench_decode/1", "model": os.path.basename(model), "threads": threads,
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "prompt_tokens": n_prompt, "decode_tokens": decode_tokens, "repeats": repeats,
                  "greedy_agreement_tokens": agree if len(engines) > 1 else None, "engines": {}}
        for name in engines:
            r = res[name]
            b1 = statistics.median(r["batch_s"][batch_sizes[0]])
            report["engines"][name] = {
                "decode_tok_s": summary([1 / s for s in r["decode_s"]]),
                "prefill_tok_s": summary([n_prompt / s for s in r["prefill_s"]]),
                "peak_rss_mb": ask(name, "rss") / 2**20,
                "batch_cost_vs_t1": {t: statistics.median(r["batch_s"][t]) / b1 for t in batch_sizes},
                "batch_ms": {t: 1e3 * statistics.median(r["batch_s"][t]) for t in batch_sizes},
            }
            ask(name, "stop")
        if "sparrow" in engines and "llama.cpp" in engines:
            s, l = report["engines"]["sparrow"], report["engines"]["llama.cpp"]
            report["ratio_sparrow_over_llama_cpp"] = {
                "decode": s["decode_tok_s"]["median"] / l["decode_tok_s"]["median"],
                "prefill": s["prefill_tok_s"]["median"] / l["prefill_tok_s"]["median"],
            }
        return report
    finally:
        for proc, conn in engines.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file both engines can run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--compare-repack", action="store_true", help="also run sparrow with repack=False")
    args = ap.parse_args(argv)

    names = ("sparrow", "llama.cpp") + (("sparrow-norepack",) if args.compare_repack else ())
    try:
        report = run(args.model, threads=args.threads, repeats=args.repeats, decode_tokens=args.decode_tokens,
                     engine_names=names)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


def print_report(r: dict) -> None:
    print(f"model {r['model']}, {r['threads']} threads, prompt {r['prompt_tokens']} tokens, "
          f"greedy agreement on first {r['greedy_agreement_tokens']} tokens")
    print(f"{'engine':<16} {'decode tok/s (min-max)':>26} {'prefill tok/s (min-max)':>26} {'peak RSS MB':>12}")
    for name, e in r["engines"].items():
        d, p = e["decode_tok_s"], e["prefill_tok_s"]
        print(f"{name:<16} {d['median']:>9.1f} ({d['min']:.1f}-{d['max']:.1f}){'':>3} "
              f"{p['median']:>9.1f} ({p['min']:.1f}-{p['max']:.1f}){'':>3} {e['peak_rss_mb']:>10.0f}")
    print("ratio sparrow/llama.cpp: decode {decode:.2f}x, prefill {prefill:.2f}x".format(
        **r["ratio_sparrow_over_llama_cpp"]))
    print("cost of T tokens in one call relative to T=1:")
    print(f"{'T':>4} " + " ".join(f"{name:>22}" for name in r["engines"]))
    for t in BATCH_SIZES:
        cells = [f"{e['batch_cost_vs_t1'][t]:6.2f}x ({e['batch_ms'][t]:7.2f} ms)" for e in r["engines"].values()]
        print(f"{t:>4} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
