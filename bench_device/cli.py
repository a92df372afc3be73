"""`sparrow bench`: the device report and `--tune` (the command; sparrow/cli.py adds it to the `sparrow` group)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..runtime.routing import choose_backend, read_gguf_header
from ..runtime.store import REGISTRY, Store

# bench_device.synthetic.SHAPES, less its test shape (not imported here: it pulls in numpy and the native module)
SYNTHETIC_SHAPE_NAMES = ("0.1b", "0.5b", "0.8b", "1.2b", "3b")

@click.command()
@click.argument("model", required=False)
@click.option("--quick", is_flag=True, help="Fewer repeats and tokens: finishes in under a minute.")
@click.option("--threads", type=int, default=0, help="CPU threads (default: physical cores).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="bench-report",
              show_default=True, help="Write report.json, report.md and the PNG plots here.")
@click.option("--no-llama-cpp", is_flag=True, help="Do not run llama.cpp alongside, even if it is installed.")
@click.option("--no-onnx", is_flag=True, help="Do not run onnxruntime alongside (on an f32 ONNX export of MODEL).")
@click.option("--tune", is_flag=True, help="Instead of the report: search threads, drafter and draft size for MODEL "
              "on this device and store the fastest in the model store (sparrow chat/generate use them).")
@click.option("--synthetic", "synthetic_shapes", multiple=True, metavar="SHAPE",
              type=click.Choice(["none", *SYNTHETIC_SHAPE_NAMES]),
              help="Synthetic BlockFFN shape(s) for the full run's synthetic section (repeat the option for several; "
              "default 0.5b; 'none' leaves the section out). The first use writes the file (0.5b: 310 MB).")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|vulkan[:N]",
              help="Also decode MODEL on this Vulkan GPU device beside the CPU (vulkan: the first; vulkan:N: device N, "
              "from 1); marked functional only on a software device (lavapipe). The report lists the devices found.")
def bench(model: str | None, quick: bool, threads: int, out_dir: Path, no_llama_cpp: bool, no_onnx: bool,
          tune: bool, synthetic_shapes: tuple[str, ...], device: str) -> None:
    """Profile this device and benchmark MODEL on it (default: the default model, pulled if needed).

    Measures memory read bandwidth (the roofline), decode and prefill tok/s, time to first token, peak RSS, energy
    (RAPL, where readable), the cost of T tokens per call and the fraction of the bandwidth bound reached, side by side
    with llama.cpp when llama-cpp-python is installed and with onnxruntime on an f32 ONNX export of MODEL; outputs are checked against an oracle before timing. The full
    run adds dense vs sparse decode of the shipped BlockFFN model (TLS, CLS-k, expert bytes), speculative decoding
    (MODEL with each drafter and llama.cpp; the BlockFFN model with its draft model) and SYNTHETIC large BlockFFN
    shapes with replayed speculation; --quick a small speculative slice."""
    from .suite import device_summary, headline_table, run_suite, write_report

    if (quick or tune) and synthetic_shapes:
        raise click.UsageError("--synthetic chooses the full report's synthetic shapes; --quick and --tune have no "
                               "synthetic section")
    _check_device(device, tune)
    store = Store()
    name = model or store.default()
    if store.get(name) is None and not Path(name).expanduser().is_file() and name in REGISTRY:
        click.echo(f"Pulling {name} ({REGISTRY[name].description}) ...", err=True)
        store.pull(name, progress=True)
    path = store.resolve(name)
    if path.suffix.lower() != ".gguf":
        raise click.ClickException(f"sparrow bench needs a GGUF model; {path.name} is not one")

    def progressbar(length: int, label: str):
        return click.progressbar(length=length, label=label, file=sys.stderr, show_eta=False)

    if tune:
        _bench_tune(store, name, path, quick=quick, threads=threads, progressbar=progressbar)
        return

    try:
        shapes = None if not synthetic_shapes else tuple(s for s in synthetic_shapes if s != "none")
        report = run_suite(path, name, quick=quick, threads=threads, llama_cpp=not no_llama_cpp, onnx=not no_onnx,
                           echo=lambda m: click.echo(m, err=True), progressbar=progressbar, synthetic_shapes=shapes,
                           device=device)
    except RuntimeError as e:
        raise click.ClickException(f"benchmark failed: {e}") from None
    j, m = write_report(report, out_dir)
    click.echo(headline_table(report))
    click.echo("\n" + "\n".join(device_summary(report)))
    pngs = [str(out_dir / f) for f in report["plots"].values() if f.endswith(".png")]
    click.echo(f"\nwrote {j}, {m}" + "".join(f", {p}" for p in pngs))


def _check_device(device: str, tune: bool) -> None:
    """--device: spelled right, there on this machine, and not with --tune (which tunes the CPU session)."""
    from ..runtime.native import device_index

    try:
        index = device_index(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if tune and index != 0:
        raise click.UsageError("--tune searches the CPU settings (threads, drafter); --device is for the report")


def _bench_tune(store: Store, name: str, path: Path, *, quick: bool, threads: int, progressbar) -> None:
    from .tune import format_result, run_tune

    if threads < 0:
        raise click.BadParameter("must be positive", param_hint="--threads")
    route = choose_backend(path, read_gguf_header(path))
    if route.backend != "native":
        raise click.ClickException(f"--tune measures Sparrow's native runtime; {path.name} goes to {route.backend} "
                                   f"({route.reason})")
    result, saved = run_tune(store, name, path, quick=quick, threads=threads, echo=lambda m: click.echo(m, err=True),
                             progressbar=progressbar)
    click.echo(format_result(result))
    x = result.speedup
    verdict = (f"{x:.2f}x plain decoding ({result.default.label}, the baseline)" if result.changed
               else "plain decoding (no drafter was faster than it beyond the noise)")
    if (u := result.untuned_ratio()) is not None:
        verdict += (f"; the untuned default, {result.untuned.label}, measured {u['median']:.2f}x "
                    f"({u['min']:.2f}-{u['max']:.2f})")
    click.echo(f"chosen for {name}: {result.chosen.label} ({result.final[result.chosen].median:.1f} tok/s): {verdict}")
    if saved:
        click.echo(f"stored in {saved}; `sparrow chat {name}` and `sparrow generate -m {name}` use it unless "
                   "--threads/--draft say otherwise")
