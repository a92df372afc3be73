"""Pull and convert in one step: a Hugging Face checkpoint (config.json, model.safetensors or
model.safetensors.index.json and the shards it names, the SentencePiece tokenizer.model), from the hub or a local
folder, converted to GGUF inside the pull's staging folder by the registered converter (the BlockFFN converter,
converters/blockffn.py, through converters/store.py), for Store.pull to register like any other model file.

From the hub, into staging/checkpoint/<repo name>/, file by file with a progress bar, each checked against the hub's
listing (`?blobs=true`): the LFS sha256 and size of LFS files (weights, tokenizer.model), the git blob id (sha1 of
"blob <size>\\0" + content) of small files kept in git (the JSON files). The cheap checks come before the weights
are downloaded: the listing must hold config.json, tokenizer.model and the weights (every shard the index names),
config.json must be a configuration the converter supports and tokenizer.model a SentencePiece model. The converter
then checks every tensor against config.json. Downloaded: config.json, tokenizer.model, the weights, and where
present tokenizer_config.json, added_tokens.json and generation_config.json.

A local folder is read through staging/checkpoint/<folder name>/, a folder of links to its files (never changed).
The folder's (or repo's) name is the GGUF's general.name, as with `sparrow convert FOLDER`, so a checkpoint pulled
and converted here gives the same bytes as the same folder converted with `sparrow convert ... --type QUANT`.

Chat template: a checkpoint whose tokenizer_config.json has a chat_template keeps it (the converter copies it);
one without gets MiniCPM's SFT format (chat_template.MINICPM_TEMPLATE), written into the staging copy of
tokenizer_config.json before converting: the released BlockFFN SFT checkpoints are MiniCPM-style.

Quantization: --quant QUANT, one of the converter's types (f32, f16, q8_0, q4_0); without it the converter's own
default, q8_0 (as `sparrow convert`): 8-bit weights stay close to the checkpoint at these small sizes (0.1B-1.2B),
where 4 bits cost more quality; q4_0 makes the file about half as large.

Only the GGUF stays: the checkpoint folder is removed before Store.pull renames the staging folder into the store,
and a failure anywhere (a missing or truncated file, a checksum, a refused conversion) leaves the store as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..chat_template import MINICPM_TEMPLATE
from .errors import ChecksumError, StoreError
from .fetch import (
    Fetched,
    _download,
    _has_control,
    check_url_path,
    hub_endpoint,
    hub_model_files,
    local_model_files,
    sha256_file,
    stored_name,
)

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"  # the Hugging Face names, as converters/hf.py reads them
SAFETENSORS_SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
OPTIONAL_FILES = (TOKENIZER_CONFIG, "added_tokens.json", "generation_config.json")
WHAT_A_CHECKPOINT_IS = (f"{CONFIG}, {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} and its shards, and the "
                        f"SentencePiece {TOKENIZER}")


class CheckpointConverter(Protocol):
    """What the store needs of a converter to pull and convert a checkpoint. The runtime may not import the
    converters (docs/architecture.md), so the `sparrow` package, which holds both, registers one at import:
    converters/store.py's BLOCKFFN, through register_converter."""

    refusal: type[Exception]    # what check and convert raise for a checkpoint they refuse (the message says why)

    @property
    def quants(self) -> tuple[str, ...]: ...   # the storage types it writes, lower case

    @property
    def default_quant(self) -> str: ...        # the type when --quant is not given

    def check(self, folder: Path) -> None: ...  # config.json and tokenizer.model, before the weights are fetched

    def convert(self, folder: Path, out: Path, quant: str, progress: bool) -> list[str]: ...  # -> its notes


_converter: CheckpointConverter | None = None


def register_converter(converter: CheckpointConverter) -> None:
    """Make `converter` the one Store.pull converts checkpoints with (sparrow/__init__.py does, at import)."""
    global _converter
    _converter = converter


def converter() -> CheckpointConverter:
    if _converter is None:
        raise StoreError("no checkpoint converter is registered (import sparrow, which registers "
                         "sparrow.converters' BlockFFN converter)")
    return _converter


def check_quant(quant: str) -> str:
    """quant in lower case, if the converter writes it; else a StoreError naming the types it does."""
    quants = converter().quants
    if not isinstance(quant, str) or quant.lower() not in quants:
        raise StoreError(f"unknown quantization {quant!r}: choose one of {', '.join(quants)}")
    return quant.lower()


def missing_parts(names: Iterable[str]) -> list[str]:
    """What a folder or repository holding `names` lacks to be a checkpoint the converter reads; [] when nothing."""
    names = set(names)
    missing = [n for n in (CONFIG, TOKENIZER) if n not in names]
    if SAFETENSORS_INDEX not in names and SAFETENSORS_SINGLE not in names:
        missing.insert(1, f"{SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")
    return missing


