"""The sections `sparrow bench` adds to the headline decode benchmark (bench_device/suite.py): sparse, speculative and
synthetic, each measured, checked before timing, and rendered as a Markdown table.

  sparse       the shipped BlockFFN model (models/blockffn-tiny): decode with every expert (ffn_mode "dense") against
               the sparse path (the default), alternated, sparse greedy tokens checked equal to dense first; TLS,
               CLS-k (k = 2..16) and expert bytes per decode token from session.sparsity().
  speculative  bench_speculative's (c) on the benchmarked model (plain, llama.cpp, each train-free drafter) and (a)
               on the shipped BlockFFN model with its draft model: tok/s, tokens per step, accepted-length histogram.
  gpu          (`sparrow bench --device vulkan[:N]`) the model's greedy decode in a session on a Vulkan GPU device
               beside one on the CPU, its tokens checked against the CPU's; FUNCTIONAL CHECK ONLY where the device is a
               software renderer on the CPU (lavapipe). gpu_device_lines: the devices the report lists.
  synthetic    SYNTHETIC: bench_synthetic on released BlockFFN shapes (random weights, synthetic routing at the
               paper's TLS 80% / CLS-8 70%): decode dense vs sparse, a T=8 chain/tree, the active-fraction sweep; and
               REPLAYED: bench_speculative's (b), (a)'s accepted lengths replayed on those shapes.
  phases       decode phase by phase (bench_device/phases.py): per configuration the weight bytes per token each phase
               reads, its time (Session.timings()) and its fraction of the bound -- the benchmarked model's decode
               (phases_section), and the synthetic shapes' dense and sparse decode and T=8 chunk pass (their records'
               "phases").

Bandwidth bound of a configuration: bandwidth / bytes read per generated token, where the bytes are weights only
(KV cache and activations left out): every non-expert tensor (the embedding as bench_decode counts it) plus the
expert weights actually read, as the session measured them. For speculation, per verification step: the target's
non-expert weights once, the experts the step read (the union over the tree), the draft model's weights once per
drafted token; divided by the tokens the step produced. Which bandwidth: the roofline's (bench_device/profile.py
Roofline) for the configuration's working set, the weights it touches over many tokens (the whole model, every
expert; plus the draft model's): DRAM's where that exceeds the last-level cache, else that of a buffer of its size.
Each row records the bound it used and why ("bound"), and why when it runs above it ("over_bound").

    bytes = read_bytes_per_token(weight_bytes, dense_expert_bytes, expert_bytes)   # one decode token
    row.update(against_bound(roofline.bound(bytes, working_set_bytes), tok_s))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import bench_speculative as spec
from . import phases
from .profile import Roofline, against_bound, weight_bytes_per_token

SHIPPED_TARGET = spec.SHIPPED / "blockffn-tiny.Q8_0.gguf"   # store name "blockffn-tiny"
SHIPPED_DRAFT = spec.SHIPPED / "blockffn-tiny-draft.Q8_0.gguf"  # "blockffn-tiny-draft"
DRAFT_K = 4  # section_a's draft model drafts a chain of 4 (its tree variant: a chain of 3, runners-up cost nothing)
DRAFT_EVALS = {"sparse + draft-model (tree: chain 3 + 2 runners-up each)": 3}  # draft passes per step, where not K
CLS_K = (2, 4, 8, 16)  # shown in the Markdown; the JSON has every k = 2..16
BOUND_METHOD = ("bandwidth (native probe, the run's threads: DRAM's, or, where the weights the configuration touches "
                "fit in the last-level cache, that of buffers of their size) / weight bytes read per generated token: "
                "non-expert weights + the expert weights the session measured as read (decode: per token; "
                "speculation: per verification step, plus the draft model's weights per drafted token, divided by the "
                "step's tokens); KV cache and activations not counted")
KIND = {"llc": "LLC", "dram": "DRAM"}
KIND_WORDS = {"llc": "cache-resident (last-level cache)", "dram": "DRAM"}

Progress = Callable[[int], None]


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, n: int) -> None:
        pass


def no_bar(length: int, label: str) -> _NullBar:
    """A progress bar factory that shows nothing (the sections' default)."""
    return _NullBar()


def read_bytes_per_token(weight_bytes: float, dense_expert_bytes: float, expert_bytes: float) -> float:
    """Weight bytes one decode token reads when it reads `expert_bytes` of expert weights: the file's per-token
    weight bytes (every expert counted, `dense_expert_bytes` of them) with the experts replaced by those read."""
    if not 0 <= expert_bytes <= dense_expert_bytes <= weight_bytes:
        raise ValueError(f"need 0 <= expert bytes ({expert_bytes}) <= dense expert bytes ({dense_expert_bytes}) "
                         f"<= weight bytes ({weight_bytes})")
    return weight_bytes - dense_expert_bytes + expert_bytes


def _tok_s_summary(seconds: dict) -> dict:
    """tok/s summary from a seconds-per-token summary (median_s, min_s, max_s, n)."""
    return {"median": 1 / seconds["median_s"], "min": 1 / seconds["max_s"], "max": 1 / seconds["min_s"],
            "n": seconds["n"]}


def bound_cells(row: dict) -> tuple[str, str]:
    """A row's bound and fraction cells: "346 (DRAM)" and "53%"; above the bound "119%†", explained under the table
    (bound_lines)."""
    b = row.get("bound", {})
    over = "†" if "over_bound" in b else ""
    kind = f" ({KIND[b['kind']]})" if b else ""
    return f"{row['bandwidth_bound_tok_s']:.0f}{kind}", f"{100 * row['fraction_of_bound']:.0f}%{over}"


def bound_lines(rows: dict[str, dict]) -> list[str]:
    """Lines under a table of rows with bounds: which bandwidth each bound used and why (once per distinct reason, with
    the rows it applies to), then why each fraction above 100% (†) can be real."""
    groups: dict[tuple, list[str]] = {}
    for name, r in rows.items():
        b = r.get("bound")
        if b:
            groups.setdefault((b["kind"], b["bandwidth_gb_s"], b["why"]), []).append(name)
    lines = []
    for (kind, gb_s, why), names in groups.items():
        whom = "" if len(groups) == 1 else " of " + ", ".join(names)
        lines.append(f"- Bound{whom}: {KIND_WORDS[kind]}, {gb_s:.1f} GB/s: {why}.")
    lines += [f"- † {name}: {r['bound']['over_bound']}." for name, r in rows.items()
              if "over_bound" in r.get("bound", {})]
    return lines


# ---- sparse ----

def decode_sparsity(session, prompts: list[list[int]], tokens: int) -> list:
    """SparsityStats of greedy decode alone, one per prompt: the prompt minus its last token prefilled, the counters
    reset, then `tokens` tokens generated (tokens + 1 single-token steps: the prompt's last token, each generated
    one)."""
    from ..runtime import generate_tokens

    out = []
    for toks in prompts:
        session.truncate(0)
        session.prefill(toks[:-1])
        session.reset_sparsity()
        list(generate_tokens(session, toks, max_tokens=tokens))
        out.append(session.sparsity())
    return out


def pool_sparsity(stats: list) -> dict:
    """TLS, CLS-k (k = 2..16, chunks of consecutive decode tokens) and expert bytes per token pooled over runs."""
    n = sum(st.n_tokens for st in stats)
    cls = {}
    for k in range(2, 17):
        parts = [(st.cls[k], st.n_tokens - k + 1) for st in stats if st.n_tokens >= k and st.cls[k] == st.cls[k]]
        if parts:
            cls[str(k)] = sum(c * m for c, m in parts) / sum(m for _, m in parts)
    return {"tls": sum(st.tls * st.n_tokens for st in stats) / n, "cls": cls, "decode_tokens_measured": n,
            "expert_bytes_per_token": sum(st.expert_bytes_per_token * st.n_tokens for st in stats) / n,
            "dense_expert_bytes_per_token": stats[0].dense_bytes_per_token}


def sparse_section(model_path: Path, *, threads: int, tokens: int, rounds: int, n_prompts: int, roofline: Roofline,
                   progress: Progress | None = None) -> dict:
    """Dense vs sparse decode of a BlockFFN model (module docstring): checked, alternated, with routing statistics
    of the decode tokens and each configuration's bandwidth bound (the roofline's, for the model's weights)."""
    from ..runtime import Model

    progress = progress or (lambda n: None)
    model = Model(model_path)
    sessions = {"dense": model.session(n_ctx=512, n_threads=threads, ffn_mode="dense"),
                "sparse": model.session(n_ctx=512, n_threads=threads)}
    try:
        if sessions["sparse"].sparsity() is None:
            raise RuntimeError(f"{model_path.name} has no sparse experts: the sparse section needs a BlockFFN model")
        prompts = [model.tokenize(p) for p in spec.DOC_PROMPTS[:n_prompts]]
        # checked and timed by bench_speculative: sparse greedy tokens must equal dense, then rounds alternate
        engines = spec.native_engines(sessions["dense"], sessions["sparse"], {})
        timed = spec.run_engines(engines, prompts, tokens=tokens, rounds=rounds, echo=lambda m: None,
                                 progress=progress)
        stats = {mode: decode_sparsity(s, prompts, tokens) for mode, s in sessions.items()}
        progress(1)
    finally:
        for s in sessions.values():
            s.close()
        model.close()

    w = weight_bytes_per_token(model_path)
    configs = {}
    for mode, engine in (("dense", "dense plain"), ("sparse", "sparse plain")):
        st = pool_sparsity(stats[mode])
        per_token = read_bytes_per_token(w["per_token"], st["dense_expert_bytes_per_token"],
                                         st["expert_bytes_per_token"])
        row = timed[engine]
        configs[mode] = {
            "ffn_mode": "dense" if mode == "dense" else "auto",
            "decode_tok_s": row["tok_s"],
            **({"ratio_vs_dense": row["ratio_vs_dense_plain"]} if mode == "sparse" else {}),
            **st, "read_bytes_per_token": per_token,
            **against_bound(roofline.bound(per_token, w["per_token"], sparse=mode == "sparse"),
                            row["tok_s"]["median"]),
        }
    return {"model": str(model_path), "model_name": model_path.name.split(".")[0],
            "prompts": len(prompts), "tokens": tokens, "rounds": rounds,
            "check": f"sparse greedy tokens equal dense on all {len(prompts)} prompts ({tokens} tokens each)",
            "weight_bytes_per_token": w["per_token"], "bound_method": BOUND_METHOD, "configs": configs}


def sparse_markdown(s: dict) -> list[str]:
    lines = [(f"{s['model_name']} ({s['prompts']} prompts x {s['tokens']} decode tokens x {s['rounds']} rounds, "
             f"alternated); {s['check']}. TLS, CLS-k and expert bytes over the decode tokens."), "",
             "| configuration | decode tok/s (min-max) | x dense (paired) | TLS | " +
             " | ".join(f"CLS-{k}" for k in CLS_K) + " | expert MB/token | weights read MB/token | "
             "bandwidth bound tok/s | fraction of bound |",
             "|---|---:|---:|---:|" + "---:|" * len(CLS_K) + "---:|---:|---:|---:|"]
    for name, c in s["configs"].items():
        d, x = c["decode_tok_s"], c.get("ratio_vs_dense")
        ratio = f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})" if x else "1.00x"
        if name == "dense":  # the router chose the same experts; dense mode reads every one anyway
            tls, cls = "-", " | ".join("-" for _ in CLS_K)
        else:
            tls = f"{100 * c['tls']:.1f}%"
            cls = " | ".join(f"{100 * c['cls'][str(k)]:.1f}%" if str(k) in c["cls"] else "n/a" for k in CLS_K)
        bound, frac = bound_cells(c)
        lines.append(f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {ratio} | "
                     f"{tls} | {cls} | {c['expert_bytes_per_token'] / 1e6:.3f} | "
                     f"{c['read_bytes_per_token'] / 1e6:.3f} | {bound} | {frac} |")
    return lines + ["", f"Bound: {s['bound_method']}."] + bound_lines(s["configs"])


