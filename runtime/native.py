"""Pythonic classes over the native runtime (the `_sparrow` binding, which mirrors native/include/sparrow.h).

    with Model("model.gguf") as model, model.session(n_ctx=2048) as session:
        for piece in generate(model, session, "Once upon a time", max_tokens=32):
            print(piece, end="")
"""
from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from typing import TypeVar

import numpy as np

from . import _sparrow

SparrowError = _sparrow.SparrowError


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    name: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    bos_token: int
    eos_token: int
    eot_token: int
    add_bos: bool
    n_params: int
    weight_bytes: int


# sp_ffn_mode by its short name: "auto", "dense", "token", "chunk" (SP_FFN_SPARSE_TOKEN -> "token"), from the binding.
FFN_MODES: dict[str, _sparrow.FfnMode] = {m.name.removeprefix("SPARSE_").lower(): m for m in _sparrow.FfnMode}


def _ffn_mode(name: str) -> int:
    if name not in FFN_MODES:
        raise ValueError(f"ffn_mode must be one of {', '.join(FFN_MODES)}, not {name!r}")
    return int(FFN_MODES[name])


# sp_kv_type by name: the KV cache's element type ("f32": multi-head latent attention only).
KV_TYPES = {"f16": 0, "f32": 1}


def _kv_type(name: str) -> int:
    if name not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {name!r}")
    return KV_TYPES[name]


# ---- devices: where a session runs (sp_session_params.device: 0 = the CPU, k >= 1 = GPU device k) ----

Device = str | int  # "cpu", "vulkan" (the first GPU device), "vulkan:N" (GPU device N, from 1), or the number itself


def devices() -> list[dict[str, object]]:
    """The GPU devices sessions can run on, in the library's order (sp_device_info): dicts of index (the device
    number, from 1), name, kind ("integrated", "discrete", "virtual", "cpu": a software renderer such as lavapipe,
    "other"), api ("vulkan"), api_version, driver and memory_bytes. Empty when the library was built without its
    Vulkan backend or finds no loader or device: device_error() says why."""
    return _sparrow.devices()


def device_error() -> str:
    """Why devices() is empty ("" when it is not, or when nothing went wrong)."""
    return _sparrow.device_error()


def parse_device(device: Device) -> int:
    """The library's device number for a device: "cpu" or 0 -> 0; "vulkan" -> 1 (the first GPU device); "vulkan:N"
    or N -> N (GPU devices count from 1). Only the spelling is checked here (device_index checks the device exists)."""
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"device must be 0 (the CPU) or a GPU device number from 1, not {device}")
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'vulkan:1', or a number, not {device!r}")
    name, sep, number = device.strip().lower().partition(":")
    if name == "cpu" and not sep:
        return 0
    if name == "vulkan" and not sep:
        return 1
    if name == "vulkan" and number.isascii() and number.isdigit() and int(number) >= 1:
        return int(number)
    if name == "vulkan":
        raise ValueError(f"bad device {device!r}: Vulkan devices are numbered from 1, as in 'vulkan:1' "
                         "(`sparrow bench` lists them)")
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'vulkan' (the first GPU device) or 'vulkan:N' (GPU "
                     "device N, from 1)")


def device_index(device: Device) -> int:
    """parse_device, then check that a GPU device asked for is there: ValueError saying why it is not (no device at
    all: the library's reason; a number past the last: the devices there are)."""
    index = parse_device(device)
    if index == 0:
        return 0
    found = devices()
    if not found:
        why = device_error() or "the library found no Vulkan device"
        raise ValueError(f"device {device!r} asked for, but this machine has no Vulkan GPU device: {why}")
    if index > len(found):
        names = ", ".join(f"vulkan:{d['index']} ({d['name']})" for d in found)
        raise ValueError(f"device {device!r} asked for, but there is no Vulkan device {index}; there are: {names}")
    return index


@dataclass(frozen=True)
class SparsityStats:
    """Sparse-expert statistics (sp_sparsity_stats): TLS = fraction of (token, expert) pairs off; cls[k] = fraction
    of (chunk of k consecutive evaluated tokens, expert) pairs off for the whole chunk, k = 2..16 (NaN before the
    first full chunk); bytes of expert weights read per token, and what reading every expert would cost."""

    n_expert: int
    n_tokens: int
    tls: float
    cls: dict[int, float]
    expert_bytes_per_token: float
    dense_bytes_per_token: float


