"""The Java binding (native/java: the JNI shim libsparrow_jni and sparrow.jar) on Linux x86-64.

tests/java/SparrowJavaTest.java is compiled with javac against the jar and run once per module with
`java -Xcheck:jni`, on the shipped blockffn-tiny and on SmolLM2-135M-Instruct; this file checks what it printed:
- greedy identity: on the 52 prompts of tests/test_speculative.py (16 new tokens each), the Java Generator's tokens
  equal plain greedy decoding's (runtime.native.generate_tokens), with every drafter on the tiny model (Token
  Recycling and the hybrid with trees, a draft model whose session was closed while the generator holds it, adaptive
  with its tuned defaults) and
  with NONE and PROMPT_LOOKUP on SmolLM2; each drafter did draft and have tokens accepted;
- Token Recycling's matrix saved from Java is a .npy int32 [n_vocab, 8], loads into another generator; a bad file
  and a generator without recycling are refused;
- Model.tokenize(text, true) equals the Python tokenizer's with parse_special=False (chat markup stays characters);
  the model info equals Python's;
- "héllo 👋 世界" tokenized and detokenized in Java comes back equal, and so does a streaming decode of the token pieces
  through Utf8Stream (no chunk holds U+FFFD although some pieces end inside a character);
- use after close (Model, Session, Generator) throws IllegalStateException; a model closed before its session leaves
  the session working; a bad path throws SparrowException with the C library's message (as Python's SparrowError);
- a callback that stops gives StopReason.CALLBACK, one that throws has its exception rethrown; stop strings; bad
  params are SparrowExceptions; two threads on one generator: refused ones get SparrowException "in use by another
  thread", every token is returned once; close() racing next() from another thread never crashes;
- the JVM exits 0 and -Xcheck:jni prints no warning.

The library and jar come from SPARROW_BUILD_DIR (tools/dev_build.sh) or the installed package (sparrow/runtime/java).
Without a JDK this test fails on CI (CI set) and is skipped elsewhere.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import sparrow
from sparrow.runtime import Model, SparrowError, _sparrow, generate_tokens
from test_generate_native import plain_greedy
from test_speculative import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "blockffn-tiny.Q8_0.gguf"
N_NEW = 16
# Drafters run on every prompt, per model: all on the tiny model (DRAFT_MODEL drafts with a second session of the
# same weights); on SmolLM2 plain decoding and prompt lookup, to keep the run short.
DRAFTERS = {"tiny": ["NONE", "PROMPT_LOOKUP", "RECYCLING", "HYBRID", "DRAFT_MODEL", "ADAPTIVE"],
            "smollm": ["NONE", "PROMPT_LOOKUP"]}
EMOJI = "héllo 👋 世界"


def _need_jdk() -> tuple[str, str]:
    javac, java = shutil.which("javac"), shutil.which("java")
    if not (javac and java):
        reason = "no JDK (javac and java on PATH) to build and run the Java binding's test"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return javac, java


def java_paths() -> tuple[Path, Path]:
    """(folder of libsparrow_jni.so, sparrow.jar) under test."""
    build = os.environ.get("SPARROW_BUILD_DIR")
    folder = Path(build) if build else Path(sparrow.runtime.__file__).parent / "java"
    return folder, folder / "sparrow.jar"


def plain_greedy_of(path: Path) -> list[tuple[list[int], list[int]]]:
    with Model(path) as model, model.session(n_ctx=512, n_threads=2) as session:
        return plain_greedy(model, session, N_NEW)


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm_path):
    """Compile and run SparrowJavaTest once; its output lines by kind, and the references it is checked against."""
    javac, java = _need_jdk()
    libdir, jar = java_paths()
    assert (libdir / "libsparrow_jni.so").is_file() and jar.is_file(), (
        f"no libsparrow_jni.so / sparrow.jar in {libdir}: build with a JDK present (SPARROW_JAVA=ON)")
    work = tmp_path_factory.mktemp("java")
    models = {"tiny": TINY, "smollm": smollm_path}
    ref = {key: plain_greedy_of(path) for key, path in models.items()}
    lines = [f"ntokens {N_NEW}", f"workdir {work}"] + [f"model {k} {p}" for k, p in models.items()]
    lines += [f"drafters {k} " + " ".join(names) for k, names in DRAFTERS.items()]
    lines += ["text " + t.encode().hex() for t in PROMPTS]
    lines += [f"prompt {k} " + " ".join(map(str, toks)) for k, pairs in ref.items() for toks, _ in pairs]
    (work / "input.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    classes = work / "classes"
    cc = subprocess.run([javac, "-encoding", "UTF-8", "-Xlint:all", "-cp", str(jar), "-d", str(classes),
                         str(ROOT / "tests" / "java" / "SparrowJavaTest.java")], capture_output=True, text=True,
                        check=False)
    assert cc.returncode == 0, cc.stderr
    # --enable-native-access: JDK 24+ warns about System.loadLibrary without it (JDK 17 accepts it silently)
    r = subprocess.run([java, "-Xcheck:jni", "--enable-native-access=ALL-UNNAMED", f"-Djava.library.path={libdir}", "-cp", f"{jar}{os.pathsep}{classes}",
                        "SparrowJavaTest", str(work / "input.txt")], capture_output=True, timeout=300, check=False)
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8", "replace")
    by_kind: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        kind, *rest = line.split(" ")
        by_kind.setdefault(kind, []).append(rest)
    return {"rc": r.returncode, "stdout": out, "stderr": err, "lines": by_kind, "ref": ref, "models": models}


def checks(run) -> dict[str, str]:
    return {name: " ".join(rest) for name, *rest in run["lines"].get("check", [])}


def assert_check(run, name: str):
    got = checks(run)
    assert got.get(name) == "ok", f"{name}: {got.get(name, 'not run')}\n{run['stdout'][-2000:]}\n{run['stderr'][-3000:]}"


def test_jvm_exits_cleanly_without_jni_warnings(run):
    assert run["rc"] == 0 and run["stdout"].rstrip().endswith("done"), run["stderr"][-5000:]
    # HotSpot's JNI checker prints "WARNING in native method: ..." to stdout; the JVM's other warnings go to stderr
    lines = run["stdout"].splitlines() + run["stderr"].splitlines()
    warnings = [line for line in lines if "WARNING" in line]
    assert not warnings, "\n".join(warnings)


@pytest.mark.parametrize(("key", "drafter"), [(k, d) for k, names in DRAFTERS.items() for d in names])
def test_greedy_equals_plain_decoding(run, key, drafter):
    ref = run["ref"][key]
    assert len(ref) >= 50
    got = {int(i): (stop, [int(t) for t in toks]) for k, d, i, stop, *toks in run["lines"]["gen"]
           if k == key and d == drafter}
    assert sorted(got) == list(range(len(ref)))
    for i, (_toks, expected) in enumerate(ref):
        stop, tokens = got[i]
        assert tokens == expected, f"prompt {i} {PROMPTS[i]!r}"
        assert stop == ("MAX_TOKENS" if len(expected) == N_NEW else "EOG")
    (steps, drafted, accepted, tokens), = [list(map(int, rest)) for k, d, *rest in run["lines"]["stats"]
                                           if k == key and d == drafter]
    assert tokens == sum(len(e) for _, e in ref)
    if drafter == "NONE":
        assert drafted == 0
    elif drafter != "ADAPTIVE":  # the adaptive gate may rightly decide not to draft
        assert 0 < accepted <= drafted and steps < tokens  # it did speculate
    print(f"{key} {drafter}: {steps} steps, {drafted} drafted, {accepted} accepted, {tokens} tokens")


@pytest.mark.parametrize("key", [k for k, names in DRAFTERS.items() if "RECYCLING" in names])
def test_recycling_matrix_saved_and_loaded(run, key):
    import numpy as np

    assert_check(run, f"drafter_file_{key}")
    (path,), = run["lines"]["npy"]
    matrix = np.load(path)
    with Model(run["models"][key]) as model:
        assert matrix.dtype == np.int32 and matrix.shape == (model.info.n_vocab, 8)
    assert (matrix >= 0).any() and matrix.min() >= -1 and matrix.max() < matrix.shape[0]


@pytest.mark.parametrize("key", ["tiny", "smollm"])
def test_tokenize_keeps_control_markup_as_text_and_info(run, key):
    with Model(run["models"][key]) as model:
        got = {int(i): [int(t) for t in toks] for k, i, *toks in run["lines"]["tok"] if k == key}
        for i, text in enumerate(PROMPTS):
            assert got[i] == model.tokenize(text, add_special=True, parse_special=False), text
        (n_vocab, n_ctx_train, name_hex, arch), = [rest for k, *rest in run["lines"]["info"] if k == key]
        assert (int(n_vocab), int(n_ctx_train), arch) == (model.info.n_vocab, model.info.n_ctx_train,
                                                         model.info.architecture)
        assert (bytes.fromhex(name_hex) if name_hex != "-" else b"").decode() == model.info.name
        if key == "smollm":  # chat markup: the control token with parse_special, never from Java's tokenize
            chat = next(i for i, p in enumerate(PROMPTS) if p.startswith("<|im_start|>"))
            im_start = model.tokenize("<|im_start|>", add_special=False, parse_special=True)
            assert len(im_start) == 1 and im_start[0] not in got[chat]


def test_emoji_round_trip_and_streaming(run):
    assert_check(run, "emoji_round_trip")
    assert_check(run, "utf8_stream_bytewise")
    (n, _, partial), = run["lines"]["emoji_tokens"]
    assert int(n) > 0 and int(partial) > 0  # some token ends inside a character: the stream had work to do


def test_use_after_close_and_close_order(run):
    assert_check(run, "use_after_close")
    assert_check(run, "model_closed_before_session")


def test_bad_path_gives_the_c_message(run):
    (status, msg_hex, path_hex), = run["lines"]["badpath"]
    path = bytes.fromhex(path_hex).decode()
    with pytest.raises(SparrowError) as e:
        Model(path)
    assert status == "SP_ERR_IO" and bytes.fromhex(msg_hex).decode() == str(e.value)
    assert path in str(e.value)  # the non-ASCII path came through the exception intact
    assert_check(run, "nul_in_path")


def test_callbacks_stop_strings_and_bad_params(run):
    for name in ("callback_stop", "callback_throws", "stop_string", "bad_params"):
        assert_check(run, name)


def test_gpu_session(run):
    """Session.Params.device: the devices Java sees are Python's; on GPU device 1 (lavapipe in CI) prompt lookup's
    greedy tokens equal plain decoding's; a device that does not exist is a SparrowException naming it."""
    assert run["lines"]["devices"] == [[str(len(_sparrow.devices()))]]
    assert_check(run, "gpu_session")


