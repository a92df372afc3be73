"""BlockFFN FFN benchmark: time per token against the fraction of experts read, dense vs sparse-token vs sparse-chunk.

Shape legend: T = tokens per call, H = hidden, E = experts, F = expert width, L = layers, A = active experts.

A model file with realistic FFN sizes (default H=2048, E=64, F=128, Q4_0, 6 layers: ~113 MB of experts, more than
the L3 cache) is written with random weights. Router scores are set directly through a testing hook
(`testing.ffn_time`: the FFN block of one layer alone, cycling through the layers so that expert weights come from
DRAM as in a forward pass), which controls the routing exactly:
  - T=1 (decode): each token uses a fraction a of the experts (TLS = 1 - a); modes dense and token (chunk = token).
  - T=8 (a verification chunk): the union of the 8 tokens' experts is a fraction u of all experts (CLS-8 = 1 - u),
    and each token uses 2/3 of the union (so u = 0.3 gives the paper's TLS 80% / CLS 70%); modes dense, token, chunk.
Every mode's output is checked against the dense path before timing. Modes are timed in interleaved rounds (A B C A
B C ...), at 1 and 2 threads; reported: median microseconds per token with min/max, and the ratio to dense at the
same T (and, for T=8, to 8 dense single-token calls). Writes JSON (--out) and prints a table.

    python -m sparrow.bench_device.bench_ffn --out ffn.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from ..runtime import Model, _sparrow
from ..runtime.native import FFN_MODES
from .profile import cpu_model

testing = _sparrow.testing
Q = gguf.GGMLQuantizationType
BLOCK = {Q.Q4_0: (32, 18), Q.Q8_0: (32, 34), Q.F16: (1, 2)}


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Random data for a tensor of numpy shape `shape`, as the raw bytes of qtype (valid blocks, scale ~0.02)."""
    n_el, size = BLOCK[qtype]
    rows = int(np.prod(shape[:-1]))
    nb = shape[-1] // n_el
    if qtype == Q.F16:
        return (rng.standard_normal((rows, shape[-1])) * 0.02).astype(np.float16).view(np.uint8).reshape(
            *shape[:-1], nb * size)
    raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
    raw[:, :, :2] = np.frombuffer(np.full(rows * nb, 0.02 / 8, np.float16).tobytes(), np.uint8).reshape(rows, nb, 2)
    return raw.reshape(*shape[:-1], nb * size)