# ---- speculative ----

# What each mode runs: (c) on the benchmarked model, (a) on the shipped BlockFFN model with its draft model.
SPEC_FULL = {"c": {"prompts": spec.PLAIN[:2] + [spec.chat(t) for t in spec.CHAT[:2]], "tokens": 32, "rounds": 2,
                   "drafters": None},
             "a": {"n_prompts": 4, "tokens": 32, "rounds": 2}}
SPEC_QUICK = {"c": {"prompts": [spec.PLAIN[0], spec.chat(spec.CHAT[0])], "tokens": 16, "rounds": 1,
                    "drafters": ["prompt-lookup", "recycling (chain 4)"]}}
SPEC_METHOD = ("bench_speculative: every drafter's greedy tokens checked equal to plain (dense) greedy decoding on "
               "every prompt first; then rounds over the engines in rotated order, each run from the prompt minus its "
               "last token in the cache, N new tokens timed; ratios paired by prompt and round")


def _spec_rows(rows: dict, *, weight_bytes: float, dense_expert_bytes: float, plain_bytes: dict[str, float],
               draft_bytes_per_step: dict[str, float], roofline: Roofline, draft_weight_bytes: float = 0.0) -> dict:
    """bench_speculative rows in the report's form: decode_tok_s, tokens per step, accepted_hist at the row's top
    level (plots.accepted_hists names a series by its row), bytes read per token and the bandwidth bound.
    plain_bytes: bytes per token of the engines without a drafter, by name. The working set of a row: the target's
    weights (`weight_bytes`), plus the draft model's (`draft_weight_bytes`) for the rows in draft_bytes_per_step."""
    out = {}
    for name, row in rows.items():
        r = {"decode_tok_s": row["tok_s"]}
        ratio = next((v for k, v in row.items() if k.startswith("ratio_vs_")), None)
        if ratio:
            r["ratio_vs_plain"] = ratio
        for k in ("speed_vs_llama_cpp", "greedy_agreement_tokens_min"):
            if k in row:
                r[k] = row[k]
        sp = row.get("speculative")
        if sp:
            step = (weight_bytes - dense_expert_bytes + sp["expert_bytes_per_step"]
                    + draft_bytes_per_step.get(name, 0.0))
            per_token = step / sp["tokens_per_step"]
            sparse = sp["expert_bytes_per_step"] < dense_expert_bytes
            r.update({"steps": sp["steps"], "tokens_per_step": sp["tokens_per_step"],
                      "mean_accepted": sp["mean_accepted"], "accepted_hist": sp["accepted_hist"],
                      "expert_bytes_per_token": sp["expert_bytes_per_token"],
                      "time_split_s": {k[:-2]: sp[k] for k in ("draft_s", "verify_attention_s", "verify_ffn_s",
                                                               "verify_head_s", "sample_s", "accept_s")}})
        else:
            per_token = plain_bytes[name]
            sparse = per_token < weight_bytes  # plain decoding that reads only some experts
        working_set = weight_bytes + (draft_weight_bytes if name in draft_bytes_per_step else 0.0)
        r["read_bytes_per_token"] = per_token
        bound = roofline.bound(per_token, max(per_token, working_set), sparse=sparse)
        r.update(against_bound(bound, row["tok_s"]["median"]))
        out[name] = r
    return out


