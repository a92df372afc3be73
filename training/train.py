"""Train one run: a BlockFFN (with or without the chunk-sparsity objectives), the dense baseline, or the draft model.

    python -m sparrow.training --run blockffn --out runs/blockffn          # the shipped model's recipe
    python -m sparrow.training --run ablation --out runs/ablation          # same, without transfer and chunk losses
    python -m sparrow.training --run dense    --out runs/dense             # dense MLP of the same total FFN width
    python -m sparrow.training --run draft    --out runs/draft             # the small draft model (BlockFFN, no objectives)
    ... --resume                                                    # continue from runs/<name>/ckpt.pt

Writes into --out: ckpt.pt (every --save-every steps and at the end), log.csv (one row per --log-every steps: loss
terms, chunk factor, lr, TLS and CLS-8 of the batch), hf/ (the checkpoint folder in the released HF layout, for
converters.blockffn.convert), eval.json (validation perplexity, TLS, CLS-8 by torch), args.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import prepare
from .model import BlockFFNForCausalLM, ModelConfig
from .objectives import AdaptiveFactorScheduler, chunk_loss, chunk_probs, sparsity, transfer_loss

# Sizes and objectives per run; everything else is shared.
RUNS = {
    "blockffn": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 32, "expert_size": 32,
                 "ffn": "block", "objectives": True},
    "ablation": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 32, "expert_size": 32,
                 "ffn": "block", "objectives": False},
    "dense": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 32, "expert_size": 32,
              "ffn": "dense", "objectives": False},
    "draft": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "experts": 8, "expert_size": 32,
              "ffn": "block", "objectives": False},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparrow.training", description=__doc__.split("\n")[0])
    p.add_argument("--run", choices=RUNS, required=True)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, exported model)")
    p.add_argument("--data", type=Path, default=Path("runs/data"), help="tokenizer + token cache (shared)")
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2, help="base lr (official 1e-2, router too); matrices get "
                   "lr / scale_width as in the official muP-style groups")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.02, help="fraction of steps")
    p.add_argument("--decay", type=float, default=0.2, help="WSD: final fraction of steps decaying to 10%% lr")
    p.add_argument("--transfer", type=float, default=2e-3, help="activation-locality weight (official 1e-3..2e-3)")
    p.add_argument("--chunk-factor", type=float, default=5e-2, help="initial chunk-sparsification factor")
    p.add_argument("--chunk-factor-floor", type=float, default=0.0, help="lowest value the adaptive scheduler may "
                   "lower the chunk factor to (0 = no floor, the released scheduler)")
    p.add_argument("--chunk-len", type=int, default=64, help="chunk length L of the chunk loss (official 64)")
    p.add_argument("--sched-stable", type=float, default=0.1, help="adaptive scheduler: constant for this fraction")
    p.add_argument("--sched-window", type=int, default=20, help="adaptive scheduler: steps per window")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--val-windows", type=int, default=64, help="validation windows of --ctx tokens for eval.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def lr_factor(step: int, steps: int, warmup: float, decay: float) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to 10% over the final `decay` fraction."""
    w, d = max(1, int(steps * warmup)), int(steps * decay)
    if step < w:
        return (step + 1) / w
    if step >= steps - d:
        return 1.0 - 0.9 * (step - (steps - d)) / max(1, d)
    return 1.0


def batch_at(stream: np.ndarray, step: int, batch: int, ctx: int, seed: int) -> torch.Tensor:
    """[B, ctx + 1] windows at offsets drawn from a generator seeded by (seed, step): resumable, reproducible."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.size - ctx - 1, size=batch)
    return torch.from_numpy(np.stack([stream[s:s + ctx + 1].astype(np.int64) for s in starts]))


def build_model(run: str, vocab: int, ctx: int) -> BlockFFNForCausalLM:
    r = RUNS[run]
    cfg = ModelConfig(vocab_size=vocab, hidden_size=r["hidden"], num_hidden_layers=r["layers"],
                      num_attention_heads=r["heads"], num_key_value_heads=r["kv_heads"], num_experts=r["experts"],
                      expert_size=r["expert_size"], ffn=r["ffn"], max_position_embeddings=ctx)
    return BlockFFNForCausalLM(cfg)


@torch.no_grad()
def evaluate(model: BlockFFNForCausalLM, stream: np.ndarray, ctx: int, windows: int) -> dict:
    """Perplexity over consecutive non-overlapping windows of ctx tokens from the start of the validation stream,
    each scored from its own position 0; TLS and CLS-8 of the same tokens."""
    model.eval()
    n = min(windows, (stream.size - 1) // ctx)
    nll, count, tls_sum, cls_sum = 0.0, 0, 0.0, 0.0
    for i in range(n):
        x = torch.from_numpy(stream[i * ctx:(i + 1) * ctx + 1].astype(np.int64))[None]
        logits, _, rs = model(x[:, :-1])
        nll += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        count += ctx
        if rs[0] is not None:
            t, c = sparsity(rs, 8)
            tls_sum, cls_sum = tls_sum + t, cls_sum + c
    model.train()
    out = {"val_tokens": count, "val_nll": nll / count, "val_ppl": math.exp(nll / count)}
    if model.config.ffn == "block":
        out.update(val_tls=tls_sum / n, val_cls8=cls_sum / n)
    return out


def export_hf(model: BlockFFNForCausalLM, folder: Path, tokenizer: Path) -> None:
    """The checkpoint folder in the released layout: config.json, model.safetensors, tokenizer.model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if model.config.ffn == "block":
        (folder / "config.json").write_text(json.dumps(model.config.hf_config(), indent=2))
    save_file(model.hf_state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))


