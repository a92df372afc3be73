"""PNG plots of a `sparrow bench` report (matplotlib, Agg canvas: no display needed, no global backend switched).

Three plots, each drawn from what the report holds and skipped with a reason when it holds nothing for it:
  tok_s_vs_bound.png   decode tok/s of every configuration (median, min-max whiskers) against its bandwidth bound
                       (bandwidth / bytes read per token), labelled with the bound's kind (DRAM or LLC, from its
                       "bound") and marked † above 100% (why: report.md). A configuration is any object in the report
                       with "bandwidth_bound_tok_s" and "decode_tok_s" (a summary or a number): the engines, and
                       whatever sparse/synthetic/speculative sections add in that form.
  time_vs_active.png   time per token against the fraction of expert weights read, from either form:
                       "time_vs_active": {series: [{"active_fraction": a, "ms_per_token": t}, ...]} (or [a, t] pairs),
                       or records anywhere in the report with "active_fraction" and "median_s" (seconds per call of
                       "T" tokens), as bench_synthetic's sweep writes them: one series per shape, kind and mode.
  accepted_length.png  distribution of accepted draft tokens per verification step, one series per drafter: every
                       "accepted_hist" ({accepted: steps}) under the report's "speculative" section.

    files = write_plots(report, out_dir)   # {"tok_s_vs_bound": "tok_s_vs_bound.png", "time_vs_active": "skipped: ..."}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("tok_s_vs_bound", "time_vs_active", "accepted_length")


def _figure(w: float = 7.5, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _walk(x: Any, path: tuple[str, ...] = (), depth: int = 5):
    """(path, dict) for every dict in the report, up to `depth` levels down; items of a list share its path."""
    if depth < 0:
        return
    if isinstance(x, dict):
        yield path, x
        for k, v in x.items():
            yield from _walk(v, path + (str(k),), depth - 1)
    elif isinstance(x, list):
        for v in x:
            yield from _walk(v, path, depth - 1)


def _record_label(d: dict) -> str:
    """"0.5b sweep_decode token" for a record that names its shape, kind and mode; "" otherwise."""
    return " ".join(str(d[k]) for k in ("label", "shape", "kind", "mode") if isinstance(d.get(k), (str, int)))


def _median(v: Any) -> tuple[float, float, float] | None:
    if isinstance(v, dict) and {"median", "min", "max"} <= set(v):
        return float(v["median"]), float(v["min"]), float(v["max"])
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), float(v), float(v)
    return None


# ---- what the report holds ----

_CONTAINERS = ("engines", "configs", "records")  # left out of a configuration's name: "speculative / c / plain"

def configurations(report: dict) -> list[dict]:
    """[{"name", "tok_s": (median, min, max), "bound", "kind", "over_bound"}] for every object with a decode speed
    and a bandwidth bound; "kind" ("llc", "dram") and "over_bound" (why it runs above the bound) are None where the
    object does not say."""
    out = []
    for path, d in _walk(report):
        if "bandwidth_bound_tok_s" in d and "decode_tok_s" in d:
            tok = _median(d["decode_tok_s"])
            if tok and isinstance(d["bandwidth_bound_tok_s"], (int, float)) and d["bandwidth_bound_tok_s"] > 0:
                where = tuple(p for p in path if p not in _CONTAINERS)
                name = path[-1] if path[:1] == ("engines",) else " / ".join(where + ((_record_label(d),) if
                                                                                     _record_label(d) else ()))
                b = d.get("bound") if isinstance(d.get("bound"), dict) else {}
                out.append({"name": name, "tok_s": tok, "bound": float(d["bandwidth_bound_tok_s"]),
                            "kind": b.get("kind"), "over_bound": b.get("over_bound")})
    return out


def active_fraction_series(report: dict) -> dict[str, list[tuple[float, float]]]:
    """{series: [(active fraction, ms per token), ...] sorted by fraction} from every "time_vs_active" section."""
    series: dict[str, list[tuple[float, float]]] = {}
    for path, d in _walk(report):
        if isinstance(d.get("active_fraction"), (int, float)) and isinstance(d.get("median_s"), (int, float)):
            label = _record_label(d) or " / ".join(path)
            ms = 1e3 * d["median_s"] / max(1, int(d.get("T", 1)))
            series.setdefault(label, []).append((float(d["active_fraction"]), ms))
            continue
        tva = d.get("time_vs_active")
        if not isinstance(tva, dict):
            continue
        for name, pts in tva.items():
            clean = []
            for p in pts if isinstance(pts, list) else []:
                if isinstance(p, dict) and "active_fraction" in p and "ms_per_token" in p:
                    clean.append((float(p["active_fraction"]), float(p["ms_per_token"])))
                elif isinstance(p, (list, tuple)) and len(p) == 2:
                    clean.append((float(p[0]), float(p[1])))
            if clean:
                label = " / ".join(path[-1:] + (str(name),)) if path else str(name)
                series[label] = clean
    return {k: sorted(v) for k, v in series.items()}


def accepted_hists(report: dict) -> dict[str, dict[int, int]]:
    """{drafter: {accepted tokens: steps}} from every "accepted_hist" under report["speculative"]."""
    out = {}
    for path, d in _walk(report.get("speculative"), ("speculative",)):
        h = d.get("accepted_hist")
        if isinstance(h, dict) and h:
            out[path[-1] if len(path) > 1 else "speculative"] = {int(k): int(v) for k, v in h.items()}
    return out


# ---- the plots ----

def plot_tok_s_vs_bound(configs: list[dict], path: Path, title: str = "") -> Path:
    longest = max((len(c["name"]) for c in configs), default=0)  # long labels take width from the bars' axis
    fig = _figure(max(7.5, 5.5 + 0.075 * longest), 1.9 + 0.5 * len(configs))
    ax = fig.add_subplot()
    ys = list(range(len(configs)))[::-1]
    med = [c["tok_s"][0] for c in configs]
    lo = [c["tok_s"][0] - c["tok_s"][1] for c in configs]
    hi = [c["tok_s"][2] - c["tok_s"][0] for c in configs]
    bound = [c["bound"] for c in configs]
    ax.barh(ys, bound, height=0.6, color="none", edgecolor="0.4", hatch="//",
            label="bandwidth bound (DRAM, or LLC where the weights fit in the last-level cache)")
    ax.barh(ys, med, height=0.6, xerr=[lo, hi], color="tab:blue", capsize=3, label="decode tok/s (median, min-max)")
    for y, m, b, c in zip(ys, med, bound, configs):
        kind = f" {c['kind'].upper()}" if c.get("kind") else ""
        over = "†" if m > b else ""  # above the bound: why is in report.md and the notes
        ax.text(max(m, b) * 1.01, y, f"{m:.0f} tok/s, {100 * m / b:.0f}%{over} of {b:.0f}{kind}", va="center",
                fontsize=8)
    if any(m > b for m, b in zip(med, bound)):
        fig.text(0.01, 0.01, "† above the bound: why is in report.md (notes)", fontsize=7)
    ax.set_yticks(ys, [c["name"] for c in configs])
    top = max(max(bound), max(c["tok_s"][2] for c in configs))
    low = min(min(bound), min(c["tok_s"][1] for c in configs))
    if low > 0 and top / low > 20:  # models of very different sizes in one plot: a log axis keeps each bar readable
        ax.set_xscale("log")
        ax.set_xlim(low / 2, top * 60)
        ax.set_xlabel("tokens per second (decode, log scale)")
    else:
        ax.set_xlim(0, top * 1.45)
        ax.set_xlabel("tokens per second (decode)")
    fig.suptitle(title or "Decode speed against the memory-bandwidth bound", fontsize=10)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_time_vs_active(series: dict[str, list[tuple[float, float]]], path: Path, title: str = "") -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    for name, pts in series.items():
        ax.plot([100 * a for a, _ in pts], [t for _, t in pts], marker="o", label=name)
    ax.set_xlabel("active fraction of expert weights (%)")
    ax.set_ylabel("ms per token")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Time per token against the fraction of experts read", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_accepted_length(hists: dict[str, dict[int, int]], path: Path, title: str = "") -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    lengths = sorted({k for h in hists.values() for k in h})
    width = 0.8 / len(hists)
    for i, (name, h) in enumerate(hists.items()):
        total = sum(h.values()) or 1
        mean = sum(k * v for k, v in h.items()) / total
        ax.bar([x + (i - (len(hists) - 1) / 2) * width for x in lengths], [100 * h.get(k, 0) / total for k in lengths],
               width=width, label=f"{name} (mean {mean:.2f}, {total} steps)")
    ax.set_xticks(lengths)
    ax.set_xlabel("draft tokens accepted per verification step")
    ax.set_ylabel("% of steps")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Accepted length distribution", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_plots(report: dict, out: Path) -> dict[str, str]:
    """Every plot the report has data for, as PNG files in `out`: {plot: file name, or "skipped: <why>"}."""
    out.mkdir(parents=True, exist_ok=True)
    m = report.get("model", {})
    threads = report.get("settings", {}).get("threads")
    sub = f"{m.get('name', '')}, {threads} threads" if threads else m.get("name", "")
    files: dict[str, str] = {}
    configs = configurations(report)
    if configs:
        files["tok_s_vs_bound"] = plot_tok_s_vs_bound(
            configs, out / "tok_s_vs_bound.png", f"Decode speed against the memory-bandwidth bound ({sub})").name
    else:
        files["tok_s_vs_bound"] = "skipped: no configuration with decode tok/s and a bandwidth bound"
    series = active_fraction_series(report)
    if series:
        files["time_vs_active"] = plot_time_vs_active(series, out / "time_vs_active.png").name
    else:
        files["time_vs_active"] = "skipped: the report has no sparse time-vs-active-fraction data (dense model only)"
    hists = accepted_hists(report)
    if hists:
        files["accepted_length"] = plot_accepted_length(hists, out / "accepted_length.png").name
    else:
        files["accepted_length"] = "skipped: the report has no speculative section with accepted_hist"
    return files
