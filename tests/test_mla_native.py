"""Multi-head latent attention (the released BlockFFN checkpoints' attention) in the native runtime: logits against the
numpy references (the HF reading and the GGUF reading), batches against token-by-token decoding, the latent KV cache
(its size, truncate and keep), tree verification, and MLA files whose metadata lies.

Shape legend: T = tokens, H = hidden, NH = heads, QL / KL = q / kv latent ranks, DN / DR = nope / rope dims.

Tolerances (NMSE = mean squared error / variance of the reference):
- Every file vs BlockFFNGGUFRef rounding as the runtime does (the latent cache c, k_pe at F16; 8-bit activation blocks
  for quantized weights): only float32 arithmetic is left: NMSE < 1e-9 (measured ~1e-11 at F32).
- F32 files vs BlockFFNRef (the HF checkpoint in float64, the expanded form, no rounding): the F16 latent cache is the
  whole difference, NMSE < 2e-5 (measured 1.2e-6 .. 7.9e-6 on these fixtures; rounding only c accounts for ~99% of it:
  c is both every head's key and its value, where GQA's F16 cache of the same fixtures measures ~1e-8).
- Q8_0 / Q4_0 files vs BlockFFNGGUFRef without rounding: 8-bit activations: NMSE < 2e-4.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from blockffn_fixture import FixtureConfig, write_checkpoint
from reference.blockffn import BlockFFNGGUFRef, BlockFFNRef
from sparrow.converters.blockffn import convert
from sparrow.runtime import Model, SparrowError
from test_blockffn_native import TOKENS, nmse, rewrite, runtime_down_i8


def mla_config(**kw) -> FixtureConfig:
    base = {"attention_type": "mla", "hidden_size": 64, "num_attention_heads": 4, "q_lora_rank": 32,
            "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8}
    return FixtureConfig(**(base | kw))


# The released ranks scaled down with every matmul row a multiple of 32, so Q8_0 / Q4_0 files really quantize them.
QUANTIZABLE = {"hidden_size": 128, "num_attention_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 64,
               "qk_nope_head_dim": 32, "qk_rope_head_dim": 16}


def build(tmp: Path, cfg: FixtureConfig, qtype: str = "f32") -> tuple[Path, Path]:
    folder = write_checkpoint(tmp / "ckpt", cfg)
    return folder, convert(folder, tmp / f"m-{qtype}.gguf", qtype, progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ffn_type", ["block", "block_linear"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_f32_logits_match_hf_reference(tmp_path, seed, ffn_type, tied):
    """One batch and token by token, against the official computation (expanded MLA, rotate-half RoPE)."""
    folder, path = build(tmp_path, mla_config(seed=seed, ffn_type=ffn_type, tie_word_embeddings=tied))
    ref, _ = BlockFFNRef.from_hf(folder).forward(TOKENS)
    rounded, _ = BlockFFNGGUFRef.from_gguf(path, runtime_rounding=True, down_i8=runtime_down_i8()).forward(TOKENS)
    assert nmse(BlockFFNGGUFRef.from_gguf(path).forward(TOKENS)[0], ref) < 1e-10  # the file is the checkpoint
    with Model(path) as m:
        with m.session(n_ctx=64, n_threads=2) as s:
            batch = s.eval(TOKENS, logits="all")
        with m.session(n_ctx=64, n_threads=1) as s:
            single = np.concatenate([s.eval([t], logits="all") for t in TOKENS])
    for ours in (batch, single):
        print(f"nmse {nmse(ours, rounded):.1e} vs the runtime's rounding, {nmse(ours, ref):.1e} vs the checkpoint")
        assert nmse(ours, rounded) < 1e-9
        assert nmse(ours, ref) < 2e-5
    # with an F32 latent cache nothing is rounded: float32 arithmetic against the float64 checkpoint
    with Model(path) as m:
        with m.session(n_ctx=64, n_threads=2, kv_type="f32") as s:
            batch = s.eval(TOKENS, logits="all")
        with m.session(n_ctx=64, n_threads=1, kv_type="f32") as s:
            single = np.concatenate([s.eval([t], logits="all") for t in TOKENS])
    for ours in (batch, single):
        print(f"F32 cache: nmse {nmse(ours, ref):.1e} vs the checkpoint")
        assert nmse(ours, ref) < 1e-6


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_quantized_logits_match_gguf_reference(tmp_path, qtype):
    _, path = build(tmp_path, mla_config(seed=4, **QUANTIZABLE), qtype)
    rounded, _ = BlockFFNGGUFRef.from_gguf(path, runtime_rounding=True, down_i8=runtime_down_i8()).forward(TOKENS)
    plain, _ = BlockFFNGGUFRef.from_gguf(path).forward(TOKENS)
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
        ours = s.eval(TOKENS, logits="all")
    rows = np.array([nmse(ours[i], rounded[i]) for i in range(len(TOKENS))])
    print(f"{qtype}: nmse {nmse(ours, plain):.2e}, {nmse(ours, rounded):.2e} with the runtime's rounding; rows {rows}")
    # Only float32 arithmetic is left, except that float32 vs float64 can decide an 8-bit rounding tie of one
    # activation differently (MLA quantizes three more inputs per layer than GQA): then that token's row, and the later
    # ones that attend to it, move by about one quantum. Most rows stay exact, and none moves further.
    assert np.mean(rows < 1e-9) >= 0.6 and rows.max() < 1e-3
    assert nmse(ours, plain) < 2e-4 if qtype != "f16" else nmse(ours, plain) < 2e-5


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_heads_split_over_any_thread_count(tmp_path, qtype):
    """The per-head phase (attn_mla.c) gives each thread whole heads, from the query to its slice of the output, with
    the per-head weights packed head by head where the tier packs the type: 4 heads on 1, 3 (2 + 1 + 1), 4 and 6
    threads (two without a head) match the reference that rounds as the runtime does, in one batch and token by
    token (the criteria of the two tests above)."""
    _, path = build(tmp_path, mla_config(seed=6, **QUANTIZABLE), qtype)
    rounded, _ = BlockFFNGGUFRef.from_gguf(path, runtime_rounding=True, down_i8=runtime_down_i8()).forward(TOKENS)
    with Model(path) as m:
        for threads in (1, 3, 4, 6):
            with m.session(n_ctx=64, n_threads=threads) as s:
                batch = s.eval(TOKENS, logits="all")
            with m.session(n_ctx=64, n_threads=threads) as s:
                single = np.concatenate([s.eval([t], logits="all") for t in TOKENS])
            for ours in (batch, single):
                rows = np.array([nmse(ours[i], rounded[i]) for i in range(len(TOKENS))])
                if qtype == "f32":
                    assert rows.max() < 1e-9, (threads, rows)
                else:
                    assert np.mean(rows < 1e-9) >= 0.6 and rows.max() < 1e-3, (threads, rows)


def test_batches_over_a_growing_cache_match_one_pass(tmp_path):
    """Batches of 1..7 tokens over the latent cache give the logits of one causal pass."""
    _, path = build(tmp_path, mla_config(seed=5))
    with Model(path) as m:
        with m.session(n_ctx=64, n_threads=2) as s:
            whole = s.eval(TOKENS, logits="all")
        with m.session(n_ctx=64, n_threads=2) as s:
            rows, i, n = [], 0, 1
            while i < len(TOKENS):
                rows.append(s.eval(TOKENS[i:i + n], logits="all"))
                i, n = i + n, n % 7 + 1
    np.testing.assert_allclose(np.concatenate(rows), whole, rtol=0, atol=2e-4 * np.abs(whole).max())


def test_latent_cache_size(tmp_path):
    """Per token and layer the cache holds KL + DR F16 values, not NH * (DK + DV) keys and values; F32 on request."""
    cfg = mla_config()
    _, path = build(tmp_path, cfg)
    per_token_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    for kv_type, size in (("f16", 2), ("f32", 4)):
        with Model(path) as m, m.session(n_ctx=96, n_threads=1, kv_type=kv_type) as s:
            mem = s.memory()
            assert m.session_memory(n_ctx=96, n_threads=1, kv_type=kv_type) == mem
        assert mem.kv_cache_bytes == cfg.num_hidden_layers * 96 * per_token_layer * size


def test_f32_cache_is_refused_for_grouped_query_attention(tmp_path):
    _, path = build(tmp_path, FixtureConfig())
    with Model(path) as m:
        with pytest.raises(SparrowError, match="F32 KV cache is implemented for multi-head latent attention only"):
            m.session(n_ctx=16, kv_type="f32")
        with pytest.raises(ValueError, match="kv_type must be one of f16, f32"):
            m.session(n_ctx=16, kv_type="q8")
        from sparrow.runtime import _sparrow
        with pytest.raises(SparrowError, match="kv_type must be"):
            _sparrow.Session(m._m, 16, 8, 1, 0, 7)


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_truncate_and_keep(tmp_path, kv_type):
    """Rollback and compaction move latent rows: the logits after them are those of the kept tokens alone."""
    _, path = build(tmp_path, mla_config(seed=6))
    prefix, junk, tail = TOKENS[:6], TOKENS[6:10], TOKENS[10:14]
    with Model(path) as m, m.session(n_ctx=64, n_threads=2, kv_type=kv_type) as s:
        want = s.eval(prefix + tail, logits="all")[len(prefix):]
        s.truncate(0)
        s.eval(prefix + junk, logits="none")
        s.truncate(len(prefix))
        got_truncate = s.eval(tail, logits="all")
        s.truncate(0)
        # a tree's sibling rows between the kept ones: keep() compacts the cache to the kept slots
        s.eval(prefix[:3] + junk[:2] + prefix[3:], pos=[0, 1, 2, 3, 4, 3, 4, 5], logits="none",
               mask=np.tril(np.ones((8, 8), np.uint8)) * np.array([1, 1, 1, 0, 0, 1, 1, 1], np.uint8)
               + np.diag([0, 0, 0, 1, 1, 0, 0, 0]).astype(np.uint8))
        s.keep([0, 1, 2, 5, 6, 7])
        got_keep = s.eval(tail, logits="all")
    scale = np.abs(want).max()
    np.testing.assert_allclose(got_truncate, want, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got_keep, want, rtol=0, atol=1e-4 * scale)


def test_tree_verified_greedy_equals_plain_greedy(tmp_path):
    """Speculative decoding with a drafted token tree on an MLA model gives plain greedy decoding's tokens."""
    from sparrow.runtime.drafters import Hybrid
    from sparrow.runtime.speculative import SpecStats, speculative_tokens

    _, path = build(tmp_path, mla_config(seed=8, num_hidden_layers=2))
    prompt = [1, 5, 100, 260, 5, 100, 260, 5, 100]
    with Model(path) as m:
        with m.session(n_ctx=128, n_threads=2) as s:
            plain, toks = [], list(prompt)
            logits = s.eval(toks, logits="last")
            for _ in range(40):
                t = int(np.argmax(logits))
                plain.append(t)
                logits = s.eval([t], logits="last")
        with m.session(n_ctx=128, n_threads=2) as s:
            stats = SpecStats()
            spec = list(speculative_tokens(s, prompt, Hybrid(m.info.n_vocab), max_tokens=40, stats=stats,
                                           stop_at_eog=False))
    assert spec == plain
    assert stats.drafted > 0  # trees were verified, not only plain steps


