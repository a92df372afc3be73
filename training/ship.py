"""Convert trained runs to GGUF in models/, measure them with the native runtime, and write the model cards.

    python -m sparrow.training.ship --runs runs    # after the four training runs

For each GGUF: validation perplexity, TLS and CLS-8 measured by the native runtime (runtime.native: Session.eval
with all logits, Session.sparsity()) on the first --windows windows of 256 tokens of the validation token stream,
each window evaluated from position 0 in chunks of 64 tokens (ffn_mode "auto"). The torch figures come from each
run's eval.json (the same windows). Results go to models/results.json; the cards to models/<name>.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np

SHIPPED = {  # GGUF name -> run folder name
    "blockffn-tiny": "blockffn",
    "blockffn-tiny-draft": "draft",
}
MEASURED_ONLY = {"blockffn-tiny-ablation": "ablation"}  # converted to a temporary folder for measurement only
CTX, BATCH = 256, 64


def native_eval(path: Path, stream: np.ndarray, windows: int) -> dict:
    from ..runtime.native import Model

    nll, count = 0.0, 0
    with Model(path) as model, model.session(n_ctx=CTX, n_batch=BATCH) as s:
        for i in range(windows):
            w = stream[i * CTX:(i + 1) * CTX + 1].astype(np.int64)
            s.truncate(0)
            for j in range(0, CTX, BATCH):
                logits = s.eval(w[j:j + BATCH].tolist(), logits="all").astype(np.float64)  # [64, V]
                m = logits.max(-1, keepdims=True)
                lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
                tgt = w[j + 1:j + BATCH + 1]
                nll += float((lse - logits[np.arange(BATCH), tgt]).sum())
                count += BATCH
        st = s.sparsity()
    out = {"native_val_tokens": count, "native_val_ppl": math.exp(nll / count)}
    if st is not None:
        out.update(native_tls=st.tls, native_cls8=st.cls[8], native_cls={k: st.cls[k] for k in (2, 4, 8, 16)},
                   expert_bytes_per_token=st.expert_bytes_per_token, dense_bytes_per_token=st.dense_bytes_per_token)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> None:
    from ..converters.blockffn import convert

    p = argparse.ArgumentParser(prog="python -m sparrow.training.ship")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--blockffn-run", default="blockffn", help="run folder of the shipped BlockFFN")
    p.add_argument("--also-tried", default=None, help="run folder of another BlockFFN variant trained in the same "
                   "selection and not shipped: measured and listed in the card")
    a = p.parse_args(argv)
    SHIPPED["blockffn-tiny"] = a.blockffn_run
    if a.also_tried:
        MEASURED_ONLY["blockffn-tiny-also-tried"] = a.also_tried
    if a.blockffn_run != "blockffn" and (a.runs / "blockffn" / "eval.json").is_file():
        MEASURED_ONLY["blockffn-tiny-factor5e-2"] = "blockffn"  # the released initial factor, for comparison
    stream = np.load(a.runs / "data" / "val.npy")
    results = {}
    tmp = a.runs / "measure"
    tmp.mkdir(exist_ok=True)
    for name, run in {**SHIPPED, **MEASURED_ONLY}.items():
        out = (a.models if name in SHIPPED else tmp) / f"{name}.Q8_0.gguf"
        src = a.runs / run / "hf"
        named = tmp / name  # the folder name becomes general.name
        shutil.rmtree(named, ignore_errors=True)
        shutil.copytree(src, named)
        convert(named, out, "q8_0", overwrite=True, progress=False)
        r = json.loads((a.runs / run / "eval.json").read_text())
        r["args"] = json.loads((a.runs / run / "args.json").read_text())
        r["final_chunk_factor"] = float((a.runs / run / "log.csv").read_text().strip().split("\n")[-1].split(",")[5])
        r.update(native_eval(out, stream, a.windows))
        r.update(file=out.name, size=out.stat().st_size, sha256=sha256(out))
        results[name] = r
        print(name, {k: v for k, v in r.items() if k not in ("config",)})
    dense = a.runs / "dense" / "eval.json"
    if dense.is_file():
        results["dense-baseline"] = json.loads(dense.read_text())
    (a.models / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not dense.is_file():
        print(f"{dense} missing (the dense run has not finished): no model cards written")
        return
    write_cards(json.loads((a.models / "results.json").read_text()), a.models,
                json.loads((a.runs / "data" / "manifest.json").read_text()))



def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _arch(c: dict) -> str:
    ffn = (f"BlockFFN FFN: {c['num_experts']} experts x width {c['expert_size']} (ffn_type block_linear, ReLU router, "
           f"RMS router norm, SiLU experts; total FFN width {c['num_experts'] * c['expert_size']})"
           if c["ffn"] == "block" else f"dense SiLU MLP of width {c['num_experts'] * c['expert_size']} (no router)")
    return (f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads "
            f"({c['num_key_value_heads']} kv heads, vanilla GQA attention, RoPE theta {c['rope_theta']:g}), "
            f"vocabulary {c['vocab_size']}, context {c['max_position_embeddings']}; {ffn}; MiniCPM scales "
            f"(scale_emb {c['scale_emb']:g}, dim_model_base {c['dim_model_base']}, scale_depth {c['scale_depth']:g}), "
            f"tied embeddings")


CONTENTION = ("3 to 5 training runs shared the 2-core machine with other jobs; ~1.2 s/step for this size when two "
              "runs share it alone")
CORPUS = ("Python {py} standard library sources (code, comments, docstrings) from the local install, gathered by "
          "`training/corpus.py`: sorted `*.py` files, test suites / idlelib / encodings / lib2to3 / turtledemo left out, "
          "files over 400 KB skipped, tabs expanded, trailing whitespace stripped. Every 20th file is held out for "
          "validation: {tr} training files ({trt} tokens), {va} validation files ({vat} tokens). Tokenizer: "
          "SentencePiece BPE, 4000 pieces, byte fallback, trained on the training split (`training/data.py`).")


def write_cards(results: dict, models: Path, data_manifest: dict) -> None:
    import platform

    s = data_manifest["splits"]
    corpus = CORPUS.format(py=platform.python_version(), tr=s["train"]["files"], trt=s["train"]["tokens"],
                           va=s["val"]["files"], vat=s["val"]["tokens"])
    a, b, d, dense = (results[k] for k in ("blockffn-tiny", "blockffn-tiny-ablation", "blockffn-tiny-draft",
                                           "dense-baseline"))
    measure = (f"Measured on the first {a['native_val_tokens']} validation tokens ({a['native_val_tokens'] // 256} "
               f"windows of 256 tokens, each from position 0); native: `runtime.native` Session.eval in chunks of 64 "
               f"tokens, ffn_mode auto, Session.sparsity() over all evaluated tokens; torch: the same windows in "
               f"float32 before conversion.")
    steps = (f"{a['steps']} steps x batch {a['batch']} x {a['ctx']} tokens = {a['train_tokens']:,} tokens "
             f"(~{a['train_tokens'] / s['train']['tokens']:.2f} epochs)")
    def flags(r: dict) -> str:
        f = "" if float(r["args"]["chunk_factor"]) == 5e-2 else f" --chunk-factor {r['args']['chunk_factor']}"
        if float(r["args"].get("chunk_factor_floor", 0)) > 0:
            f += f" --chunk-factor-floor {r['args']['chunk_factor_floor']}"
        return f

    extra = flags(a)
    floor = float(a["args"].get("chunk_factor_floor", 0))
    out_a = Path(a["args"]["out"]).name
    alt = results.get("blockffn-tiny-also-tried")
    alt_cmd = (f"python -m sparrow.training --run blockffn --out runs/{Path(alt['args']['out']).name} --data runs/data "
               f"--steps {alt['steps']}{flags(alt)}   # the other variant tried, not shipped\n" if alt else "")
    repro = ("```\npip install .[train]\ntools/dev_build.sh build/train\n"
             f"python -m sparrow.training --run blockffn --out runs/{out_a} --data runs/data --steps {a['steps']}{extra}\n"
             + alt_cmd
             + ("python -m sparrow.training --run blockffn --out runs/blockffn --data runs/data --steps "
                f"{a['steps']}   # released factor, for comparison\n" if extra else "")
             + "for run in ablation dense draft; do\n"
             f"  python -m sparrow.training --run $run --out runs/$run --data runs/data --steps {a['steps']}\ndone\n"
             f"python -m sparrow.training.ship --runs runs --models models --blockffn-run {out_a}"
             + (f" --also-tried {Path(alt['args']['out']).name}" if alt else "")
             + "\n```")
    official_row = ""
    if "blockffn-tiny-factor5e-2" in results:
        o = results["blockffn-tiny-factor5e-2"]
        official_row = (f"| same recipe, released initial chunk factor 5e-2 (not shipped) | {o['native_val_ppl']:.2f} | "
                        f"{o['val_ppl']:.2f} | {_pct(o['native_tls'])} | {_pct(o['native_cls8'])} | "
                        f"{' / '.join(_pct(o['native_cls'][str(k)]) for k in (2, 4, 16))} |\n")
    alt_row = ""
    if alt:
        alt_row = (f"| other variant tried: initial factor = floor = {alt['args']['chunk_factor']} (not shipped) | "
                   f"{alt['native_val_ppl']:.2f} | {alt['val_ppl']:.2f} | {_pct(alt['native_tls'])} | "
                   f"{_pct(alt['native_cls8'])} | {' / '.join(_pct(alt['native_cls'][str(k)]) for k in (2, 4, 16))} |\n")
    contention = CONTENTION if not floor else ("two runs (the two variants below) shared the 2-core machine, "
                                               "~0.75 s/step")
    sched = ("the official adaptive scheduler with min/max factor 1.025/4.0" if not floor else
             f"the official adaptive scheduler with min/max factor 1.025/4.0 and a floor of {floor:g} (a Sparrow "
             f"option, `--chunk-factor-floor`; the released scheduler has none)")
    selection = ""
    if floor:
        selection = ("\n\nSelection: the run without the floor (initial factor 0.2) plateaued at "
                     "79.5% TLS: its batch TLS peaked at ~80.2% near step 150 while the factor was high, then the "
                     "scheduler lowered the factor (to 0.156) as the chunk loss fell, and TLS sank with it. "
                     + (f"Two floor variants were then trained from scratch with the same data, size and schedule: "
                        f"initial factor = floor = {a['args']['chunk_factor']} (this model) and "
                        f"{alt['args']['chunk_factor']} (row 'other variant tried'). The rule fixed beforehand: keep "
                        "the variant that reaches TLS >= 80% (native) with the lower validation perplexity; this one "
                        "was kept. The validation windows used for selection are the same ones reported here, so "
                        "these figures are slightly optimistic for the selected model." if alt else ""))
    floor_text = (f"the chunk loss kept falling, so the scheduler lowered the factor to {a['final_chunk_factor']:.3f} by "
                  "the end." if not floor else
                  f"the chunk loss kept falling, which makes the released scheduler lower the factor (to 0.156 in "
                  f"the run without a floor, and TLS fell below 80% with it), so the shipped run adds a floor of "
                  f"{floor:g}: the factor ended at {a['final_chunk_factor']:.3f}.")
    start_text = (f"{float(a['args']['chunk_factor']) / 5e-2:g}x the released value"
                  + (", the most the released scheduler lets the factor grow to"
                     if float(a["args"]["chunk_factor"]) == 0.2 else ""))
    card_a = f"""# blockffn-tiny

