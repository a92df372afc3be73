"""Decode, prefill and batch-cost benchmark: Sparrow's native runtime vs llama.cpp (llama-cpp-python), same GGUF,
and onnxruntime on an ONNX export of it (engine "onnxruntime": f32; "onnxruntime-int8", "onnxruntime-int4").

Each engine lives in its own worker process (so its peak RSS is its own); the parent asks them in turn, A B A B ...,
so drift of the machine does not bias the ratio. Threads are pinned to the same count for both. Before timing, each
engine's outputs are checked against an oracle: llama.cpp, or, when Sparrow runs alone, Sparrow's scalar reference
kernels (a worker started with SPARROW_FORCE_SCALAR=1). Both are fed the first engine's greedy continuation of the
prompt (teacher forcing) and their logits at every step compared: normalized MSE < 1e-2 against llama.cpp, < 3e-3
against the scalar kernels (nmse_bound), and wherever the top-1 tokens differ they must be a near tie in the
oracle's logits (gap < 0.5): engines that round differently may break a tie differently, nothing else. The first
step where Sparrow's own greedy continuation leaves the oracle's must be such a tie too. The report names the oracle
and gives the NMSE, the forks, how many greedy tokens agree outright and the first fork's gap.

    python -m sparrow.bench_device.bench_decode MODEL.gguf --threads 2 --repeats 5 --out result.json

--onnx adds the "onnxruntime" engine (--onnx int8: "onnxruntime-int8"). --compare-repack adds a third engine, "sparrow-norepack" (Model(repack=False): weights read as file views by the
unpacked kernels), asked in the same rounds, so the gain of load-time repacking is measured side by side.
--before BUILD_DIR adds "sparrow-before": the native runtime of another developer build (tools/dev_build.sh folder,
e.g. main before a change, built in a git worktree) in its own worker, asked in the same rounds, so a change to the
library is measured before and after side by side; the report gains "ratio_sparrow_over_before" (decode, prefill and
each batch size's time).

Measures, per engine: decode tok/s (greedy, one token per call), prefill tok/s (one batch of the prompt), time to
first token (the prompt text tokenized, prefilled from an empty cache and the first token picked; it must be the
engine's own greedy first token), peak RSS, energy per decoded token where RAPL counters can be read, and the cost
of evaluating T tokens in one call relative to one token, for T = 1, 2, 4, 8, 16, 64 after 64 cached tokens (the
number that decides whether speculative decoding pays on a CPU; see DESIGN.md), and for T = 1, 8 after 1024 cached
tokens (where attention over the cache is a large share of the pass).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

BATCH_SIZES = (1, 2, 4, 8, 16, 64)
LONG_CACHED, LONG_SIZES = 1024, (1, 8)  # the T-curve after a long context
PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, and what the message says.<|im_end|>\n<|im_start|>assistant\n")


class NativeEngine:
    name = "sparrow"

    def __init__(self, path: str, threads: int, n_ctx: int, repack: bool = True):
        from ..runtime import Model

        self.model = Model(path, repack=repack)
        self.session = self.model.session(n_ctx=n_ctx, n_batch=64, n_threads=threads)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, parse_special=True)

    def reset(self, n: int = 0) -> None:
        self.session.truncate(n)

    def eval(self, tokens: list[int]):
        return self.session.eval(tokens, logits="last")

    def argmax_last(self, logits) -> int:
        return int(logits.argmax())

    def logits_row(self, logits):
        return logits.reshape(-1).copy()

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

    def argmax_last(self, logits) -> int:
        return int(self.np.argmax(self.last_logits()))

    def logits_row(self, logits):
        return self.last_logits().copy()

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


class OnnxEngine(NativeEngine):
    """onnxruntime on an ONNX export of the GGUF (converters/onnx_export.py: "onnxruntime" exports f32, the GGUF's
    exact function; "onnxruntime-int8" / "-int4" export those weight types), written to a temporary folder when the
    worker starts (the export's time is not measured)."""

    name = "onnxruntime"

    def __init__(self, path: str, threads: int, n_ctx: int, weights: str = "f32"):
        import subprocess
        import sys
        import tempfile

        from ..runtime.onnx_backend import OnnxModel

        self._tmp = tempfile.TemporaryDirectory(prefix="sparrow-bench-onnx-")
        out = Path(self._tmp.name) / "model.onnx"
        # exported by a process of its own (`python -m sparrow.converters`), so this worker's peak RSS is the
        # engine's, not the export's
        converters = __package__.rsplit(".", 1)[0] + ".converters"
        done = subprocess.run([sys.executable, "-m", converters, path, str(out), "--type", weights, "--no-progress"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the ONNX export of {path} failed: {done.stderr.strip()[-500:]}")
        self.model = OnnxModel(out, n_threads=threads)
        self.session = self.model.session(n_ctx=n_ctx, n_batch=64)


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
    elif engine_name.startswith("onnxruntime"):
        engine = OnnxEngine(path, threads, n_ctx, *engine_name.split("-")[1:])
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
        elif cmd == "logits":  # [n, V] logits of each step of the continuation `arg` after the prompt (teacher forced)
            engine.reset()
            rows = []
            for i in range(0, len(prompt), 64):
                logits = engine.eval(prompt[i:i + 64])
            rows.append(engine.logits_row(logits))
            for tok in arg[:-1]:
                rows.append(engine.logits_row(engine.eval([tok])))
            conn.send(__import__("numpy").stack(rows))
        elif cmd == "ttft":  # seconds from the prompt text to the first token: tokenize, prefill, greedy pick
            engine.reset()
            t0 = time.perf_counter()
            toks = engine.tokenize(PROMPT)
            for i in range(0, len(toks), 64):
                logits = engine.eval(toks[i:i + 64])
            first = engine.argmax_last(logits)
            conn.send((time.perf_counter() - t0, first))
        elif cmd == "decode":  # seconds per token over `arg` single-token steps after the prompt
            engine.reset()
            for i in range(0, len(prompt), 64):
                engine.eval(prompt[i:i + 64])
            tok = prompt[-1]
            t0 = time.perf_counter()
            for _ in range(arg):
                engine.eval([tok])
            conn.send((time.perf_counter() - t0) / arg)
        elif cmd == "batch":  # seconds for one call of T tokens after `cached` tokens, median of 5
            T, cached = arg
            text = prompt * (cached // len(prompt) + 2)  # the prompt repeated: as many tokens as asked
            engine.reset()
            for i in range(0, cached, 64):
                engine.eval(text[i:min(i + 64, cached)])
            times = []
            for _ in range(5):
                engine.reset(cached)
                t0 = time.perf_counter()
                engine.eval(text[cached:cached + T])
                times.append(time.perf_counter() - t0)
            conn.send(statistics.median(times))
        elif cmd == "rss":
            conn.send(peak_rss_bytes())


def how_it_ended(proc, timeout: float = 5.0) -> str:
    """How a worker process whose pipe closed ended: "killed by signal 11 (SIGSEGV)", "exit code 1", or "still running
    after its pipe closed" (it is joined for up to `timeout` seconds first: until then its exit code is unknown)."""
    proc.join(timeout=timeout)
    code = proc.exitcode
    if code is None:
        return "still running after its pipe closed"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


SCALAR_ORACLE = "sparrow-scalar"
NMSE_MAX = 1e-2   # logits vs llama.cpp's (measured 1.1e-3 on SmolLM2 and the tiny test llamas)
# Logits vs Sparrow's scalar kernels: the same forward code, and kernels that agree to ~2e-7 of a row's magnitude,
# but an activation that rounds across an 8-bit step on one tier and not the other moves by a whole step, and such
# steps grow through the layers. Measured over 16 steps: 4e-15 (tiny Q4_1 llama), 6e-11 (tiny F32 llama), 1.4e-6
# (blockffn-tiny), 1.1e-3 (SmolLM2-135M, 30 layers: already 3.7e-4 on its first token).
SCALAR_NMSE_MAX = 3e-3
TIE_GAP = 0.5     # a top-1 difference must be a near tie in the oracle's logits


def nmse_bound(oracle: str) -> float:
    return SCALAR_NMSE_MAX if oracle == SCALAR_ORACLE else NMSE_MAX
STEPS_PER_REPEAT = 3  # decode, prefill, ttft; plus one per batch size


def compare_logits(rows, ref_rows) -> dict:
    """NMSE of logits rows [n, V] against the oracle's, and the oracle's gap between its top-1 token and the engine's
    wherever they differ (the forks)."""
    import numpy as np

    nmse = float(np.mean((rows - ref_rows) ** 2) / np.var(ref_rows))
    a, b = rows.argmax(-1), ref_rows.argmax(-1)
    forks = [(int(i), float(ref_rows[i, b[i]] - ref_rows[i, a[i]])) for i in np.flatnonzero(a != b)]
    return {"nmse": nmse, "positions": len(rows), "top1_forks": len(forks),
            "max_fork_gap": max((g for _, g in forks), default=0.0)}


def run(model: str, *, threads: int = 2, repeats: int = 5, decode_tokens: int = 64,
        engine_names: tuple[str, ...] = ("sparrow", "llama.cpp"), batch_sizes: tuple[int, ...] = BATCH_SIZES,
        n_ctx: int = 2048, progress=None, energy=None, worker_target: Callable | None = None,
        engine_env: dict[str, dict[str, str]] | None = None) -> dict:
    """The benchmark as a library call: engines in worker processes, asked in turn each repeat. Raises RuntimeError
    when an engine's logits along the first engine's greedy continuation disagree with the oracle's (see the module
    doc). The oracle is llama.cpp when it is among the engines, otherwise a Sparrow worker on the scalar kernels.
    `progress(step)` is called after every measurement (repeats * engines * (STEPS_PER_REPEAT + len(batch_sizes) +
    len(LONG_SIZES)) in all).
    `energy`: a bench_device.energy.Rapl meter read around every decode measurement, or None.
    `worker_target`: the function each worker process runs (default: worker; with the spawn context it must live in
    an importable module). A worker that dies raises RuntimeError saying how: "the llama.cpp worker died (killed by
    signal 11 (SIGSEGV))". `engine_env`: environment variables set for an engine's worker, by engine name (e.g.
    {"sparrow-before": {"SPARROW_BUILD_DIR": folder}})."""
    ctx = mp.get_context("spawn")
    engines = {}
    oracle = "llama.cpp" if "llama.cpp" in engine_names else SCALAR_ORACLE

    def start(name: str, env: dict[str, str] | None = None) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_target or worker, args=(name, model, threads, n_ctx, child), daemon=True)
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})  # a spawned worker starts with the parent's environment as it is now
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            child.close()  # the worker has its own end: when it dies, ours reads EOF instead of waiting
        engines[name] = (proc, parent)

    try:
        for name in engine_names:
            start(name, (engine_env or {}).get(name))
        if oracle == SCALAR_ORACLE:
            start(SCALAR_ORACLE, {"SPARROW_FORCE_SCALAR": "1"})

        def ask(name, cmd, arg=None):
            proc, conn = engines[name]
            try:
                conn.send((cmd, arg))
                return conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                raise RuntimeError(f"the {name} worker died ({how_it_ended(proc)})") from None

        # correctness first: every engine's logits along one greedy continuation against the oracle's
        n_check = 16
        outs = {name: ask(name, "greedy", n_check) for name in engines}
        agree = min(next((i for i, (a, b) in enumerate(zip(outs[oracle], o)) if a != b), n_check)
                     for o in outs.values())
        cont = outs[engine_names[0]]
        ref_rows = ask(oracle, "logits", cont)
        checks, bound = {}, nmse_bound(oracle)
        for name in engine_names:
            if name == oracle:
                continue
            rows = ask(name, "logits", cont)
            if name == engine_names[0] and rows.argmax(-1).tolist() != cont:
                raise RuntimeError(f"{name}: teacher-forced logits do not reproduce its own greedy continuation")
            checks[name] = compare_logits(rows, ref_rows)
            if checks[name]["nmse"] >= bound or checks[name]["max_fork_gap"] >= TIE_GAP:
                raise RuntimeError(f"{name} disagrees with the oracle ({oracle}): {checks[name]} (bounds: NMSE < "
                                   f"{bound}, top-1 forks only at near ties, gap < {TIE_GAP}); greedy {outs}")
        # The first step where the greedy continuations part: up to it they share their tokens, so the oracle's
        # teacher-forced row there is its own greedy step, and the two tokens must be a near tie in it.
        step = next((i for i, (a, b) in enumerate(zip(outs[oracle], cont)) if a != b), None)
        first_fork = None
        if step is not None:
            first_fork = {"step": step, "gap": float(ref_rows[step].max() - ref_rows[step, cont[step]])}
            if first_fork["gap"] >= TIE_GAP:
                raise RuntimeError(f"{engine_names[0]}'s greedy continuation leaves the oracle's ({oracle}) at step "
                                   f"{step} where the oracle's top token leads by {first_fork['gap']:.3f} (a near "
                                   f"tie is < {TIE_GAP}); greedy {outs}")
        if oracle == SCALAR_ORACLE:  # it is not timed: stop it now, so it holds no memory while the others run
            ask(SCALAR_ORACLE, "stop")
            proc, _ = engines.pop(SCALAR_ORACLE)
            proc.join(timeout=5)

        res = {name: {"decode_s": [], "prefill_s": [], "ttft_s": [], "decode_j": [],
                      "batch_s": {t: [] for t in batch_sizes}, "long_s": {t: [] for t in LONG_SIZES}}
               for name in engines}
        n_prompt = 0
        for _ in range(repeats):
            for name in engines:  # alternate engines within every repeat
                before = energy.read() if energy else None
                res[name]["decode_s"].append(ask(name, "decode", decode_tokens))
                if energy:
                    res[name]["decode_j"].append(energy.joules(before, energy.read()))
                if progress:
                    progress(1)
                secs, n_prompt = ask(name, "prefill")
                res[name]["prefill_s"].append(secs)
                if progress:
                    progress(1)
                secs, first = ask(name, "ttft")
                if first != outs[name][0]:
                    raise RuntimeError(f"{name}: the first token of the timed TTFT run ({first}) is not its greedy "
                                       f"first token ({outs[name][0]})")
                res[name]["ttft_s"].append(secs)
                if progress:
                    progress(1)
                for t in batch_sizes:
                    res[name]["batch_s"][t].append(ask(name, "batch", (t, 64)))
                    if progress:
                        progress(1)
                for t in LONG_SIZES:
                    res[name]["long_s"][t].append(ask(name, "batch", (t, LONG_CACHED)))
                    if progress:
                        progress(1)
        report = {"schema": "sparrow.bench_decode/1", "model": os.path.basename(model), "threads": threads,
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "prompt_tokens": n_prompt, "decode_tokens": decode_tokens, "repeats": repeats,
                  "greedy_agreement_tokens": agree, "greedy_checked_tokens": n_check, "greedy_first_fork": first_fork,
                  "oracle": oracle, "oracle_checks": checks, "engines": {}}
        for name in engines:
            r = res[name]
            b1 = statistics.median(r["batch_s"][batch_sizes[0]])
            report["engines"][name] = {
                "decode_tok_s": summary([1 / s for s in r["decode_s"]]),
                "prefill_tok_s": summary([n_prompt / s for s in r["prefill_s"]]),
                "ttft_ms": summary([1e3 * s for s in r["ttft_s"]]),
                "peak_rss_mb": ask(name, "rss") / 2**20,
                "batch_cost_vs_t1": {t: statistics.median(r["batch_s"][t]) / b1 for t in batch_sizes},
                "batch_ms": {t: 1e3 * statistics.median(r["batch_s"][t]) for t in batch_sizes},
                "long_cached_tokens": LONG_CACHED,
                "long_cost_vs_t1": {t: statistics.median(r["long_s"][t]) / statistics.median(r["long_s"][LONG_SIZES[0]])
                                    for t in LONG_SIZES},
                "long_ms": {t: 1e3 * statistics.median(r["long_s"][t]) for t in LONG_SIZES},
            }
            if r["decode_j"]:  # joules of `decode_tokens` steps: the whole package, whatever else runs
                report["engines"][name]["decode_j"] = summary(r["decode_j"])
                report["engines"][name]["decode_j_per_token"] = summary([j / decode_tokens for j in r["decode_j"]])
            ask(name, "stop")
        if "sparrow" in engines and "llama.cpp" in engines:
            s, l = report["engines"]["sparrow"], report["engines"]["llama.cpp"]
            report["ratio_sparrow_over_llama_cpp"] = {
                "decode": s["decode_tok_s"]["median"] / l["decode_tok_s"]["median"],
                "prefill": s["prefill_tok_s"]["median"] / l["prefill_tok_s"]["median"],
            }
        if "sparrow" in engines and "sparrow-before" in engines:
            s, b = report["engines"]["sparrow"], report["engines"]["sparrow-before"]
            report["ratio_sparrow_over_before"] = {
                "decode": s["decode_tok_s"]["median"] / b["decode_tok_s"]["median"],
                "prefill": s["prefill_tok_s"]["median"] / b["prefill_tok_s"]["median"],
                "batch_time": {t: s["batch_ms"][t] / b["batch_ms"][t] for t in batch_sizes},
                "long_time": {t: s["long_ms"][t] / b["long_ms"][t] for t in LONG_SIZES},
            }
        return report
    finally:
        for proc, conn in engines.values():
            if proc.is_alive():  # left waiting by an error: ask it to stop rather than wait out the timeout
                try:
                    conn.send(("stop", None))
                except OSError:
                    pass
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
    ap.add_argument("--onnx", nargs="?", const="f32", choices=("f32", "int8", "int4"),
                    help="also run onnxruntime on an ONNX export of the model (weight type; default f32)")
    ap.add_argument("--before", type=Path, metavar="BUILD_DIR",
                    help="also run the native runtime of this developer build (tools/dev_build.sh) as sparrow-before")
    args = ap.parse_args(argv)

    from .energy import Rapl

    names = ("sparrow", "llama.cpp") + (("sparrow-norepack",) if args.compare_repack else ()) + \
        ((f"onnxruntime{'' if args.onnx == 'f32' else '-' + args.onnx}",) if args.onnx else ()) + \
        (("sparrow-before",) if args.before else ())
    engine_env = {}
    if args.before:
        if not list(args.before.glob("_sparrow*.so")) and not list(args.before.glob("_sparrow*.pyd")):
            raise SystemExit(f"--before {args.before}: no _sparrow module there (build one with tools/dev_build.sh)")
        engine_env["sparrow-before"] = {"SPARROW_BUILD_DIR": str(args.before.resolve())}
    meter, why = Rapl.open()
    if meter is None:
        print(f"energy: unavailable: {why}")
    try:
        report = run(args.model, threads=args.threads, repeats=args.repeats, decode_tokens=args.decode_tokens,
                     engine_names=names, energy=meter, engine_env=engine_env)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


def print_report(r: dict) -> None:
    print(f"model {r['model']}, {r['threads']} threads, prompt {r['prompt_tokens']} tokens, "
          f"greedy agreement with {r['oracle']} on the first {r['greedy_agreement_tokens']} tokens")
    print(f"{'engine':<16} {'decode tok/s (min-max)':>26} {'prefill tok/s (min-max)':>26} {'TTFT ms':>9} "
          f"{'peak RSS MB':>12}")
    for name, e in r["engines"].items():
        d, p = e["decode_tok_s"], e["prefill_tok_s"]
        print(f"{name:<16} {d['median']:>9.1f} ({d['min']:.1f}-{d['max']:.1f}){'':>3} "
              f"{p['median']:>9.1f} ({p['min']:.1f}-{p['max']:.1f}){'':>3} {e['ttft_ms']['median']:>9.1f} "
              f"{e['peak_rss_mb']:>10.0f}" +
              (f"  {e['decode_j_per_token']['median']:.3f} J/token" if "decode_j_per_token" in e else ""))
    print("ratio sparrow/llama.cpp: decode {decode:.2f}x, prefill {prefill:.2f}x".format(
        **r["ratio_sparrow_over_llama_cpp"]))
    if "ratio_sparrow_over_before" in r:
        rb = r["ratio_sparrow_over_before"]
        print("sparrow over sparrow-before: decode {:.3f}x, prefill {:.3f}x; time of T tokens: {}".format(
            rb["decode"], rb["prefill"], ", ".join(f"T={t} {v:.3f}x" for t, v in rb["batch_time"].items())))
    print("cost of T tokens in one call relative to T=1:")
    print(f"{'T':>4} " + " ".join(f"{name:>22}" for name in r["engines"]))
    for t in BATCH_SIZES:
        cells = [f"{e['batch_cost_vs_t1'][t]:6.2f}x ({e['batch_ms'][t]:7.2f} ms)" for e in r["engines"].values()]
        print(f"{t:>4} " + " ".join(f"{c:>22}" for c in cells))
    if all("long_ms" in e for e in r["engines"].values()):
        print(f"after {LONG_CACHED} cached tokens:")
        for t in LONG_SIZES:
            cells = [f"{e['long_cost_vs_t1'][t]:6.2f}x ({e['long_ms'][t]:7.2f} ms)" for e in r["engines"].values()]
            print(f"{t:>4} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
