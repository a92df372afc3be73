"""Pull and convert in one step (issue 14, part 4): `sparrow models pull hf:owner/repo --quant q4_0` against a local hub
(tests/fixtures/store_fixtures.HubFixture) serving small random BlockFFN checkpoints (tests/blockffn_fixture.py,
vanilla attention), single-file and sharded. The result equals the same folder converted with `sparrow convert`,
byte for byte, and runs; every bad input is a clear StoreError that leaves the store exactly as it was."""
from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from blockffn_fixture import FixtureConfig, tokenizer_model, write_checkpoint
from click.testing import CliRunner
from fixtures.store_fixtures import HubFixture, tiny_gguf
from sparrow.cli import sparrow
from sparrow.converters.blockffn import QTYPES, convert
from sparrow.converters.cli import default_type
from sparrow.converters.hf import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from sparrow.converters.store import BLOCKFFN
from sparrow.runtime import Model, Sampler, SamplerParams, generate_tokens
from sparrow.runtime.backends import Chat, NativeBackend
from sparrow.runtime.chat_template import MINICPM_TEMPLATE
from sparrow.runtime.routing import read_gguf_header
from sparrow.runtime.store import ChecksumError, Store, StoreError, checkpoint

NAME = "BlockFFN-Test"   # the repository's (and folder's) name: the GGUF's general.name
TOKENS = [1, 5, 100, 260, 261, 7, 42, 270, 3, 99, 150, 200]
N_SHARDS = 3