A small BlockFFN language model trained by Sparrow, to demonstrate and test chunk-level activation sparsity on CPUs.
It is a toy: it writes Python-looking text, it does not follow instructions. File: `{a['file']}` (Q8_0,
{a['size'] / 1e6:.2f} MB, sha256 `{a['sha256']}`), converted by `converters/blockffn.py` from a checkpoint in the
released BlockFFN Hugging Face layout. Draft model for speculative decoding: `blockffn-tiny-draft`.

## Architecture
{_arch(a['config'])}. {a['params']:,} parameters.

## Corpus
{corpus}

## Training
{steps}; {a['train_seconds'] / 60:.1f} min of step time on one CPU thread (torch {_torch_version()}; {contention}). AdamW (betas 0.9/0.95,
weight decay 0.1), base lr 1e-2 with the official parameter groups (attention, router and expert matrices at
lr / (hidden / dim_model_base) = 2.5e-3, embeddings and norms at 1e-2), warmup 2%, stable, linear decay to 10% over
the last 20% of steps (WSD), gradient clipping 1.0. Loss = LM cross-entropy + {a['args']['transfer']} x activation locality + factor x
chunk sparsification (chunk length {a['args']['chunk_len']}, initial factor {a['args']['chunk_factor']} (the released
runs start at 5e-2), {sched}, stable for the first
{float(a['args']['sched_stable']):.0%} of steps, then {a['args']['sched_window']}-step windows). See `training/objectives.py` for exactly what
was implemented and how it follows the official code.

