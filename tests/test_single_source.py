"""One source of truth per fact (STYLE.md 14): what the Python side reads from the C library equals what C reports
and does (sampler defaults, FFN modes, the architectures the loader implements), and the drafter registry
(runtime.drafters.DRAFTERS) is exactly what the store's tuned settings, the CLI and the tuner accept."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sparrow.bench_device.tune import drafter_candidates
from sparrow.cli import sparrow
from sparrow.runtime import Model, SamplerParams, SparrowError, _sparrow
from sparrow.runtime.cli import DRAFT_HELP, chat, generate
from sparrow.runtime.drafters import DRAFT_MODEL, DRAFTERS, known_drafters, make_drafter
from sparrow.runtime.native import FFN_MODES
from sparrow.runtime.routing import NATIVE_ARCHITECTURES, choose_backend
from sparrow.runtime.store import TUNED_SCHEMA, Store, TunedSettings, TunedSettingsError, device_fingerprint
from tiny_llama import TinyConfig, write_tiny_llama

SHIPPED_BLOCKFFN = Path(__file__).parent.parent / "models" / "blockffn-tiny.Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinyConfig())


# ---- sampler defaults ----

def test_sampler_params_defaults_are_the_c_librarys():
    c = _sparrow.sampler_default_params()
    py = dataclasses.asdict(SamplerParams())
    assert set(py) == set(c)
    for key, value in c.items():  # C's floats are float32: compare there
        assert (np.float32(py[key]) == np.float32(value)) if isinstance(value, float) else py[key] == value, key


def test_the_bindings_sampler_defaults_are_the_c_librarys():
    """_sparrow.Sampler(V) without arguments samples exactly as with sp_sampler_default_params() spelled out."""
    V = 64
    logits = np.random.default_rng(0).standard_normal((20, V)).astype(np.float32)
    a, b = _sparrow.Sampler(V), _sparrow.Sampler(V, **_sparrow.sampler_default_params())
    assert [a.sample(x) for x in logits] == [b.sample(x) for x in logits]


def test_chat_sampling_defaults_are_defined_once_in_the_library():
    """`sparrow chat`/`generate` option defaults are SamplerParams.chat(), which changes only what it means to."""
    want = dataclasses.asdict(SamplerParams.chat())
    for command in (chat, generate):
        defaults = {p.name: p.default for p in command.params}
        for key in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty"):
            assert defaults[key] == want[key], (command.name, key)
    base = dataclasses.asdict(SamplerParams())
    assert {k for k in want if want[k] != base[k]} == {"temperature", "top_p", "repeat_penalty"}
    assert SamplerParams.chat(seed=5).seed == 5


# ---- FFN modes ----

def test_ffn_mode_names_round_trip_through_the_c_enum(tiny):
    assert list(FFN_MODES) == ["auto", "dense", "token", "chunk"]
    assert sorted(FFN_MODES.values()) == list(_sparrow.FfnMode)  # every C value named, once
    for name, mode in FFN_MODES.items():
        assert _sparrow.FfnMode(int(mode)) is mode
        assert {v: k for k, v in FFN_MODES.items()}[_sparrow.FfnMode(int(mode))] == name
    with Model(tiny) as m:
        for name in FFN_MODES:  # C accepts each named mode ...
            m.session_memory(n_ctx=16, ffn_mode=name)
        with pytest.raises(SparrowError, match="ffn_mode"):  # ... and nothing past the enum
            _sparrow.Session(m._m, 16, 8, 1, max(_sparrow.FfnMode) + 1)


# ---- architectures ----

def test_native_architectures_are_what_the_c_loader_implements(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("SPARROW_BACKEND", raising=False)
    supported = _sparrow.supported_architectures()
    assert NATIVE_ARCHITECTURES == frozenset(supported) and len(supported) == len(set(supported))
    assert {"llama", "blockffn"} <= NATIVE_ARCHITECTURES
    files = [tiny] + ([SHIPPED_BLOCKFFN] if SHIPPED_BLOCKFFN.exists() else [])
    for path in files:
        with Model(path) as m:
            assert m.info.architecture in supported and choose_backend(path).backend == "native"
    # Another architecture (the tiny llama relabelled, same length so the file stays valid): the loader refuses it
    # and names what it implements; vocab_only reads it.
    data = tiny.read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8  # the key, the value type (u32) and the string length (u64)
    assert data[at:at + 5] == b"llama"
    other = tmp_path / "gemma.gguf"
    other.write_bytes(data[:at] + b"gemma" + data[at + 5:])
    with pytest.raises(SparrowError, match="SP_ERR_UNSUPPORTED.*'gemma'") as e:
        Model(other)
    assert ", ".join(supported) in str(e.value)
    with Model(other, vocab_only=True) as m:
        assert m.info.architecture == "gemma" and choose_backend(other).backend == "llama.cpp"


# ---- the drafter registry ----

def _record(drafter: str, options: dict) -> dict:
    return {"schema": TUNED_SCHEMA, "model": "m", "model_sha256": "ab" * 32, "created": "2025-01-01T00:00:00+00:00",
            "device": device_fingerprint(), "settings": {"threads": 1, "drafter": drafter, "drafter_options": options}}


def _valid(typ: type) -> object:
    return [1] if typ is list else 1


def test_the_registry_matches_the_drafter_classes(tiny):
    for name, kind in [*DRAFTERS.items(), ("draft-model", DRAFT_MODEL)]:
        params = list(inspect.signature(kind.cls).parameters)
        assert set(kind.options) <= set(params), name  # every option is a constructor keyword
        assert kind.takes_vocab == (params[:1] == ["n_vocab"]), name
    with Model(tiny) as m:
        for name, kind in DRAFTERS.items():
            d = make_drafter(name, m)
            assert type(d) is kind.cls
            d.close()


def test_tuned_settings_accept_exactly_the_registrys_drafters_and_options():
    for name, kind in [*DRAFTERS.items(), ("my-draft-model", DRAFT_MODEL)]:
        options = {key: _valid(typ) for key, typ in kind.options.items()}
        t = TunedSettings.from_record(_record(name, options))
        assert (t.drafter, t.drafter_options) == (name, options)
        with pytest.raises(TunedSettingsError, match="unknown option 'bogus'|takes no options"):
            TunedSettings.from_record(_record(name, {**options, "bogus": 1}))
    with pytest.raises(TunedSettingsError, match="drafter must be " + ", ".join(DRAFTERS)):
        TunedSettings.from_record(_record("Not A Name", {}))


def test_the_tuner_tries_every_registered_drafter_in_shapes_the_store_accepts():
    full = drafter_candidates(2, quick=False, draft_model="my-draft-model")
    assert {c.drafter for c in drafter_candidates(2, quick=True)} == set(DRAFTERS) - {"none"}
    assert {c.drafter for c in full} == set(DRAFTERS) - {"none"} | {"my-draft-model"}
    for c in full:
        TunedSettings.from_record(_record(c.drafter, c.kwargs))


def test_the_cli_lists_and_accepts_exactly_the_registrys_drafters(home, tiny):
    for name, kind in DRAFTERS.items():
        assert f"{name} ({kind.summary})" in DRAFT_HELP
    assert DRAFT_MODEL.summary in DRAFT_HELP
    Store().pull(str(tiny), name="tiny", progress=False)

    def generate_with(draft: str):
        return CliRunner().invoke(sparrow, ["generate", "-m", "tiny", "--temperature", "0", "--max-tokens", "4",
                                            "--json", "--draft", draft, "the"], catch_exceptions=False)

    for name in DRAFTERS:
        r = generate_with(name)
        assert r.exit_code == 0 and json.loads(r.stdout)["draft"] == name, (name, r.output)
    r = generate_with("lookup")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"unknown drafter 'lookup'; known: {known_drafters()}" in r.output and "unknown model" not in r.output
