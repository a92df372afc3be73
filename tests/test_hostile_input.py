"""Hostile and unlucky input at the store and the CLI (issue 13): each case ends in one clear line (exit 1, or click's
usage error, exit 2), never a traceback, a hang or a full disk, and nothing that was in the store is lost.

- pull takes regular files only: a link to /dev/zero, a FIFO (also inside a folder source) are refused (13.4);
- a fetched file can never be stored as manifest.json (13.5);
- a manifest's paths and name are confined to the model's folder; its size is checked on every use, its sha256 by
  `models info --verify` (13.6); broken manifests are listed with the reason and removable;
- --max-tokens, --seed and the sampling floats are checked by the CLI (13.10 and the tracebacks list);
- store names are checked with fullmatch: 'mine\\n' is not a name (13.11);
- text that is not UTF-8 (argv, stdin, a chat line), an empty prompt, SPARROW_MEMORY_LIMIT that is not a number,
  SPARROW_HOME that is a file, URL paths that climb or hold %00, and a mistyped path taken for a hub repository.

Nothing here reaches the internet: pip runs against an empty folder and the hub is a local fixture or a closed port.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import package_root
from fixtures.store_fixtures import HubFixture, tiny_gguf
from sparrow.cli import sparrow
from sparrow.runtime.store import NAME_RE, Store

QUICK = ["--draft", "none", "--temperature", "0", "--max-tokens", "2"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Whatever a case falls back to, nothing leaves this machine: pip sees an empty folder, the hub a closed port."""
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("SPARROW_PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("SPARROW_HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def hub(tiny, monkeypatch):
    fixture = HubFixture({"sparrow-test/tiny": {"tiny.gguf": tiny, "manifest.json": tiny}},
                         files={"manifest.json": tiny, "%2e%2e": tiny, "%00.gguf": tiny, "..": tiny})
    with fixture.running():
        monkeypatch.setenv("SPARROW_HF_ENDPOINT", fixture.url)
        yield fixture


def run(*args: str, input: str | bytes | None = None):
    """The CLI in-process; a Python exception escaping it (a traceback for a user) fails the test."""
    r = CliRunner().invoke(sparrow, list(args), input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"{args}: a traceback instead of a message:\n{r.output}") from r.exception
    return r


def one_clear_line(r, code: int = 1) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    return r.output


def snapshot(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in home.rglob("*") if p.is_file()} if home.exists() else {}


def assert_nothing_half_done(home: Path) -> None:
    assert not (home / "tmp").exists() or not any((home / "tmp").iterdir()), list((home / "tmp").iterdir())


# ---- 13.4: regular files only ----

def _pull_in_subprocess(home: Path, source: str) -> subprocess.CompletedProcess:
    """`sparrow models pull SOURCE` with files capped at 64 MiB and a time limit, so that code copying /dev/zero or
    waiting on a FIFO fails this test instead of filling the disk or hanging it."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))

    env = {**os.environ, "SPARROW_HOME": str(home)}
    try:
        return subprocess.run([sys.executable, "-m", "sparrow", "models", "pull", "-q", source], check=False,
                              cwd=package_root(), env=env, capture_output=True, text=True, timeout=60,
                              preexec_fn=cap)
    except subprocess.TimeoutExpired:
        pytest.fail(f"models pull {source} hung")


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "dev-zero-in-folder", "fifo-in-folder"])
def test_pull_takes_regular_files_only(home, tiny, tmp_path, kind):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    before = snapshot(home)
    folder = tmp_path / "src"
    folder.mkdir()
    target = folder / "model.gguf"
    if kind.startswith("dev-zero"):
        target.symlink_to("/dev/zero")
    else:
        os.mkfifo(target)
    source = folder if kind.endswith("in-folder") else target
    done = _pull_in_subprocess(home, str(source))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "is not a regular file" in done.stderr, done.stderr
    assert snapshot(home) == before
    assert_nothing_half_done(home)


# ---- 13.5: a fetched file is never stored as manifest.json ----

@pytest.mark.parametrize("source", ["url", "hub"])
def test_a_file_named_manifest_json_cannot_replace_the_manifest(home, hub, tiny, source):
    spec = f"{hub.url}/files/manifest.json" if source == "url" else "hf:sparrow-test/tiny:manifest.json"
    r = run("models", "pull", "-q", spec, "--name", "odd")
    assert r.exit_code == 0, r.output
    m = Store().info("odd")
    assert m.files[0].path == "manifest.json.gguf" and m.architecture == "llama"
    assert Store().resolve("odd").read_bytes() == tiny.read_bytes()
    assert json.loads((home / "models" / "odd" / "manifest.json").read_text())["name"] == "odd"
    assert_nothing_half_done(home)


# ---- 13.6: a manifest points inside its own folder ----

def _edit_manifest(home: Path, model: str, **changes: object) -> None:
    path = home / "models" / model / "manifest.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "path":
            data["files"][0]["path"] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit", ["absolute", "dotdot", "name", "symlink"])
def test_manifest_cannot_point_outside_the_store(home, tiny, tmp_path, edit):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    outside = tmp_path / "outside.gguf"  # a good model file, so that only the confinement can refuse it
    outside.write_bytes(tiny.read_bytes())
    folder = home / "models" / "tiny"
    if edit == "absolute":
        _edit_manifest(home, "tiny", path=str(outside))
    elif edit == "dotdot":
        _edit_manifest(home, "tiny", path="../../../outside.gguf")
    elif edit == "name":
        (home / "outside").mkdir()  # where models/../outside/tiny.gguf leads
        (home / "outside" / "tiny.gguf").write_bytes(tiny.read_bytes())
        _edit_manifest(home, "tiny", name="../outside")
    else:
        (folder / "tiny.gguf").unlink()
        (folder / "tiny.gguf").symlink_to(outside)
    for args in (["models", "info", "tiny"], ["generate", "-m", "tiny", "hi"]):
        out = one_clear_line(run(*args))
        assert "'tiny' in the store is broken" in out and "sparrow models rm tiny" in out, out
    assert "BROKEN" in run("models", "list").output
    assert run("models", "rm", "tiny").exit_code == 0
    assert outside.read_bytes() == tiny.read_bytes() and not folder.exists()


def test_size_checked_on_every_use_sha256_with_verify(home, tiny):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    r = run("models", "info", "tiny", "--verify")
    assert r.exit_code == 0 and "verified" in r.output, r.output
    assert json.loads(run("models", "info", "tiny", "--verify", "--json").output)["verified"]
    path = Store().resolve("tiny")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content: only the sha256 can tell
    path.write_bytes(bytes(data))
    assert run("models", "info", "tiny").exit_code == 0
    out = one_clear_line(run("models", "info", "tiny", "--verify"))
    assert "the file changed since it was pulled" in out and hashlib.sha256(data).hexdigest() in out
    with open(path, "ab") as f:
        f.write(b"\0" * 16)  # another size: every use refuses it
    for args in (["models", "info", "tiny"], ["generate", "-m", "tiny", "hi"]):
        out = one_clear_line(run(*args))
        assert f"has {len(data) + 16} bytes, the manifest says {len(data)}" in out
    assert one_clear_line(run("models", "info", str(tiny), "--verify"), 2)


# ---- broken manifests: listed with the reason, removable ----

BROKEN = {
    "files-empty": (lambda m: {**m, "files": []}, "'files' must be a non-empty list"),
    "path-not-a-string": (lambda m: {**m, "files": [{**m["files"][0], "path": 123}]}, "path must be a string"),
    "unknown-key": (lambda m: {**m, "surprise": 1}, "unknown key 'surprise'"),
    "size-a-string": (lambda m: {**m, "size": "big"}, "'size' must be a whole number"),
    "a-list": (lambda m: [m], "not a JSON object"),
    "invalid-json": (None, "not valid JSON"),
    "no-manifest": (None, "no manifest.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_is_listed_with_the_reason_and_removable(home, tiny, case):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    assert run("models", "pull", "-q", str(tiny), "--name", "good").exit_code == 0
    edit, reason = BROKEN[case]
    manifest = home / "models" / "tiny" / "manifest.json"
    if case == "invalid-json":
        manifest.write_text('{"name": "tiny", ')
    elif case == "no-manifest":
        manifest.unlink()
    else:
        manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    listing = run("models", "list")
    assert listing.exit_code == 0 and "good" in listing.output, listing.output
    line = next(ln for ln in listing.output.splitlines() if ln.split()[:1] == ["tiny"])
    assert "BROKEN" in line and reason in line, listing.output
    for args in (["models", "info", "tiny"], ["generate", "-m", "tiny", "hi"], ["models", "default", "tiny"]):
        out = one_clear_line(run(*args))
        assert "broken" in out and reason in out, out
    out = one_clear_line(run("models", "pull", "-q", str(tiny)))  # no silent overwrite, --force replaces it
    assert "--force" in out
    r = run("models", "rm", "tiny")
    assert r.exit_code == 0 and "removed 'tiny' (it was broken)" in r.output, r.output
    assert not (home / "models" / "tiny").exists() and [m.name for m in Store().list()] == ["good"]
    assert_nothing_half_done(home)


def test_folder_whose_name_is_not_a_store_name_is_listed_and_removable(home, tiny):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    odd = home / "models" / "mine\n"  # as older versions made it from --name $'mine\n'
    odd.mkdir()
    (odd / "manifest.json").write_text((home / "models" / "tiny" / "manifest.json").read_text())
    listing = run("models", "list").output
    assert "'mine\\n'" in listing and "not a store name" in listing, listing
    assert run("models", "rm", "mine\n").exit_code == 0 and not odd.exists()
    assert Store().info("tiny").name == "tiny"


# ---- 13.11: names are matched whole ----

def test_store_name_with_a_trailing_newline_is_refused(home, tiny):
    assert NAME_RE.fullmatch("mine") and not NAME_RE.fullmatch("mine\n")
    out = one_clear_line(run("models", "pull", "-q", str(tiny), "--name", "mine\n"))
    assert "bad model name 'mine\\n'" in out
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []
    with pytest.raises(Exception, match="bad model name"):
        Store().save_tuned("tiny\n", {})


# ---- 13.10 and sampling options: checked by the CLI ----

@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option", [["--max-tokens", "0"], ["--max-tokens", "-1"], ["--seed", "-1"],
                                    ["--seed", str(2**64)], ["--temperature", "nan"], ["--temperature", "inf"],
                                    ["--top-p", "nan"], ["--repeat-penalty", "-inf"]])
def test_bad_sampling_options_are_usage_errors(home, smollm_path, command, option):
    args = ["generate", "-m", str(smollm_path), *QUICK, *option, "hi"] if command == "generate" else \
        ["chat", str(smollm_path), *QUICK, *option]
    out = one_clear_line(run(*args, input="hi\n/exit\n"), 2)
    assert f"Invalid value for '{option[0]}'" in out, out


def test_max_tokens_one_is_the_least(home, smollm_path):
    r = run("generate", "-m", str(smollm_path), *QUICK[:-1], "1", "--json", "The capital of France is")
    assert r.exit_code == 0 and len(json.loads(r.output)["tokens"]) == 1, r.output


# ---- text that is not UTF-8, empty prompts ----

def test_text_that_is_not_utf8(home, smollm_path):
    model = ["-m", str(smollm_path), *QUICK]
    out = one_clear_line(run("generate", *model, "hi\udcff"), 2)  # argv: Python decodes bytes with surrogateescape
    assert "not valid UTF-8 (byte 0xff at character 2)" in out
    out = one_clear_line(run("generate", *model, "--chat", "--system", "\udcfe", "hi"), 2)
    assert "'--system'" in out and "byte 0xfe" in out
    out = one_clear_line(run("generate", *model, input=b"hi \xc3\x28"))
    assert "stdin is not valid UTF-8 (byte 0xc3 at offset 3)" in out
    out = one_clear_line(run("chat", str(smollm_path), "--system", "\udcff"), 2)
    assert "not valid UTF-8" in out


def test_chat_line_that_is_not_utf8_is_not_sent_and_the_chat_goes_on(home, smollm_path):
    r = run("chat", str(smollm_path), *QUICK, "--stats", input=b"caf\xe9?\nSay hi.\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "[not sent: that line is not valid UTF-8 (byte 0xe9 at character 3); the conversation is kept" in r.output
    assert r.output.count(" generated; first token after") == 1, r.output  # the next line was answered


def test_empty_prompt(home, smollm_path):
    for args, stdin in ((["", ], None), ([], "")):
        out = one_clear_line(run("generate", "-m", str(smollm_path), *QUICK, *args, input=stdin), 2)
        assert "the prompt is empty" in out


# ---- environment ----

@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1"])
def test_memory_limit_that_is_not_a_number(home, smollm_path, monkeypatch, value):
    monkeypatch.setenv("SPARROW_MEMORY_LIMIT", value)
    out = one_clear_line(run("generate", "-m", str(smollm_path), *QUICK, "hi"))
    assert f"SPARROW_MEMORY_LIMIT={value!r} is not a number of bytes" in out


def test_sparrow_home_that_is_a_file(tmp_path, tiny, smollm_path, monkeypatch):
    home = tmp_path / "store"
    home.write_text("not a folder")
    monkeypatch.setenv("SPARROW_HOME", str(home))
    for args in (["models", "list"], ["models", "pull", "-q", str(tiny)], ["generate", "-m", str(smollm_path), "hi"]):
        out = one_clear_line(run(*args))
        assert "is a file, not a folder" in out, out
    assert home.read_text() == "not a folder"


def test_pull_that_cannot_write_says_so_and_stores_nothing(home, tiny):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    before = snapshot(home)
    if (home / "tmp").exists():
        (home / "tmp").rmdir()
    (home / "tmp").write_text("in the way")  # staging cannot be made
    out = one_clear_line(run("models", "pull", "-q", "--force", str(tiny)))
    assert "could not pull" in out and "nothing was stored" in out
    (home / "tmp").unlink()
    assert snapshot(home) == before


# ---- URL and hub paths ----

@pytest.mark.parametrize("path", ["/files/..", "/files/%2e%2e", "/files/%00.gguf", "/files/a/%2E%2E/tiny.gguf"])
def test_url_paths_that_climb_or_hold_nul_are_refused(home, hub, path):
    out = one_clear_line(run("models", "pull", "-q", hub.url + path))
    assert "bad URL path" in out and "'..'" in out, out
    assert hub.requests == [] and Store().list() == []
    assert_nothing_half_done(home)


@pytest.mark.parametrize("spec", ["hf:sparrow-test/tiny:../tiny.gguf", "hf:sparrow-test/tiny:%2e%2e/x.gguf",
                                  "hf:../..:tiny.gguf", "hf:sparrow-test/tiny:a\0.gguf",
                                  "hf:sparrow-test/tiny:tiny.gguf@../../x", "sparrow-test/..",
                                  "{url}/sparrow-test/tiny/resolve/main/%2e%2e/tiny.gguf"])
def test_hub_references_that_climb_are_refused(home, hub, spec):
    out = one_clear_line(run("models", "pull", "-q", spec.format(url=hub.url)))
    assert "bad hub" in out or "no such file" in out, out
    assert hub.requests == [] and Store().list() == []


def test_mistyped_path_is_no_such_file_not_a_hub_repository(home, hub, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["models", "pull", "work/typo.gguf"], ["generate", "-m", "work/typo.gguf", "hi"],
                 ["models", "info", "./typo.gguf"], ["chat", "typo.gguf"]):
        out = one_clear_line(run(*args))
        assert "no such file: " in out and "typo.gguf" in out, out
    assert hub.requests == []
    # owner/repo that is no local path is still the hub's
    assert run("models", "pull", "-q", "sparrow-test/tiny", "--name", "bare").exit_code == 0
    assert Store().resolve("bare").read_bytes() == tiny.read_bytes()