# ---- MLA files whose metadata lies ----

MLA_LIES = [
    ({"overrides": {"blockffn.attention.kv_lora_rank": 16}}, "attn_kv_a_mqa.weight.*shape"),
    ({"overrides": {"blockffn.attention.q_lora_rank": 16}}, "attn_q_a.weight.*shape"),
    ({"overrides": {"blockffn.attention.key_length": 8}}, "key_length 8 must exceed"),
    ({"overrides": {"blockffn.attention.value_length": 8}}, "attn_v_b.weight.*shape"),
    ({"overrides": {"blockffn.attention.head_count_kv": 2}}, "head_count_kv"),
    ({"overrides": {"blockffn.attention.type": "sliding"}}, "attention.type 'sliding' is not implemented"),
    ({"overrides": {"blockffn.attention.lora_norm_epsilon": 0.0}}, "lora_norm_epsilon"),
    ({"overrides": {"blockffn.rope.dimension_count": 7}}, "must be even"),
    ({"drop_keys": ("blockffn.attention.kv_lora_rank",)}, "kv_lora_rank"),
    ({"drop_keys": ("blockffn.attention.type",)}, "dimension_count 8 must equal the head dimension"),
    ({"drop": ("blk.1.attn_k_b.weight",)}, "blk.1.attn_k_b.weight' is missing"),
    ({"drop": ("blk.0.attn_kv_a_norm.weight",)}, "blk.0.attn_kv_a_norm.weight' is missing"),
]


