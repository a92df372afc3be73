"""Tiny random BlockFFN checkpoints in the released Hugging Face layout, for tests.

A checkpoint folder holds config.json (the official MiniCPM/BlockFFN keys), model.safetensors (the official tensor
names, written with the `safetensors` numpy API) and a SentencePiece tokenizer.model trained here on Python standard
library source (cached under tests/.cache, so training happens once per machine).

Shape legend: H = hidden, V = vocabulary, E = experts, F = expert width, NH/NKV = heads/kv heads, D = head dim;
with attention_type "mla" (the released checkpoints' multi-head latent attention): QL/KL = q/kv lora ranks,
DN/DR = per-head nope/rope dims, DV = H / NH.

Routing: the embeddings share one direction m (half their energy), and router row e leans against it by lean_e
(spread over [0, 2 * router_lean]), so ReLU switches an expert off for a fraction of tokens that grows with its
lean: about 50-95% per expert with the default lean. A negative router_lean leans every row towards m, so every
expert is active for (practically) every token.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("SPARROW_TEST_CACHE", Path(__file__).parent / ".cache"))

SPM_VOCAB = 512
SPM_SOURCES = ["textwrap.py", "json/__init__.py", "json/decoder.py", "argparse.py", "functools.py", "pathlib.py",
               "random.py", "statistics.py", "fractions.py", "heapq.py", "bisect.py", "shutil.py", "tempfile.py",
               "string.py", "difflib.py", "pprint.py", "dataclasses.py", "contextlib.py", "calendar.py"]
USER_DEFINED_SYMBOLS = ["<think>"]


def _training_lines() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in SPM_SOURCES:
        path = stdlib / name
        if path.is_file():
            lines += [s.strip() for s in path.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
    if len(lines) < 2000:
        raise RuntimeError(f"too little training text found under {stdlib}")
    return lines


def tokenizer_model(vocab_size: int = SPM_VOCAB, cache: Path = CACHE) -> Path:
    """A SentencePiece BPE model (byte fallback, <unk>=0 <s>=1 </s>=2), trained once and cached."""
    import sentencepiece as spm

    options = {"vocab_size": vocab_size, "model_type": "bpe", "byte_fallback": True, "unk_id": 0, "bos_id": 1,
               "eos_id": 2, "pad_id": -1, "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
               "character_coverage": 1.0, "split_digits": True, "user_defined_symbols": USER_DEFINED_SYMBOLS,
               "max_sentence_length": 4096, "num_threads": 1, "minloglevel": 2}
    key = hashlib.sha256(json.dumps([options, SPM_SOURCES, spm.__version__], sort_keys=True).encode()).hexdigest()
    target = cache / f"blockffn-spm-{key[:12]}.model"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_training_lines()), model_writer=model, **options)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, target)
    return target


@dataclass
class FixtureConfig:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 8
    expert_size: int = 16
    ffn_type: str = "block_linear"       # "block" | "block_linear"
    norm_after_router: str = "rms"       # "rms" | "sum" | "none"
    norm_scale: float = 1.0
    tie_word_embeddings: bool = False
    scale_emb: float = 12.0
    dim_model_base: int = 16
    scale_depth: float = 1.4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 256
    vocab_size: int | None = None        # None: the tokenizer's size; larger: padded embedding rows
    router_lean: float = 0.2             # > 0: experts off for most tokens; < 0: every expert on
    seed: int = 0
    attention_type: str = "vanilla"      # "vanilla" (MHA/GQA) | "mla" (num_key_value_heads then unused)
    q_lora_rank: int = 32                # MLA only: QL
    kv_lora_rank: int = 32               # MLA only: KL
    qk_nope_head_dim: int = 16           # MLA only: DN
    qk_rope_head_dim: int = 8            # MLA only: DR


def canonical_weights(cfg: FixtureConfig, vocab_size: int) -> dict[str, np.ndarray]:
    """Random weights, the experts as up [E, F, H] and down [E, H, F] whatever cfg.ffn_type, so 'block' and
    'block_linear' checkpoints of one seed hold the same model."""
    rng = np.random.default_rng(cfg.seed)
    H, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_size
    NH, NKV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = H // NH

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return rng.standard_normal((rows, cols)) * scale

    def norm(n: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(n)

    m = rng.standard_normal(H)                           # the shared direction of every embedding
    m_hat = m / np.linalg.norm(m)
    w = {"model.embed_tokens.weight": 0.1 * (rng.standard_normal((vocab_size, H)) + m),  # [V, H]
         "model.norm.weight": norm(H)}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = mat(vocab_size, H, H ** -0.5)
    lean = np.linspace(0.0, 2.0 * cfg.router_lean, E) if cfg.router_lean >= 0 else np.full(E, cfg.router_lean)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = norm(H)
        if cfg.attention_type == "mla":
            w.update(mla_weights(cfg, p, mat, norm))
        else:
            w[p + "self_attn.q_proj.weight"] = mat(NH * D, H, H ** -0.5)
            w[p + "self_attn.k_proj.weight"] = mat(NKV * D, H, H ** -0.5)
            w[p + "self_attn.v_proj.weight"] = mat(NKV * D, H, H ** -0.5)
        w[p + "self_attn.o_proj.weight"] = mat(H, NH * D, (NH * D) ** -0.5)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        w[p + "mlp.router_proj.weight"] = mat(E, H, H ** -0.5) - lean[:, None] * m_hat  # [E, H]
        w[p + "mlp.router_norm.weight"] = norm(E)
        w[p + "mlp.up_proj"] = rng.standard_normal((E, F, H)) * H ** -0.5                 # [E, F, H]
        w[p + "mlp.down_proj"] = rng.standard_normal((E, H, F)) * (E * F) ** -0.5         # [E, H, F]
    return w


def mla_weights(cfg: FixtureConfig, p: str, mat, norm) -> dict[str, np.ndarray]:
    """One layer's MLA projections in the official MLAAttention layout (every projection keeps unit-variance
    activations: q and c come out of RMSNorms, k_pe out of the normed block input)."""
    H, NH = cfg.hidden_size, cfg.num_attention_heads
    QL, KL, DN, DR, DV = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, H // NH
    a = "self_attn."
    return {p + a + "q_a_proj.weight": mat(QL, H, H ** -0.5),                       # [QL, H]
            p + a + "q_a_layernorm.weight": norm(QL),
            p + a + "q_b_proj.weight": mat(NH * (DN + DR), QL, QL ** -0.5),        # [NH*(DN+DR), QL]
            p + a + "kv_a_proj_with_mqa.weight": mat(KL + DR, H, H ** -0.5),       # [KL+DR, H]
            p + a + "kv_a_layernorm.weight": norm(KL),
            p + a + "kv_b_proj.weight": mat(NH * (DN + DV), KL, KL ** -0.5)}       # [NH*(DN+DV), KL]


def hf_layout(w: dict[str, np.ndarray], cfg: FixtureConfig) -> dict[str, np.ndarray]:
    """Canonical weights -> the tensors a checkpoint of cfg.ffn_type / cfg.norm_after_router stores."""
    H, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_size
    out = {}
    for name, a in w.items():
        if name.endswith("mlp.router_norm.weight") and cfg.norm_after_router != "rms":
            continue
        if cfg.ffn_type == "block_linear" and name.endswith("mlp.up_proj"):
            a = a.reshape(E * F, H)                                   # [E*F, H]
        elif cfg.ffn_type == "block_linear" and name.endswith("mlp.down_proj"):
            a = a.transpose(1, 0, 2).reshape(H, E * F)                # [E, H, F] -> [H, E*F]
        out[name] = a
    return out


def config_json(cfg: FixtureConfig, vocab_size: int) -> dict:
    return {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.1,
        "intermediate_size": cfg.num_experts * cfg.expert_size,
        "max_position_embeddings": cfg.max_position_embeddings, "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": None, "rope_theta": cfg.rope_theta, "use_cache": True,
        "vocab_size": vocab_size, "scale_emb": cfg.scale_emb, "dim_model_base": cfg.dim_model_base,
        "scale_depth": cfg.scale_depth, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_type": "vanilla", "ffn_type": cfg.ffn_type, "ffn_gated": True, "router_act": "relu",
        "expert_size": cfg.expert_size, "num_experts": cfg.num_experts,
        "norm_after_router": cfg.norm_after_router, "norm_scale": cfg.norm_scale, "block_implementation": "torch",
    } | (mla_config(cfg) if cfg.attention_type == "mla" else {})


def mla_config(cfg: FixtureConfig) -> dict:
    """The keys the official bmt -> HF converter (pretrain/convert_bmt_to_hf.py) writes for an MLA model."""
    return {"attention_type": "mla", "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads}


def write_checkpoint(folder: Path, cfg: FixtureConfig | None = None, *, drop: tuple[str, ...] = (),
                     replace: dict[str, np.ndarray] | None = None, config_overrides: dict | None = None,
                     dtype: str = "F32") -> Path:
    """Write a checkpoint folder. `drop` leaves tensors out, `replace` substitutes (or adds) tensors,
    `config_overrides` changes config.json keys (value None deletes the key). dtype: F32, F16 or BF16 (BF16 is
    written without the safetensors package, whose numpy API has no bfloat16)."""
    from safetensors.numpy import save_file

    cfg = cfg or FixtureConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm_path = tokenizer_model()
    shutil.copyfile(spm_path, folder / "tokenizer.model")
    import sentencepiece as spm

    n_pieces = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
    vocab_size = cfg.vocab_size or n_pieces
    tensors = hf_layout(canonical_weights(cfg, vocab_size), cfg)
    tensors.update(replace or {})
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    config = config_json(cfg, vocab_size)
    for k, v in (config_overrides or {}).items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "chat_template": "{{ bos_token }}{{ messages[0].content }}"}))
    if dtype == "BF16":
        save_bf16(tensors, folder / "model.safetensors")
    else:
        np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
        save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
    """A safetensors file with every tensor in BF16 (the released checkpoints' dtype)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        blob = to_bf16_bits(a).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)


def describe(cfg: FixtureConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