def _refuse(what: str, names: Iterable[str], model_files: list[str], quant: str | None) -> StoreError:
    """The error for a source that is no checkpoint Sparrow can convert (missing_parts(names) is not empty)."""
    names = sorted(names)
    missing = missing_parts(names)
    if quant is not None and model_files:
        return StoreError(f"{what} has no checkpoint to convert (no {', '.join(missing)}), so --quant does not "
                          f"apply: pull its model file ({', '.join(model_files)}) as it is, without --quant")
    if CONFIG in names:
        return StoreError(f"{what} is not a checkpoint Sparrow can convert: it lacks {', '.join(missing)} (a "
                          f"checkpoint is {WHAT_A_CHECKPOINT_IS}); nothing was stored")
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") if names else "nothing"
    return StoreError(f"{what} has neither a GGUF or ONNX model file nor a Hugging Face checkpoint to convert "
                      f"({WHAT_A_CHECKPOINT_IS}); it holds {shown}")


# ---- the hub ----

def fetch_hub_checkpoint(repo: str, revision: str, listing: dict[str, dict], staging: Path, progress: bool,
                         quant: str | None) -> Fetched:
    """Download the checkpoint of hub repository repo@revision (listing: fetch.hub_files) into staging and convert it
    to staging/<repo name>.<QUANT>.gguf. quant None: --quant was not given (the converter's default)."""
    what = f"hf:{repo}@{revision}"
    if missing_parts(listing):
        raise _refuse(what, listing, hub_model_files(listing), quant)
    quant = check_quant(quant or converter().default_quant)
    name = repo.split("/")[1]
    folder = staging / "checkpoint" / name
    folder.mkdir(parents=True)
    endpoint, quoted_rev = hub_endpoint(), urllib.parse.quote(revision, safe="")
    hashes: dict[str, str] = {}
    unchecked: list[str] = []

    def get(file: str) -> Path:
        sha256, size, blob = _listed_checksums(what, file, listing[file])
        dest = folder / file
        url = f"{endpoint}/{repo}/resolve/{quoted_rev}/{urllib.parse.quote(file)}"
        checked = _download(url, dest, sha256=sha256, size=size, progress=progress,
                            sha256_from="sha256 listed by the hub")
        if checked is None and blob is not None:
            actual = _git_blob_id(dest)
            if actual != blob:
                raise ChecksumError(f"{url}: git blob id {actual} does not match the {blob} the hub lists (corrupt "
                                    "download); nothing was stored")
            checked = "git blob id listed by the hub"
        if checked is None:
            unchecked.append(file)
        hashes[file] = sha256.lower() if sha256 and checked == "sha256 listed by the hub" else sha256_file(dest)
        return dest

    # 1. What can refuse the checkpoint cheaply, before the weights: config.json, the index, the tokenizer.
    for file in (CONFIG, TOKENIZER, *(f for f in OPTIONAL_FILES if f in listing)):
        get(file)
    shards = _index_shards(get(SAFETENSORS_INDEX), listing, what) if SAFETENSORS_INDEX in listing \
        else [SAFETENSORS_SINGLE]
    conv = converter()
    try:
        conv.check(folder)
    except conv.refusal as e:
        raise StoreError(f"{what} cannot be converted: {_shown(e, folder, what)}; nothing was stored") from e
    if progress:
        total = sum(_listed_checksums(what, s, listing[s])[1] or 0 for s in shards)
        print(f"{what}: downloading {len(shards)} weights file{'s' if len(shards) > 1 else ''} "
              f"({total / (1 << 20):.1f} MiB), then converting to {quant.upper()}", file=sys.stderr, flush=True)
    # 2. The weights.
    for shard in shards:
        get(shard)
    # 3. The conversion.
    template = _ensure_chat_template(folder)
    out = _convert(folder, staging, name, quant, progress, shown_as=what)
    shutil.rmtree(staging / "checkpoint")
    if unchecked:
        print(f"warning: the hub listed no checksum for {', '.join(unchecked)} of {what}: only that they "
              "downloaded completely was checked", file=sys.stderr, flush=True)
        checked = (f"the hub's sha256 or git blob id of every file but {', '.join(unchecked)} (listed without one); "
                   f"converted to {quant.upper()} here")
    else:
        checked = f"every file against the hub's sha256 or git blob id; converted to {quant.upper()} here"
    extra = {"converted": {"from": what, "quant": quant, "chat_template": template, "files": hashes}}
    return Fetched(out, f"hf:{repo}@{revision}", checked, extra)


