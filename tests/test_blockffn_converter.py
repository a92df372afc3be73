"""BlockFFN: the HF -> GGUF converter (metadata, tensors, vocabulary, bad input) and the numpy reference.

Tolerances (logits of the GGUF-file reference vs the HF-checkpoint reference, relative to max |logit|): F32 1e-6
(float32 storage of float64 maths), F16 5e-3, Q8_0 5e-2. Q4_0 is checked value by value instead: every Q4_0 weight
against the F32 conversion, within half its block's scale (one scale where the quantizer clamps at +7), without bias
and with the spread of rounding (RMS error 1/sqrt(12) of the scale); its logits (NMSE 0.039 here) are only bounded.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from blockffn_fixture import (
    FixtureConfig,
    canonical_weights,
    hf_layout,
    to_bf16_bits,
    tokenizer_model,
    write_checkpoint,
)
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize
from reference.blockffn import BlockFFNGGUFRef, BlockFFNRef, cls, rmsnorm, tls
from sparrow.converters import ConversionError
from sparrow.converters.blockffn import ConversionWarning, convert, permute_rope_rows, unpermute_rope_rows
from sparrow.converters.cli import convert_command

Q = gguf.GGMLQuantizationType
PROMPT = "import os\nfor line in open(path):\n    print(line.strip())  # été"


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model()))


@pytest.fixture(scope="module")
def tokens(sp) -> list[int]:
    return [1] + sp.encode(PROMPT)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The default fixture: block_linear, rms router norm, GQA 4/2, untied head."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-blockffn", FixtureConfig())


def fields(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(str(path))
    return {k: v.contents() for k, v in r.fields.items()}, {t.name: t for t in r.tensors}


def no_output_left(folder: Path, keep: set[str]) -> bool:
    return {p.name for p in folder.iterdir()} == keep


# --- metadata and tensors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_metadata_and_tensor_types(ckpt, tmp_path, qtype):
    out = convert(ckpt, tmp_path / "m.gguf", qtype, progress=False)
    kv, tensors = fields(out)
    cfg = FixtureConfig()
    H, E, F, L = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.num_hidden_layers
    assert kv["general.architecture"] == "blockffn"
    expect = {"context_length": 256, "embedding_length": H, "block_count": L, "feed_forward_length": E * F,
              "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": H // 4,
              "vocab_size": 512, "expert_count": E, "expert_width": F, "router_norm": "rms",
              "router_activation": "relu", "expert_activation": "silu"}
    for k, v in expect.items():
        assert kv["blockffn." + k] == v, k
    approx = {"attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "router_norm_eps": 1e-5,
              "router_norm_scale": 1.0, "embedding_scale": 12.0, "residual_scale": 1.4 / np.sqrt(L),
              "logit_scale": 16 / H}
    for k, v in approx.items():
        assert kv["blockffn." + k] == pytest.approx(v, rel=1e-6), k

    want_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for l in range(L):
        names |= {f"blk.{l}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_router", "ffn_router_norm", "ffn_experts")}
    assert set(tensors) == names
    for name, t in tensors.items():
        high_precision = name.endswith(("_norm.weight", "ffn_router.weight"))
        assert t.tensor_type == (Q.F32 if high_precision else want_type), name
    assert [int(d) for d in tensors["blk.0.ffn_experts.weight"].shape] == [H, 2 * F, E]  # GGUF ne order
    assert [int(d) for d in tensors["blk.1.ffn_router.weight"].shape] == [H, E]
    assert [int(d) for d in tensors["blk.1.ffn_router_norm.weight"].shape] == [E]
    assert [int(d) for d in tensors["blk.0.attn_k.weight"].shape] == [H, 2 * H // 4]
    assert [int(d) for d in tensors["token_embd.weight"].shape] == [H, 512]


def tensor(t) -> np.ndarray:
    return dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).astype(np.float64)


@pytest.mark.parametrize("ffn_type", ["block", "block_linear"])
@pytest.mark.parametrize("qtype,bound", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 1 / 127), ("q4_0", 1 / 7)])
def test_experts_are_contiguous_up_then_down_per_expert(tmp_path, ffn_type, qtype, bound):
    cfg = FixtureConfig(ffn_type=ffn_type)
    src = write_checkpoint(tmp_path / "ck", cfg)
    _, tensors = fields(convert(src, tmp_path / "m.gguf", qtype, progress=False))
    w = canonical_weights(cfg, 512)
    F = cfg.expert_size
    for l in range(cfg.num_hidden_layers):
        slabs = tensor(tensors[f"blk.{l}.ffn_experts.weight"])                    # [E, 2F, H]
        up = w[f"model.layers.{l}.mlp.up_proj"].astype(np.float32)               # [E, F, H]
        down = w[f"model.layers.{l}.mlp.down_proj"].astype(np.float32)           # [E, H, F]
        for e in range(cfg.num_experts):
            # error bound: half a quantization step of the largest value, relative to max |w| of the row block
            tol = bound * max(np.abs(up[e]).max(), np.abs(down[e]).max()) + 1e-7
            np.testing.assert_allclose(slabs[e, :F], up[e], atol=tol, rtol=0)
            np.testing.assert_allclose(slabs[e, F:], down[e].T, atol=tol, rtol=0)


def test_qk_rows_permuted_like_llama_cpp(ckpt, tmp_path):
    _, tensors = fields(convert(ckpt, tmp_path / "m.gguf", "f32", progress=False))
    w = canonical_weights(FixtureConfig(), 512)
    for l in range(2):
        for proj, heads in (("q", 4), ("k", 2)):
            hf = w[f"model.layers.{l}.self_attn.{proj}_proj.weight"].astype(np.float32)
            stored = tensor(tensors[f"blk.{l}.attn_{proj}.weight"])
            assert not np.array_equal(stored, hf)
            np.testing.assert_array_equal(unpermute_rope_rows(stored, heads), hf)
        np.testing.assert_array_equal(tensor(tensors[f"blk.{l}.attn_v.weight"]),
                                      w[f"model.layers.{l}.self_attn.v_proj.weight"].astype(np.float32))


def test_rope_permutation_is_llama_cpp_permute():
    """Row j of head h in GGUF order is HF row (j // 2) + (j % 2) * D/2: pairs (i, i + D/2) become (2i, 2i + 1)."""
    D, heads = 8, 3
    w = np.arange(heads * D * 2, dtype=np.float64).reshape(heads * D, 2)
    p = permute_rope_rows(w, heads)
    for h in range(heads):
        for j in range(D):
            np.testing.assert_array_equal(p[h * D + j], w[h * D + j // 2 + (j % 2) * D // 2])
    np.testing.assert_array_equal(unpermute_rope_rows(p, heads), w)


def test_vocabulary(ckpt, tmp_path, sp):
    kv, _ = fields(convert(ckpt, tmp_path / "m.gguf", "q8_0", progress=False))
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    scores = kv["tokenizer.ggml.scores"]
    assert kv["tokenizer.ggml.model"] == "llama"
    assert len(toks) == len(types) == len(scores) == sp.get_piece_size() == 512
    assert toks == [sp.id_to_piece(i) for i in range(512)]
    np.testing.assert_allclose(scores, [sp.get_score(i) for i in range(512)], rtol=1e-6)
    assert (toks[0], types[0]) == ("<unk>", 2)
    assert (toks[1], types[1], toks[2], types[2]) == ("<s>", 3, "</s>", 3)
    assert toks.index("<0x41>") == sp.piece_to_id("<0x41>") and types[toks.index("<0x41>")] == 6
    assert sum(t == 6 for t in types) == 256
    assert types[toks.index("<think>")] == 4                        # user-defined symbol
    assert types[toks.index("▁return")] == 1
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.eos_token_id"] == 2
    assert kv["tokenizer.ggml.unknown_token_id"] == 0
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.ggml.add_space_prefix"] is True
    assert kv["tokenizer.chat_template"] == "{{ bos_token }}{{ messages[0].content }}"


def test_vocabulary_padded_to_config_vocab_size(tmp_path):
    src = write_checkpoint(tmp_path / "ck", FixtureConfig(vocab_size=520))
    kv, tensors = fields(convert(src, tmp_path / "m.gguf", "f16", progress=False))
    assert len(kv["tokenizer.ggml.tokens"]) == 520 and kv["blockffn.vocab_size"] == 520
    assert kv["tokenizer.ggml.tokens"][515] == "[PAD515]" and kv["tokenizer.ggml.token_type"][515] == 5
    assert [int(d) for d in tensors["token_embd.weight"].shape] == [64, 520]


def test_tied_head_and_sum_norm(tmp_path):
    cfg = FixtureConfig(tie_word_embeddings=True, norm_after_router="sum", norm_scale=2.0, ffn_type="block",
                        num_key_value_heads=4)
    src = write_checkpoint(tmp_path / "ck", cfg)
    kv, tensors = fields(convert(src, tmp_path / "m.gguf", "q4_0", progress=False))
    assert "output.weight" not in tensors and "blk.0.ffn_router_norm.weight" not in tensors
    assert kv["blockffn.router_norm"] == "sum"
    assert kv["blockffn.router_norm_eps"] == pytest.approx(1e-5)
    assert kv["blockffn.router_norm_scale"] == 2.0
    assert kv["blockffn.attention.head_count_kv"] == 4


def test_rows_not_multiple_of_32_stay_f16(tmp_path, tokens):
    cfg = FixtureConfig(hidden_size=48, dim_model_base=12)
    src = write_checkpoint(tmp_path / "ck", cfg)
    with pytest.warns(ConversionWarning, match="kept F16"):
        out = convert(src, tmp_path / "m.gguf", "q8_0", progress=False)
    _, tensors = fields(out)
    assert tensors["blk.0.ffn_experts.weight"].tensor_type == Q.F16
    assert tensors["blk.0.ffn_router.weight"].tensor_type == Q.F32
    want, _ = BlockFFNRef.from_hf(src).forward(tokens)
    got, _ = BlockFFNGGUFRef.from_gguf(out).forward(tokens)
    assert np.abs(got - want).max() < 5e-3 * np.abs(want).max()


def test_bf16_checkpoint_converts_like_its_f32_twin(tmp_path):
    """The released checkpoints are BF16: the reader widens BF16 exactly."""
    cfg = FixtureConfig()
    w = canonical_weights(cfg, 512)
    rounded = {k: (to_bf16_bits(v).astype(np.uint32) << 16).view(np.float32) for k, v in w.items()}
    a = write_checkpoint(tmp_path / "bf16", cfg, dtype="BF16")
    b = write_checkpoint(tmp_path / "f32", cfg, replace=hf_layout(rounded, cfg))
    _, ta = fields(convert(a, tmp_path / "a.gguf", "f32", progress=False))
    _, tb = fields(convert(b, tmp_path / "b.gguf", "f32", progress=False))
    assert set(ta) == set(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name].data, tb[name].data, err_msg=name)


# --- the converted file computes the checkpoint's function ---------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    FixtureConfig(),
    FixtureConfig(ffn_type="block", norm_after_router="sum", norm_scale=1.5, num_key_value_heads=4),
    FixtureConfig(norm_after_router="none", tie_word_embeddings=True, num_key_value_heads=1, seed=3),
    FixtureConfig(ffn_type="block", num_hidden_layers=3, scale_emb=1.0, dim_model_base=64, scale_depth=1.0, seed=5),
], ids=["linear-rms-gqa", "block-sum-mha", "linear-none-mqa-tied", "block-rms-unscaled"])
@pytest.mark.parametrize("qtype,rel", [("f32", 1e-6), ("f16", 5e-3), ("q8_0", 5e-2)])
def test_gguf_reference_equals_hf_reference(tmp_path, tokens, cfg, qtype, rel):
    src = write_checkpoint(tmp_path / "ck", cfg)
    want, r_want = BlockFFNRef.from_hf(src).forward(tokens)
    got, r_got = BlockFFNGGUFRef.from_gguf(convert(src, tmp_path / "m.gguf", qtype, progress=False)).forward(tokens)
    assert np.abs(got - want).max() <= rel * np.abs(want).max()
    if qtype == "f32":
        np.testing.assert_array_equal(r_got == 0, r_want == 0)
        np.testing.assert_allclose(r_got, r_want, atol=1e-6)


