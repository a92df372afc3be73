"""ONNX side by side (issue 18): does chunk sparsity survive the export, and how fast is each engine on one model.

Shape legend: T = tokens in one pass, H = hidden, L = layers, E = experts, F = expert width, V = vocabulary.

1. Sparsity through the export. A SYNTHETIC BlockFFN GGUF (F32, random weights, ordinary grouped-query attention;
   H 1024, L 8, E 64, F 64, V 4000) whose routers switch off a chosen fraction of the experts for every token, with
   a pattern that changes from token to token: the embeddings carry a constant in dimension 0 and a random code in
   dimensions 1..32, no layer writes to those dimensions (their rows of attn_output and of every expert's down half
   are zero), and router row e reads only them: relu(w_e . code - b_e * const) with b_e set so that w_e . code > b_e
   for 1 - TLS of the codes. The same file is exported twice (converters/onnx_export.py): experts as onnxruntime's
   MoE operator (only the active experts run) and as a dense FFN (every expert runs). Decode (T = 1 after a 32-token
   prompt) time per token on onnxruntime, the two alternating, medians with min/max; the native runtime on the GGUF
   (sparse, and ffn_mode "dense") and its measured TLS beside them, and the ratio of the bytes a token reads.
2. SmolLM2-135M-Instruct Q4_1 (the real model): decode and prefill (64 tokens) tok/s for the native runtime on the
   GGUF, onnxruntime on its f32 / int8 / int4 exports and llama.cpp on the GGUF, alternating, 2 threads each.

    python -m sparrow.bench_device.bench_onnx --smollm PATH --out bench_device/results/onnx_zen5_2t.json
    python -m sparrow.bench_device.bench_onnx --rounds 7 --out X.json    # section 1 only (~30 s)
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

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = REPO / "models" / "blockffn-tiny.Q8_0.gguf"  # its tokenizer keys (V = 4000) are reused
ROUTING_DIMS = 32


def routed_blockffn(path: Path, *, tls: float = 0.8, H: int = 1024, L: int = 8, NH: int = 16, NKV: int = 4,
                    E: int = 64, F: int = 64, seed: int = 0) -> Path:
    """Write the synthetic routed BlockFFN (module docstring) as an F32 GGUF."""
    from statistics import NormalDist

    rng = np.random.default_rng(seed)
    src = gguf.GGUFReader(str(TOKENIZER_SOURCE))
    V = len(src.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(path), "blockffn")
    for name, field in src.fields.items():
        if name.startswith("tokenizer.") or name in ("general.name",):
            w.add_key_value(name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    p = "blockffn."
    for k, v in {"context_length": 512, "embedding_length": H, "block_count": L, "feed_forward_length": E * F,
                 "attention.head_count": NH, "attention.head_count_kv": NKV, "rope.dimension_count": H // NH,
                 "vocab_size": V, "expert_count": E, "expert_width": F}.items():
        w.add_uint32(p + k, v)
    for k, v in {"attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "router_norm_eps": 1e-5,
                 "router_norm_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0 / np.sqrt(L),
                 "logit_scale": 1.0}.items():
        w.add_float32(p + k, float(v))
    w.add_string(p + "router_norm", "rms")
    w.add_string(p + "router_activation", "relu")
    w.add_string(p + "expert_activation", "silu")
    f32 = np.float32

    def mat(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(f32)

    R = ROUTING_DIMS
    embd = rng.standard_normal((V, H)).astype(f32)
    embd[:, 0] = 1.0                                         # the constant the routers' thresholds scale
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(H, f32))
    z = NormalDist().inv_cdf(tls)                            # P(N(0, 1) > z) = 1 - TLS
    for l in range(L):
        b = f"blk.{l}."
        out = mat(H, H)
        out[: R + 1] = 0                                     # nothing is written to the routing dimensions
        router = np.zeros((E, H), f32)
        router[:, 1:R + 1] = rng.standard_normal((E, R))
        router[:, 0] = -z * np.linalg.norm(router[:, 1:R + 1], axis=1)
        slabs = np.concatenate([mat(E * F, H).reshape(E, F, H), mat(E * F, H).reshape(E, F, H)], axis=1)
        slabs[:, F:, : R + 1] = 0                            # the down halves (rows [F, H]) skip them too
        for name, data in (("attn_norm.weight", np.ones(H, f32)), ("attn_q.weight", mat(H, H)),
                           ("attn_k.weight", mat(NKV * H // NH, H)), ("attn_v.weight", mat(NKV * H // NH, H)),
                           ("attn_output.weight", out), ("ffn_norm.weight", np.ones(H, f32)),
                           ("ffn_router.weight", router), ("ffn_router_norm.weight", np.ones(E, f32)),
                           ("ffn_experts.weight", slabs)):
            w.add_tensor(b + name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _decode_ms(session, prompt: list[int], n: int) -> float:
    session.truncate(0)
    session.prefill(prompt)
    t0 = time.perf_counter()
    for i in range(n):
        session.eval([prompt[i % len(prompt)]])
    return (time.perf_counter() - t0) / n * 1e3


def sparsity_section(work: Path, threads: int, rounds: int, steps: int) -> dict:
    from ..converters.onnx_export import export_onnx
    from ..runtime.native import Model
    from ..runtime.onnx_backend import OnnxModel

    src = routed_blockffn(work / "routed.gguf")
    moe = OnnxModel(export_onnx(src, work / "moe.onnx", ffn="moe", progress=False), n_threads=threads)
    dense = OnnxModel(export_onnx(src, work / "dense.onnx", ffn="dense", progress=False), n_threads=threads)
    native = Model(src)
    prompt = list(range(100, 132))
    sessions = {"onnx_moe": moe.session(n_ctx=256), "onnx_dense": dense.session(n_ctx=256),
                "native": native.session(n_ctx=256, n_threads=threads),
                "native_dense": native.session(n_ctx=256, n_threads=threads, ffn_mode="dense")}
    # the exports compute the GGUF's function: check before timing
    a = sessions["onnx_moe"].prefill(prompt)
    b = sessions["onnx_dense"].prefill(prompt)
    assert np.allclose(a, b, atol=1e-3 * np.abs(b).max()), "MoE and dense exports disagree"
    sessions["native"].reset_sparsity()
    sessions["native"].prefill(prompt)
    tls = sessions["native"].sparsity().tls
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            times[k].append(_decode_ms(s, prompt, steps))
    out = {k: _stats(v) for k, v in times.items()}
    ratio = [d / m for d, m in zip(times["onnx_dense"], times["onnx_moe"])]
    native_ratio = [d / m for d, m in zip(times["native_dense"], times["native"])]
    # bytes a token reads (float32): every layer's attention and router, its experts (all, or the TLS share), the head
    H, L, E, F, NKV, NH, V = 1024, 8, 64, 64, 4, 16, 4000
    attention = (2 * H * H + 2 * NKV * (H // NH) * H + E * H) * 4
    experts = 2 * E * F * H * 4
    dense_bytes = L * (attention + experts) + V * H * 4
    sparse_bytes = L * (attention + (1 - tls) * experts) + V * H * 4
    return {"model": "synthetic routed BlockFFN F32 (H 1024, L 8, E 64, F 64, GQA 16/4, V 4000)",
            "moe_export": json.loads(moe.meta_props.get("sparrow.experts", "{}")),
            "measured_tls": tls, "decode_ms_per_token": out, "moe_speedup_over_dense": _stats(ratio),
            "native_sparse_speedup_over_dense": _stats(native_ratio),
            "bytes_per_token": {"dense": dense_bytes, "sparse": sparse_bytes, "ratio": dense_bytes / sparse_bytes}}


def smollm_section(smollm: Path, work: Path, threads: int, rounds: int, steps: int) -> dict:
    from ..converters.onnx_export import export_onnx
    from ..runtime.native import Model
    from ..runtime.onnx_backend import OnnxModel

    native = Model(smollm)
    prompt = native.tokenize("The history of the city goes back to the Roman era, when a small settlement grew "
                             "around the river crossing. Over the centuries it became a market town, then an "
                             "industrial centre, and today it is known for its university and its old bridges. "
                             "Visitors come for the museums, the food and the long walks along the water.",
                             add_special=True)[:64]
    engines = {"native": native.session(n_ctx=512, n_threads=threads)}
    for wt in ("f32", "int8", "int4"):
        engines[f"onnx_{wt}"] = OnnxModel(export_onnx(smollm, work / f"smol_{wt}.onnx", weights=wt, progress=False),
                                          n_threads=threads).session(n_ctx=512)
    llama = None
    try:
        import llama_cpp

        llama = llama_cpp.Llama(model_path=str(smollm), n_ctx=512, n_threads=threads, n_batch=64, verbose=False)
    except ImportError:
        pass
    decode: dict[str, list[float]] = {k: [] for k in [*engines, *(["llama.cpp"] if llama else [])]}
    prefill: dict[str, list[float]] = {k: [] for k in decode}
    for _ in range(rounds):
        for k, s in engines.items():
            s.truncate(0)
            t0 = time.perf_counter()
            s.prefill(prompt)
            prefill[k].append(len(prompt) / (time.perf_counter() - t0))
            decode[k].append(1e3 / _decode_ms(s, prompt, steps))
        if llama is not None:
            llama.reset()
            t0 = time.perf_counter()
            llama.eval(prompt)
            prefill["llama.cpp"].append(len(prompt) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(steps):
                llama.eval([prompt[i % len(prompt)]])
            decode["llama.cpp"].append(steps / (time.perf_counter() - t0))
    return {"model": smollm.name, "prompt_tokens": len(prompt), "decode_tok_s": {k: _stats(v) for k, v in
                                                                                 decode.items()},
            "prefill_tok_s": {k: _stats(v) for k, v in prefill.items()}}


def main(argv: list[str] | None = None) -> None:
    from .profile import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm", type=Path, help="SmolLM2-135M-Instruct Q4_1 GGUF (section 2 is left out without)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import onnxruntime

    report = {"bench": "onnx", "cpu": cpu_model(), "machine": platform.machine(), "threads": args.threads,
              "rounds": args.rounds, "steps_per_round": args.steps, "onnxruntime": onnxruntime.__version__,
              "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="sparrow-bench-onnx-") as tmp:
        report["sparsity"] = sparsity_section(Path(tmp), args.threads, args.rounds, args.steps)
        if args.smollm:
            report["smollm2"] = smollm_section(args.smollm, Path(tmp), args.threads, args.rounds, args.steps)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