def speculative_section(model_path: Path, *, threads: int, quick: bool, llama_cpp: str, roofline: Roofline,
                        sparse: dict | None = None, bar=no_bar, cfg: dict | None = None) -> tuple[dict, dict | None]:
    """(c) on model_path and, in full mode, (a) on the shipped BlockFFN model (module docstring): (the section,
    section_a's own result for section_b, or None in quick mode). `sparse`: the sparse section, whose measured bytes
    per sparse decode token give (a)'s plain sparse bound. `bar(length, label)`: a progress bar context manager.
    llama_cpp: "ran" to run llama.cpp in (c), else why not. cfg: SPEC_QUICK or SPEC_FULL by default."""

    cfg = cfg or (SPEC_QUICK if quick else SPEC_FULL)
    out = {"method": SPEC_METHOD, "bound_method": BOUND_METHOD}
    c = cfg["c"]
    w = weight_bytes_per_token(model_path)
    with bar(len(c["prompts"]) * (1 + c["rounds"]), f"speculative (c): {model_path.name}") as b:
        rc = spec.section_c(str(model_path), threads=threads, tokens=c["tokens"], rounds=c["rounds"], n_prompts=0,
                            llama_cpp=llama_cpp == "ran", echo=lambda m: None, prompts=c["prompts"], drafters=c["drafters"],
                            progress=b.update)
    plain_bytes = w["per_token"]
    if w["expert_bytes"]:  # a BlockFFN model decodes sparsely: the experts its plain decode reads, measured
        from ..runtime import Model

        with Model(model_path) as m, m.session(n_ctx=1024, n_threads=threads) as session:
            toks = [m.tokenize(p, parse_special=True) for p in c["prompts"]]
            st = pool_sparsity(decode_sparsity(session, toks, c["tokens"]))
        plain_bytes = read_bytes_per_token(w["per_token"], st["dense_expert_bytes_per_token"],
                                           st["expert_bytes_per_token"])
    plain = {n: plain_bytes for n in rc["engines"] if "speculative" not in rc["engines"][n]}
    out["c"] = {"label": "real end to end", "model": str(model_path), "prompts": len(c["prompts"]),
                "tokens": c["tokens"], "rounds": c["rounds"],
                "llama_cpp": "ran" if rc["llama_cpp"] == "ran" else f"not run ({llama_cpp})",
                "engines": _spec_rows(rc["engines"], weight_bytes=w["per_token"],
                                      dense_expert_bytes=w["expert_bytes"], plain_bytes=plain,
                                      draft_bytes_per_step={}, roofline=roofline)}
    if "a" not in cfg:
        return out, None
    if sparse is None:
        raise ValueError("speculative (a) needs the sparse section's measured bytes per sparse decode token")
    a = cfg["a"]
    with bar(a["n_prompts"] * (1 + a["rounds"]), f"speculative (a): {SHIPPED_TARGET.name} + draft") as b:
        ra = spec.section_a(SHIPPED_TARGET, SHIPPED_DRAFT, threads=threads, tokens=a["tokens"], rounds=a["rounds"],
                            n_prompts=a["n_prompts"], echo=lambda m: None, progress=b.update)
    wt, wd = weight_bytes_per_token(SHIPPED_TARGET), weight_bytes_per_token(SHIPPED_DRAFT)
    dense_expert = ra["routing"]["dense_expert_bytes_per_token"]
    plain = {"dense plain": wt["per_token"], "sparse plain": sparse["configs"]["sparse"]["read_bytes_per_token"]}
    draft = {n: DRAFT_EVALS.get(n, DRAFT_K) * wd["per_token"] for n in ra["engines"]
             if n.startswith("sparse + draft-model")}
    out["a"] = {"label": "real acceptance and routing", "model": ra["model"], "draft": ra["draft"],
                "prompts": a["n_prompts"], "tokens": a["tokens"], "rounds": a["rounds"], "routing": ra["routing"],
                "engines": _spec_rows(ra["engines"], weight_bytes=wt["per_token"], dense_expert_bytes=dense_expert,
                                      plain_bytes=plain, draft_bytes_per_step=draft, roofline=roofline,
                                      draft_weight_bytes=wd["per_token"])}
    return out, ra