def write_model(path: Path, H: int, E: int, F: int, L: int, qtype: Q, seed: int = 0) -> Path:
    """A blockffn GGUF with random weights (attention included but unused by this benchmark)."""
    rng = np.random.default_rng(seed)
    NH = H // 128 if H % 128 == 0 else 1
    w = gguf.GGUFWriter(str(path), "blockffn")
    for key, val in {"context_length": 256, "embedding_length": H, "block_count": L, "feed_forward_length": E * F,
                     "attention.head_count": NH, "attention.head_count_kv": NH, "rope.dimension_count": H // NH,
                     "expert_count": E, "expert_width": F, "vocab_size": 259}.items():
        w.add_uint32(f"blockffn.{key}", val)
    for key, val in {"attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "router_norm_eps": 1e-5,
                     "router_norm_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0,
                     "logit_scale": 1.0}.items():
        w.add_float32(f"blockffn.{key}", val)
    w.add_string("blockffn.router_norm", "sum")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    w.add_token_scores([0.0] * 259)
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    q = lambda shape: random_tensor(rng, shape, qtype)
    w.add_tensor("token_embd.weight", q((259, H)), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for l in range(L):
        p = f"blk.{l}."
        w.add_tensor(p + "attn_norm.weight", np.ones(H, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", q((H, H)), raw_dtype=qtype)
        w.add_tensor(p + "ffn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(p + "ffn_router.weight", (rng.standard_normal((E, H)) * H ** -0.5).astype(np.float32))
        w.add_tensor(p + "ffn_experts.weight", q((E, 2 * F, H)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def routing(T: int, E: int, union: float, per_token: float, rng: np.random.Generator) -> np.ndarray:
    """Scores [T, E]: the T tokens' active experts lie in a random set of round(union*E) experts (all of them used),
    each token using round(per_token*E) of them; 'sum'-normalised positive scores."""
    u = max(1, round(union * E))
    k = max(1, min(u, round(per_token * E)))
    chosen = rng.choice(E, u, replace=False)
    r = np.zeros((T, E), np.float32)
    for t in range(T):
        own = rng.choice(chosen, k, replace=False)
        if t < -(-u // k):  # the first tokens cover the whole union
            own[: len(chosen[t * k:(t + 1) * k])] = chosen[t * k:(t + 1) * k]
        r[t, np.unique(own)] = rng.uniform(0.5, 1.5, len(np.unique(own)))
    return r / r.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6, help="layers to cycle through (their experts exceed the L3)")
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q8_0", "F16"])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--chunk", type=int, default=8, help="T of the chunk measurements")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=24, help="calls per mode per round")
    ap.add_argument("--model", default=None, help="reuse/write the model file here (default: a temporary file, "
                    "removed when the run ends)")
    ap.add_argument("--out", default=None, help="write JSON here")
    args = ap.parse_args(argv)
    if args.model:
        run(args, Path(args.model))
        return
    # The model file (~170 MB at the default shape) lives only as long as the run, whatever ends it.
    with tempfile.TemporaryDirectory(prefix="sparrow-bench-ffn-") as tmp:
        run(args, Path(tmp) / "bench_ffn.gguf")


def run(args: argparse.Namespace, path: Path) -> None:
    H, E, F, L, T8 = args.hidden, args.experts, args.width, args.layers, args.chunk
    qtype = Q[args.type]
    if not path.exists():
        t0 = time.time()
        write_model(path, H, E, F, L, qtype)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.time() - t0:.1f} s")
    rng = np.random.default_rng(1)
    results = []
    with Model(path) as m:
        for nt in args.threads:
            with m.session(n_ctx=16, n_batch=max(64, T8), n_threads=nt) as s:
                for T, modes in ((1, ["dense", "token"]), (T8, ["dense", "token", "chunk"])):
                    xn = rng.standard_normal((T, H)).astype(np.float32)
                    for a in args.fractions:
                        union, per_token = (a, a) if T == 1 else (a, a * 2 / 3)
                        r = routing(T, E, union, per_token, rng)
                        # check every mode against dense before timing
                        base = testing.ffn_run(s.handle, 0, xn, r, FFN_MODES["dense"])
                        for mode in modes:
                            y = testing.ffn_run(s.handle, 0, xn, r, FFN_MODES[mode])
                            err = np.max(np.abs(y - base)) / max(np.max(np.abs(base)), 1e-30)
                            if err > 1e-4:
                                raise SystemExit(f"{mode} differs from dense by {err:.2e} (T={T}, a={a})")
                        times = {mode: [] for mode in modes}
                        for _ in range(args.rounds):
                            for mode in modes:
                                times[mode] += testing.ffn_time(s.handle, list(range(L)), xn, r, FFN_MODES[mode],
                                                                args.reps)
                        s.reset_sparsity()
                        testing.ffn_run(s.handle, 0, xn, r, FFN_MODES["chunk"])
                        st = s.sparsity(0)
                        for mode in modes:
                            ts = times[mode]
                            results.append({"threads": nt, "T": T, "fraction": a, "mode": mode,
                                            "tls": float(np.mean(r == 0)), "cls": float(np.mean(~np.any(r != 0, 0))),
                                            "stats_tls": st.tls, "median_s": statistics.median(ts),
                                            "min_s": min(ts), "max_s": max(ts), "calls": len(ts)})
    dense1 = {(x["threads"], x["fraction"]): x["median_s"] for x in results if x["T"] == 1 and x["mode"] == "dense"}
    denseT = {(x["threads"], x["fraction"]): x["median_s"] for x in results if x["T"] == T8 and x["mode"] == "dense"}
    print(f"\nFFN of one layer: H={H} E={E} F={F} {args.type}, {L} layers cycled; {platform.processor() or ''} "
          f"{os.cpu_count()} CPUs; median us per call [min, max]; ratio to dense")
    print(f"{'thr':>3} {'T':>2} {'active':>6} {'TLS':>5} {'CLS':>5} {'mode':>6} {'us/call':>9} {'[min, max]':>17}"
          f" {'/dense':>7} {'/(T x dense T=1)':>16}")
    for x in results:
        k = (x["threads"], x["fraction"])
        x["ratio_dense"] = x["median_s"] / (dense1[k] if x["T"] == 1 else denseT[k])
        x["ratio_T_dense1"] = x["median_s"] / (x["T"] * dense1[k])
        print(f"{x['threads']:>3} {x['T']:>2} {x['fraction']:>6.2f} {x['tls']:>5.2f} {x['cls']:>5.2f} {x['mode']:>6} "
              f"{x['median_s'] * 1e6:>9.1f} [{x['min_s'] * 1e6:>7.1f}, {x['max_s'] * 1e6:>7.1f}] "
              f"{x['ratio_dense']:>7.3f} {x['ratio_T_dense1']:>16.3f}")
    machine = {"cpu_model": cpu_model(), "platform": platform.platform(), "cpus": os.cpu_count(),
               "tier": _sparrow.kernel_tier(), "features": _sparrow.cpu_features()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "time": time.time(), "config": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
