"""ONNX export (converters/onnx_export.py) and the onnxruntime backend (runtime/onnx_backend.py), against the numpy
references, the native runtime and onnxruntime-genai.

Bounds: an f32 export computes the GGUF's function in float32 (NMSE <= 1e-9 against the float64 reference); int8 and
int4 exports use onnxruntime's int8-activation MatMulNBits kernels, as the native runtime uses int8 activations
(NMSE <= 1e-3 on the tiny models from a source of the same type, where the mapping is bit-exact)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from reference.blockffn import BlockFFNGGUFRef
from reference.llama import LlamaRef
from sparrow.cli import sparrow
from sparrow.converters import ConversionError
from sparrow.converters.onnx_export import GENAI_CONFIG, export_onnx
from sparrow.runtime import Model, SamplerParams, generate_tokens
from sparrow.runtime.backends import BackendError, open_backend
from sparrow.runtime.drafters import PromptLookup, Recycling
from sparrow.runtime.onnx_backend import OnnxModel, OnnxModelError
from sparrow.runtime.speculative import speculative_tokens
from tiny_llama import TinyConfig, write_tiny_llama

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parent.parent
BLOCKFFN_TINY = REPO / "models" / "blockffn-tiny.Q8_0.gguf"


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx_llama")
    return {wt.name: write_tiny_llama(d / f"tiny_{wt.name}.gguf", TinyConfig(wtype=wt)) for wt in (Q.F32, Q.Q4_0,
                                                                                                   Q.Q8_0)}


@pytest.fixture(scope="module")
def tiny_blockffn_onnx(tmp_path_factory) -> Path:
    return export_onnx(BLOCKFFN_TINY, tmp_path_factory.mktemp("onnx_bf") / "bf.onnx", progress=False)


def run_graph(path: Path, tokens: list[int], past: list[np.ndarray] | None = None, p0: int = 0):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kv = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
    T = len(tokens)
    feeds = {"input_ids": np.array([tokens]), "attention_mask": np.ones((1, p0 + T), np.int64),
             "position_ids": np.arange(p0, p0 + T)[None]}
    for j, i in enumerate(kv):
        feeds[i.name] = past[j] if past is not None else np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    out = s.run(None, feeds)
    return out[0][0], out[1:]


@pytest.mark.parametrize("source,weights,bound", [("F32", "f32", 1e-9), ("Q4_0", "f32", 1e-9), ("Q4_0", "int4", 1e-3),
                                                  ("Q8_0", "int8", 1e-3), ("F32", "int8", 1e-3)])
def test_llama_export_matches_reference(tiny_llamas, tmp_path, source, weights, bound):
    src = tiny_llamas[source]
    out = export_onnx(src, tmp_path / "m.onnx", weights=weights, progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    tokens = [1, 5, 9, 30, 200, 7, 8, 260, 3]
    ref = LlamaRef.from_gguf(str(src)).forward(tokens)
    logits, _ = run_graph(out, tokens)
    assert nmse(logits, ref) <= bound
    # the KV cache: 5 tokens, then 4 with the first pass's present as past, give the same logits
    first, present = run_graph(out, tokens[:5])
    second, _ = run_graph(out, tokens[5:], present, p0=5)
    np.testing.assert_allclose(np.concatenate([first, second]), logits, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / GENAI_CONFIG).read_text())["model"]["decoder"]["filename"] == "m.onnx"


@pytest.mark.parametrize("ffn", ["moe", "dense"])
@pytest.mark.parametrize("weights,bound", [("f32", 1e-9), ("int8", 1e-3)])
def test_blockffn_export_matches_reference(tmp_path, ffn, weights, bound):
    out = export_onnx(BLOCKFFN_TINY, tmp_path / "bf.onnx", weights=weights, ffn=ffn, progress=False)
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(props["sparrow.experts"])["ffn"] == ffn
    assert not (tmp_path / GENAI_CONFIG).exists()  # onnxruntime-genai has no BlockFFN model type
    tokens = [1, 50, 60, 70, 80, 90, 100, 3, 4, 5, 77, 900]
    ref, routers = BlockFFNGGUFRef.from_gguf(BLOCKFFN_TINY).forward(tokens)
    assert 0.3 < float(np.mean(routers == 0)) < 1  # the experts really are sparse: MoE skips work here
    logits, _ = run_graph(out, tokens)
    assert nmse(logits, ref) <= bound


def test_moe_token_with_every_expert_off(tmp_path):
    """A token whose router switches every expert off gets an FFN output of exactly 0 (no NaN from log(0))."""
    r = gguf.GGUFReader(str(BLOCKFFN_TINY))
    w = gguf.GGUFWriter(str(tmp_path / "off.gguf"), "blockffn")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, field.contents(), field.types[0],
                        sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == "blk.1.ffn_router.weight":
            data = np.zeros_like(data)  # relu(0) = 0 for every expert of layer 1
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = export_onnx(tmp_path / "off.gguf", tmp_path / "off.onnx", progress=False)
    tokens = [1, 50, 60, 70]
    ref, routers = BlockFFNGGUFRef.from_gguf(tmp_path / "off.gguf").forward(tokens)
    assert (routers[1] == 0).all()
    logits, _ = run_graph(out, tokens)
    assert np.isfinite(logits).all() and nmse(logits, ref) <= 1e-9


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_blockffn_graph_shape(tmp_path, ffn):
    """What keeps a decode step's fixed cost down (each node costs a dispatch and a thread-pool sync): q, k and v
    from one matmul, each residual add fused with the norm after it, and the MoE router's log(r) with its fallback
    for a token with every expert off in two nodes (Log, Max)."""
    out = export_onnx(BLOCKFFN_TINY, tmp_path / "bf.onnx", ffn=ffn, progress=False)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    L = 4
    assert ops.count("Attention") == L and ops.count("SkipSimplifiedLayerNormalization") == 2 * L - 1
    assert ops.count("MatMul") == L * (3 if ffn == "moe" else 5)  # qkv, attn_output, router (+ up, down)
    assert ops.count("Add") == 2  # the attention mask's bias and the last layer's residual
    assert ops.count("Where") == 2  # the attention mask's and logits_keep's: none per layer
    if ffn == "moe":
        assert ops.count("MoE") == ops.count("Log") == ops.count("Max") == L


def test_tree_pass_equals_each_branch_alone(tiny_blockffn_onnx):
    """One pass over a draft tree (mask + depth positions through attention_bias) gives each node the logits its
    root-to-node path gets evaluated alone."""
    model = OnnxModel(tiny_blockffn_onnx, n_threads=1)
    prompt = [1, 50, 60, 70, 80]
    tree = [(900, 0), (901, 1), (902, 1), (903, 0), (904, 4)]  # (token, parent index in the batch; 0 = root)
    batch = [prompt[-1]] + [t for t, _ in tree]
    parents = [p for _, p in tree]
    T = len(batch)
    mask = np.eye(T, dtype=np.uint8)
    depth = [0] * T
    for i, p in enumerate(parents, start=1):
        mask[i] = mask[p]
        mask[i, i] = 1
        depth[i] = depth[p] + 1
    s = model.session(n_ctx=64)
    s.prefill(prompt[:-1])
    P = s.n_past
    tree_logits = s.eval(batch, pos=[P + d for d in depth], mask=mask, logits="all")
    for i in range(T):
        path = [j for j in range(T) if mask[i, j]]
        alone = model.session(n_ctx=64)
        alone.prefill(prompt[:-1])
        chain = alone.eval([batch[j] for j in path], logits="all")
        np.testing.assert_allclose(tree_logits[i], chain[-1], rtol=0, atol=2e-4)
    s.keep(list(range(P)) + [P, P + 1, P + 2])  # the root and nodes 1, 2 accepted
    assert s.tokens == prompt[:-1] + batch[:3]
    model.close()


@pytest.mark.parametrize("drafter", ["prompt-lookup", "recycling"])
def test_speculative_greedy_equals_plain_on_onnxruntime(tiny_blockffn_onnx, drafter):
    model = OnnxModel(tiny_blockffn_onnx, n_threads=1)
    vocab = Model(BLOCKFFN_TINY, vocab_only=True)
    prompts = ["Once upon a time", "def main():\n    return 1\n\ndef main():", "the the the the"]
    for text in prompts:
        prompt = vocab.tokenize(text, add_special=True)
        plain = list(generate_tokens(model.session(n_ctx=128), prompt, max_tokens=40))
        d = PromptLookup() if drafter == "prompt-lookup" else Recycling(model.info.n_vocab)
        spec = list(speculative_tokens(model.session(n_ctx=128), prompt, d, max_tokens=40,
                                       params=SamplerParams.greedy()))
        assert spec == plain, text
    vocab.close()
    model.close()


def test_smollm2_f32_export_greedy_matches_native(smollm_path, tmp_path):
    """SmolLM2 exported at f32 computes the Q4_1 file's function exactly; the native runtime rounds activations to
    8 bits, so greedy outputs may fork, but only where the native top-2 logits are within 0.5."""
    out = export_onnx(smollm_path, tmp_path / "smol.onnx", progress=False)
    model = OnnxModel(out, n_threads=2)
    native = Model(smollm_path)
    ref = LlamaRef.from_gguf(str(smollm_path))
    tokens = native.tokenize("The capital of France is", add_special=True)
    assert nmse(model.session(n_ctx=64).eval(tokens, logits="all"), ref.forward(tokens)) <= 1e-9
    forks = 0
    for text in ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time, a fox"]:
        prompt = native.tokenize(text, add_special=True)
        ort_s, nat_s = model.session(n_ctx=256), native.session(n_ctx=256, n_threads=2)
        a, b = ort_s.prefill(prompt), nat_s.prefill(prompt)
        for _ in range(32):
            ta, tb = int(a.argmax()), int(b.argmax())
            if ta != tb:
                top2 = np.sort(b)[-2:]
                assert top2[1] - top2[0] < 0.5, f"{text!r}: forked at a margin of {top2[1] - top2[0]:.3f}"
                forks += 1
                break
            a, b = ort_s.eval([ta]), nat_s.eval([tb])
        nat_s.close()
    assert forks <= 2
    native.close()
    model.close()


def test_onnxruntime_genai_runs_the_export(tiny_llamas, tmp_path):
    import onnxruntime_genai as og
    out = export_onnx(tiny_llamas["Q4_0"], tmp_path / "m.onnx", weights="int4", progress=False)
    prompt = [1, 5, 9, 30, 200]
    mine = list(generate_tokens(OnnxModel(out, n_threads=1).session(n_ctx=64), prompt, max_tokens=8,
                                stop_at_eog=False))
    m = og.Model(str(tmp_path))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(prompt) + 8)
    gen = og.Generator(m, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == mine


def test_cli_convert_and_generate(tmp_path):
    runner = CliRunner()
    out = tmp_path / "bf.onnx"
    r = runner.invoke(sparrow, ["convert", str(BLOCKFFN_TINY), str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(sparrow, ["convert", str(BLOCKFFN_TINY), str(out), "--no-progress"])
    assert r.exit_code == 1 and "exists" in r.output  # nothing replaced without --overwrite
    r = runner.invoke(sparrow, ["convert", str(BLOCKFFN_TINY), str(tmp_path / "x.onnx"), "--type", "q4_0"])
    assert r.exit_code == 2 and "GGUF type" in r.output
    args = ["generate", "-m", str(out), "--max-tokens", "16", "--temperature", "0", "Once upon a time"]
    onnx_text = runner.invoke(sparrow, args)
    native_text = runner.invoke(sparrow, args[:2] + [str(BLOCKFFN_TINY)] + args[3:])
    assert onnx_text.exit_code == 0, onnx_text.output
    assert onnx_text.output == native_text.output
    spec = runner.invoke(sparrow, args + ["--draft", "prompt-lookup"])
    assert spec.exit_code == 0 and spec.output == onnx_text.output


def test_bad_onnx_files(tmp_path, tiny_llamas):
    from onnx import TensorProto, helper

    # not an ONNX file at all
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx" * 100)
    with pytest.raises(BackendError, match="onnxruntime cannot load"):
        open_backend(junk)
    # a valid ONNX graph without Sparrow's interface (no KV cache, no tokenizer)
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), plain)
    with pytest.raises(BackendError, match="not a Sparrow ONNX export"):
        open_backend(plain)
    # an opset onnxruntime does not have
    future = tmp_path / "future.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 99)]), future)
    with pytest.raises(BackendError, match="onnxruntime cannot load"):
        open_backend(future)
    # a damaged tokenizer inside an otherwise good export
    good = export_onnx(tiny_llamas["F32"], tmp_path / "good.onnx", progress=False)
    m = onnx.load(str(good))
    for p in m.metadata_props:
        if p.key == "sparrow.vocab_gguf":
            p.value = "GGUF" + "A" * 40
    bad = tmp_path / "badvocab.onnx"
    onnx.save(m, bad)
    with pytest.raises(OnnxModelError, match="embedded tokenizer"):
        OnnxModel(bad)
    # a genai_config.json beside the export that disagrees with it, or is not JSON
    config = tmp_path / GENAI_CONFIG
    saved = json.loads(config.read_text())
    saved["model"]["decoder"]["num_hidden_layers"] = 7
    config.write_text(json.dumps(saved))
    with pytest.raises(OnnxModelError, match="num_hidden_layers 7 .the graph: 2."):
        OnnxModel(good)
    config.write_text("{not json")
    with pytest.raises(OnnxModelError, match="not a valid genai_config.json"):
        OnnxModel(good)
    config.unlink()
    # bad requests to a session
    model = OnnxModel(good, n_threads=1)
    s = model.session(n_ctx=16)
    with pytest.raises(ValueError, match="token ids"):
        s.eval([10 ** 6])
    with pytest.raises(ValueError, match="do not fit"):
        s.eval(list(range(17)))
    with pytest.raises(ValueError, match="mask"):
        s.eval([1, 2], mask=np.zeros((2, 2), np.uint8))
    assert s.n_past == 0  # nothing evaluated by a refused request
    model.close()


def test_export_refuses_what_it_cannot_do(tmp_path, tiny_llamas):
    with pytest.raises(ConversionError, match="ends in .onnx"):
        export_onnx(tiny_llamas["F32"], tmp_path / "m.gguf")
    with pytest.raises(ConversionError, match="cannot read"):
        (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
        export_onnx(tmp_path / "junk.gguf", tmp_path / "m.onnx")
    with pytest.raises(ConversionError, match="weight type"):
        export_onnx(tiny_llamas["F32"], tmp_path / "m.onnx", weights="int3")
    existing = tmp_path / "keep.onnx"
    existing.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="exists"):
        export_onnx(tiny_llamas["F32"], existing)
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf", "keep.onnx"]  # no partial files left


@pytest.mark.parametrize("weights,bound", [("f32", 1e-9), ("int8", 1e-3)])
def test_mla_export_matches_reference(tmp_path, weights, bound):
    """The released checkpoints' multi-head latent attention, exported expanded, computes the GGUF's function."""
    from blockffn_fixture import FixtureConfig, write_checkpoint
    from sparrow.converters.blockffn import convert

    cfg = FixtureConfig(attention_type="mla", hidden_size=128, num_attention_heads=4, q_lora_rank=64,
                        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16)
    src = convert(write_checkpoint(tmp_path / "ckpt", cfg), tmp_path / "mla.gguf", "f32", progress=False)
    out = export_onnx(src, tmp_path / "mla.onnx", weights=weights, progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    tokens = [1, 50, 60, 70, 80, 90, 100, 3, 4, 5]
    ref, _ = BlockFFNGGUFRef.from_gguf(src).forward(tokens)
    logits, _ = run_graph(out, tokens)
    assert nmse(logits, ref) <= bound
    first, present = run_graph(out, tokens[:6])
    second, _ = run_graph(out, tokens[6:], present, p0=6)
    assert nmse(np.concatenate([first, second]), logits) <= (1e-12 if weights == "f32" else 1e-5)
    # through the backend: greedy output equals the native runtime's on the same GGUF
    native = Model(src)
    prompt = tokens[:5]
    theirs = list(generate_tokens(native.session(n_ctx=64, n_threads=1), prompt, max_tokens=12))
    mine = list(generate_tokens(OnnxModel(out, n_threads=1).session(n_ctx=64), prompt, max_tokens=12))
    if weights == "f32":
        assert mine == theirs
    native.close()


def test_sparsity_metadata_in_both_formats(tmp_path):
    """A converted BlockFFN GGUF carries TLS / CLS-8 measured on the calibration text and the paired draft model;
    the ONNX export carries the same figures; both equal a measurement made here with the native runtime."""
    from blockffn_fixture import FixtureConfig, write_checkpoint
    from sparrow.converters import sparsity

    folder = write_checkpoint(tmp_path / "ckpt", FixtureConfig())
    runner = CliRunner()
    r = runner.invoke(sparrow, ["convert", str(folder), str(tmp_path / "m.gguf"), "--type", "f32",
                                "--draft-model", "blockffn-tiny-draft", "--no-progress"])
    assert r.exit_code == 0, r.output
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.items()
              if k.startswith(("blockffn.sparsity", "sparrow."))}
    carried = sparsity.from_fields(fields)
    measured = sparsity.measure(tmp_path / "m.gguf")
    assert carried["tokens"] == measured["tokens"] > 100
    assert carried["tls"] == pytest.approx(measured["tls"], abs=1e-6) and 0 < carried["tls"] < 1
    assert carried["cls_8"] == pytest.approx(measured["cls_8"], abs=1e-6) and carried["cls_8"] <= carried["tls"]
    assert carried["draft_model"] == "blockffn-tiny-draft"
    r = runner.invoke(sparrow, ["convert", str(folder), str(tmp_path / "m.onnx"), "--draft-model", "d.gguf",
                                "--no-progress"])
    assert r.exit_code == 0, r.output
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    in_onnx = json.loads(props["sparrow.sparsity"])
    assert in_onnx["tls"] == pytest.approx(measured["tls"], abs=1e-6) and in_onnx["draft_model"] == "d.gguf"
    # a GGUF without the keys (the shipped tiny model predates them): the export measures its source
    in_tiny = json.loads({p.key: p.value for p in onnx.load(str(export_onnx(
        BLOCKFFN_TINY, tmp_path / "t.onnx", progress=False))).metadata_props}["sparrow.sparsity"])
    assert in_tiny["tls"] == pytest.approx(sparsity.measure(BLOCKFFN_TINY)["tls"], abs=1e-6)


def write_hf_llama(folder: Path, *, tied: bool = False, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """A tiny random llama checkpoint in Hugging Face layout with a SentencePiece tokenizer (blockffn_fixture's)."""
    import shutil

    from blockffn_fixture import tokenizer_model
    from safetensors.numpy import save_file
    from sparrow.converters.spm import load_spm

    rng = np.random.default_rng(seed)
    spm = tokenizer_model()
    V, H, L, NH, NKV, F = 320, 64, 2, 4, 2, 96
    V = max(V, len(load_spm(spm).tokens))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H,
              "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV,
              "intermediate_size": F, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": tied}

    def mat(n, k):
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(V, H), "model.norm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(
        np.float32)}
    if not tied:
        w["lm_head.weight"] = mat(V, H)
    D = H // NH
    for l in range(L):
        p = f"model.layers.{l}."
        w |= {p + "input_layernorm.weight": np.ones(H, np.float32), p + "self_attn.q_proj.weight": mat(H, H),
              p + "self_attn.k_proj.weight": mat(NKV * D, H), p + "self_attn.v_proj.weight": mat(NKV * D, H),
              p + "self_attn.o_proj.weight": mat(H, H), p + "post_attention_layernorm.weight": np.ones(H, np.float32),
              p + "mlp.gate_proj.weight": mat(F, H), p + "mlp.up_proj.weight": mat(F, H),
              p + "mlp.down_proj.weight": mat(H, F)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(spm, folder / "tokenizer.model")
    return config, {k: v.astype(np.float64) for k, v in w.items()}


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_checkpoint_to_gguf_and_onnx(tmp_path, tied):
    """A llama-family Hugging Face checkpoint converts to GGUF (the native runtime runs it) and to ONNX (onnxruntime
    runs it), both computing the checkpoint's own function."""
    from reference.llama import hf_llama_forward

    config, w = write_hf_llama(tmp_path / "ckpt", tied=tied)
    runner = CliRunner()
    r = runner.invoke(sparrow, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--type", "f32",
                                "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(sparrow, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "m.onnx"), "--no-progress"])
    assert r.exit_code == 0, r.output
    tokens = [1, 40, 41, 42, 100, 7, 8, 200]
    ref = hf_llama_forward(config, w, tokens)
    assert nmse(LlamaRef.from_gguf(str(tmp_path / "m.gguf")).forward(tokens), ref) <= 1e-9
    onnx_logits, _ = run_graph(tmp_path / "m.onnx", tokens)
    assert nmse(onnx_logits, ref) <= 1e-9
    with Model(tmp_path / "m.gguf") as m, m.session(n_ctx=64, n_threads=1) as s:
        assert nmse(s.eval(tokens, logits="all"), ref) <= 1e-4  # F32 weights, F16 KV cache


def test_hf_llama_checkpoint_refusals(tmp_path):
    config, _ = write_hf_llama(tmp_path / "ckpt")
    runner = CliRunner()
    (tmp_path / "ckpt" / "tokenizer.model").rename(tmp_path / "ckpt" / "tokenizer.json")
    r = runner.invoke(sparrow, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")])
    assert r.exit_code == 1 and "byte-level BPE vocabularies are not converted here" in r.output
    (tmp_path / "ckpt" / "tokenizer.json").rename(tmp_path / "ckpt" / "tokenizer.model")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear"}}))
    r = runner.invoke(sparrow, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")])
    assert r.exit_code == 1 and "rope_scaling" in r.output
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    r = runner.invoke(sparrow, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")])
    assert r.exit_code == 1 and "mlp.gate_proj.weight has shape (96, 64), config.json implies (64, 64)" in r.output
    assert not (tmp_path / "m.gguf").exists()


def test_store_pulls_an_export_and_chats_with_it(home, tiny_blockffn_onnx, tmp_path):
    runner = CliRunner()
    r = runner.invoke(sparrow, ["models", "pull", str(tiny_blockffn_onnx), "--name", "bf-onnx", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(sparrow, ["models", "info", "bf-onnx", "--json"])
    info = json.loads(r.output)
    assert (info["architecture"], info["quantization"], info["backend"]["name"]) == ("blockffn", "F32",
                                                                                     "onnxruntime")
    r = runner.invoke(sparrow, ["generate", "-m", "bf-onnx", "--max-tokens", "8", "--temperature", "0", "Hello"])
    assert r.exit_code == 0 and r.output.strip(), r.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model")
    r = runner.invoke(sparrow, ["models", "pull", str(junk), "--name", "junk", "--quiet"])
    assert r.exit_code == 1 and "not an ONNX file" in r.output and "nothing was stored" in r.output
    assert str(junk) in r.output and "pull-" not in r.output  # names the user's file, not the staging copy
    r = runner.invoke(sparrow, ["models", "list"])
    assert "junk" not in r.output and "bf-onnx" in r.output


def test_large_export_keeps_its_weights_beside_it(tmp_path, monkeypatch, home):
    """Past protobuf's limit the weights go to OUT.data (here forced with a low threshold): onnxruntime runs it, an
    existing OUT.data is kept without --overwrite, and the store refuses the two-file model with what to do."""
    import sparrow.converters.onnx_export as ox

    monkeypatch.setattr(ox, "MAX_PROTO_BYTES", 1 << 20)
    (tmp_path / "bf.onnx.data").write_bytes(b"precious")
    with pytest.raises(ConversionError, match="bf.onnx.data exists"):
        ox.export_onnx(BLOCKFFN_TINY, tmp_path / "bf.onnx", progress=False)
    assert (tmp_path / "bf.onnx.data").read_bytes() == b"precious" and not (tmp_path / "bf.onnx").exists()
    out = ox.export_onnx(BLOCKFFN_TINY, tmp_path / "bf.onnx", progress=False, overwrite=True)
    assert (tmp_path / "bf.onnx.data").stat().st_size > 10 << 20 and out.stat().st_size < 5 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf.onnx", "bf.onnx.data"]  # nothing else left
    vocab = Model(BLOCKFFN_TINY, vocab_only=True)
    prompt = vocab.tokenize("Once upon a time", add_special=True)
    with Model(BLOCKFFN_TINY) as m, m.session(n_ctx=64, n_threads=1) as s:
        native = list(generate_tokens(s, prompt, max_tokens=10))
    assert list(generate_tokens(OnnxModel(out, n_threads=1).session(n_ctx=64), prompt, max_tokens=10)) == native
    r = CliRunner().invoke(sparrow, ["models", "pull", str(out), "--name", "big", "--quiet"])
    assert r.exit_code == 1 and "separate file" in r.output and "nothing was stored" in r.output
    vocab.close()
