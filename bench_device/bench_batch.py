"""Batch decoding (issue 19): tokens/s with 1..32 concurrent sequences, in process and through `sparrow serve`.

1. In process: the batching engine (runtime.batching.Engine) with C concurrent requests, each a 16-token prompt
   generating exactly N tokens (end of generation ignored), greedy; tokens/s = C * N / wall time from submission to
   the last token (prompts included). Rounds alternate over C; medians with min/max; speed-up against C = 1 of the
   same run.
2. Through the server: `sparrow serve --parallel 32` in a subprocess, the same requests sent by C client threads at
   once (non-streaming /v1/completions, ignore_eos), alternating with the in-process runs at the same C: the
   server's overhead. The server's resident memory before and after (psutil), against the KV cache the sequences
   filled (their tokens x the cache's bytes per token).
3. BlockFFN (the shipped tiny model): how the union of active experts per pass grows with the number of sequences,
   each on a prompt of its own (expert bytes read per pass and per token, from the session's counters).

    python -m sparrow.bench_device.bench_batch --model PATH --out bench_device/results/batch_smollm2_xeon_2t.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKFFN = REPO / "models" / "blockffn-tiny.Q8_0.gguf"
PROMPT = "Write a long story about a lighthouse keeper and the storm that changed"


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def engine_run(engine, tokens: list[int] | list[list[int]], c: int, n: int) -> float:
    """Seconds for c requests of n tokens each, all submitted at once (tokens: one prompt for all, or a list of
    prompts taken in turn)."""
    from ..runtime.batching import Request
    from ..runtime.native import SamplerParams

    t0 = time.perf_counter()
    prompts = tokens if tokens and isinstance(tokens[0], list) else [tokens]
    for i in range(c):
        engine.submit(Request(prompt=prompts[i % len(prompts)], max_tokens=n, params=SamplerParams.greedy(),
                              stop_at_eog=False, tag=i))
    done = 0
    while engine.busy:
        done += sum(1 for ev in engine.step() if ev.finish_reason)
    assert done == c
    return time.perf_counter() - t0


def post(port: int, body: dict, timeout: float = 600) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        out = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"server answered {r.status}: {out}")
        return out
    finally:
        conn.close()


def server_run(port: int, c: int, n: int) -> float:
    results: list[dict] = []
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    threads = [threading.Thread(target=lambda: results.append(post(port, body))) for _ in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    assert len(results) == c and all(r["usage"]["completion_tokens"] == n for r in results)
    return dt


def start_server(model: Path, threads: int, parallel: int, n_ctx: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sparrow", "serve", "-m", str(model), "--port", str(port),
                             "--parallel", str(parallel), "--threads", str(threads), "--ctx", str(n_ctx)],
                            cwd=REPO.parent if (REPO.parent / "sparrow").is_dir() else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("sparrow serve did not start")


def blockffn_union(threads: int, concurrency: list[int], n: int) -> list[dict]:
    from ..runtime.batching import Engine
    from ..runtime.native import Model

    rows = []
    topics = ["a lighthouse", "the stock market", "a recipe for bread", "quantum physics", "a football match",
              "an old castle", "the rainforest", "a space mission", "a jazz concert", "medieval trade", "a chess game",
              "volcanoes", "a city at night", "honey bees", "a mountain hike", "the printing press"]
    with Model(BLOCKFFN) as m:
        tokens = [m.tokenize(f"Tell me about {t}.") for t in topics]  # different text: different experts
        for c in concurrency:
            with Engine(m, n_seq=c, n_ctx=256, n_batch=max(64, c), n_threads=threads) as engine:
                engine.session.reset_sparsity()
                passes0 = engine.n_passes
                engine_run(engine, tokens, c, n)
                sp = engine.session.sparsity()
                passes = engine.n_passes - passes0
                rows.append({"sequences": c, "passes": passes, "tokens": sp.n_tokens, "tls": sp.tls,
                             "expert_bytes_per_token": sp.expert_bytes_per_token,
                             "expert_bytes_per_pass": sp.expert_bytes_per_token * sp.n_tokens / passes,
                             "dense_bytes_per_pass": sp.dense_bytes_per_token})
    return rows


def main(argv: list[str] | None = None) -> None:
    from ..runtime.batching import Engine
    from ..runtime.native import Model
    from .profile import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a GGUF (SmolLM2-135M-Instruct Q4_1 in the README)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--server-concurrency", default="1,8,32")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cs = [int(x) for x in args.concurrency.split(",")]
    scs = [int(x) for x in args.server_concurrency.split(",")]
    n, n_ctx = args.tokens, 256
    report: dict = {"bench": "batch", "cpu": cpu_model(), "machine": platform.machine(), "threads": args.threads,
                    "rounds": args.rounds, "tokens_per_request": n, "prompt": PROMPT, "model": args.model.name}
    import psutil

    proc, port = start_server(args.model, args.threads, max(cs + scs), n_ctx)
    try:
        server = psutil.Process(proc.pid)
        post(port, {"prompt": PROMPT, "max_tokens": 4})  # warm
        rss_idle = server.memory_info().rss
        times: dict[str, dict[int, list[float]]] = {"engine": {c: [] for c in cs}, "server": {c: [] for c in scs}}
        with Model(args.model) as m:
            tokens = m.tokenize(PROMPT)
            report["prompt_tokens"] = len(tokens)
            with Engine(m, n_seq=max(cs), n_ctx=n_ctx, n_batch=max(64, max(cs)), n_threads=args.threads) as eng:
                engine_run(eng, tokens, 1, 4)  # warm
                for r in range(args.rounds):
                    for c in cs:
                        times["engine"][c].append(engine_run(eng, tokens, c, n))
                        if c in scs:
                            times["server"][c].append(server_run(port, c, n))
                        print(f"round {r}: {c} sequences done", file=sys.stderr)
            per_token_kv = m.session_memory(n_ctx=n_ctx).kv_cache_bytes / n_ctx
        rss_after = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    one = statistics.median(times["engine"][1])
    report["engine"] = [{"sequences": c, "seconds": stats(times["engine"][c]),
                         "tok_s": stats([c * n / t for t in times["engine"][c]]),
                         "speedup_vs_1": statistics.median(times["engine"][c]) and
                         (c * n / statistics.median(times["engine"][c])) / (n / one)} for c in cs]
    report["server"] = [{"sequences": c, "tok_s": stats([c * n / t for t in times["server"][c]]),
                         "overhead_vs_engine": statistics.median(times["server"][c]) /
                         statistics.median(times["engine"][c]) - 1} for c in scs]
    filled = max(scs) * (len(tokens) + n)
    report["server_memory"] = {"rss_idle_bytes": rss_idle, "rss_after_bytes": rss_after,
                               "growth_bytes": rss_after - rss_idle,
                               "kv_filled_bytes": filled * per_token_kv,
                               "note": f"{max(scs)} sequences of {len(tokens) + n} tokens at "
                                       f"{per_token_kv:.0f} bytes of KV cache per token"}
    report["blockffn_union"] = blockffn_union(args.threads, [1, 2, 4, 8, 16], 32)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