def shard(folder: Path, n: int = N_SHARDS) -> Path:
    """Split folder's model.safetensors into n shards named by a model.safetensors.index.json, as the hub stores
    large checkpoints."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / SAFETENSORS_SINGLE))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), n)):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({names[j]: file for j in part})
    (folder / SAFETENSORS_SINGLE).unlink()
    total = sum(a.nbytes for a in tensors.values())
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def control_piece(text: str) -> bytes:
    """A SentencePiece ModelProto `pieces` entry (field 1) of type CONTROL, to append to a tokenizer.model."""
    def varint(n: int) -> bytes:
        out = b""
        while n > 0x7F:
            out += bytes([n & 0x7F | 0x80])
            n >>= 7
        return out + bytes([n])

    raw = text.encode()
    msg = b"\x0a" + varint(len(raw)) + raw + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x03"
    return b"\x0a" + varint(len(msg)) + msg


def minicpm_checkpoint(folder: Path) -> Path:
    """An SFT-style checkpoint: MiniCPM's turn markers <用户> and <AI> are control tokens of the vocabulary (ids
    V and V + 1), and tokenizer_config.json has no chat_template."""
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(tokenizer_model())).get_piece_size()
    write_checkpoint(folder, FixtureConfig(vocab_size=pieces + 2))
    (folder / "tokenizer.model").write_bytes(tokenizer_model().read_bytes() + control_piece("<用户>")
                                             + control_piece("<AI>"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders, each named NAME (so every conversion of the same weights gives the same bytes)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {"single": write_checkpoint(root / "single" / NAME),
           "sharded": shard(write_checkpoint(root / "sharded" / NAME)),
           "minicpm": minicpm_checkpoint(root / "minicpm" / NAME),
           "mismatch": write_checkpoint(root / "mismatch" / NAME, config_overrides={"expert_size": 8}),
           "rope": write_checkpoint(root / "rope" / NAME,
                                    config_overrides={"rope_scaling": {"type": "linear", "factor": 2.0}})}
    (out["single"] / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    readme = root / "README.md"
    readme.write_text("# weights elsewhere\n")
    out["readme"] = readme
    out["tiny"] = tiny_gguf(root / "tiny.gguf")
    return out


def files_of(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir())}


@pytest.fixture
def hub(ckpts, monkeypatch):
    shards = files_of(ckpts["sharded"])
    no_shard = {k: v for k, v in shards.items() if k != f"model-00002-of-{N_SHARDS:05d}.safetensors"}
    repos = {f"{kind}/{NAME}": files_of(ckpts[kind]) for kind in ("single", "sharded", "minicpm", "mismatch", "rope")}
    repos |= {f"no-shard/{NAME}": no_shard,
              f"no-tokenizer/{NAME}": {k: v for k, v in files_of(ckpts["single"]).items() if k != "tokenizer.model"},
              f"readme/{NAME}": {"README.md": ckpts["readme"]},
              f"gguf/{NAME}": {"tiny.gguf": ckpts["tiny"], "README.md": ckpts["readme"]},
              f"both/{NAME}": {"tiny.gguf": ckpts["tiny"], **files_of(ckpts["single"])}}
    fixture = HubFixture(repos)
    with fixture.running():
        monkeypatch.setenv("SPARROW_HF_ENDPOINT", fixture.url)
        yield fixture


def sparrow_convert(src: Path, out: Path, qtype: str) -> Path:
    r = CliRunner().invoke(sparrow, ["convert", str(src), str(out), "--type", qtype, "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def logits(path: Path) -> np.ndarray:
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
        return np.array(s.eval(TOKENS, logits="all"))


def greedy(path: Path, n: int = 8) -> list[int]:
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
        sampler = Sampler(m.info.n_vocab, SamplerParams.greedy())
        return list(generate_tokens(s, TOKENS[:4], max_tokens=n, sampler=sampler))


def state(home: Path) -> tuple[dict[str, str], list[str]]:
    """Every file under the store with its sha256, and the registry (the models list() sees)."""
    files = {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(home.rglob("*")) if p.is_file()}
    return files, [m.to_json() for m in Store().list()]


def assert_no_staging(home: Path) -> None:
    assert not (home / "tmp").exists() or not any((home / "tmp").iterdir()), list((home / "tmp").iterdir())


# ---- the flow ----

@pytest.mark.parametrize("kind, quant", [("single", "f16"), ("sharded", "q4_0")])
def test_pull_and_convert_equals_sparrow_convert(home, hub, ckpts, tmp_path, kind, quant):
    m = Store().pull(f"hf:{kind}/{NAME}", quant=quant, progress=False)
    assert (m.name, m.architecture, m.format, m.quantization) == ("blockffn-test", "blockffn", "gguf", quant.upper())
    assert m.source == f"hf:{kind}/{NAME}@main" and m.extra["model_name"] == NAME
    pulled = Store().resolve(m.name)
    assert pulled.name == f"{NAME}.{quant.upper()}.gguf"
    # Only the GGUF and its manifest are stored; the downloaded checkpoint is gone.
    assert sorted(p.name for p in (home / "models" / m.name).iterdir()) == sorted(["manifest.json", pulled.name])
    assert_no_staging(home)
    # Every file the checkpoint needs was downloaded and checked, and is recorded with its sha256.
    wanted = {"config.json", "tokenizer.model", "tokenizer_config.json"} | (
        {SAFETENSORS_SINGLE, "generation_config.json"} if kind == "single"
        else {SAFETENSORS_INDEX} | {f"model-{i:05d}-of-{N_SHARDS:05d}.safetensors" for i in range(1, N_SHARDS + 1)})
    converted = m.extra["converted"]
    assert converted["files"] == {f: hashlib.sha256((ckpts[kind] / f).read_bytes()).hexdigest() for f in wanted}
    assert converted["quant"] == quant and converted["chat_template"].startswith("the checkpoint's own")
    assert m.extra["checked"].startswith("every file against the hub's sha256 or git blob id")
    # The same folder through `sparrow convert`: the same bytes, the same logits, and it generates.
    local = sparrow_convert(ckpts[kind], tmp_path / "local.gguf", quant)
    assert pulled.read_bytes() == local.read_bytes()
    ours = logits(pulled)
    assert ours.shape[0] == len(TOKENS) and np.isfinite(ours).all() and ours.std() > 0
    np.testing.assert_array_equal(ours, logits(local))
    tokens = greedy(pulled)
    assert tokens and tokens == greedy(local)


def test_sharded_and_single_checkpoints_of_the_same_weights_give_the_same_file(home, hub):
    a = Store().pull(f"hf:single/{NAME}", name="a", quant="q8_0", progress=False)
    b = Store().pull(f"hf:sharded/{NAME}", name="b", quant="q8_0", progress=False)
    assert a.sha256 == b.sha256


def test_default_quant_is_the_converters_default(home, hub, ckpts):
    default = inspect.signature(convert).parameters["qtype"].default
    assert default == "q8_0" == BLOCKFFN.default_quant
    assert default_type("out.gguf") == default and default_type("out.onnx") == "f32"  # `sparrow convert --type`
    assert BLOCKFFN.quants == tuple(QTYPES) and checkpoint.converter() is BLOCKFFN
    m = Store().pull(f"hf:single/{NAME}", progress=False)
    assert m.quantization == "Q8_0" and m.extra["converted"]["quant"] == "q8_0"
    # A local checkpoint folder converts the same way, to the same bytes, and is left as it was.
    before = {p.name: p.read_bytes() for p in ckpts["single"].iterdir()}
    local = Store().pull(str(ckpts["single"]), name="local", progress=False)
    assert local.sha256 == m.sha256 and local.source == str(ckpts["single"].resolve())
    assert {p.name: p.read_bytes() for p in ckpts["single"].iterdir()} == before
    assert_no_staging(home)


def test_checkpoint_file_names_agree_with_the_converters():
    assert (checkpoint.SAFETENSORS_INDEX, checkpoint.SAFETENSORS_SINGLE) == (SAFETENSORS_INDEX, SAFETENSORS_SINGLE)


# ---- bad input: a clear error, the store exactly as it was ----

SHARD2 = f"model-00002-of-{N_SHARDS:05d}.safetensors"


def _truncate(hub, ckpts):
    hub.bodies[SHARD2] = (ckpts["sharded"] / SHARD2).read_bytes()[:-1000]


BAD = {
    # case: (repository kind, how the hub misbehaves, error class, what the message says, fetched weights?)
    "truncated shard": ("sharded", _truncate, ChecksumError, "expected", True),
    "connection cut in a shard": ("sharded", lambda hub, c: hub.cut.update({SHARD2: 5000}), ChecksumError,
                                  "stopped after 5000", True),
    "wrong sha256": ("sharded", lambda hub, c: hub.wrong_checksum.add(SHARD2), ChecksumError,
                     "does not match the expected " + "0" * 64, True),
    "wrong git blob id": ("single", lambda hub, c: hub.wrong_checksum.add("config.json"), ChecksumError,
                          "git blob id", False),
    "server error mid-way": ("sharded", lambda hub, c: hub.errors.update({SHARD2: 500}), StoreError, "HTTP 500",
                             True),
    "shard named by the index missing": ("no-shard", None, StoreError,
                                         f"names {SHARD2}, which the repository does not have", False),
    "no tokenizer.model": ("no-tokenizer", None, StoreError, "lacks tokenizer.model", False),
    "shapes disagree with config.json": ("mismatch", None, StoreError, "config.json implies", True),
    "unsupported config": ("rope", None, StoreError, "rope_scaling", False),
    "neither a model file nor a checkpoint": ("readme", None, StoreError,
                                              "has neither a GGUF or ONNX model file nor a Hugging Face checkpoint",
                                              False),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_refused_and_the_store_is_unchanged(home, hub, ckpts, case):
    kind, misbehave, error, message, fetched_weights = BAD[case]
    store = Store()
    store.pull(str(ckpts["tiny"]), progress=False)                              # another model
    store.pull(f"hf:single/{NAME}", name="blockffn-test", progress=False)       # the one the failed pull would replace
    before = state(home)
    hub.requests.clear()
    if misbehave:
        misbehave(hub, ckpts)
    with pytest.raises(error, match=message) as caught:
        store.pull(f"hf:{kind}/{NAME}", name="blockffn-test", force=True, quant="q4_0", progress=False)
    said = str(caught.value)
    assert "must be converted first" not in said and str(home / "tmp") not in said  # the source, not the staging
    assert "nothing was stored" in said or case in ("server error mid-way", "neither a model file nor a checkpoint")
    assert state(home) == before
    assert_no_staging(home)
    weights = [r for r in hub.requests if r.split("?")[0].endswith(".safetensors")]
    assert bool(weights) == fetched_weights, hub.requests  # what can be refused early is refused before them


def test_bad_local_checkpoint_folders(home, ckpts, tmp_path):
    """A local folder: the same checks and messages, naming the folder (never the staging folder), and the folder
    left as it was."""
    Store().pull(str(ckpts["tiny"]), progress=False)
    before = state(home)
    no_tokenizer = shutil.copytree(ckpts["single"], tmp_path / NAME)
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(StoreError, match=f"{re.escape(str(no_tokenizer))} is not a checkpoint Sparrow can convert: "
                                         "it lacks tokenizer.model"):
        Store().pull(str(no_tokenizer), progress=False)
    listing = sorted(p.name for p in ckpts["mismatch"].iterdir())
    with pytest.raises(StoreError, match=f"^{re.escape(str(ckpts['mismatch']))} cannot be converted: tensor .* "
                                         "config.json implies"):
        Store().pull(str(ckpts["mismatch"]), quant="f16", progress=False)
    assert sorted(p.name for p in ckpts["mismatch"].iterdir()) == listing
    with_gguf = tmp_path / "with-gguf"
    with_gguf.mkdir()
    shutil.copy(ckpts["tiny"], with_gguf / "tiny.gguf")
    with pytest.raises(StoreError, match=r"no checkpoint to convert .* --quant does not apply.*tiny\.gguf"):
        Store().pull(str(with_gguf), quant="q8_0", progress=False)
    assert Store().pull(str(with_gguf), name="plain", progress=False).source == str(with_gguf / "tiny.gguf")
    Store().rm("plain")
    assert state(home) == before
    assert_no_staging(home)


def test_neither_message_names_what_the_repository_holds(home, hub):
    with pytest.raises(StoreError) as caught:
        Store().pull(f"hf:readme/{NAME}", progress=False)
    assert "it holds README.md" in str(caught.value) and "config.json" in str(caught.value)
    assert Store().list() == [] and not (home / "models").exists() or not any((home / "models").iterdir())


# ---- GGUF repositories as before; --quant asks for the conversion ----

def test_gguf_repositories_pull_as_before(home, hub, ckpts):
    m = Store().pull(f"hf:gguf/{NAME}", progress=False)
    assert m.source == f"hf:gguf/{NAME}:tiny.gguf@main" and "converted" not in m.extra
    assert Store().resolve(m.name).read_bytes() == ckpts["tiny"].read_bytes()
    # a repository with both: the model file without --quant, the checkpoint with it
    m = Store().pull(f"hf:both/{NAME}", name="both-gguf", progress=False)
    assert m.source == f"hf:both/{NAME}:tiny.gguf@main"
    m = Store().pull(f"hf:both/{NAME}", name="both-converted", quant="q8_0", progress=False)
    assert m.architecture == "blockffn" and m.source == f"hf:both/{NAME}@main"
    # --quant where there is nothing to convert
    with pytest.raises(StoreError, match=r"no checkpoint to convert .* so --quant does not apply.*tiny\.gguf"):
        Store().pull(f"hf:gguf/{NAME}", name="x", quant="q4_0", progress=False)
    with pytest.raises(StoreError, match="is a model file, stored as it is: --quant applies"):
        Store().pull(f"hf:gguf/{NAME}:tiny.gguf", name="x", quant="q4_0", progress=False)
    with pytest.raises(StoreError, match="is a model file"):
        Store().pull(str(ckpts["tiny"]), name="x", quant="q4_0", progress=False)
    with pytest.raises(StoreError, match="unknown quantization 'q5_k': choose one of f32, f16, q8_0, q4_0"):
        Store().pull(f"hf:single/{NAME}", quant="q5_k", progress=False)
    assert Store().get("x") is None
    assert_no_staging(home)


def test_another_quant_of_a_stored_model_needs_force(home, hub):
    Store().pull(f"hf:single/{NAME}", quant="q8_0", progress=False)
    with pytest.raises(StoreError, match="already in the store as Q8_0, not Q4_0: pull with --force"):
        Store().pull(f"hf:single/{NAME}", quant="q4_0", progress=False)
    assert Store().pull(f"hf:single/{NAME}", quant="Q8_0", progress=False).quantization == "Q8_0"  # as stored
    assert Store().pull(f"hf:single/{NAME}", quant="q4_0", force=True, progress=False).quantization == "Q4_0"


# ---- the chat template of SFT checkpoints ----

def test_checkpoint_without_a_chat_template_gets_minicpms(home, hub, ckpts):
    m = Store().pull(f"hf:minicpm/{NAME}", progress=False)
    path = Store().resolve(m.name)
    assert read_gguf_header(path).metadata["tokenizer.chat_template"] == MINICPM_TEMPLATE
    assert m.extra["has_chat_template"] and m.extra["converted"]["chat_template"].startswith("MiniCPM's")
    backend = NativeBackend(path, n_ctx=128, n_threads=2)
    try:
        user, ai = backend.control_tokens()["<用户>"], backend.control_tokens()["<AI>"]
        chat = Chat(backend)
        assert chat.template == MINICPM_TEMPLATE
        # The user's text is text: its "<AI>" and "<用户>" are characters, never the turn markers.
        text = "a <AI> b <用户> c"
        chat.messages = [{"role": "user", "content": text}]
        tokens = chat.prompt_tokens()
        body = backend.tokenize(text, add_special=False, parse_special=False)
        assert tokens == [backend.model.info.bos_token, user, *body, ai]
        assert user not in body and ai not in body
        chat.reset()
        answer = "".join(chat.send("hello", max_tokens=4, params=SamplerParams.greedy()))
        assert chat.messages[-1] == {"role": "assistant", "content": answer} and chat.last_stats.generated_tokens
    finally:
        backend.close()
    # the same folder pulled from disk: the same file, the folder itself unchanged (no template written into it)
    config = (ckpts["minicpm"] / "tokenizer_config.json").read_bytes()
    assert Store().pull(str(ckpts["minicpm"]), name="local-minicpm", progress=False).sha256 == m.sha256
    assert (ckpts["minicpm"] / "tokenizer_config.json").read_bytes() == config


# ---- the command ----

def test_cli_models_pull_hf_repo_with_quant(home, hub, ckpts):
    run = CliRunner().invoke
    r = run(sparrow, ["models", "pull", f"hf:sharded/{NAME}", "--quant", "q8_0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "blockffn-test: " in r.output and "blockffn Q8_0" in r.output
    assert f"hf:sharded/{NAME}@main: downloading {N_SHARDS} weights files" in r.output  # progress on stderr
    info = json.loads(run(sparrow, ["models", "info", "blockffn-test", "--json"]).output)
    assert info["quantization"] == "Q8_0" and info["backend"]["name"] == "native"
    r = run(sparrow, ["models", "pull", "-q", f"hf:no-tokenizer/{NAME}", "--name", "other"], catch_exceptions=False)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "lacks tokenizer.model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    shown = " ".join(run(sparrow, ["models", "pull", "--help"]).output.split())  # the help names the converter's
    *first, last = QTYPES
    assert f"TYPE: {', '.join(first)} or {last}. Default for a checkpoint: q8_0." in shown  # types
    assert_no_staging(home)
