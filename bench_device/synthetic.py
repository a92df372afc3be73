"""Synthetic BlockFFN models: the shapes of the released BlockFFN checkpoints with random weights, as GGUF files.

Shape legend: H = hidden, L = layers, NH/NKV = heads/kv heads, D = H / NH head dim, E = experts, F = expert width,
V = vocabulary.

Everything here is SYNTHETIC: random weights (so the text is noise) in the exact `blockffn` GGUF layout of
docs/gguf-blockffn.md, for measuring how the runtime scales to realistic sizes without the real checkpoints. Random
weights route arbitrarily, so benchmarks pair these files with the native synthetic-routing switch
(`Session.set_synthetic_routing`, native/src/routing_synth.c), which fixes TLS and CLS-k.

Shapes (SHAPES) come from the official repository github.com/thunlp/BlockFFN, read for facts:
  pretrain/apps/dragonfly_2b/model_configs/{0.1b,0.5b,0.8b,1.2b}_mla_block.json give dim_model (H), num_layers (L),
  num_heads (NH), num_expert (E), dim_expert (F), vocab_size (V = 122753) and scale_emb 12 / scale_depth 1.4;
  pretrain/bmt_to_hf/config.json (the HF config template of the released checkpoints) gives dim_model_base 256,
  rms_norm_eps 1e-5, rope_theta default 10000 and max_position_embeddings 4096.
  Their attention is multi-head latent attention (`attention_type: "mla"`) with q_lora_rank 768, kv_lora_rank 256,
  qk_nope_head_dim 128, qk_rope_head_dim 64 and v_head_dim = H / NH = 128 in all four; the shapes here are MLA with
  exactly those dimensions (the layout of docs/gguf-blockffn.md, MLA), so the KV cache is the latent one. Q4_0 files
  store MLA's value path (attn_kv_a_mqa, attn_v_b) Q8_0, as the converter does (converters/blockffn.py).
Differences, stated:
  - 3B (the SFT model of the paper's speed experiments, SparseLLM/blockffn_3b_sft): its config is NOT in the
    repository. Assumed here: the HF template's H = 2304, L = 40, NH = 36 (D = 64, NKV = NH), V = 122753, and E x F
    = 4 H as in every released pre-training config (0.1b: 48 x 64 = 4 x 768, ..., 1.2b: 56 x 128 = 4 x 1792) with
    F = 128: E = 72, and ordinary multi-head attention (its attention is not published either). About 3.1 B
    parameters with the untied 122753-token embeddings.
  - Vocabulary: the default is a small V (SMALL_VOCAB) so files are written quickly; the LM head then costs less
    than in the real models (122753 x H per token). `vocab="real"` writes the real V.
  - Router: "rms" norm (the released runs' norm_after_router), router weights random normal; experts stored as in
    `block_linear` files (one contiguous slab per expert).
Quantized weights are random blocks: a fixed scale per block (weight std ~ 1 / sqrt(row length)) and random quants,
written tensor by tensor (peak memory ~ the largest tensor, not the model). Files are cached under cache_dir()
and reused when the same shape, type, vocabulary and seed were written before.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3  # bump when the bytes a (shape, qtype, vocab, seed) produces change
REAL_VOCAB = 122753  # vocab_size of every released BlockFFN pre-training config
SMALL_VOCAB = 4096
QTYPES = ("Q4_0", "Q8_0")
FILE_TYPE = {"Q4_0": 2, "Q8_0": 7}  # general.file_type (LlamaFileType)
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34}  # per 32 values: f16 scale + quants
QUANT_STD = {"Q4_0": math.sqrt((16 ** 2 - 1) / 12), "Q8_0": math.sqrt((256 ** 2 - 1) / 12)}  # std of uniform quants


@dataclass(frozen=True)
class Shape:
    """One BlockFFN configuration (see the module docstring for sources). attention "mla" (the released models:
    QL, KL latent ranks, DN nope and DR rope dims per head, DV = H / NH) or "mha" (kv_heads = heads)."""

    name: str
    hidden: int          # H
    layers: int          # L
    heads: int           # NH
    kv_heads: int        # NKV
    experts: int         # E
    expert_width: int    # F
    vocab: int = REAL_VOCAB
    context: int = 4096
    source: str = ""
    attention: str = "mla"
    q_lora: int = 768    # QL
    kv_lora: int = 256   # KL
    qk_nope: int = 128   # DN
    qk_rope: int = 64    # DR

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def with_vocab(self, vocab: int | str) -> Shape:
        """This shape with vocabulary "real" (the released V), "small" (SMALL_VOCAB) or a number."""
        v = REAL_VOCAB if vocab == "real" else SMALL_VOCAB if vocab == "small" else int(vocab)
        if v < 259:
            raise ValueError(f"vocab must be at least 259 (3 special + 256 byte tokens), got {v}")
        return replace(self, vocab=v)

    def n_params(self) -> dict[str, int]:
        """Parameters by part: attention, expert FFN, router, embeddings (token_embd + output)."""
        H, L, E, F, kvd = self.hidden, self.layers, self.experts, self.expert_width, self.kv_heads * self.head_dim
        attn = sum(math.prod(shp) for name, shp, _ in _attention_tensors(self, "", "Q4_0") if len(shp) > 1)
        return {"attention": L * attn, "experts": L * E * 2 * F * H, "router": L * E * H,
                "embeddings": 2 * self.vocab * H}

    def kv_bytes_per_token(self) -> dict[str, int]:
        """F16 KV cache bytes per token over all layers: what Sparrow caches (MLA: the latent and the rope key), and
        full per-head keys and values (NH x (DN + DR + DV) for MLA, as an expanded cache would hold them)."""
        L, NH, D = self.layers, self.heads, self.head_dim
        if self.attention == "mla":
            return {"cached": L * (self.kv_lora + self.qk_rope) * 2,
                    "full_k_v": L * NH * (self.qk_nope + self.qk_rope + D) * 2}
        return {"cached": L * 2 * self.kv_heads * D * 2, "full_k_v": L * 2 * self.kv_heads * D * 2}


_REPO = "github.com/thunlp/BlockFFN"
_PRE = "pretrain/apps/dragonfly_2b/model_configs/"
SHAPES: dict[str, Shape] = {
    "0.1b": Shape("0.1b", 768, 16, 6, 6, 48, 64, source=f"{_REPO} {_PRE}0.1b_mla_block.json"),
    "0.5b": Shape("0.5b", 1280, 27, 10, 10, 40, 128, source=f"{_REPO} {_PRE}0.5b_mla_block.json"),
    "0.8b": Shape("0.8b", 1536, 32, 12, 12, 48, 128, source=f"{_REPO} {_PRE}0.8b_mla_block.json"),
    "1.2b": Shape("1.2b", 1792, 35, 14, 14, 56, 128, source=f"{_REPO} {_PRE}1.2b_mla_block.json"),
    "3b": Shape("3b", 2304, 40, 36, 36, 72, 128,
                source=f"ASSUMED: H/L/NH/V from {_REPO} pretrain/bmt_to_hf/config.json; E x F = 4H, F = 128 as in "
                       f"the released configs; the 3B SFT config itself is not in the repository", attention="mha"),
    # tiny, for tests (seconds to write and run)
    "tiny": Shape("tiny", 64, 2, 2, 2, 16, 32, vocab=300, context=512, source="test shape", q_lora=64, kv_lora=32,
                  qk_nope=32, qk_rope=16),
}

# MiniCPM scaling (both repository files above): scale_emb, scale_depth, dim_model_base
SCALE_EMB, SCALE_DEPTH, DIM_MODEL_BASE = 12.0, 1.4, 256


def cache_dir() -> Path:
    """$SPARROW_SYNTH_CACHE, else the model store's root (runtime.store) / "synthetic"."""
    if os.environ.get("SPARROW_SYNTH_CACHE"):
        return Path(os.environ["SPARROW_SYNTH_CACHE"]).expanduser()
    from ..runtime.store import store_root

    return store_root() / "synthetic"