def train(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    meta = prepare(args.data, args.vocab)
    train_stream = np.load(args.data / "train.npy")
    val_stream = np.load(args.data / "val.npy")
    model = build_model(args.run, meta["vocab_size"], args.ctx)
    objectives = RUNS[args.run]["objectives"]
    opt = torch.optim.AdamW(model.param_groups(args.lr, args.weight_decay), betas=(0.9, 0.95), eps=1e-8)
    sched = AdaptiveFactorScheduler(args.chunk_factor, stable=max(1, int(args.steps * args.sched_stable)),
                                    window=args.sched_window, floor=args.chunk_factor_floor)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = args.out / "ckpt.pt", args.out / "log.csv"
    start, elapsed = 0, 0.0
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, elapsed = ck["step"], ck["elapsed"]
    elif log_path.exists():
        log_path.unlink()
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    fields = ["step", "loss", "lm", "transfer", "chunk", "chunk_factor", "lr", "tls", "cls8", "sec"]
    new_log = not log_path.exists()
    logf = log_path.open("a", newline="")
    log = csv.DictWriter(logf, fieldnames=fields)
    if new_log:
        log.writeheader()

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "elapsed": elapsed, "config": asdict(model.config)}, tmp)
        tmp.replace(ckpt_path)

    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.run, mininterval=5)
    acc = {k: 0.0 for k in ("loss", "lm", "transfer", "chunk", "tls", "cls8")}
    n_acc = 0
    for step in bar:
        t0 = time.perf_counter()
        f = lr_factor(step, args.steps, args.warmup, args.decay)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        xy = batch_at(train_stream, step, args.batch, args.ctx, args.seed)
        x, y = xy[:, :-1], xy[:, 1:]
        logits, raws, rs = model(x)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss, tr, ch, factor = lm, torch.zeros(()), torch.zeros(()), 0.0
        if objectives:
            valid = x[:, 1:] != model.config.bos_token_id               # pair (t, t+1) within one document
            eps = model.config.rms_norm_eps
            tr = sum(transfer_loss(raw, valid) for raw in raws) / len(raws)
            ch = sum(chunk_loss(chunk_probs(raw, eps), args.chunk_len) for raw in raws) / len(raws)
            factor = sched.step(ch.item())
            loss = lm + args.transfer * tr + factor * ch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed += time.perf_counter() - t0
        tls, cls8 = sparsity(rs, 8) if rs[0] is not None else (float("nan"), float("nan"))
        for k, v in (("loss", loss.item()), ("lm", lm.item()), ("transfer", tr.item()), ("chunk", ch.item()),
                     ("tls", tls), ("cls8", cls8)):
            acc[k] += v
        n_acc += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row = {k: round(v / n_acc, 5) for k, v in acc.items()}
            row.update(step=step + 1, chunk_factor=round(factor, 6), lr=opt.param_groups[0]["lr"],
                       sec=round(elapsed, 1))
            log.writerow(row)
            logf.flush()
            bar.set_postfix(lm=row["lm"], tls=row["tls"], cls8=row["cls8"], fac=row["chunk_factor"])
            acc = {k: 0.0 for k in acc}
            n_acc = 0
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(step + 1)
    logf.close()
    result = {"run": args.run, "steps": args.steps, "batch": args.batch, "ctx": args.ctx,
              "train_tokens": args.steps * args.batch * args.ctx, "train_seconds": round(elapsed, 1),
              "params": sum(p.numel() for p in model.parameters()), "config": asdict(model.config)}
    result.update(evaluate(model, val_stream, args.ctx, args.val_windows))
    export_hf(model, args.out / "hf", args.data / "tokenizer.model")
    (args.out / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


def main(argv=None) -> None:
    train(parse_args(argv))