def test_threads(run):
    assert_check(run, "two_threads_one_generator")
    assert_check(run, "close_while_generating")
    (refused, tokens), = [(int(r[1]), int(r[3])) for r in run["lines"]["threads"]]
    assert tokens == 3 * 32 and refused >= 0
    print(f"two threads on one generator: {refused} calls refused, {tokens} tokens")


def test_jar_holds_the_api():
    _need_jdk()
    _, jar = java_paths()
    if not jar.is_file():
        pytest.fail(f"no {jar}")
    names = zipfile.ZipFile(jar).namelist()
    for cls in ("Model", "Session", "Generator", "Drafter", "StopReason", "TokenCallback", "Utf8Stream",
                "SparrowException"):
        assert f"dev/sparrow/{cls}.class" in names
    assert re.search(r"dev/sparrow/Generator\$Params\.class", "\n".join(names))


def readme_example() -> str:
    """The Java program of README.md's "Java and Android" section (written by a shell heredoc)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Java and Android\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"^cat > Example\.java <<'EOF'\n(.*?)^EOF$", section, flags=re.MULTILINE | re.DOTALL)
    assert m, "README.md: no Example.java heredoc in the Java and Android section"
    return m.group(1)


def test_readme_java_example_prints_plain_greedy_text(tmp_path, smollm_path):
    javac, java = _need_jdk()
    libdir, jar = java_paths()
    code = readme_example()
    (tmp_path / "Example.java").write_text(code, encoding="utf-8")
    cc = subprocess.run([javac, "-encoding", "UTF-8", "-cp", str(jar), "Example.java"], cwd=tmp_path,
                        capture_output=True, text=True, check=False)
    assert cc.returncode == 0, cc.stderr
    r = subprocess.run([java, "-Xcheck:jni", "--enable-native-access=ALL-UNNAMED", "-Dfile.encoding=UTF-8",
                        "-Dsun.stdout.encoding=UTF-8", "-cp", f"{jar}{os.pathsep}.", f"-Djava.library.path={libdir}",
                        "Example", str(smollm_path)], cwd=tmp_path, capture_output=True, timeout=120, check=False)
    out = r.stdout.decode("utf-8")
    assert r.returncode == 0 and "WARNING" not in out + r.stderr.decode("utf-8", "replace"), (out, r.stderr)
    text, stats = out.rsplit("\n[", 1)
    prompt = re.search(r'model\.tokenize\("(.*?)", true\)', code).group(1)
    max_tokens = int(re.search(r"maxTokens\((\d+)\)", code).group(1))
    with Model(smollm_path) as model, model.session(n_ctx=1024, n_threads=2) as s:
        toks = model.tokenize(prompt, add_special=True, parse_special=False)
        pieces = [model.token_bytes(t) for t in generate_tokens(s, toks, max_tokens=max_tokens)]
    end = next((i + 1 for i in range(len(pieces)) if b"\n\n" in b"".join(pieces[:i + 1])), len(pieces))
    assert text.encode() == b"".join(pieces[:end])
    why = "STOP_STRING" if b"\n\n" in b"".join(pieces[:end]) else "MAX_TOKENS" if end == max_tokens else "EOG"
    assert re.match(rf"{why}: {end} tokens, \d+ of \d+ drafted accepted\]", stats), stats
    print(out)