def _random_quant(rng: np.random.Generator, rows: int, k: int, qtype: str) -> np.ndarray:
    """[rows, k/32 * block bytes] uint8: valid qtype blocks, scale 1 / (quant std * sqrt(k)), random quants."""
    nb, bb = k // 32, BLOCK_BYTES[qtype]
    raw = np.frombuffer(rng.bytes(rows * nb * bb), np.uint8).reshape(rows, nb, bb).copy()
    scale = np.float16(1.0 / (QUANT_STD[qtype] * math.sqrt(k)))
    raw[:, :, :2] = np.frombuffer(scale.tobytes(), np.uint8)
    return raw.reshape(rows, nb * bb)


def _tensors(shape: Shape, qtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, type) of every tensor in file order; type is qtype or "F32"."""
    H, E, F, V = shape.hidden, shape.experts, shape.expert_width, shape.vocab
    out = [("token_embd.weight", (V, H), qtype), ("output_norm.weight", (H,), "F32"), ("output.weight", (V, H), qtype)]
    for i in range(shape.layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (H,), "F32"), *_attention_tensors(shape, p, qtype),
                (p + "ffn_norm.weight", (H,), "F32"), (p + "ffn_router.weight", (E, H), "F32"),
                (p + "ffn_router_norm.weight", (E,), "F32"), (p + "ffn_experts.weight", (E, 2 * F, H), qtype)]
    return out


def _attention_tensors(shape: Shape, p: str, qtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """One layer's attention tensors (numpy shapes): MLA's factorised projections, or MHA's q, k, v, output."""
    H, NH, D = shape.hidden, shape.heads, shape.head_dim
    if shape.attention == "mla":
        from ..converters.blockffn import MLA_Q8_IN_Q4_0

        QL, KL, DN, DR = shape.q_lora, shape.kv_lora, shape.qk_nope, shape.qk_rope
        value = "Q8_0" if qtype == "Q4_0" else qtype  # the value path of a Q4_0 file, as the converter stores it
        assert (p + "attn_kv_a_mqa.weight").endswith(MLA_Q8_IN_Q4_0) and (p + "attn_v_b.weight").endswith(MLA_Q8_IN_Q4_0)
        return [(p + "attn_q_a.weight", (QL, H), qtype), (p + "attn_q_a_norm.weight", (QL,), "F32"),
                (p + "attn_q_b.weight", (NH * (DN + DR), QL), qtype), (p + "attn_kv_a_mqa.weight", (KL + DR, H), value),
                (p + "attn_kv_a_norm.weight", (KL,), "F32"), (p + "attn_k_b.weight", (NH, KL, DN), qtype),
                (p + "attn_v_b.weight", (NH, D, KL), value), (p + "attn_output.weight", (H, NH * D), qtype)]
    kvd = shape.kv_heads * D
    return [(p + "attn_q.weight", (H, H), qtype), (p + "attn_k.weight", (kvd, H), qtype),
            (p + "attn_v.weight", (kvd, H), qtype), (p + "attn_output.weight", (H, H), qtype)]