def test_q4_0_weights_are_the_f32_weights_rounded_to_their_block_scale(ckpt, tmp_path, tokens):
    """Q4_0 stores d = max / -8 (max: the block's value of largest magnitude) and q = round(x / d) + 8 clamped to
    0..15: |x - (q - 8) d| <= d/2, except values with x/d in (7.5, 8] which clamp to 7d (error <= d); d is stored as
    F16 (+ 8 * 2^-11 d). Measured: 0.5011 / 1.0017 of |d| at most, mean error 6e-4 |d|, RMS 0.2886 |d| (uniform
    rounding: 1/sqrt(12) = 0.2887). A scale or an offset applied to a tensor before quantizing (a correlation of
    the logits does not see either) moves the mean or the RMS, or breaks the bound."""
    f32 = fields(convert(ckpt, tmp_path / "f32.gguf", "f32", progress=False))[1]
    q4 = fields(convert(ckpt, tmp_path / "q4.gguf", "q4_0", progress=False))[1]
    assert set(q4) == set(f32)
    n_q4 = 0
    for name, t in q4.items():
        x = tensor(f32[name]).reshape(-1, 32) if t.tensor_type == Q.Q4_0 else tensor(f32[name])
        if t.tensor_type != Q.Q4_0:  # norms and the router stay F32
            assert t.tensor_type == Q.F32 and np.array_equal(tensor(t), x), name
            continue
        n_q4 += 1
        raw = np.asarray(t.data, np.uint8).reshape(-1, 18)
        d = raw[:, :2].copy().view(np.float16).astype(np.float64)  # [blocks, 1]: each block's scale, as stored
        d = np.where(d != 0, d, 1.0)
        err = (tensor(t).reshape(-1, 32) - x) / np.abs(d)  # in units of the block's scale
        clamped = x / d > 7.49
        assert np.all(np.abs(err) <= np.where(clamped, 1.0, 0.5) + 1 / 128), (name, np.abs(err).max())
        se = 0.2887 / np.sqrt(err.size)  # standard error of the mean of uniform rounding errors
        assert abs(err.mean()) < 6 * se and abs(np.sqrt(np.mean(err ** 2)) - 0.2887) < 0.03, \
            (name, err.mean(), np.sqrt(np.mean(err ** 2)))
    assert n_q4 == 2 + 2 * 5  # embeddings, head; per layer q, k, v, output, experts
    want, _ = BlockFFNRef.from_hf(ckpt).forward(tokens)
    got, _ = BlockFFNGGUFRef.from_gguf(tmp_path / "q4.gguf").forward(tokens)
    assert np.mean((got - want) ** 2) / np.var(want) < 0.1  # measured 0.039