def _listed_checksums(what: str, file: str, entry: object) -> tuple[str | None, int | None, str | None]:
    """(sha256, size, git blob id) the hub lists for file: the LFS sha256 and size for an LFS file, the git blob id
    and size for one kept in git. A malformed value is refused (a hub that lies about one cannot be trusted)."""
    if not isinstance(entry, dict):
        raise StoreError(f"{what}: the hub's listing of {file} is not an object; nothing was stored")
    lfs = entry.get("lfs")
    lfs = lfs if isinstance(lfs, dict) else {}
    sha256 = lfs.get("sha256")
    blob = entry.get("blobId") if not lfs else None  # an LFS file's blob id is its pointer's, not its content's
    size = lfs.get("size", entry.get("size"))
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        raise StoreError(f"{what}: the hub lists {sha256!r:.80} as the sha256 of {file}, which is not one; nothing "
                         "was stored")
    if blob is not None and not (isinstance(blob, str) and re.fullmatch(r"[0-9a-f]{40}", blob)):
        blob = None  # a blob id in another hash (the hub's sha256 repositories): the size is still checked
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise StoreError(f"{what}: the hub lists {size!r:.80} as the size of {file}, which is not one; nothing was "
                         "stored")
    return sha256, size, blob


def _git_blob_id(path: Path) -> str:
    """The git blob id of a file: sha1 of "blob <size>\\0" + its content (what the hub lists for files kept in git)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _index_shards(index: Path, listing: dict[str, dict], what: str) -> list[str]:
    """The weights files model.safetensors.index.json names: each a plain file name the repository has."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"{what}: {SAFETENSORS_INDEX} is not a safetensors index ({type(e).__name__}: {e}); nothing "
                         "was stored") from None
    for shard in shards:
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard \
                or _has_control(shard):
            raise StoreError(f"{what}: {SAFETENSORS_INDEX} names the weights file {shard!r:.100}; only files beside "
                             "the index can be read; nothing was stored")
        check_url_path(shard, "hub file")
    if not shards:
        raise StoreError(f"{what}: {SAFETENSORS_INDEX} names no weights file; nothing was stored")
    absent = [s for s in shards if s not in listing]
    if absent:
        raise StoreError(f"{what}: {SAFETENSORS_INDEX} names {', '.join(absent)}, which the repository does not "
                         "have (an incomplete upload?); nothing was stored")
    return shards


# ---- a local folder ----

def fetch_local_checkpoint(src: Path, staging: Path, progress: bool, quant: str | None) -> Fetched:
    """Convert the checkpoint in local folder src to staging/<folder name>.<QUANT>.gguf. quant None: --quant was
    not given (the converter's default)."""
    files = {p.name: p for p in src.iterdir() if p.is_file()}  # regular files (and links to them) only
    if missing_parts(files):
        raise _refuse(str(src), files, [p.name for p in local_model_files(src)], quant)
    quant = check_quant(quant or converter().default_quant)
    name = src.resolve().name or "checkpoint"
    folder = staging / "checkpoint" / name
    folder.mkdir(parents=True)
    for file, path in files.items():
        os.symlink(path.resolve(), folder / file)
    template = _ensure_chat_template(folder)
    out = _convert(folder, staging, name, quant, progress, shown_as=str(src))
    shutil.rmtree(staging / "checkpoint")
    extra = {"converted": {"from": str(src.resolve()), "quant": quant, "chat_template": template}}
    return Fetched(out, str(src.resolve()), f"a local checkpoint folder, converted to {quant.upper()} here", extra)


# ---- both ----

def _ensure_chat_template(folder: Path) -> str:
    """Give the checkpoint in folder a chat template if its tokenizer_config.json has none; say which it has."""
    path = folder / TOKENIZER_CONFIG
    config: object = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            config = {}  # the converter skips an unreadable one too
    if isinstance(config, dict) and isinstance(config.get("chat_template"), str):
        return f"the checkpoint's own ({TOKENIZER_CONFIG})"
    config = dict(config) if isinstance(config, dict) else {}
    config["chat_template"] = MINICPM_TEMPLATE
    path.unlink(missing_ok=True)  # a link to the local folder's file: replaced, never written through
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return f"MiniCPM's (the checkpoint's {TOKENIZER_CONFIG} has none)"


def _convert(folder: Path, staging: Path, name: str, quant: str, progress: bool, *, shown_as: str) -> Path:
    """Run the registered converter on folder into staging/<name>.<QUANT>.gguf; its notes go to stderr. A refusal
    is a StoreError that names the source (shown_as), not the staging folder."""
    conv = converter()
    out = staging / stored_name(f"{name}.{quant.upper()}.gguf", shown_as)
    try:
        notes = conv.convert(folder, out, quant, progress)
    except conv.refusal as e:
        raise StoreError(f"{shown_as} cannot be converted: {_shown(e, folder, shown_as)}; nothing was stored") from e
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return out


def _shown(error: Exception, folder: Path, shown_as: str) -> str:
    """The converter's message without the staging folder's path (gone when the user reads it): a file in it is
    named alone ("config.json: ..."), the folder itself as shown_as (which the message already starts with)."""
    message = str(error)
    for path in {str(folder.resolve()), str(folder)}:
        message = message.replace(f"{path}/", "").replace(f"{path}: ", "").replace(path, shown_as)
    return message