## Results
{measure}

| model | val ppl (native, Q8_0) | val ppl (torch, f32) | TLS (native) | CLS-8 (native) | CLS-2/4/16 (native) |
|---|---|---|---|---|---|
| blockffn-tiny (chunk objectives) | {a['native_val_ppl']:.2f} | {a['val_ppl']:.2f} | {_pct(a['native_tls'])} | {_pct(a['native_cls8'])} | {' / '.join(_pct(a['native_cls'][str(k)]) for k in (2, 4, 16))} |
{official_row}{alt_row}| ablation: same recipe without transfer + chunk losses | {b['native_val_ppl']:.2f} | {b['val_ppl']:.2f} | {_pct(b['native_tls'])} | {_pct(b['native_cls8'])} | {' / '.join(_pct(b['native_cls'][str(k)]) for k in (2, 4, 16))} |
| dense baseline (same total FFN width, all units always on) | - | {dense['val_ppl']:.2f} | - | - | - |

Goals from the issue: TLS >= 80%, CLS-8 >= 60%. Reached: TLS {_pct(a['native_tls'])} \
({'met' if a['native_tls'] >= 0.8 else 'NOT met'}), CLS-8 {_pct(a['native_cls8'])} ({'met' if a['native_cls8'] >= 0.6 else 'NOT met'}). \
The chunk objectives raise CLS-8 from {_pct(b['native_cls8'])} (ablation) to {_pct(a['native_cls8'])}. Quality cost \
against the dense model of the same size trained the same way: perplexity {a['val_ppl']:.2f} vs {dense['val_ppl']:.2f} \
(+{100 * (a['val_ppl'] / dense['val_ppl'] - 1):.1f}%, torch, same windows); the ablation costs about the same \
({b['val_ppl']:.2f}), so at this scale the cost is the ReLU-routed block FFN itself, not the chunk objectives.{selection}