def _data(rng: np.random.Generator, name: str, shp: tuple[int, ...], ty: str) -> np.ndarray:
    if ty != "F32":
        return _random_quant(rng, math.prod(shp[:-1]), shp[-1], ty)
    if name.endswith("ffn_router.weight"):
        return (rng.standard_normal(shp) * shp[-1] ** -0.5).astype(np.float32)
    return np.ones(shp, np.float32)  # norms


def key(shape: Shape, qtype: str, seed: int) -> str:
    """Hash of everything that determines the file's bytes."""
    blob = json.dumps([FORMAT_VERSION, asdict(shape) | {"source": None}, qtype, seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def path_for(shape: Shape, qtype: str = "Q4_0", seed: int = 0, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"blockffn-synthetic-{shape.name}-v{shape.vocab}-{qtype.lower()}-s{seed}-" \
                                    f"{key(shape, qtype, seed)}.gguf"


def write(shape: Shape, path: str | os.PathLike, qtype: str = "Q4_0", seed: int = 0, progress: bool = True) -> Path:
    """Write the synthetic GGUF of `shape` to `path` (through a temporary file renamed into place)."""
    import gguf
    from tqdm import tqdm

    from ..converters.gguf_out import streamed_gguf

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(QTYPES)}, not {qtype!r}")
    H, L = shape.hidden, shape.layers
    if H % 32 or H % shape.heads or shape.heads % shape.kv_heads or shape.head_dim % 2:
        raise ValueError(f"shape {shape.name}: H must be a multiple of 32 and of NH, NH of NKV, D even")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = "blockffn"
    w = gguf.GGUFWriter(None, arch)
    w.add_name(f"synthetic-blockffn-{shape.name} (random weights)")
    w.add_file_type(FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    mla = shape.attention == "mla"
    for k, v in {"context_length": shape.context, "embedding_length": H, "block_count": L,
                 "feed_forward_length": shape.experts * shape.expert_width, "attention.head_count": shape.heads,
                 "attention.head_count_kv": shape.heads if mla else shape.kv_heads,
                 "rope.dimension_count": shape.qk_rope if mla else shape.head_dim,
                 "vocab_size": shape.vocab, "expert_count": shape.experts,
                 "expert_width": shape.expert_width}.items():
        w.add_uint32(f"{arch}.{k}", v)
    if mla:
        w.add_string(f"{arch}.attention.type", "mla")
        for k, v in {"attention.q_lora_rank": shape.q_lora, "attention.kv_lora_rank": shape.kv_lora,
                     "attention.key_length": shape.qk_nope + shape.qk_rope,
                     "attention.value_length": shape.head_dim}.items():
            w.add_uint32(f"{arch}.{k}", v)
        w.add_float32(f"{arch}.attention.lora_norm_epsilon", 1e-6)
    for k, v in {"attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "router_norm_eps": 1e-5,
                 "router_norm_scale": 1.0, "embedding_scale": SCALE_EMB, "residual_scale": SCALE_DEPTH / math.sqrt(L),
                 "logit_scale": DIM_MODEL_BASE / H}.items():
        w.add_float32(f"{arch}.{k}", v)
    w.add_string(f"{arch}.router_norm", "rms")
    w.add_string(f"{arch}.router_activation", "relu")
    w.add_string(f"{arch}.expert_activation", "silu")
    # vocabulary: <unk> <s> </s>, the 256 byte pieces, then normal pieces that are never produced by text
    n_extra = shape.vocab - 259
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [f"[syn{i}]" for i in range(n_extra)])
    w.add_token_scores([0.0] * 259 + [-1000.0] * n_extra)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * n_extra)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    plan = _tensors(shape, qtype)
    for name, shp, ty in plan:
        if ty == "F32":
            w.add_tensor_info(name, shp, np.dtype(np.float32), 4 * math.prod(shp))
        else:
            byte_shape = (*shp[:-1], shp[-1] // 32 * BLOCK_BYTES[ty])
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                              raw_dtype=gguf.GGMLQuantizationType[ty])
    with streamed_gguf(w, out):
        for i, (name, shp, ty) in enumerate(tqdm(plan, desc=f"synthetic {shape.name} {qtype}", unit="tensor",
                                                 disable=not progress)):
            rng = np.random.default_rng([seed, i])  # per tensor: the bytes do not depend on write order
            w.write_tensor_data(_data(rng, name, shp, ty))
    return out


def ensure(shape: Shape | str, qtype: str = "Q4_0", seed: int = 0, vocab: int | str | None = None,
           cache: Path | None = None, progress: bool = True) -> Path:
    """The cached synthetic file of this shape (a name in SHAPES or a Shape), writing it when absent."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    if vocab is not None:
        s = s.with_vocab(vocab)
    p = path_for(s, qtype, seed, cache)
    if not p.exists():
        write(s, p, qtype, seed, progress)
    return p


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write (or find in the cache) a synthetic BlockFFN GGUF.")
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--type", default="Q4_0", choices=QTYPES)
    ap.add_argument("--vocab", default="small", help=f'"small" (default, {SMALL_VOCAB}), "real" ({REAL_VOCAB}) or a number')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write here instead of the cache")
    a = ap.parse_args()
    s = SHAPES[a.shape].with_vocab(a.vocab)
    p = write(s, a.out, a.type, a.seed) if a.out else ensure(s, a.type, a.seed)
    print(f"{p} ({p.stat().st_size / 1e6:.0f} MB): {s}")


if __name__ == "__main__":
    main()
