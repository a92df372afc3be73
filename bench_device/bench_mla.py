"""Multi-head latent attention on the released shapes (SYNTHETIC weights; issue 14): the latent KV cache against full
keys and values, and what a decode step costs as the context grows.

  python -m sparrow.bench_device.bench_mla --out FILE [--shapes 0.1b 0.5b 0.8b 1.2b] [--curve-shape 1.2b]

(1) KV cache per token (all layers, F16): what Sparrow caches (the latent c and the rope key, KL + DR values per layer)
    and what full per-head keys and values would take (NH x (DN + DR + DV) per layer), with the allocation a session of
    4096 tokens measures (Session.memory()).
(2) Decode cost against the context: one token evaluated after P cached tokens, P = 64 .. 4096, on the curve shape
    (synthetic routing TLS 80% / CLS-8 70%, the sparse path). The cache is filled with pseudo-random latents
    (testing.fill_cache: only timing means anything) instead of a prefill, and each step is rolled back so P stays put.
    The P values take turns step by step (A B C ... A B C ...), so the VM's slow moments fall on all of them alike;
    per P the median ms/step with min/max, and its ratio to P = 64. The runtime computes the absorbed form only: the
    expanded form's decode would read full keys and values (the (1) column, e.g. 313.6 KB per token for 1.2b, 14x the
    latent) or re-expand the cache every step, so it is not a decode candidate; the file states that per P as the
    bytes an expanded cache would read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from ..runtime import Model, _sparrow
from . import synthetic
from .bench_synthetic import machine

SCHEMA = "sparrow.bench.mla/1"
CONTEXTS = (64, 256, 512, 1024, 2048, 4096)


def kv_table(shapes: list[str], threads: int) -> list[dict]:
    rows = []
    for name in shapes:
        shape = synthetic.SHAPES[name].with_vocab("small")
        per = shape.kv_bytes_per_token()
        path = synthetic.ensure(shape, "Q4_0", 0)
        with Model(path) as m, m.session(n_ctx=4096, n_threads=threads) as s:
            measured = s.memory().kv_cache_bytes
        rows.append({"shape": name, "layers": shape.layers, "kv_lora": shape.kv_lora, "qk_rope": shape.qk_rope,
                     "cached_bytes_per_token": per["cached"], "full_k_v_bytes_per_token": per["full_k_v"],
                     "ratio": per["full_k_v"] / per["cached"], "session_4096_kv_bytes": measured,
                     "session_4096_expected": per["cached"] * 4096})
    return rows


def decode_curve(name: str, threads: int, steps: int, contexts=CONTEXTS) -> dict:
    shape = synthetic.SHAPES[name].with_vocab("small")
    path = synthetic.ensure(shape, "Q4_0", 0)
    testing = _sparrow.testing
    times: dict[int, list[float]] = {P: [] for P in contexts}
    with Model(path) as m:
        sessions = {P: m.session(n_ctx=max(contexts) + 8, n_threads=threads) for P in contexts}
        try:
            for P, s in sessions.items():
                s.set_synthetic_routing(tls=0.8, cls=0.7, k=8, seed=0)
                testing.fill_cache(s.handle, P, P)
                s.eval([5], logits="last")  # warm-up
                s.truncate(P)
            for i in range(steps):
                for P, s in sessions.items():
                    t0 = time.perf_counter()
                    s.eval([5 + i % 50], logits="last")
                    times[P].append(time.perf_counter() - t0)
                    s.truncate(P)
        finally:
            for s in sessions.values():
                s.close()
    base = statistics.median(times[contexts[0]])
    per = shape.kv_bytes_per_token()
    return {"shape": name, "threads": threads, "steps": steps, "routing": {"tls": 0.8, "cls": 0.7, "k": 8},
            "form": "absorbed",
            "points": [{"P": P, "ms_median": 1e3 * statistics.median(times[P]), "ms_min": 1e3 * min(times[P]),
                        "ms_max": 1e3 * max(times[P]), "x_P64": statistics.median(times[P]) / base,
                        "latent_bytes_read": P * per["cached"], "expanded_cache_bytes_read": P * per["full_k_v"]}
                       for P in contexts]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["0.1b", "0.5b", "0.8b", "1.2b"], choices=sorted(synthetic.SHAPES))
    ap.add_argument("--curve-shape", default="1.2b", choices=sorted(synthetic.SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="decode steps per context length")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    t0 = time.time()
    load0 = list(os.getloadavg())
    kv = kv_table(a.shapes, a.threads)
    for r in kv:
        print(f"{r['shape']}: {r['cached_bytes_per_token'] / 1e3:.1f} KB/token cached vs "
              f"{r['full_k_v_bytes_per_token'] / 1e3:.1f} KB full K,V ({r['ratio']:.1f}x); session of 4096: "
              f"{r['session_4096_kv_bytes'] / 2**20:.1f} MiB")
    curve = decode_curve(a.curve_shape, a.threads, a.steps)
    for p in curve["points"]:
        print(f"{a.curve_shape} P={p['P']:5d}: {p['ms_median']:.2f} ms ({p['ms_min']:.2f}-{p['ms_max']:.2f}), "
              f"{p['x_P64']:.2f}x P=64")
    doc = {"schema": SCHEMA, "synthetic": True, "machine": machine(), "time": t0, "duration_s": time.time() - t0,
           "load_avg": {"start": load0, "end": list(os.getloadavg())}, "qtype": "Q4_0", "vocab": "small",
           "kv": kv, "decode_curve": curve}
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
