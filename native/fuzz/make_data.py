"""Data and seed corpora for the libFuzzer targets of native/fuzz (run by tools/fuzz.sh).

    python3 native/fuzz/make_data.py OUT_DIR

OUT_DIR/data: what the targets load at start-up: vocab-*.gguf (fuzz_tokenize: byte-level BPE under every
pre-tokenizer kind, from SmolLM2's vocabulary when tests/.cache holds it, else a small hand-made one; SentencePiece
with and without the space prefix) and model-*.gguf (fuzz_eval: tiny random llama models of several weight types, and
tiny BlockFFN models, grouped-query and MLA, when the converter and sentencepiece can be imported).
OUT_DIR/seeds/<target>: starting inputs: the negative GGUF corpus of tests/gguf_corpus.py and small valid files for
fuzz_load and fuzz_vocab, texts for fuzz_tokenize, a few programs for fuzz_sampler and fuzz_eval.
Uses the tests' own builders (tests/tiny_llama.py, tests/gguf_corpus.py, tests/blockffn_fixture.py)."""
from __future__ import annotations

import io
import os
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import gguf
import gguf_corpus
import numpy as np
from tiny_llama import TinyConfig, vocab, write_tiny_llama

Q = gguf.GGMLQuantizationType
SMOLLM = Path(os.environ.get("SPARROW_TEST_CACHE", REPO / "tests" / ".cache")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
PRETOKENIZERS = ["default", "gpt-2", "smollm", "llama3", "qwen2"]  # one of each splitter kind in vocab.c
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _gpt2_chars() -> list[str]:
    """GPT-2's byte -> character map, in byte order (the stand-ins a byte-level BPE vocabulary is written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _small_bpe() -> tuple[list[str], list[str], list[int]]:
    """A hand-made byte-level BPE vocabulary: specials, the 256 byte characters, merges of common English pairs."""
    g = _gpt2_chars()
    sp = g[ord(" ")]
    merges = [f"{sp} t", "h e", f"{sp}t he", "i n", "e r", f"{sp} a", "o n", "r e", "a t", "e n", "1 2", f"{sp} {sp}"]
    tokens = SPECIALS + g
    for m in merges:
        a, b = m.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    tokens.append("<think>")
    types.append(4)  # user-defined
    return tokens, merges, types


def _smollm_bpe() -> tuple[list[str], list[str], list[int]] | None:
    if not SMOLLM.exists():
        return None
    r = gguf.GGUFReader(str(SMOLLM))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    f = r.fields["tokenizer.ggml.token_type"]
    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"), [int(f.parts[i][0]) for i in f.data]


def _write_vocab(path: Path, model: str, tokens: list[str], types: list[int], *, pre: str | None = None,
                 merges: list[str] | None = None, scores: list[float] | None = None,
                 add_space_prefix: bool | None = None, bos: int = 0, eos: int = 1) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def vocabularies(data: Path, seeds: Path) -> None:
    smol = _smollm_bpe()
    tokens, merges, types = smol or _small_bpe()
    print(f"BPE vocabularies from {'SmolLM2' if smol else 'the small hand-made vocabulary'} ({len(tokens)} tokens)")
    for pre in PRETOKENIZERS:
        _write_vocab(data / f"vocab-bpe-{pre}.gguf", "gpt2", tokens, types, pre=pre, merges=merges)
    spm_tokens, spm_scores, spm_types = vocab()
    spm_tokens = spm_tokens + ["<|im_start|>", "<think>"]
    spm_scores = spm_scores + [0.0, 0.0]
    spm_types = spm_types + [3, 4]
    for prefix in (True, False):
        _write_vocab(data / f"vocab-spm-{'prefix' if prefix else 'noprefix'}.gguf", "llama", spm_tokens, spm_types,
                     scores=spm_scores, add_space_prefix=prefix, bos=1, eos=2)
    # fuzz_vocab seeds: small whole vocabularies (the SmolLM2 one is too large to mutate quickly)
    small_t, small_m, small_ty = _small_bpe()
    for pre in PRETOKENIZERS:
        _write_vocab(seeds / "vocab" / f"bpe-{pre}.gguf", "gpt2", small_t, small_ty, pre=pre, merges=small_m)
    for name in ("spm-prefix", "spm-noprefix"):
        (seeds / "vocab" / f"{name}.gguf").write_bytes((data / f"vocab-{name}.gguf").read_bytes())


def models(data: Path, seeds: Path) -> None:
    small = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_ff": 64}
    for name, wtype, tied in (("f32", Q.F32, True), ("q4_0", Q.Q4_0, False), ("q8_0", Q.Q8_0, True),
                              ("f16", Q.F16, False)):
        write_tiny_llama(data / f"model-llama-{name}.gguf", TinyConfig(**small, wtype=wtype, tied=tied, seed=3))
    # head dim 32 on a packed type: forward.c splits wq | wk | wv by heads and quantizes the attention output inside
    # the attention (head dim 8 above takes its other path)
    write_tiny_llama(data / "model-llama-q8_0-d32.gguf",
                     TinyConfig(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, wtype=Q.Q8_0, seed=3))
    # fuzz_load seeds: the smallest models (one layer) of each weight type
    for name, wtype in (("f32", Q.F32), ("q4_0", Q.Q4_0), ("q8_0", Q.Q8_0)):
        write_tiny_llama(seeds / "load" / f"llama-{name}.gguf",
                         TinyConfig(n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=32, wtype=wtype))
    try:
        from blockffn_fixture import FixtureConfig, write_checkpoint
        from sparrow.converters.blockffn import convert
    except ImportError as e:  # the converter or sentencepiece is missing: llama models only
        print(f"no BlockFFN model for fuzz_eval ({e})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FixtureConfig(num_experts=8, expert_size=16, hidden_size=64, num_hidden_layers=2, seed=5)
        folder = write_checkpoint(Path(tmp) / "ckpt", cfg)
        for q in ("f32", "q4_0"):
            convert(folder, data / f"model-blockffn-{q}.gguf", q, overwrite=True, progress=False)
        # multi-head latent attention (the released checkpoints' attention), matmul rows multiples of 32 so that q4_0
        # quantizes them; a one-layer file seeds fuzz_load with the MLA metadata and tensors
        mla = {"attention_type": "mla", "hidden_size": 64, "num_attention_heads": 2, "q_lora_rank": 32,
               "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16}
        folder = write_checkpoint(Path(tmp) / "mla", FixtureConfig(num_experts=8, expert_size=16, seed=6, **mla))
        for q in ("f32", "q4_0"):
            convert(folder, data / f"model-blockffn-mla-{q}.gguf", q, overwrite=True, progress=False)
        folder = write_checkpoint(Path(tmp) / "mla1", FixtureConfig(num_experts=4, expert_size=16, seed=7,
                                                                    num_hidden_layers=1, **mla))
        convert(folder, seeds / "load" / "blockffn-mla-q8_0.gguf", "q8_0", overwrite=True, progress=False)


def corpora(seeds: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gguf_corpus.dump(Path(tmp), 300)
        for p in Path(tmp).glob("*.gguf"):
            for target in ("load", "vocab"):
                (seeds / target / p.name).write_bytes(p.read_bytes())
    texts = [b"Hello, world!", b"The quick brown fox jumps over 12345 lazy dogs.\n\n  Indented\ttabs",
             b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", b"don't I'LL we've \xc3\xa9t\xc3\xa9 na\xc3\xafve",
             "中文 日本語 한국어 emoji 🙂👍🏽".encode(), b"\xff\xfe bad \xe4\xbd bytes \xc3(", b"<think>x</think> <0x41>",
             b"    \r\n\r\n x = f(a[1], b{2}) // comment", b""]
    for i, text in enumerate(texts):
        for vocab_i in range(len(PRETOKENIZERS) + 2):
            for flags in (0, 3):
                (seeds / "tokenize" / f"t{i:02d}-{vocab_i}-{flags}").write_bytes(bytes([vocab_i, flags]) + text)
    # sampler: (shape, V, params...) mostly defaults, then logits
    for i, temp in enumerate((0.0, 0.8, 1e-30, 5.0)):
        body = bytes([0]) + struct.pack("<H", 50) + bytes([0]) + struct.pack("<H", int(temp * 1000) % 65536)
        (seeds / "sampler" / f"s{i}").write_bytes(body + bytes(range(64)) + struct.pack("<8f", *range(8)))
    for i in range(4):  # eval: model i, a session, a few evals and a truncate
        (seeds / "eval" / f"e{i}").write_bytes(bytes([i, 8 * i + 5, 0, 4, 3] + [1, 0] * 3 + [2, 1, 0, 0, 2] + [5, 0] * 2))
    # npy: (rows - 1, cols - 1) then an np.save file of that shape, of another shape, dtype or order, versions 1 and 2
    for i, (shape, dtype, order) in enumerate([((5, 8), np.int32, "C"), ((64, 8), np.int32, "C"), ((5, 4), np.int32, "C"),
                                                ((5, 8), np.int64, "C"), ((5, 8), np.int32, "F"), ((3,), np.int32, "C")]):
        buf = io.BytesIO()
        np.save(buf, np.asarray(np.arange(np.prod(shape)).reshape(shape) - 1, dtype=dtype, order=order))
        raw = buf.getvalue()
        (seeds / "npy" / f"n{i}").write_bytes(bytes([shape[0] - 1, 7]) + raw)
        if i == 0:  # the same as version 2.0 (a 4-byte header length)
            hlen = int.from_bytes(raw[8:10], "little")
            v2 = raw[:6] + b"\x02\x00" + (hlen - 2).to_bytes(4, "little") + raw[10:10 + hlen - 2] + raw[10 + hlen:]
            (seeds / "npy" / "n-v2").write_bytes(bytes([4, 7]) + v2)


def main(out: Path) -> None:
    data, seeds = out / "data", out / "seeds"
    for d in [data] + [seeds / t for t in ("load", "vocab", "tokenize", "sampler", "eval", "npy")]:
        d.mkdir(parents=True, exist_ok=True)
    vocabularies(data, seeds)
    models(data, seeds)
    corpora(seeds)
    print(f"fuzz data in {data}, seeds in {seeds}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