@dataclass(frozen=True)
class Timings:
    """Where the forward passes' wall time went (sp_timings), summed since the session began or reset_timings():
    embeddings, attention blocks (norms, projections, attention, residuals), FFN blocks, LM head; and the BlockFFN
    blocks' phases within ffn_s (router, planning, expert units -- of which thread 0's own up and down shares --, the
    sum of the threads' partial outputs)."""

    n_evals: int
    n_tokens: int
    embed_s: float
    attention_s: float
    ffn_s: float
    head_s: float
    ffn_router_s: float = 0.0
    ffn_plan_s: float = 0.0
    ffn_experts_s: float = 0.0
    ffn_up_s: float = 0.0
    ffn_down_s: float = 0.0
    ffn_reduce_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.embed_s + self.attention_s + self.ffn_s + self.head_s


@dataclass(frozen=True)
class SessionMemory:
    """The memory a session allocates (sp_session_memory): its F16 KV cache, scratch, statistics and record; the
    model's weights are not included. n_ctx is the KV cache capacity, an n_ctx of 0 resolved to the model's."""

    n_ctx: int
    kv_cache_bytes: int
    total_bytes: int


def _c_sampler_defaults() -> dict[str, float | int]:
    """sp_sampler_default_params(), floats as the shortest decimal that is the same float32 (0.8, not 0.800000011)."""
    return {k: float(str(np.float32(v))) if isinstance(v, float) else v
            for k, v in _sparrow.sampler_default_params().items()}


_C_SAMPLER = _c_sampler_defaults()