## How the objectives follow the official code
- Activation locality: `F.binary_cross_entropy_with_logits(prev_raw * 100, sigmoid(cur_raw * 100))` over \
consecutive token pairs of one document, raw = router projection before ReLU, averaged over layers, weight \
{a['args']['transfer']} (official `transfer_regularization`).
- Chunk sparsification: p = the RMS-normalised ReLU router score (before the learned router_norm weight) divided by \
its sum over experts, the official `router_score_scaled` for `norm_after_router = "rms"`; loss = \
1 - mean over (chunk, expert) of exp(sum_t log(1 - p + 1e-5)), averaged over layers (official \
`chunk_regularization`). The sharpened sigmoid (steepness 100) appears in the official code only in the locality \
loss, so that is where it is used here.
- Factor: the official `AdaptiveLinearScheduler`: it does not aim at a target sparsity; it compares the mean chunk \
loss of the last window with the window before and ramps the factor by that ratio (at least 1.025x when the loss \
rose), capped at 4x the initial factor. With the released initial factor 5e-2 this 3.9M-parameter model reached \
only {_pct(results['blockffn-tiny-factor5e-2']['native_tls']) if 'blockffn-tiny-factor5e-2' in results else '?'} TLS in {a['steps']} steps (second row), so the shipped run starts at {a['args']['chunk_factor']} ({start_text}); {floor_text}

## Reproduce
{repro}
"""
    card_d = f"""# blockffn-tiny-draft

The draft model for `blockffn-tiny` (speculative decoding): same tokenizer and vocabulary, trained on the same data
with the same schedule, but much smaller. It is a tiny BlockFFN (so the same converter and native code path run it),
trained with the language-modelling loss only (no chunk objectives). File: `{d['file']}` (Q8_0,
{d['size'] / 1e6:.2f} MB, sha256 `{d['sha256']}`).

## Architecture
{_arch(d['config'])}. {d['params']:,} parameters.

## Corpus
{corpus}

## Training
{steps}; {d['train_seconds'] / 60:.1f} min of step time on one CPU thread ({CONTENTION}). Same optimiser and schedule as blockffn-tiny
(`python -m sparrow.training --run draft`), LM loss only.

## Results
{measure}

| model | val ppl (native, Q8_0) | val ppl (torch, f32) | TLS (native) | CLS-8 (native) |
|---|---|---|---|---|
| blockffn-tiny-draft | {d['native_val_ppl']:.2f} | {d['val_ppl']:.2f} | {_pct(d['native_tls'])} | {_pct(d['native_cls8'])} |
| blockffn-tiny (target) | {a['native_val_ppl']:.2f} | {a['val_ppl']:.2f} | {_pct(a['native_tls'])} | {_pct(a['native_cls8'])} |

## Reproduce
{repro}
"""
    (models / "blockffn-tiny.md").write_text(card_a)
    (models / "blockffn-tiny-draft.md").write_text(card_d)


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