def speculative_markdown(s: dict) -> list[str]:
    lines = [f"Checked first: {s['method']}.", ""]
    titles = {"c": "(c) {model}: real end to end, {prompts} prompts x {tokens} tokens x {rounds} rounds",
              "a": "(a) {model} + its draft model: real acceptance and routing, {prompts} prompts x {tokens} tokens "
                   "x {rounds} rounds"}
    for key in ("c", "a"):
        if key not in s:
            continue
        sec = s[key]
        lines += [titles[key].format(**{**sec, "model": Path(sec["model"]).name}), "",
                  ("| engine | tok/s (min-max) | x plain (paired) | tokens/step | mean accepted | expert MB/token | "
                  "weights read MB/token | bandwidth bound tok/s | fraction of bound |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in sec["engines"].items():
            d, x = r["decode_tok_s"], r.get("ratio_vs_plain")
            ratio = f"{x['median']:.2f}x" if x else "1.00x"
            if "speed_vs_llama_cpp" in r:
                ratio += f" ({r['speed_vs_llama_cpp']:.2f}x llama.cpp)"
            tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "1"
            acc = f"{r['mean_accepted']:.2f}" if "mean_accepted" in r else "-"
            exp = f"{r['expert_bytes_per_token'] / 1e6:.3f}" if r.get("expert_bytes_per_token") else "-"
            bound, frac = bound_cells(r)
            lines.append(f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {ratio} | {tps} | {acc} | "
                         f"{exp} | {r['read_bytes_per_token'] / 1e6:.2f} | {bound} | {frac} |")
        if key == "c" and sec["llama_cpp"] != "ran":
            lines.append(f"| llama.cpp plain | {sec['llama_cpp']} | | | | | | | |")
        lines += [""] + bound_lines(sec["engines"]) + [""]
    return lines + [f"Bound: {s['bound_method']}."]


# ---- phases: the benchmarked model's decode phase by phase ----

def phases_section(model_path: Path, *, threads: int, tokens: int, roofline: Roofline) -> dict:
    """Greedy decode of `tokens` tokens after a short prompt, phase by phase (bench_device/phases.py) against the
    bandwidth bound of the model's weights (the roofline's)."""
    from ..runtime import Model

    with Model(model_path) as model, model.session(n_ctx=512, n_threads=threads) as s:
        logits = s.eval(model.tokenize(spec.DOC_PROMPTS[0]), logits="last")
        s.reset_timings()
        for _ in range(tokens):
            logits = s.eval([int(logits.argmax())], logits="last")
        tm = asdict(s.timings())
        sp = s.sparsity()
    pb = phases.phase_bytes(model_path)
    w = weight_bytes_per_token(model_path)
    expert = sp.expert_bytes_per_token if sp is not None else 0.0
    bound = roofline.bound(read_bytes_per_token(w["per_token"], pb["experts"], expert) if sp else w["per_token"],
                           w["per_token"], sparse=sp is not None)
    return {"model": str(model_path), "model_name": model_path.name.split(".")[0], "tokens": tokens,
            "threads": threads, "bandwidth_gb_s": bound["bandwidth_gb_s"], "bound": bound, "timings": tm,
            "phases": phases.phase_table(phases.pass_bytes(pb, expert if sp else pb["experts"]),
                                         phases.phase_seconds(tm), 1, bound["bandwidth_gb_s"])}


def phases_markdown(s: dict) -> list[str]:
    rows = phases.markdown_rows(s["model_name"], "decode", 1, s["phases"])
    return [(f"{s['model_name']}, greedy decode of {s['tokens']} tokens, {s['threads']} threads; bound: "
             f"{s['bandwidth_gb_s']:.1f} GB/s ({KIND_WORDS[s['bound']['kind']]} probe). Weight bytes each phase reads "
             "per token, thread 0's time in it (Session.timings()), and the fraction of the bound:"), "",
            *phases.MARKDOWN_HEADER, *rows, *phases.over_bound_lines(rows)]


# ---- synthetic ----

SYNTH_FULL = {"Ts": (8,), "fractions": (0.1, 0.3, 0.5, 1.0), "repeats": 3, "decode_steps": 8, "replay_repeats": 3}
SYNTH_LABEL = ("SYNTHETIC: released BlockFFN shapes with random weights (bench_device/synthetic.py) and synthetic "
               "routing (a (layer, position)-keyed pattern of stated TLS/CLS replacing the router's choice), not a "
               "trained model")


def synthetic_section(shapes: list[str], *, threads: int, roofline: Roofline, replay_from: dict | None,
                      bar=no_bar, settings: dict = SYNTH_FULL) -> dict:
    """bench_synthetic on each shape (decode dense vs sparse, a T=8 chain and tree, the active-fraction sweep),
    every record labelled SYNTHETIC, decode records with their bandwidth bound; then, given section_a's result,
    bench_speculative's (b): (a)'s accepted lengths REPLAYED on the same shapes."""
    from . import bench_synthetic, synthetic

    c = settings
    records = []
    for shape in shapes:
        steps = 2 + 2 * len(c["Ts"]) + len(c["fractions"])  # bench_shape's log lines
        with bar(steps, f"synthetic {shape} (SYNTHETIC weights and routing)") as b:
            recs = bench_synthetic.bench_shape(shape, threads=threads, Ts=c["Ts"], fractions=c["fractions"],
                                               repeats=c["repeats"], decode_steps=c["decode_steps"],
                                               log=lambda m: b.update(1))
        path = synthetic.ensure(shape, "Q4_0", 0, vocab="small", progress=False)
        w, pb = weight_bytes_per_token(path), phases.phase_bytes(path)
        bw = roofline.bound(w["per_token"])["bandwidth_gb_s"]  # the whole model: every configuration's working set
        for r in recs:
            r["label"] = "SYNTHETIC"
            expert_pass = {("decode", "dense"): pb["experts"], ("chain", "dense"): pb["experts"],
                           ("decode", "token"): r.get("measured_sparsity", {}).get("expert_bytes_per_token"),
                           ("chain", "chunk"): r.get("expert_bytes_per_pass")}.get((r["kind"], r["mode"]))
            if expert_pass is not None and "timings" in r:
                r["phases"] = phases.phase_table(phases.pass_bytes(pb, expert_pass),
                                                 phases.phase_seconds(r["timings"]), r["T"], bw)
            if r["kind"] == "decode":
                m = r["measured_sparsity"]
                expert = m["dense_bytes_per_token"] if r["mode"] == "dense" else m["expert_bytes_per_token"]
                per_token = read_bytes_per_token(w["per_token"], m["dense_bytes_per_token"], expert)
                r["decode_tok_s"] = _tok_s_summary(r)
                r["read_bytes_per_token"] = per_token
                bound = roofline.bound(per_token, w["per_token"], sparse=r["mode"] != "dense")
                r.update(against_bound(bound, r["decode_tok_s"]["median"]))
        records += recs
    out = {"label": SYNTH_LABEL, "synthetic": True,
           "shapes": {s: asdict(synthetic.SHAPES[s].with_vocab("small")) for s in shapes}, "qtype": "Q4_0",
           "routing": asdict(bench_synthetic.PAPER), "settings": {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in c.items()},
           "records": records}
    if replay_from is not None:
        with bar(2 * len(shapes), "synthetic: REPLAYED speculation") as b:
            out["replayed"] = spec.section_b(replay_from, shapes=shapes, threads=threads,
                                             repeats=c["replay_repeats"], echo=lambda m: b.update(1))
    return out


def synthetic_markdown(s: dict) -> list[str]:
    recs = s["records"]

    def find(shape, kind, mode, **kw):
        return [r for r in recs if r["shape"] == shape and r["kind"] == kind and r["mode"] == mode
                and all(r.get(k) == v for k, v in kw.items())]

    rt = s["routing"]
    lines = [(f"**{s['label']}.** Routing stated at TLS {100 * rt['tls']:.0f}% / CLS-{rt['k']} {100 * rt['cls']:.0f}% "
             f"(the paper's), {s['qtype']}, vocabulary {next(iter(s['shapes'].values()))['vocab']}; sparse output "
             "checked against dense (logits) before every timing."), "",
             ("| shape (SYNTHETIC) | mode | ms/token median (min-max) | tok/s | x dense | TLS / CLS-8 measured | "
             "weights read MB/token | bandwidth bound tok/s | fraction of bound |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    bounded = {}
    for shape in s["shapes"]:
        dense = find(shape, "decode", "dense")[0]
        for r in find(shape, "decode", "dense") + find(shape, "decode", "token"):
            m = r["measured_sparsity"]
            mode = "sparse" if r["mode"] == "token" else "dense"
            sp = f"{100 * m['tls']:.1f}% / {100 * m['cls_8']:.1f}%" if r["mode"] == "token" else "-"
            bound, frac = bound_cells(r)
            bounded[f"{shape} {mode}"] = r
            lines.append(f"| {shape} | {mode} | {1e3 * r['median_s']:.2f} "
                         f"({1e3 * r['min_s']:.2f}-{1e3 * r['max_s']:.2f}) | {r['decode_tok_s']['median']:.1f} | "
                         f"{dense['median_s'] / r['median_s']:.2f}x | {sp} | {r['read_bytes_per_token'] / 1e6:.1f} | "
                         f"{bound} | {frac} |")
    if bounded:
        lines += [""] + bound_lines(bounded)
    phase_rows = [row for shape in s["shapes"] for kind, mode in (("decode", "dense"), ("decode", "token"),
                                                                   ("chain", "dense"), ("chain", "chunk"))
                  for r in find(shape, kind, mode) if "phases" in r
                  for row in phases.markdown_rows(shape, {"token": "sparse", "chunk": "sparse chunk"}.get(mode, mode),
                                                  r["T"], r["phases"])]
    if phase_rows:
        lines += ["", ("Phase by phase (SYNTHETIC; bench_device/phases.py): weight bytes each phase reads per token, "
                       "thread 0's time in it per pass (Session.timings()), and its fraction of the bound at the "
                       "configuration's bandwidth:"), "", *phases.MARKDOWN_HEADER, *phase_rows,
                  *phases.over_bound_lines(phase_rows)]
    lines += ["", "Verification passes (SYNTHETIC), sparse = the union of the batch's experts read once:", "",
              "| shape | draft | T | dense ms | sparse ms | sparse / dense | sparse / one dense decode step |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for shape in s["shapes"]:
        for kind in ("chain", "tree"):
            for d in find(shape, kind, "dense"):
                ch = find(shape, kind, "chunk", T=d["T"])[0]
                lines.append(f"| {shape} | {kind} | {d['T']} | {1e3 * d['median_s']:.1f} | {1e3 * ch['median_s']:.1f} "
                             f"| {ch['median_s'] / d['median_s']:.2f} | {ch['ratio_to_dense_decode']:.2f} |")
    lines += ["", ("Time against the active fraction of experts (SYNTHETIC routing at TLS = 1 - a; the T=8 chain's "
              "union is a):"), "",
              "| shape | active fraction a | T=1 sparse / dense | T=8 chain sparse / dense |", "|---|---:|---:|---:|"]
    for shape in s["shapes"]:
        for d in find(shape, "sweep_decode", "dense"):
            a = d["active_fraction"]
            t1 = find(shape, "sweep_decode", "token", active_fraction=a)[0]
            d8 = find(shape, "sweep_chain8", "dense", active_fraction=a)[0]
            c8 = find(shape, "sweep_chain8", "chunk", active_fraction=a)[0]
            lines.append(f"| {shape} | {a:.2f} | {t1['median_s'] / d['median_s']:.2f} | "
                         f"{c8['median_s'] / d8['median_s']:.2f} |")
    if "replayed" in s:
        lines += ["", (f"**{s['replayed']['label']}.** Verify and decode steps measured on the synthetic shape; "
                  "accepted lengths (and the drafter's time per step) from (a) on the shipped model:"), "",
                  ("| shape | replayed from | tokens/step | dense decode tok/s | sparse decode tok/s | "
                  "sparse + speculation tok/s (REPLAYED) | x dense decode |"), "|---|---|---:|---:|---:|---:|---:|"]
        for r in s["replayed"]["runs"]:
            t = r["tok_s"]
            lines.append(f"| {r['shape']} | {r['replayed_from']} | {r['tokens_per_step']:.2f} | "
                         f"{t['dense_decode']:.1f} | {t['sparse_decode']:.1f} | {t['sparse_speculation']:.1f} | "
                         f"{r['speedup_vs_dense_decode']['sparse_speculation']:.2f}x |")
    return lines


# ---- gpu: decode on a GPU device beside the CPU ----

GPU_RUN = {"quick": {"tokens": 16, "repeats": 1}, "full": {"tokens": 32, "repeats": 3}}
GPU_FUNCTIONAL = ("FUNCTIONAL CHECK ONLY: this device is a software renderer on the CPU (kind 'cpu', e.g. lavapipe); "
                  "its speed says nothing about a GPU")


def gpu_device_lines(found: list[dict], error: str) -> list[str]:
    """The Vulkan devices the library found (runtime.native.devices()), one line each, or why there are none."""
    if not found:
        return [f"none ({error or 'the library found no Vulkan device'})"]
    return [f"vulkan:{d['index']} {d['name']}: {d['kind']}{' (software)' if d['kind'] == 'cpu' else ''}, "
            f"{d['api']} {d['api_version']}, driver {d['driver']}, {d['memory_bytes'] / 2**30:.1f} GiB"
            for d in found]


def _greedy_decode(session, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """`tokens` greedy tokens after the prompt (the KV cache emptied first, end of generation ignored) with the C
    generator, and the seconds the decode took (the prompt's evaluation not counted)."""
    import time

    from ..runtime import Generator

    session.truncate(0)
    with Generator(session, max_tokens=tokens, stop_at_eog=False) as gen:
        gen.start(prompt)
        t0 = time.perf_counter()
        out = gen.generate()
        return out, time.perf_counter() - t0


def gpu_section(model_path: Path, device: str, *, threads: int, tokens: int, repeats: int,
                prompt: str = spec.PLAIN[3], progress: Progress | None = None) -> dict:
    """Greedy decode tok/s of the model in a session on the GPU `device` ("vulkan", "vulkan:N") beside one on the
    CPU, alternated, `repeats` rounds of `tokens` tokens. Checked first: the device's greedy tokens equal the CPU's,
    or part from them only at a near tie of the CPU's logits (gap < bench_decode.TIE_GAP); RuntimeError otherwise.
    Marked functional only when the device is a software renderer (kind "cpu")."""
    import numpy as np

    from ..runtime.native import Model, device_index, devices
    from .bench_decode import TIE_GAP
    from .profile import summary

    index = device_index(device)
    info = devices()[index - 1]
    name = f"vulkan:{index}"
    tick = progress or (lambda n: None)
    with Model(model_path) as model, model.session(n_ctx=512, n_threads=threads) as cpu, \
            model.session(n_ctx=512, n_threads=threads, device=index) as gpu:
        toks = model.tokenize(prompt)
        want, _ = _greedy_decode(cpu, toks, tokens)
        got, _ = _greedy_decode(gpu, toks, tokens)
        agree = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        if agree < len(want):  # the device's token at the fork must be a near tie in the CPU's logits
            cpu.truncate(0)
            logits = cpu.prefill(toks + want[:agree])
            gap = float(logits[want[agree]] - logits[got[agree]])
            if gap >= TIE_GAP:
                raise RuntimeError(f"{name} ({info['name']}) decodes differently from the CPU at token {agree}: "
                                   f"{got[agree]} where the CPU's greedy token {want[agree]} leads by {gap:.2f} > "
                                   f"{TIE_GAP}")
        tick(1)
        seconds: dict[str, list[float]] = {"cpu": [], name: []}
        for _ in range(repeats):
            for key, session in (("cpu", cpu), (name, gpu)):
                seconds[key].append(_greedy_decode(session, toks, tokens)[1])
            tick(1)
    rows = {key: {"decode_tok_s": summary([tokens / s for s in xs])} for key, xs in seconds.items()}
    ratio = float(np.median([c / g for c, g in zip(seconds["cpu"], seconds[name])]))
    functional = info["kind"] == "cpu"
    return {"device": name, "info": info, "functional_only": functional,
            "label": GPU_FUNCTIONAL if functional else "measured", "model": str(model_path),
            "prompt_tokens": len(toks), "tokens": tokens, "repeats": repeats, "threads": threads,
            "greedy_agreement_tokens": agree, "engines": rows, "ratio_vs_cpu": ratio}


def gpu_markdown(s: dict) -> list[str]:
    i, agree = s["info"], s["greedy_agreement_tokens"]
    fork = "" if agree == s["tokens"] else " (then a near tie of the CPU's logits)"
    lines = [(f"{Path(s['model']).name} on {s['device']} ({i['name']}, {i['kind']}) beside the CPU ({s['threads']} "
              f"threads): greedy decode, {s['repeats']} round(s) of {s['tokens']} tokens after a "
              f"{s['prompt_tokens']}-token prompt, alternated; greedy tokens identical to the CPU's for "
              f"{agree}/{s['tokens']}{fork}."), ""]
    if s["functional_only"]:
        lines += [f"**{s['label']}.**", ""]
    lines += ["| session | decode tok/s (min-max) | x CPU (paired) |", "|---|---:|---:|"]
    for name, r in s["engines"].items():
        d = r["decode_tok_s"]
        x = "1.00x" if name == "cpu" else f"{s['ratio_vs_cpu']:.3g}x" + (" (functional only)" if s["functional_only"]
                                                                         else "")
        lines.append(f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {x} |")
    return lines
