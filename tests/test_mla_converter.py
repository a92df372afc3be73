"""BlockFFN with multi-head latent attention (attention_type "mla", the released checkpoints): the converter's MLA
layout (docs/gguf-blockffn.md, "Multi-head latent attention") and the numpy reference's two readings of it.

Random checkpoints in the official MLAAttention layout (tests/blockffn_fixture.py) convert, and the GGUF-file
reference (BlockFFNGGUFRef, the document's function) reproduces the HF-checkpoint reference (BlockFFNRef, the official
code's function) on a 12-token prompt. Logits NMSE against the HF reference, measured over 32 random checkpoints
(16 seeds x the two fixture sizes below; block / block_linear, tied / untied, every router norm), max (mean):
F32 1.9e-14 (2.1e-15: the f32 metadata scalars), F16 8.1e-7 (2.2e-7), Q8_0 3.4e-4 (1.3e-4), Q4_0 0.061 (0.026;
kv_a_mqa and v_b stored Q8_0 as the converter decides). Bounds: F32 1e-10, F16 4e-6, Q8_0 2e-3, Q4_0 0.2 (its
weights are also checked one by one against the F32 conversion).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from blockffn_fixture import FixtureConfig, canonical_weights, tokenizer_model, write_checkpoint
from gguf import GGUFReader
from gguf.quants import dequantize
from reference.blockffn import BlockFFNGGUFRef, BlockFFNRef
from sparrow.converters import ConversionError
from sparrow.converters.blockffn import ConversionWarning, convert, permute_rope_tail

Q = gguf.GGMLQuantizationType
PROMPT = "import os\nfor line in open(path):\n    print(line.strip())  # été"
# Every MLA matrix's rows a multiple of 32, so Q8_0 / Q4_0 quantize all of them (the default fixture's DN = 16 rows
# of attn_k_b stay F16).
X32 = {"hidden_size": 128, "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16}
MLA_ATTENTION = ("attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b",
                 "attn_v_b", "attn_output")


def mla(**kw) -> FixtureConfig:
    return FixtureConfig(attention_type="mla", **kw)


CASES = {
    "small-linear-rms-untied": mla(),
    "small-block-sum-tied": mla(ffn_type="block", norm_after_router="sum", tie_word_embeddings=True, seed=1),
    "x32-linear-none-tied": mla(**X32, norm_after_router="none", tie_word_embeddings=True, seed=2),
    "x32-block-rms-untied-3layers": mla(**X32, ffn_type="block", num_hidden_layers=3, seed=3),
    "x32-linear-rms-untied-2heads": mla(**{**X32, "hidden_size": 64}, num_attention_heads=2, dim_model_base=8,
                                        seed=4),
}
NMSE_BOUND = {"f32": 1e-10, "f16": 4e-6, "q8_0": 2e-3, "q4_0": 0.2}


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    import sentencepiece as spm

    return ([1] + spm.SentencePieceProcessor(model_file=str(tokenizer_model())).encode(PROMPT))[:12]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("mla") / "tiny-mla", mla(**X32))


def fields(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(str(path))
    return {k: v.contents() for k, v in r.fields.items()}, {t.name: t for t in r.tensors}


def tensor(t) -> np.ndarray:
    return dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).astype(np.float64)


def ne(t) -> list[int]:
    return [int(d) for d in t.shape]


def nmse(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean((got - want) ** 2) / np.var(want))


def quiet_convert(src, out, qtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)  # small fixtures: attn_k_b rows (DN = 16) stay F16
        return convert(src, out, qtype, progress=False)


# --- the file: metadata, tensor set, shapes, types ----------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_mla_metadata_and_tensors(ckpt, tmp_path, qtype):
    kv, tensors = fields(convert(ckpt, tmp_path / "m.gguf", qtype, progress=False))
    H, NH, QL, KL, DN, DR = 128, 4, 64, 64, 32, 16
    DV, DK, E, F = H // NH, DN + DR, 8, 16
    expect = {"attention.type": "mla", "attention.head_count": NH, "attention.head_count_kv": NH,
              "attention.q_lora_rank": QL, "attention.kv_lora_rank": KL, "attention.key_length": DK,
              "attention.value_length": DV, "rope.dimension_count": DR, "embedding_length": H,
              "feed_forward_length": E * F}
    for k, v in expect.items():
        assert kv["blockffn." + k] == v, k
    assert kv["blockffn.attention.lora_norm_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert kv["blockffn.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)

    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for l in range(2):
        names |= {f"blk.{l}.{n}.weight" for n in (*MLA_ATTENTION, "ffn_norm", "ffn_router", "ffn_router_norm",
                                                  "ffn_experts")}
    assert set(tensors) == names
    shapes = {"attn_q_a": [H, QL], "attn_q_a_norm": [QL], "attn_q_b": [QL, NH * DK], "attn_kv_a_mqa": [H, KL + DR],
              "attn_kv_a_norm": [KL], "attn_k_b": [DN, KL, NH], "attn_v_b": [KL, DV, NH],
              "attn_output": [NH * DV, H]}  # GGUF ne order
    for n, shape in shapes.items():
        assert ne(tensors[f"blk.1.{n}.weight"]) == shape, n

    q = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    for name, t in tensors.items():
        if name.endswith(("_norm.weight", "ffn_router.weight")):
            want = Q.F32
        elif qtype == "q4_0" and name.endswith(("attn_kv_a_mqa.weight", "attn_v_b.weight")):
            want = Q.Q8_0  # MLA's value path (converters/blockffn.py, _matrix_qtype)
        else:
            want = q
        assert t.tensor_type == want, name


def test_gqa_files_carry_no_attention_type(tmp_path):
    """MLA adds keys; a GQA file stays as it was (absent attention.type = "gqa")."""
    kv, tensors = fields(convert(write_checkpoint(tmp_path / "ck", FixtureConfig()), tmp_path / "m.gguf", "f16",
                                 progress=False))
    assert not any(k.startswith(("blockffn.attention.type", "blockffn.attention.q_lora", "blockffn.attention.kv_lora",
                                 "blockffn.attention.key_length", "blockffn.attention.lora")) for k in kv)
    assert "blk.0.attn_q.weight" in tensors and "blk.0.attn_q_a.weight" not in tensors


def test_mla_tensors_are_the_checkpoint_rearranged(ckpt, tmp_path):
    """Each stored tensor against the HF weights, index by index: q_b's per-head rope rows and kv_a's last DR rows
    in adjacent-pair order (stored row j of a rope group = HF row j//2 + (j%2)*DR/2), kv_b split into k_b (W_UK
    transposed per head) and v_b (W_UV per head), everything else as it was."""
    cfg = mla(**X32)
    _, tensors = fields(convert(ckpt, tmp_path / "m.gguf", "f32", progress=False))
    w = {k: v.astype(np.float32) for k, v in canonical_weights(cfg, 512).items()}
    NH, KL, DN, DR, DV = 4, 64, 32, 16, 32
    DK = DN + DR
    for l in range(2):
        p, g = f"model.layers.{l}.self_attn.", f"blk.{l}."
        t = {n: tensor(tensors[g + n + ".weight"]) for n in MLA_ATTENTION if n != "attn_norm"}
        np.testing.assert_array_equal(t["attn_q_a"], w[p + "q_a_proj.weight"])
        np.testing.assert_array_equal(t["attn_q_a_norm"], w[p + "q_a_layernorm.weight"])
        np.testing.assert_array_equal(t["attn_kv_a_norm"], w[p + "kv_a_layernorm.weight"])
        np.testing.assert_array_equal(t["attn_output"], w[p + "o_proj.weight"])
        q_b, kv_a, kv_b = w[p + "q_b_proj.weight"], w[p + "kv_a_proj_with_mqa.weight"], w[p + "kv_b_proj.weight"]
        for h in range(NH):
            for j in range(DK):
                src = j if j < DN else DN + (j - DN) // 2 + ((j - DN) % 2) * DR // 2
                np.testing.assert_array_equal(t["attn_q_b"][h * DK + j], q_b[h * DK + src])
        for j in range(KL + DR):
            src = j if j < KL else KL + (j - KL) // 2 + ((j - KL) % 2) * DR // 2
            np.testing.assert_array_equal(t["attn_kv_a_mqa"][j], kv_a[src])
        for h in range(NH):
            rows = kv_b[h * (DN + DV): (h + 1) * (DN + DV)]
            np.testing.assert_array_equal(t["attn_k_b"][h], rows[:DN].T)      # [KL, DN]
            np.testing.assert_array_equal(t["attn_v_b"][h], rows[DN:])        # [DV, KL]


def test_permute_rope_tail():
    groups, size, dr = 3, 7, 4
    w = np.arange(groups * size * 2, dtype=np.float64).reshape(groups * size, 2)
    p = permute_rope_tail(w, groups, dr)
    for g in range(groups):
        for j in range(size):
            i = j - (size - dr)
            src = j if i < 0 else size - dr + i // 2 + (i % 2) * dr // 2
            np.testing.assert_array_equal(p[g * size + j], w[g * size + src])
    assert not np.shares_memory(p, w)


def test_rows_not_multiple_of_32_stay_f16(tmp_path):
    src = write_checkpoint(tmp_path / "ck", mla())  # DN = 16: attn_k_b rows
    with pytest.warns(ConversionWarning, match="attn_k_b.weight kept F16"):
        out = convert(src, tmp_path / "m.gguf", "q4_0", progress=False)
    _, tensors = fields(out)
    assert tensors["blk.0.attn_k_b.weight"].tensor_type == Q.F16
    assert tensors["blk.0.attn_q_b.weight"].tensor_type == Q.Q4_0       # rows QL = 32
    assert tensors["blk.0.attn_v_b.weight"].tensor_type == Q.Q8_0       # rows KL = 32, the value path


# --- the converted file computes the checkpoint's function --------------------------------------------------------

@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_reference_equals_hf_reference(tmp_path, tokens, case, qtype):
    cfg = CASES[case]
    src = write_checkpoint(tmp_path / "ck", cfg)
    assert json.loads((src / "config.json").read_text())["attention_type"] == "mla"
    want, r_want = BlockFFNRef.from_hf(src).forward(tokens)
    got, r_got = BlockFFNGGUFRef.from_gguf(quiet_convert(src, tmp_path / "m.gguf", qtype)).forward(tokens)
    assert nmse(got, want) < NMSE_BOUND[qtype], nmse(got, want)
    if qtype == "f32":
        np.testing.assert_array_equal(r_got == 0, r_want == 0)
        np.testing.assert_allclose(r_got, r_want, atol=1e-6)


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_absorbed_and_expanded_forms_agree(ckpt, tmp_path, tokens, qtype):
    """The two forms of docs/gguf-blockffn.md's MLA are one function: equal at float64 on any file's weights."""
    ref = BlockFFNGGUFRef.from_gguf(convert(ckpt, tmp_path / "m.gguf", qtype, progress=False))
    assert ref.mla_absorbed
    absorbed, r_abs = ref.forward(tokens)
    expanded, r_exp = dataclasses.replace(ref, mla_absorbed=False).forward(tokens)
    assert nmse(absorbed, expanded) < 1e-24
    np.testing.assert_allclose(absorbed, expanded, rtol=0, atol=1e-12 * np.abs(expanded).max())
    np.testing.assert_array_equal(r_abs == 0, r_exp == 0)


def test_runtime_rounding_rounds_the_latent_cache(ckpt, tmp_path, tokens):
    """runtime_rounding on an F32 file touches only what the runtime holds in F16, the latent cache (c, rotated k_pe;
    the absorbed query stays float32 as in the runtime): a small, nonzero change; with quantized weights the
    activations entering quantized matmuls (k_b's and v_b's too) are rounded to 8-bit blocks as well."""
    f32 = convert(ckpt, tmp_path / "f32.gguf", "f32", progress=False)
    plain, _ = BlockFFNGGUFRef.from_gguf(f32).forward(tokens)
    rounded = BlockFFNGGUFRef.from_gguf(f32, runtime_rounding=True)
    assert rounded.kv_f16 and not rounded.q8_inputs
    e = nmse(rounded.forward(tokens)[0], plain)
    assert 1e-12 < e < 1e-7, e                                                       # measured 8.4e-9
    q8 = convert(ckpt, tmp_path / "q8.gguf", "q8_0", progress=False)
    r8 = BlockFFNGGUFRef.from_gguf(q8, runtime_rounding=True)
    assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight", "blk.0.attn_q_a.weight"} <= r8.q8_inputs
    e8 = nmse(r8.forward(tokens)[0], BlockFFNGGUFRef.from_gguf(q8).forward(tokens)[0])
    assert e < e8 < 5e-4, e8                                                         # measured 6.5e-5


def test_q4_0_weights_are_the_f32_weights_rounded(ckpt, tmp_path):
    """In a q4_0 MLA file every quantized weight is its F32 value rounded within its block's step: Q4_0 to half of
    d = max/-8 (one d where the quantizer clamps at +7), Q8_0 (kv_a_mqa, v_b) to half of d = amax/127."""
    f32 = fields(convert(ckpt, tmp_path / "f32.gguf", "f32", progress=False))[1]
    q4 = fields(convert(ckpt, tmp_path / "q4.gguf", "q4_0", progress=False))[1]
    seen = set()
    for name, t in q4.items():
        x = tensor(f32[name])
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(tensor(t), x)
            continue
        seen.add((name.split(".")[-2], t.tensor_type.name))
        x = x.reshape(-1, 32)
        err = tensor(t).reshape(-1, 32) - x
        if t.tensor_type == Q.Q4_0:
            d = np.asarray(t.data, np.uint8).reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float64)
            d = np.where(d != 0, d, 1.0)
            bound = np.where(x / d > 7.49, 1.0, 0.5) * np.abs(d) * (1 + 1 / 128)  # + the F16 rounding of d
        else:
            assert t.tensor_type == Q.Q8_0, name
            d = np.asarray(t.data, np.uint8).reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float64)
            bound = (0.5 + 127 / 2048 + 1e-3) * np.abs(d)  # q = round(x / d) with d = amax / 127, stored F16
        assert np.all(np.abs(err) <= bound + 1e-12), name
    assert {(n, "Q4_0") for n in ("attn_q_a", "attn_q_b", "attn_k_b", "attn_output", "ffn_experts")} <= seen
    assert {(n, "Q8_0") for n in ("attn_kv_a_mqa", "attn_v_b")} <= seen


def test_hf_reference_mla_against_a_token_loop(tmp_path, tokens):
    """BlockFFNRef's MLA written once more, token by token and head by head with a growing cache of full keys and
    values (as MLAAttention with a DynamicCache), RoPE as complex numbers on the half-split layout."""
    cfg = mla(**X32, seed=6)
    ref = BlockFFNRef.from_hf(write_checkpoint(tmp_path / "ck", cfg))
    w = ref.weights
    NH, KL, DN, DR, DV, T = 4, 64, 32, 16, 32, len(tokens)
    x = np.random.default_rng(0).standard_normal((T, cfg.hidden_size))

    def norm(v, g):
        return g * v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6)

    def rope(v, t):  # [..., DR], HF layout: pairs (i, i + DR/2)
        theta = t * cfg.rope_theta ** (-np.arange(DR // 2) / (DR // 2))
        z = (v[..., : DR // 2] + 1j * v[..., DR // 2:]) * np.exp(1j * theta)
        return np.concatenate([z.real, z.imag], -1)

    p = "model.layers.0.self_attn."
    keys, values, out = [], [], np.zeros((T, cfg.hidden_size))
    for t in range(T):
        q = (norm(w[p + "q_a_proj.weight"] @ x[t], w[p + "q_a_layernorm.weight"]) @ w[p + "q_b_proj.weight"].T)
        q = q.reshape(NH, DN + DR)
        a = w[p + "kv_a_proj_with_mqa.weight"] @ x[t]
        kv = (w[p + "kv_b_proj.weight"] @ norm(a[:KL], w[p + "kv_a_layernorm.weight"])).reshape(NH, DN + DV)
        k_pe = rope(a[KL:], t)
        keys.append([np.concatenate([kv[h, :DN], k_pe]) for h in range(NH)])
        values.append([kv[h, DN:] for h in range(NH)])
        o = []
        for h in range(NH):
            qh = np.concatenate([q[h, :DN], rope(q[h, DN:], t)])
            s = np.array([qh @ keys[s][h] for s in range(t + 1)]) / np.sqrt(DN + DR)
            a_h = np.exp(s - s.max())
            o.append(sum(a_h[s] * values[s][h] for s in range(t + 1)) / a_h.sum())
        out[t] = w[p + "o_proj.weight"] @ np.concatenate(o)
    np.testing.assert_allclose(ref.mla(x, "model.layers.0."), out, rtol=0, atol=1e-12 * np.abs(out).max())


# --- bad input: a clear ConversionError and nothing written -------------------------------------------------------

A = "model.layers.1.self_attn."
BAD = {
    "missing q_a_proj": ({"drop": (A + "q_a_proj.weight",)}, "missing.*q_a_proj"),
    "missing q_a_layernorm": ({"drop": (A + "q_a_layernorm.weight",)}, "missing.*q_a_layernorm"),
    "missing q_b_proj": ({"drop": (A + "q_b_proj.weight",)}, "missing.*q_b_proj"),
    "missing kv_a_proj_with_mqa": ({"drop": (A + "kv_a_proj_with_mqa.weight",)}, "missing.*kv_a_proj_with_mqa"),
    "missing kv_a_layernorm": ({"drop": (A + "kv_a_layernorm.weight",)}, "missing.*kv_a_layernorm"),
    "missing kv_b_proj": ({"drop": (A + "kv_b_proj.weight",)}, "missing.*kv_b_proj"),
    "missing o_proj": ({"drop": (A + "o_proj.weight",)}, "missing.*o_proj"),
    "q_b_proj rows": ({"replace": {A + "q_b_proj.weight": np.zeros((4 * 20, 32))}}, "q_b_proj.weight has shape"),
    "q_a_proj cols": ({"replace": {A + "q_a_proj.weight": np.zeros((32, 48))}}, "q_a_proj.weight has shape"),
    "kv_a without the rope key": ({"replace": {A + "kv_a_proj_with_mqa.weight": np.zeros((32, 64))}},
                                  "kv_a_proj_with_mqa.weight has shape"),
    "kv_b_proj with 24-dim values": ({"replace": {A + "kv_b_proj.weight": np.zeros((4 * (16 + 24), 32))}},
                                     "kv_b_proj.weight has shape"),
    "kv_a_layernorm size": ({"replace": {A + "kv_a_layernorm.weight": np.ones(40)}}, "kv_a_layernorm.weight has"),
    "o_proj shape": ({"replace": {A + "o_proj.weight": np.zeros((64, 48))}}, "o_proj.weight has shape"),
    "gqa tensors too": ({"replace": {A + "q_proj.weight": np.zeros((64, 64))}}, "unexpected"),
    "q_lora_rank 0": ({"config_overrides": {"q_lora_rank": 0}}, "q_lora_rank"),
    "q_lora_rank missing": ({"config_overrides": {"q_lora_rank": None}}, "q_lora_rank .* missing"),
    "kv_lora_rank 0": ({"config_overrides": {"kv_lora_rank": 0}}, "kv_lora_rank"),
    "kv_lora_rank negative": ({"config_overrides": {"kv_lora_rank": -32}}, "kv_lora_rank"),
    "kv_lora_rank a string": ({"config_overrides": {"kv_lora_rank": "32"}}, "wrong type"),
    "qk_nope_head_dim 0": ({"config_overrides": {"qk_nope_head_dim": 0}}, "qk_nope_head_dim"),
    "qk_rope_head_dim 0": ({"config_overrides": {"qk_rope_head_dim": 0}}, "qk_rope_head_dim"),
    "qk_rope_head_dim odd": ({"config_overrides": {"qk_rope_head_dim": 7}}, "qk_rope_head_dim = 7 is odd"),
    "rope_scaling": ({"config_overrides": {"rope_scaling": {"type": "dynamic", "factor": 2.0}}}, "rope_scaling"),
    "v_head_dim mismatch": ({"config_overrides": {"v_head_dim": 32}}, "v_head_dim = 32"),
    "heads do not divide hidden": ({"config_overrides": {"num_attention_heads": 5}}, "not a multiple"),
    "ranks disagree with weights": ({"config_overrides": {"kv_lora_rank": 48}}, "has shape"),
    "unknown attention_type": ({"config_overrides": {"attention_type": "linear"}}, "attention_type"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_mla_checkpoint_gives_clear_error_and_no_file(tmp_path, case):
    kwargs, match = BAD[case]
    src = write_checkpoint(tmp_path / "ck", mla(), **kwargs)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(ConversionError, match=match):
        convert(src, outdir / "m.gguf", "q8_0", progress=False)
    assert list(outdir.iterdir()) == []


def test_v_head_dim_absent_or_equal_is_accepted(tmp_path):
    for i, v in enumerate((None, 16)):
        src = write_checkpoint(tmp_path / f"ck{i}", mla(), config_overrides={"v_head_dim": v})
        assert fields(quiet_convert(src, tmp_path / f"m{i}.gguf", "f16"))[0]["blockffn.attention.value_length"] == 16


def test_gqa_checkpoint_labelled_mla_is_refused(tmp_path):
    """A vanilla-attention checkpoint whose config says mla: the MLA tensors are missing, the GQA ones unexpected."""
    src = write_checkpoint(tmp_path / "ck", FixtureConfig(), config_overrides={
        "attention_type": "mla", "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8})
    with pytest.raises(ConversionError, match="missing.*q_a_proj.*attention_type 'mla'"):
        convert(src, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()