# --- bad input: a clear ConversionError and no output ---------------------------------------------------------------

def _drop(name):
    return {"drop": (name,)}


BAD = {
    "not BlockFFN (dense)": ({"config_overrides": {"ffn_type": "vanilla"}}, "not a BlockFFN checkpoint"),
    "no ffn_type": ({"config_overrides": {"ffn_type": None}}, "not a BlockFFN checkpoint"),
    "unknown ffn_type": ({"config_overrides": {"ffn_type": "block_sparse"}}, "not a BlockFFN checkpoint"),
    "router_act gelu": ({"config_overrides": {"router_act": "gelu"}}, "router_act"),
    "hidden_act relu": ({"config_overrides": {"hidden_act": "relu"}}, "hidden_act"),
    "unknown router norm": ({"config_overrides": {"norm_after_router": "softmax"}}, "norm_after_router"),
    "unknown attention_type": ({"config_overrides": {"attention_type": "linear"}}, "attention_type"),
    "mla without its ranks": ({"config_overrides": {"attention_type": "mla"}}, "q_lora_rank"),
    "fastmoe layout": ({"config_overrides": {"block_implementation": "fastmoe"}}, "block_implementation"),
    "rope scaling": ({"config_overrides": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, "rope_scaling"),
    "heads do not divide": ({"config_overrides": {"num_attention_heads": 5}}, "inconsistent"),
    "missing num_experts": ({"config_overrides": {"num_experts": None}}, "num_experts"),
    "string hidden_size": ({"config_overrides": {"hidden_size": "64"}}, "wrong type"),
    "missing router": (_drop("model.layers.1.mlp.router_proj.weight"), "missing"),
    "missing router norm": (_drop("model.layers.0.mlp.router_norm.weight"), "router_norm"),
    "missing head": (_drop("lm_head.weight"), "lm_head.weight"),
    "wrong expert shape": ({"replace": {"model.layers.0.mlp.up_proj": np.zeros((8, 16, 64))}}, "shape"),
    "wrong experts count": ({"config_overrides": {"num_experts": 6}}, "shape"),
    "unexpected tensor": ({"replace": {"model.layers.0.mlp.gate_proj.weight": np.zeros((128, 64))}}, "unexpected"),
    "vocab smaller than tokenizer": ({"cfg": FixtureConfig(vocab_size=500)}, "tokenizer"),
    "bos outside vocab": ({"config_overrides": {"bos_token_id": 9999}}, "bos"),
    "NaN weights": ({"replace": {"model.layers.1.mlp.down_proj": np.full((64, 128), np.nan)}}, "NaN"),
    "huge layer count": ({"config_overrides": {"num_hidden_layers": 10**7}}, "num_hidden_layers = 10000000"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_checkpoint_gives_clear_error_and_no_file(tmp_path, case):
    kwargs, match = BAD[case]
    kwargs = dict(kwargs)
    src = write_checkpoint(tmp_path / "ck", kwargs.pop("cfg", FixtureConfig()), **kwargs)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(ConversionError, match=match):
        convert(src, outdir / "m.gguf", "q8_0", progress=False)
    assert no_output_left(outdir, set())


@pytest.mark.parametrize("break_it,match", [
    (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model"),
    (lambda d: (d / "tokenizer.model").write_bytes(b"not a model"), "SentencePiece"),
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "truncated"),
], ids=["no tokenizer", "bad tokenizer", "no config", "bad config", "no weights", "truncated weights"])
def test_broken_folder(tmp_path, break_it, match):
    src = write_checkpoint(tmp_path / "ck", FixtureConfig())
    break_it(src)
    with pytest.raises(ConversionError, match=match):
        convert(src, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()
    assert not list(tmp_path.glob(".m.gguf*"))


def test_not_a_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ConversionError, match="not a folder"):
        convert(f, tmp_path / "m.gguf", progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "m.gguf", progress=False)
    with pytest.raises(ConversionError, match="unsupported output type"):
        convert(tmp_path, tmp_path / "m.gguf", "q5_k", progress=False)


def test_existing_output_is_not_clobbered(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="already exists"):
        convert(ckpt, out, progress=False)
    assert out.read_bytes() == b"precious"
    # a failing conversion with overwrite=True leaves the old file too
    bad = write_checkpoint(tmp_path / "bad", FixtureConfig(), replace={
        "model.layers.1.mlp.down_proj": np.full((64, 128), np.inf)})
    with pytest.raises(ConversionError):
        convert(bad, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"precious"
    assert convert(ckpt, out, overwrite=True, progress=False) == out
    assert fields(out)[0]["general.architecture"] == "blockffn"
    assert no_output_left(tmp_path, {"m.gguf", "bad"})


def test_cli(ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(convert_command, [str(ckpt), str(tmp_path / "m.gguf"), "--type", "f16", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    res = runner.invoke(convert_command, [str(ckpt), str(tmp_path / "m.gguf")])
    assert res.exit_code != 0 and "already exists" in res.output
    res = runner.invoke(convert_command, [str(tmp_path / "m.gguf"), str(tmp_path / "n.gguf")])
    assert res.exit_code != 0 and "not a folder" in res.output and "Traceback" not in res.output


def test_sparrow_convert_command(ckpt, tmp_path):
    from sparrow.cli import sparrow

    res = CliRunner().invoke(sparrow, ["convert", str(ckpt), str(tmp_path / "m.gguf"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert fields(tmp_path / "m.gguf")[0]["general.architecture"] == "blockffn"


def test_python_dash_m(ckpt, tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "sparrow.converters", str(ckpt), str(tmp_path / "m.gguf"), "--type", "q4_0"],
                         check=False, cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert fields(tmp_path / "m.gguf")[1]["blk.0.ffn_experts.weight"].tensor_type == Q.Q4_0


# --- the reference itself -------------------------------------------------------------------------------------------

def test_block_and_block_linear_are_the_same_model(tmp_path, tokens):
    a = write_checkpoint(tmp_path / "a", FixtureConfig(ffn_type="block"))
    b = write_checkpoint(tmp_path / "b", FixtureConfig(ffn_type="block_linear"))
    assert json.loads((a / "config.json").read_text())["ffn_type"] == "block"
    la, ra = BlockFFNRef.from_hf(a).forward(tokens)
    lb, rb = BlockFFNRef.from_hf(b).forward(tokens)
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-12)   # equal up to float64 summation order
    np.testing.assert_allclose(ra, rb, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ra == 0, rb == 0)


def test_fixture_routing_is_sparse_but_not_empty(ckpt, tokens):
    _, r = BlockFFNRef.from_hf(ckpt).forward(tokens)
    assert r.shape == (2, len(tokens), 8)
    assert 0.5 < tls(r) < 0.95
    assert (r > 0).any(axis=(0, 1)).all()          # every expert is used by some token
    assert cls(r, 8) < tls(r)


def test_tls_cls_known_answers():
    r = np.zeros((8, 4))          # [T, E]
    r[0, 0] = r[1, 0] = 0.5       # expert 0 on in tokens 0, 1
    r[2, 1] = 1.0                 # expert 1 on in token 2
    r[5, 2] = r[7, 2] = 2.0       # expert 2 on in tokens 5, 7; expert 3 never
    assert tls(r) == 1 - 5 / 32
    # k=2 chunks {0,1} {2,3} {4,5} {6,7}: active experts 1, 1, 1, 1 of 4 -> 12/16 inactive
    assert cls(r, 2) == 12 / 16
    # k=4 chunks {0..3}: experts 0, 1; {4..7}: expert 2 -> (2 + 3) / 8 inactive
    assert cls(r, 4) == 5 / 8
    assert cls(r, 8) == 1 / 4
    assert cls(r, 3) == (2 + 3) / 8          # {0,1,2}: experts 0, 1; {3,4,5}: expert 2; token 6-7 left out
    assert np.isnan(cls(r, 9))
    layers = np.stack([r, np.ones_like(r)])  # [L, T, E]: a second layer with everything on
    assert tls(layers) == (1 - 5 / 32) / 2 and cls(layers, 4) == 5 / 16
    assert tls(np.zeros((3, 5))) == 1.0 and cls(np.ones((4, 5)), 2) == 0.0


def test_reference_with_every_expert_active_equals_a_dense_model(tmp_path, tokens):
    """With all router scores > 0 the BlockFFN layer is a dense FFN whose hidden units are scaled by their
    expert's score. This forward pass is written independently of the reference: complex-number RoPE on the
    half-split layout, experts as one dense matrix pair, the scalings spelled out."""
    cfg = FixtureConfig(router_lean=-1.0, ffn_type="block", num_key_value_heads=1)
    src = write_checkpoint(tmp_path / "ck", cfg)
    logits, r = BlockFFNRef.from_hf(src).forward(tokens)
    assert (r > 0).all(), "precondition: every expert active for every token"

    w = {k: v.astype(np.float32).astype(np.float64) for k, v in canonical_weights(cfg, 512).items()}  # as stored
    H, E, F, L, NH = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.num_hidden_layers, 4
    D, T, eps = H // NH, len(tokens), cfg.rms_norm_eps

    def norm(x, g):
        return g * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)

    pos = np.arange(T)[:, None] * cfg.rope_theta ** (-np.arange(D // 2) / (D // 2))   # [T, D/2]
    rot = np.exp(1j * pos)[:, None, :]

    def rope(x):  # [T, heads, D], HF layout: pairs (i, i + D/2) as complex numbers
        z = (x[..., : D // 2] + 1j * x[..., D // 2:]) * rot
        return np.concatenate([z.real, z.imag], -1)

    x = w["model.embed_tokens.weight"][tokens] * cfg.scale_emb
    for l in range(L):
        p = f"model.layers.{l}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, NH, D))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, 1, D))[:, 0]        # MQA: one kv head
        v = h @ w[p + "self_attn.v_proj.weight"].T                                       # [T, D]
        out = np.zeros((T, NH, D))
        for t in range(T):
            s = np.einsum("nd,sd->ns", q[t], k[: t + 1]) / np.sqrt(D)
            a = np.exp(s - s.max(1, keepdims=True))
            out[t] = (a / a.sum(1, keepdims=True)) @ v[: t + 1]
        x = x + cfg.scale_depth / np.sqrt(L) * out.reshape(T, H) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        score = np.maximum(h @ w[p + "mlp.router_proj.weight"].T, 0)
        score = norm(score, w[p + "mlp.router_norm.weight"])                              # rms over experts
        up = w[p + "mlp.up_proj"].reshape(E * F, H)                                       # dense [E*F, H]
        down = np.concatenate(list(w[p + "mlp.down_proj"]), axis=1)                       # dense [H, E*F]
        a = up @ h.T                                                                      # [E*F, T]
        a = a / (1 + np.exp(-a)) * np.repeat(score.T, F, axis=0)
        x = x + cfg.scale_depth / np.sqrt(L) * (down @ a).T
    dense = norm(x, w["model.norm.weight"]) * cfg.dim_model_base / H @ w["lm_head.weight"].T
    np.testing.assert_allclose(logits, dense, rtol=0, atol=1e-10)


def test_rmsnorm_of_all_zero_router_is_zero():
    assert not rmsnorm(np.zeros((2, 8)), np.ones(8), 1e-5).any()


def test_sharded_checkpoint_converts_like_the_single_file(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "sharded"
    src.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (src / name).write_bytes((ckpt / name).read_bytes())
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(src / file))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    _, a = fields(convert(ckpt, tmp_path / "a.gguf", "f16", progress=False))
    _, b = fields(convert(src, tmp_path / "b.gguf", "f16", progress=False))
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name].data, b[name].data, err_msg=name)


def test_streamed_gguf_leaves_either_the_whole_file_or_nothing(tmp_path):
    """converters.gguf_out.streamed_gguf (the converter's and the synthetic models' writer): a failure while the
    tensors are written leaves no file and no temporary behind, and an existing file untouched; a success gives a
    readable file with the permissions of a new file."""
    import os

    import gguf
    import numpy as np
    from sparrow.converters.gguf_out import streamed_gguf

    def writer():
        w = gguf.GGUFWriter(None, "llama")
        w.add_tensor_info("t", (4,), np.dtype(np.float32), 16)
        return w

    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(KeyboardInterrupt), streamed_gguf(writer(), out):
        raise KeyboardInterrupt
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with pytest.raises(RuntimeError, match="refused"):
        w = writer()
        with streamed_gguf(w, out, before_replace=lambda: (_ for _ in ()).throw(RuntimeError("refused"))):
            w.write_tensor_data(np.arange(4, dtype=np.float32))
    assert out.read_bytes() == b"precious" and len(list(tmp_path.iterdir())) == 1
    out.unlink()
    w = writer()
    with streamed_gguf(w, out):
        w.write_tensor_data(np.arange(4, dtype=np.float32))
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask
    assert gguf.GGUFReader(str(out)).tensors[0].data.tolist() == [0.0, 1.0, 2.0, 3.0]


def _edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with edit(header) -> new header (the data stays as it is)."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


@pytest.mark.parametrize("edit,match", [
    (lambda h: [h], "must be a JSON object"),
    (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": ["0", "4"]}}, "non-negative integers"),
    (lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [-1, 4]}}, "non-negative integers"),
    (lambda h: {**h, "huge": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, "disagree"),
], ids=["list header", "string offsets", "negative dim", "2^64 elements in 0 bytes"])
def test_hostile_safetensors_headers(tmp_path, edit, match):
    """Headers from strangers (issue 13): a clear ConversionError, never a traceback or a wrapped size check."""
    src = write_checkpoint(tmp_path / "ck", FixtureConfig())
    _edit_header(src / "model.safetensors", edit)
    with pytest.raises(ConversionError, match=match):
        convert(src, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_sharded_index_names_only_files_beside_it(tmp_path):
    import json

    src = write_checkpoint(tmp_path / "ck", FixtureConfig())
    for target in ("../../etc/passwd", 7):
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": target}}))
        with pytest.raises(ConversionError, match="only files beside the index"):
            convert(src, tmp_path / "m.gguf", progress=False)
