"""Open a model the way Sparrow's apps do: the run policy of the library, shared by `sparrow.load`, `sparrow chat`
and `sparrow generate` (so the Python API and the CLI choose the same threads and drafter for the same model).

    backend = load("smollm2-135m-instruct")    # pull if it is a known model, settings, memory check, route, drafter

Settings: an explicit argument wins; else the model's tuned settings for this device (`sparrow bench --tune`, kept in
the store); else the defaults: physical cores and DEFAULT_DRAFTER, the adaptive drafter, which measures on the device
as it runs where drafting pays and decodes plainly elsewhere. Drafters run on the native runtime (in libsparrow's
generator), and on onnxruntime when asked for (--draft: the Python loop); llama.cpp and onnxruntime without --draft
decode plainly.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import Backend, BackendError, check_device, open_backend
from .drafters import DRAFTERS, UnknownDrafterError, known_drafters, make_drafter, recycling_part
from .native import Device, device_index
from .routing import choose_backend, read_gguf_header
from .store import REGISTRY, Store, StoreError, TunedSettings, check_memory, device_fingerprint

# The drafter used when neither an argument nor tuned settings say, for every model: the adaptive drafter (prompt
# lookup merged with a Token Recycling tree that the sparsity-aware planner prunes each step, behind a gate that drafts
# only where drafting measures faster than plain decoding, here and now, and runs plain decoding steps elsewhere).
# Train-free, so every model the native runtime runs has it; a drafter's speed depends on the device (issue 23: the
# hybrid measured 1.03x plain chat decoding on Zen 4 and 0.80x on a Xeon), so no fixed drafter is the default: only
# measurement on the device (`sparrow bench --tune`) replaces this one.
DEFAULT_DRAFTER = "adaptive"

Warn = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def physical_cores() -> int:
    """The thread count a run takes by default: this device's physical cores (as the C library's default)."""
    return int(device_fingerprint()["physical_cores"])


def default_drafter(name: str) -> tuple[str, str]:
    """The drafter a model gets when neither an argument nor tuned settings choose one, and why: DEFAULT_DRAFTER for
    every model (name: the model's, for the day a model needs another)."""
    return DEFAULT_DRAFTER, ("the default without tuned settings: drafts where it measures faster than plain "
                             "decoding, plain steps elsewhere")


@dataclass
class RunSettings:
    """Threads and drafter for a run: the caller's where given, else the model's tuned settings, else defaults."""

    threads: int                      # worker threads (the default: physical cores)
    draft: str                        # a name in runtime.drafters.DRAFTERS, a draft model's store name or file
    draft_options: dict[str, Any] = field(default_factory=dict)
    tuned: TunedSettings | None = None  # the tuned settings applied (in part or whole), if any
    default_draft: bool = False       # the drafter is the built-in default (no argument, no tuned settings)
    why_draft: str = ""               # where the drafter comes from, in words (`sparrow models info`)

    def describe(self) -> str:
        """The effective settings, e.g. "2 threads, recycling (branching=[1], max_nodes=4)"."""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        opts = ", ".join(f"{k}={v}" for k, v in self.draft_options.items())
        return f"{threads}, " + ("no drafter" if self.draft == "none" else self.draft + (f" ({opts})" if opts else ""))


def run_settings(store: Store, name: str, *, threads: int | None = None, draft: str | None = None,
                 warn: Warn = _warn) -> RunSettings:
    """Explicit arguments win; a setting not given comes from the tuned settings stored for this model on this
    device, if any; else the defaults. Unusable tuned settings: a warning, then the defaults."""
    manifest = store.get(name)
    tuned, warning = store.load_tuned(manifest.name, sha256=manifest.sha256) if manifest else (None, None)
    if warning:
        warn(f"warning: {warning}")
    if tuned is None or (threads is not None and draft is not None):
        default, why = default_drafter(name)
        return RunSettings(threads or physical_cores(), draft or default, {}, None, default_draft=draft is None,
                           why_draft="chosen by the caller (--draft)" if draft is not None else why)
    effective = draft if draft is not None else tuned.drafter
    options = dict(tuned.drafter_options) if effective == tuned.drafter else {}  # the tuned shape of that drafter
    why = "chosen by the caller (--draft)" if draft is not None else "tuned on this device (`sparrow bench --tune`)"
    return RunSettings(threads if threads is not None else tuned.threads, effective, options, tuned, why_draft=why)


def drafter_source(store: Store, draft: str) -> str:
    """What make_drafter takes for a drafter name: a registry drafter's name as it is, else a draft model's file (the
    name is a path, or a model in the store). UnknownDrafterError (a ValueError) when it is none of these."""
    if draft in DRAFTERS:
        return draft
    if Path(draft).expanduser().is_file():
        return draft
    if store.get(draft) is not None or draft in REGISTRY:
        return str(store.resolve(draft))  # a known model not pulled yet: resolve says to pull it
    raise UnknownDrafterError(f"unknown drafter {draft!r}; known: {known_drafters()}")


def with_drafter(backend: Backend, settings: RunSettings, store: Store, *, n_ctx: int, name: str,
                 warn: Warn = _warn) -> Backend:
    """The backend itself for draft "none", else one that decodes speculatively with that drafter: in libsparrow's
    generator (runtime.speculative.NativeSpeculativeBackend) for every built-in drafter and draft model, in the Python
    loop (SpeculativeBackend) only for options the C generator lacks (a draft model's `alternatives`). For a model in
    the store, Token Recycling starts from what it learned in earlier sessions and saves it on close."""
    draft = settings.draft
    if draft == "none":
        return backend
    from .native import SparrowError
    from .speculative import NativeSpeculativeBackend, SpeculativeBackend

    tuned = settings.tuned is not None and draft == settings.tuned.drafter
    if backend.name == "onnxruntime" and not settings.default_draft and not tuned:
        # an asked-for drafter runs in the Python loop, the tree verified through the graph's attention_bias
        try:
            return SpeculativeBackend(backend, make_drafter(drafter_source(store, draft), backend.model,
                                                            n_threads=settings.threads, n_ctx=n_ctx,
                                                            **settings.draft_options))
        except BaseException as e:
            backend.close()
            if isinstance(e, ValueError):
                raise BackendError(str(e)) from None
            raise
    if backend.name != "native":
        if settings.default_draft:  # the default drafter is a native-runtime feature; other backends decode plainly
            return backend
        if tuned:  # a tuned drafter was measured on the native runtime; another backend just runs without it
            warn(f"note: the tuned drafter {draft} is left out: this model runs on {backend.name}")
            return backend
        backend.close()
        raise BackendError(f"--draft needs the native runtime or onnxruntime; this model runs on {backend.name}")
    try:
        source = drafter_source(store, draft)
        spec = native_speculative(backend, source, settings, n_ctx=n_ctx)
        if spec is None:
            spec = SpeculativeBackend(backend, make_drafter(source, backend.model, n_threads=settings.threads,
                                                            n_ctx=n_ctx, **settings.draft_options))
    except BaseException as e:
        if tuned and isinstance(e, (ValueError, StoreError)):
            warn(f"warning: the tuned drafter {draft} cannot be used ({e}); decoding without a drafter. "
                 "Run `sparrow bench --tune` again.")
            return backend
        backend.close()
        if isinstance(e, ValueError):
            raise BackendError(str(e)) from None
        raise
    if isinstance(spec, NativeSpeculativeBackend):
        rec = spec if spec.has_state else None
    else:
        rec = recycling_part(spec.drafter)
    if rec is not None and store.get(name) is not None:
        state = store.recycling_state_path(name)
        if state.exists() and (why := rec.load_state(state)):
            warn(f"warning: the saved Token Recycling state is not used: {why}")

        def save() -> None:
            try:
                rec.save_state(state)
            except (OSError, SparrowError) as e:
                warn(f"warning: could not save the Token Recycling state to {state}: {e}")
        spec.on_close = save
    return spec


def native_speculative(backend: Backend, source: str, settings: RunSettings, *, n_ctx: int):
    """The C generator's speculative backend for a drafter source (drafter_source: a registry name or a draft model's
    file) with the settings' options, or None where only the Python loop has them. ValueError for a draft model
    with another vocabulary."""
    from .native import Model
    from .speculative import NativeSpeculativeBackend, c_generator_options

    kind = source if source in DRAFTERS else "draft-model"
    options = c_generator_options(kind, settings.draft_options)
    if options is None:
        return None
    if kind != "draft-model":
        return NativeSpeculativeBackend(backend, kind, options, registry_options=settings.draft_options)
    draft = Model(source)
    if draft.info.n_vocab != backend.model.info.n_vocab:
        n = draft.info.n_vocab
        draft.close()
        raise ValueError(f"the draft model {Path(source).name} has {n} tokens, the target "
                         f"{backend.model.info.n_vocab}: a draft model must share the target's vocabulary")
    return NativeSpeculativeBackend(backend, "draft-model", options, draft_model=draft, n_ctx=n_ctx,
                                    n_threads=settings.threads, registry_options=settings.draft_options)


def open_model(model: str | Path | None = None, *, n_ctx: int = 2048, threads: int | None = None,
               draft: str | None = None, store: Store | None = None, progress: bool = False,
               warn: Warn = _warn, device: Device = "cpu") -> tuple[str, Backend, RunSettings]:
    """Resolve MODEL (a store name or a file; default: the store's default model, pulled if it is a known model
    not pulled yet), choose threads and drafter, check that it fits in memory, route and load it on `device`
    (runtime.native.parse_device: "cpu", "vulkan", "vulkan:N"; a GPU device for the native runtime only), and wrap
    it with its drafter. Returns (name, backend, settings)."""
    store = store if store is not None else Store()
    name = str(model) if model is not None else store.default()
    try:
        device_index(device)  # a bad or missing device fails now, before a pull or a load
    except ValueError as e:
        raise BackendError(str(e)) from None
    if draft is not None:
        try:
            drafter_source(store, draft)  # a mistyped drafter fails now, before a pull or a load
        except UnknownDrafterError as e:
            raise BackendError(str(e)) from None
    if store.get(name) is None and not Path(name).expanduser().is_file() and name in REGISTRY:
        if progress:
            warn(f"Pulling {name} ({REGISTRY[name].description}) ...")
        store.pull(name, progress=progress)
    path = store.resolve(name)
    settings = run_settings(store, name, threads=threads, draft=draft, warn=warn)
    header = read_gguf_header(path) if path.suffix.lower() != ".onnx" else None
    route = choose_backend(path, header)
    check_device(route, device)
    if route.available:
        check_memory(path, n_ctx=n_ctx, header=header, backend=route.backend, n_threads=settings.threads)
    backend = open_backend(path, n_ctx=n_ctx, n_threads=settings.threads, route=route, device=device)
    return name, with_drafter(backend, settings, store, n_ctx=n_ctx, name=name, warn=warn), settings


def load(model: str | Path | None = None, *, n_ctx: int = 2048, threads: int | None = None, draft: str | None = None,
         store: Store | None = None, progress: bool = False, device: Device = "cpu") -> Backend:
    """Open a model by store name or file path, exactly as `sparrow chat` would (open_model), and return its backend.
    draft="none" decodes plainly; threads=None and draft=None take the tuned settings or the defaults; device: "cpu",
    "vulkan" or "vulkan:N" (runtime.native.devices())."""
    return open_model(model, n_ctx=n_ctx, threads=threads, draft=draft, store=store, progress=progress,
                      device=device)[1]
