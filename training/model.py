"""A small BlockFFN (MiniCPM-based) in PyTorch, whose state dict and config.json are the released Hugging Face
layout that converters/blockffn.py reads (tensor names and config keys as tests/blockffn_fixture.py writes them).

Shape legend: B = batch, T = tokens, H = hidden, V = vocabulary, E = experts, F = expert width, NH/NKV = heads/kv
heads, D = head dim, L = layers.

The block (as the official modeling code computes it; vanilla attention, ffn_type "block_linear", norm "rms"):
    x = x + s_res * attn(rmsnorm(x))                        s_res = scale_depth / sqrt(L)
    x = x + s_res * ffn(rmsnorm(x))
  ffn(x):  raw = x @ router_proj.T                          [B, T, E]   (the "raw router score")
           r   = rmsnorm_E(relu(raw)) * router_norm         [B, T, E]
           y   = sum_e r_e * silu(x @ up_e.T) @ down_e.T    up_proj [E*F, H], down_proj [H, E*F]
  embeddings x scale_emb; logits = rmsnorm(x) / (H / dim_model_base) @ embed.T (tied)

`ffn="dense"` replaces the block by a dense non-gated MLP of the same width E*F (y = silu(x @ up.T) @ down.T, no
router): the "all experts always on" baseline with the same parameter count (less the E x H router). `ffn="block"`
with chunk objectives off is the ablation; both are the same module.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 32
    expert_size: int = 32
    ffn: str = "block"                 # "block" (BlockFFN, block_linear) | "dense" (baseline, not convertible)
    max_position_embeddings: int = 256
    scale_emb: float = 12.0            # MiniCPM values (released BlockFFN configs)
    dim_model_base: int = 64           # logits / (H / dim_model_base); also the muP width factor for the lr
    scale_depth: float = 1.4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.1              # official init_std; matrices use init_std / sqrt(scale_width)
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def scale_width(self) -> float:
        return self.hidden_size / self.dim_model_base

    def hf_config(self) -> dict:
        """config.json in the released BlockFFN (MiniCPM) format."""
        if self.ffn != "block":
            raise ValueError("only ffn='block' models have a BlockFFN config.json")
        return {
            "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "hidden_act": "silu", "hidden_size": self.hidden_size, "initializer_range": self.init_std,
            "intermediate_size": self.num_experts * self.expert_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads, "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None, "rope_theta": self.rope_theta, "use_cache": True, "vocab_size": self.vocab_size,
            "scale_emb": self.scale_emb, "dim_model_base": self.dim_model_base, "scale_depth": self.scale_depth,
            "tie_word_embeddings": True, "attention_type": "vanilla", "ffn_type": "block_linear",
            "ffn_gated": True, "router_act": "relu", "expert_size": self.expert_size,
            "num_experts": self.num_experts, "norm_after_router": "rms", "norm_scale": 1.0,
            "block_implementation": "torch",
        }


def rmsnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.eps) * self.weight


def rope_cache(T: int, D: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] in HF's rotate_half layout (dimension i pairs with i + D/2)."""
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    theta = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]       # [T, D/2]
    theta = torch.cat([theta, theta], dim=-1)                                    # [T, D]
    return theta.cos(), theta.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]."""
    D = x.shape[-1]
    rotated = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
        H = c.hidden_size
        self.q_proj = nn.Linear(H, self.nh * self.d, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.d, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.nh * self.d, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.d).transpose(1, 2)         # [B, NH, T, D]
        k = self.k_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)        # [B, NKV, T, D]
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.nh // self.nkv                                               # q head h uses kv head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)             # [B, NH, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.d))


class BlockMLP(nn.Module):
    """BlockFFN's FFN (block_linear, relu router, rms router norm) or, with dense=True, a plain silu MLP."""

    def __init__(self, c: ModelConfig, dense: bool = False):
        super().__init__()
        H, E, Fw = c.hidden_size, c.num_experts, c.expert_size
        self.E, self.F, self.eps, self.dense = E, Fw, c.rms_norm_eps, dense
        if not dense:
            self.router_proj = nn.Linear(H, E, bias=False)                      # weight [E, H]
            self.router_norm = RMSNorm(E, c.rms_norm_eps)                       # weight [E]
        self.up_proj = nn.Parameter(torch.empty(E * Fw, H))                     # [E*F, H]
        self.down_proj = nn.Parameter(torch.empty(H, E * Fw))                   # [H, E*F]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [B, T, H] -> y [B, T, H], raw router score [B, T, E], normalised score r [B, T, E] (None if dense)."""
        h = F.silu(x @ self.up_proj.T)                                          # [B, T, E*F]
        if self.dense:
            return h @ self.down_proj.T, None, None
        raw = self.router_proj(x)                                               # [B, T, E]
        r = self.router_norm(F.relu(raw))                                       # [B, T, E]
        h = (h.unflatten(-1, (self.E, self.F)) * r.unsqueeze(-1)).flatten(-2)   # [B, T, E*F]
        return h @ self.down_proj.T, raw, r


class Layer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = BlockMLP(c, dense=c.ffn == "dense")
        self.s_res = c.scale_depth / math.sqrt(c.num_hidden_layers)

    def forward(self, x, cos, sin):
        x = x + self.s_res * self.self_attn(self.input_layernorm(x), cos, sin)
        y, raw, r = self.mlp(self.post_attention_layernorm(x))
        return x + self.s_res * y, raw, r


class Inner(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class BlockFFNForCausalLM(nn.Module):
    """state_dict() keys are the released HF names (model.layers.N.mlp.router_proj.weight, ...); tied head."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = Inner(c)
        cos, sin = rope_cache(c.max_position_embeddings, c.hidden_size // c.num_attention_heads, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        std = c.init_std / math.sqrt(c.scale_width)                              # official: init_std / sqrt(width)
        g = torch.Generator().manual_seed(0)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name == "model.embed_tokens.weight":
                with torch.no_grad():
                    p.normal_(0.0, c.init_std, generator=g)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=g)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The official split: matrices (attention, router, experts) at lr / scale_width, the rest (embeddings,
        norms) at lr. No weight decay on norms."""
        scaled, normal, norms = [], [], []
        for name, p in self.named_parameters():
            if "norm" in name:
                norms.append(p)
            elif name == "model.embed_tokens.weight":
                normal.append(p)
            else:
                scaled.append(p)
        s = self.config.scale_width
        return [{"params": scaled, "lr": lr / s, "base_lr": lr / s, "weight_decay": weight_decay},
                {"params": normal, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
                {"params": norms, "lr": lr, "base_lr": lr, "weight_decay": 0.0}]

    def forward(self, tokens: torch.Tensor):
        """tokens [B, T] -> logits [B, T, V], raw router scores [L][B, T, E], normalised scores [L][B, T, E]."""
        c = self.config
        T = tokens.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(tokens) * c.scale_emb                        # [B, T, H]
        raws, rs = [], []
        for layer in self.model.layers:
            x, raw, r = layer(x, cos, sin)
            raws.append(raw)
            rs.append(r)
        h = self.model.norm(x) / c.scale_width                                   # / (H / dim_model_base)
        return h @ self.model.embed_tokens.weight.T, raws, rs

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of model.safetensors (tied head: no lm_head.weight)."""
        return {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}


def config_dict(c: ModelConfig) -> dict:
    return asdict(c)