@dataclass
class SamplerParams:
    """Sampling settings (sp_sampler_params); temperature <= 0 means greedy. The defaults are the C library's
    (sp_sampler_default_params); chat() gives the chat commands' defaults."""

    temperature: float = _C_SAMPLER["temperature"]
    top_k: int = _C_SAMPLER["top_k"]
    top_p: float = _C_SAMPLER["top_p"]
    min_p: float = _C_SAMPLER["min_p"]
    repeat_penalty: float = _C_SAMPLER["repeat_penalty"]
    repeat_last_n: int = _C_SAMPLER["repeat_last_n"]
    seed: int = _C_SAMPLER["seed"]

    @classmethod
    def greedy(cls) -> SamplerParams:
        return cls(temperature=0.0)

    @classmethod
    def chat(cls, **changes: float) -> SamplerParams:
        """What `sparrow chat` and `sparrow generate` sample with unless told otherwise: the library's defaults made
        cooler (small models answer best cool; SmolLM2's card recommends temperature 0.2), with a tighter nucleus
        and a mild repetition penalty. changes: fields to set instead (e.g. seed=)."""
        return cls(**{"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.1, **changes})


class Model:
    """An immutable model loaded from a GGUF file (weights memory-mapped). Shareable by many sessions."""

    def __init__(self, path: str | PathLike[str], *, use_mmap: bool = True, vocab_only: bool = False,
                 repack: bool = True):
        """repack: copy the quantized matmul weights once into the kernels' faster layout (same results; the file
        pages of those weights are released, so memory stays about the same). False keeps them as file views."""
        self.path = str(path)
        self._m = _sparrow.Model(self.path, use_mmap, vocab_only, repack)
        self.info = ModelInfo(**self._m.info())

    def close(self) -> None:
        self._m.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self._m.tokenize(data, add_special, parse_special)

    def token_bytes(self, token: int, *, render_special: bool = False) -> bytes:
        return self._m.token_to_piece(token, render_special)

    def detokenize(self, tokens: Sequence[int], *, render_special: bool = False) -> str:
        return b"".join(self._m.token_to_piece(t, render_special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return self._m.is_eog(token)

    def meta(self, key: str) -> str | None:
        """A string metadata value of the GGUF file (e.g. "tokenizer.chat_template"), or None."""
        raw = self._m.meta_str(key)
        return None if raw is None else raw.decode("utf-8", errors="replace")

    def session(self, *, n_ctx: int = 2048, n_batch: int = 64, n_threads: int = 0, ffn_mode: str = "auto",
                kv_type: str = "f16", device: Device = "cpu") -> Session:
        return Session(self, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, ffn_mode=ffn_mode, kv_type=kv_type,
                       device=device)

    def session_memory(self, *, n_ctx: int = 2048, n_batch: int = 64, n_threads: int = 0,
                       ffn_mode: str = "auto", kv_type: str = "f16", n_seq: int = 1,
                       device: Device = "cpu") -> SessionMemory:
        """What session() (n_seq > 1: BatchSession) with these arguments would allocate, computed by the C library
        without allocating it (the same sizing code as the session's, so it is exact)."""
        return SessionMemory(**self._m.session_memory(n_ctx, n_batch, n_threads, _ffn_mode(ffn_mode),
                                                      _kv_type(kv_type), n_seq, device_index(device)))


_S = TypeVar("_S", bound="_SessionBase")


class _SessionBase:
    """What Session and BatchSession share: the binding's session object (self._s), closing, and the statistics of
    the passes run on it."""

    _s: _sparrow.Session

    def close(self) -> None:
        self._s.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        """KV cache slots (of each sequence, in a BatchSession)."""
        return self._s.n_ctx

    def memory(self) -> SessionMemory:
        """What this session allocated when it was created (what Model.session_memory predicted)."""
        return SessionMemory(**self._s.memory())

    def sparsity(self, layer: int | None = None) -> SparsityStats | None:
        """Expert sparsity over the tokens evaluated since the session began (or reset_sparsity()): all layers, or
        one layer. None for models without sparse experts."""
        d = self._s.sparsity(-1 if layer is None else layer)
        return None if d is None else SparsityStats(**d)

    def reset_sparsity(self) -> None:
        self._s.reset_sparsity()

    def timings(self) -> Timings:
        """Forward-pass time per phase since the session began (or reset_timings())."""
        return Timings(**self._s.timings())

    def reset_timings(self) -> None:
        self._s.reset_timings()

    @property
    def handle(self) -> _sparrow.Session:
        """The binding's session object, which the `_sparrow.testing` hooks take (ffn_run, last_router_scores, ...)."""
        return self._s

    @staticmethod
    def _check_out(out: np.ndarray | None) -> None:
        if out is not None and not (isinstance(out, np.ndarray) and out.dtype == np.float32
                                    and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be a writeable float32 C-contiguous numpy array")


class Session(_SessionBase):
    """KV cache + scratch + threads for one conversation over a Model. Not for concurrent use."""

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: int = 64, n_threads: int = 0,
                 ffn_mode: str = "auto", kv_type: str = "f16", device: Device = "cpu"):
        """ffn_mode (sparse-expert models only): "auto", "dense", "token" or "chunk" (see sp_ffn_mode). kv_type: the
        KV cache's element type, "f16" (default) or "f32" (unrounded, twice the memory; multi-head latent attention
        only, see sp_kv_type). device: where the forward pass runs, "cpu" (default), "vulkan" (the first GPU
        device), "vulkan:N" or the device number (devices() lists them); a GPU session takes grouped-query attention
        models (SparrowError, saying why, for others)."""
        self.model = model
        self.device = device_index(device)  # 0: the CPU, k: GPU device k
        self._s = _sparrow.Session(model._m, n_ctx, n_batch, n_threads, _ffn_mode(ffn_mode), _kv_type(kv_type), 1,
                                   self.device)
        self.n_batch = n_batch
        self.tokens: list[int] = []  # what the KV cache holds, in order
        self.n_evaluated = 0  # tokens run through the forward pass over this session's life (shows KV cache reuse)

    @property
    def n_past(self) -> int:
        return self._s.n_past

    def eval(self, tokens: Sequence[int], *, pos: Sequence[int] | None = None, mask: np.ndarray | None = None,
             logits: str = "last", out: np.ndarray | None = None) -> np.ndarray | None:
        """Evaluate up to n_batch tokens in one forward pass; logits "last" -> [V], "all" -> [T, V], "none".
        out: a float32 C-contiguous array of that shape to fill and return instead of a new one (a loop that
        evaluates every step saves an allocation, and the page faults of a fresh ~1 MB buffer, per step)."""
        self._check_out(out)
        out = self._s.eval(list(tokens), None if pos is None else list(pos), mask, logits, out)
        self.tokens.extend(tokens)
        self.n_evaluated += len(tokens)
        return out

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate any number of tokens in n_batch chunks; returns the last token's logits."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        out = None
        for i in range(0, len(tokens), self.n_batch):
            out = self.eval(tokens[i:i + self.n_batch], logits="last")
        return out

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only these KV cache slots (strictly increasing), in order: the accepted path of a verified draft tree."""
        self._s.keep(list(slots))
        self.tokens = [self.tokens[i] for i in slots]

    def reuse_prefix(self, tokens: Sequence[int]) -> int:
        """Keep the longest cached prefix of `tokens`, but never the last one (evaluating it again gives its logits),
        and drop the rest of the cache; returns how many tokens were kept."""
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        common = max(0, min(common, len(tokens) - 1))
        self.truncate(common)
        return common

    def truncate(self, n: int) -> None:
        """Roll the KV cache back to its first n tokens."""
        self._s.truncate(n)
        del self.tokens[n:]

    def resync(self) -> None:
        """Make `tokens` and the KV cache agree again after an interruption (a Ctrl-C can land between the C eval
        returning and `tokens` being extended): keep what both hold."""
        n = min(len(self.tokens), self.n_past)
        if n != self.n_past or n != len(self.tokens):
            self.truncate(n)

    def generate(self, prompt_tokens: Sequence[int], *, params: SamplerParams | None = None, max_tokens: int = 128,
                 drafter: str = "none", stop: Sequence[str | bytes] = (), **drafter_options: int) -> Iterator[int]:
        """Generate with the C generator (Generator: the loop, the sampler and the drafter in libsparrow), yielding
        each token; default greedy. drafter: "none" or "prompt-lookup" (options ngram, min_ngram, draft_k)."""
        with Generator(self, params=params, max_tokens=max_tokens, drafter=drafter, stop=stop,
                       **drafter_options) as gen:
            gen.start(prompt_tokens)
            yield from gen

    # ---- for benchmarks and tests: synthetic routing and the binding's test hooks (not the stable C API) ----

    def set_synthetic_routing(self, *, tls: float, cls: float, k: int = 8, seed: int = 0) -> dict[str, float | int]:
        """Replace every BlockFFN layer's router scores with a pattern keyed by (layer, position) of exactly this
        token-level sparsity (TLS) and chunk-level sparsity over k consecutive positions (CLS-k, at most TLS), so that
        a random-weight model routes like a trained one (native/src/routing_synth.c). Evaluate again afterwards: the
        KV cache holds what the old routing computed. Returns the effective setting: n_expert, n_active, n_union, k,
        seed and the exact tls and cls. SparrowError (the setting unchanged) on bad values or a model without
        BlockFFN layers."""
        return _sparrow.testing.set_synthetic_routing(self._s, tls, cls, k, seed)

    def clear_synthetic_routing(self) -> None:
        """Back to the router's own scores."""
        _sparrow.testing.clear_synthetic_routing(self._s)

    def synthetic_routing(self) -> dict[str, float | int] | None:
        """The effective synthetic-routing setting (as set_synthetic_routing returns it), or None when off."""
        return _sparrow.testing.synthetic_routing(self._s)


class BatchSession(_SessionBase):
    """Several independent sequences over one Model (sp_session_params.n_seq), their tokens evaluated together: one
    forward pass reads the weights once for every sequence in it. Each sequence has its own n_ctx cache slots and
    positions and never sees another's tokens. Not for concurrent use."""

    def __init__(self, model: Model, *, n_seq: int, n_ctx: int = 2048, n_batch: int = 64, n_threads: int = 0,
                 ffn_mode: str = "auto"):
        self.model = model
        self._s = _sparrow.Session(model._m, n_ctx, n_batch, n_threads, _ffn_mode(ffn_mode), _kv_type("f16"), n_seq)
        self.n_seq = n_seq
        self.n_batch = n_batch

    def n_past(self, seq: int) -> int:
        n = self._s.seq_n_past(seq)
        if n < 0:
            raise ValueError(f"sequence {seq} is outside [0, {self.n_seq})")
        return n

    def truncate(self, seq: int, n: int = 0) -> None:
        """Roll sequence seq back to its first n tokens (0: free it for a new sequence)."""
        self._s.truncate(n, seq)

    def eval(self, runs: Sequence[tuple[int, Sequence[int]]], *, out: np.ndarray | None = None) -> np.ndarray:
        """One forward pass over runs of (sequence id, tokens): each run's tokens go after what its sequence holds.
        At most n_batch tokens in all; each sequence once. Returns [R, V] float32: the logits of each run's last
        token, in the order given (out: a float32 C-contiguous [R, V] array to fill instead of a new one)."""
        tokens: list[int] = []
        seq: list[int] = []
        for s, toks in runs:
            tokens.extend(toks)
            seq.extend([s] * len(toks))
        self._check_out(out)
        return self._s.eval(tokens, None, None, "last", out, seq)


class Sampler:
    """Chooses the next token from logits (greedy, temperature, top-k, top-p, min-p, repetition penalty)."""

    def __init__(self, n_vocab: int, params: SamplerParams | None = None):
        self.params = params or SamplerParams()
        self._s = _sparrow.Sampler(n_vocab, **asdict(self.params))

    def sample(self, logits: np.ndarray) -> int:
        return self._s.sample(np.ascontiguousarray(logits, dtype=np.float32))

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution sample() draws from: (token ids int32 [K], probabilities float32 [K]) of the K tokens
        with non-zero probability, in no particular order."""
        return self._s.candidates(np.ascontiguousarray(logits, dtype=np.float32))

    def accept(self, token: int) -> None:
        self._s.accept(token)

    def reset(self) -> None:
        self._s.reset()


# ---- the C generator (sp_generator): generation and speculative decoding inside libsparrow ----

# The drafters the C generator implements, by the names runtime.drafters uses (sp_drafter_kind).
C_DRAFTERS = {"none": 0, "prompt-lookup": 1, "recycling": 2, "hybrid": 3, "draft-model": 4, "adaptive": 5}
# sp_gen_stop: why a generation ended.
STOP_REASONS = {0: "running", 1: "eog", 2: "max_tokens", 3: "stop_string", 4: "context_full", 5: "callback"}


@dataclass(frozen=True)
class GeneratorStats:
    """What a Generator did since it was created (sp_generator_stats): forward passes after the prompt, draft tokens
    verified and accepted, tokens returned, prompt tokens evaluated, and the time in the forward passes and in the C
    loop around them (drafting, sampling, acceptance, rollback)."""

    steps: int
    drafted: int
    accepted: int
    tokens: int
    prompt_tokens: int
    eval_s: float
    loop_s: float
    draft_eval_s: float = 0.0  # of loop_s: the draft model's forward passes (draft-model drafter)
    plain_steps: int = 0       # of steps: those the adaptive drafter's gate ran plain (no draft)
    plan_steps: int = 0        # the planner (plan, adaptive): steps planned,
    plan_candidates: int = 0   # ... candidate nodes proposed and
    plan_kept: int = 0         # ... kept over them; its cost model of a step:
    cost_step_s: float = 0.0   # ... per step
    cost_token_s: float = 0.0  # ... + per token
    cost_expert_byte_s: float = 0.0  # ... + per expert byte read
    gate_drafting: tuple = (False, False, False)  # the gate (adaptive) per arm (no match, short, repeating): drafting
    gate_probes: tuple = (0, 0, 0)                # ... episodes of drafting started
    gate_paid: tuple = (0, 0, 0)                  # ... that ran faster than plain decoding


class Generator:
    """The decode loop of libsparrow (sp_generator) over a Session: a sampler, stop conditions (end of generation,
    max_tokens, stop strings, a full context) and a drafter, verified speculatively in C (sparrow.h,
    sp_drafter_kind): "none"; "prompt-lookup" (ngram..min_ngram-token matches, draft_k tokens per step);
    "recycling" (Token Recycling: recycling_k candidates kept per token, a tree of branching[depth] children per node,
    max_nodes nodes); "hybrid" (the lookup's chain of draft_k, then the recycling tree merged in); "adaptive" (the
    hybrid pruned by the planner behind the draft gate: plain steps where drafting does not pay; probe_every,
    max_probe_every, learn_every); "draft-model" (draft_session, a session of a model with the same vocabulary,
    drafts a greedy chain of draft_k). plan: prune recycling / hybrid trees with the sparsity-aware planner. Options
    left None take the C library's tuned defaults for the drafter (sp_generator_default_params_for). Greedy output
    equals generate_tokens'; sampled output has the sampler's distribution (without a drafter, the same tokens for the
    same seed). Token Recycling's matrix persists across generations: save_drafter / load_drafter (.npy).

        with Generator(session, params=SamplerParams.greedy(), drafter="prompt-lookup") as gen:
            tokens = gen.generate(prompt_tokens)          # or: gen.start(prompt_tokens); for tok in gen: ...
            print(gen.stop_reason, gen.stats())

    Each start() restarts the sampler from its seed; the KV cache keeps the prefix this generator left there."""

    def __init__(self, session: Session, *, params: SamplerParams | None = None, max_tokens: int = 128,
                 drafter: str = "none", ngram: int | None = None, min_ngram: int | None = None,
                 draft_k: int | None = None, recycling_k: int | None = None, branching: Sequence[int] | None = None,
                 max_nodes: int | None = None, plan: bool | None = None, probe_every: int | None = None,
                 max_probe_every: int | None = None, learn_every: int | None = None,
                 draft_session: Session | None = None, stop: Sequence[str | bytes] = (), stop_at_eog: bool = True):
        if drafter not in C_DRAFTERS:
            raise ValueError(f"the C generator's drafter must be one of {', '.join(C_DRAFTERS)}, not {drafter!r}")
        given = {"ngram": ngram, "min_ngram": min_ngram, "draft_k": draft_k, "recycling_k": recycling_k,
                 "branching": None if branching is None else list(branching), "max_nodes": max_nodes, "plan": plan,
                 "probe_every": probe_every, "max_probe_every": max_probe_every, "learn_every": learn_every}
        options = _sparrow.generator_defaults(C_DRAFTERS[drafter])
        options.update({k: v for k, v in given.items() if v is not None})
        if (drafter == "draft-model") != (draft_session is not None):
            raise ValueError("draft_session goes with drafter='draft-model' (and only with it)")
        self.session = session
        self.draft_session = draft_session
        self.params = params or SamplerParams.greedy()
        stops = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in stop]
        self._g = _sparrow.Generator(session._s, **asdict(self.params), max_tokens=max_tokens,
                                     stop_at_eog=stop_at_eog, drafter=C_DRAFTERS[drafter], stop=stops, **options,
                                     draft_session=None if draft_session is None else draft_session._s)
        self.stop_reason: str | None = None  # why the last generation ended ("eog", "max_tokens", ...), None while on

    def close(self) -> None:
        self._g.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sync(self) -> None:
        """Session.tokens = what the KV cache holds (the generator evaluated and rolled back in C); the draft
        session's cache holds what the C drafter put there, unknown here (-1: no prefix of it is reused)."""
        self.session.tokens = self._g.context()[:self.session.n_past]
        if self.draft_session is not None:
            self.draft_session.tokens = [-1] * self.draft_session.n_past

    def start(self, prompt_tokens: Sequence[int]) -> None:
        """Begin a generation (the prompt evaluated but its last token, which the first step evaluates)."""
        self.stop_reason = None
        before = self._g.stats()["prompt_tokens"]
        try:
            self._g.start(list(prompt_tokens))
        finally:
            self._sync()
        self.session.n_evaluated += self._g.stats()["prompt_tokens"] - before

    def next(self) -> int | None:
        """The next token, or None once the generation has ended (stop_reason says why)."""
        tok, why = self._g.next()
        if tok < 0:
            self.stop_reason = STOP_REASONS[why]
            self._sync()
            return None
        return tok

    def __iter__(self) -> Iterator[int]:
        try:
            while (tok := self.next()) is not None:
                yield tok
        finally:
            self._sync()

    def generate(self, prompt_tokens: Sequence[int] | None = None,
                 callback: Callable[[int], bool | None] | None = None) -> list[int]:
        """Start (when given a prompt) and run to the end in C; callback(token) returning False stops it (an
        exception raised in it stops it too and is raised here). Returns the tokens."""
        if prompt_tokens is not None:
            self.start(prompt_tokens)
        try:
            tokens, why = self._g.generate(callback)
        finally:
            self._sync()
        self.stop_reason = STOP_REASONS[why]
        return tokens

    def stats(self) -> GeneratorStats:
        d = self._g.stats()
        for key in ("gate_drafting", "gate_probes", "gate_paid"):
            d[key] = tuple(d[key])
        return GeneratorStats(**d)

    def reset_stats(self) -> None:
        self._g.reset_stats()

    def context(self) -> list[int]:
        """Every token of the generation so far: the prompt, then the generated ones."""
        return self._g.context()

    def save_drafter(self, path: str | PathLike) -> None:
        """Write Token Recycling's matrix (recycling, hybrid) to path as .npy, atomically."""
        self._g.save_drafter(os.fspath(path))

    def load_drafter(self, path: str | PathLike) -> None:
        """Take Token Recycling's matrix from a .npy file (this generator's or runtime.drafters.Recycling's), after
        validating all of it; SparrowError (nothing changed) when it does not fit."""
        self._g.load_drafter(os.fspath(path))


def generate_tokens(session: Session, prompt_tokens: Sequence[int], *, max_tokens: int = 128,
                    sampler: Sampler | None = None, stop_at_eog: bool = True) -> Iterator[int]:
    """Evaluate the prompt tokens not yet in the cache, then sample up to max_tokens tokens, yielding each.

    The KV cache is reused: if the session already holds a prefix of prompt_tokens, only the rest is evaluated."""
    model = session.model
    sampler = sampler or Sampler(model.info.n_vocab, SamplerParams.greedy())
    common = session.reuse_prefix(prompt_tokens)
    for t in prompt_tokens:
        sampler.accept(t)
    logits = session.prefill(prompt_tokens[common:])
    buf = np.empty(model.info.n_vocab, dtype=np.float32)  # every step's logits, reused
    for _ in range(max_tokens):
        token = sampler.sample(logits)
        sampler.accept(token)
        if stop_at_eog and model.is_eog(token):
            return
        yield token
        if session.n_past >= session.n_ctx:
            return
        logits = session.eval([token], out=buf)


def generate(model: Model, session: Session, prompt: str | Sequence[int], *, max_tokens: int = 128,
             sampler: Sampler | None = None, parse_special: bool = True) -> Iterator[str]:
    """Stream the text of a continuation piece by piece (whole UTF-8 characters only).

    A text prompt is raw model input: special-token markup in it ("<|im_start|>") becomes the special tokens, as in
    llama.cpp's completion; parse_special=False tokenizes it as plain characters instead (for untrusted text)."""
    tokens = model.tokenize(prompt, parse_special=parse_special) if isinstance(prompt, str) else list(prompt)
    yield from utf8_pieces(model.token_bytes, generate_tokens(session, tokens, max_tokens=max_tokens,
                                                              sampler=sampler))


def control_tokens(model: Model) -> dict[str, int]:
    """Text of each control token -> id, for a Model (also a vocab-only one): a control token renders as nothing
    unless asked to render special tokens."""
    out = {}
    for t in range(model.info.n_vocab):
        if not model.token_bytes(t):
            text = model.token_bytes(t, render_special=True)
            if text:
                out.setdefault(text.decode("utf-8", "replace"), t)
    return out


def utf8_pieces(token_bytes: Callable[[int], bytes], tokens: Iterable[int]) -> Iterator[str]:
    """The text of a token stream as it comes, in whole UTF-8 characters: a character split across tokens is held
    back until it is complete; invalid bytes become U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def complete(model: Model, prompt: str | Sequence[int], *, max_tokens: int = 128, sampler: Sampler | None = None,
             n_ctx: int = 2048, n_threads: int = 0, parse_special: bool = True) -> str:
    """Non-streaming one-shot generation in a fresh session (parse_special: as in generate)."""
    with model.session(n_ctx=n_ctx, n_threads=n_threads) as session:
        return "".join(generate(model, session, prompt, max_tokens=max_tokens, sampler=sampler,
                                parse_special=parse_special))