@pytest.fixture(scope="module")
def honest_mla(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mla-lies")
    return build(tmp, mla_config())[1]


@pytest.mark.parametrize("kwargs,message", MLA_LIES, ids=[str(k) for k, _ in MLA_LIES])
def test_mla_metadata_that_lies_is_rejected(honest_mla, tmp_path, kwargs, message):
    assert Model(rewrite(honest_mla, tmp_path / "same.gguf")).info.n_layer == 2  # the rewrite itself is faithful
    path = rewrite(honest_mla, tmp_path / "lie.gguf", **kwargs)
    with pytest.raises(SparrowError, match=message):
        Model(path)


def test_llama_file_claiming_mla_is_refused(tmp_path):
    """MLA is read only for blockffn files; a llama file asking for it gets a clear error."""
    from tiny_llama import TinyConfig, write_tiny_llama

    path = write_tiny_llama(tmp_path / "mla.gguf", TinyConfig(), overrides={"llama.attention.type": "mla"})
    with pytest.raises(SparrowError, match="not implemented for architecture llama"):
        Model(path)


def test_sparse_paths_agree(tmp_path):
    """The dense, token and chunk FFN paths on an MLA model: F32 within float summation order at any thread count; a
    Q4_0 file with one thread bit for bit (several threads add per-thread partial sums in another order on each
    path, and MLA's extra 8-bit activation roundings can turn that last bit into a flip)."""
    cfg = mla_config(seed=7, **QUANTIZABLE)
    folder = write_checkpoint(tmp_path / "ckpt", cfg)
    for qtype in ("f32", "q4_0"):
        path = convert(folder, tmp_path / f"{qtype}.gguf", qtype, progress=False)
        for threads in (1, 3):
            outs = {}
            for mode in ("dense", "token", "chunk"):
                with Model(path) as m, m.session(n_ctx=64, n_threads=threads, ffn_mode=mode) as s:
                    outs[mode] = s.eval(TOKENS, logits="all")
            base = outs["dense"]
            for mode, out in outs.items():
                if qtype == "f32":
                    assert np.max(np.abs(out - base)) <= 1e-5 * np.max(np.abs(base)), (qtype, threads, mode)
                elif threads == 1:
                    assert np.array_equal(out, base), (qtype, threads, mode)


def test_models_info_reports_attention_and_kv_bytes(tmp_path, home):
    """`sparrow models info` names the attention kind and the KV cache per token, read from the metadata, and that is
    what the C library allocates (an MLA, a grouped-query BlockFFN and a llama file)."""
    import json

    from click.testing import CliRunner
    from sparrow.cli import sparrow
    from sparrow.runtime.routing import read_gguf_header
    from tiny_llama import TinyConfig, write_tiny_llama

    files = {"mla": build(tmp_path / "a", mla_config())[1], "gqa": build(tmp_path / "b", FixtureConfig())[1],
             "llama": write_tiny_llama(tmp_path / "llama.gguf", TinyConfig())}
    for kind, path in files.items():
        r = CliRunner().invoke(sparrow, ["models", "info", str(path), "--json"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        att = json.loads(r.output)["attention"]
        assert att["kind"] == {"mla": "mla", "gqa": "gqa", "llama": "gqa"}[kind]
        with Model(path) as m:
            assert att["kv_bytes_per_token"] * 96 == m.session_memory(n_ctx=96, n_threads=1).kv_cache_bytes
        assert read_gguf_header(path).attention() == att
        text = CliRunner().invoke(sparrow, ["models", "info", str(path)], catch_exceptions=False).output
        assert "attention:     " in text and "per token (F16)" in text
