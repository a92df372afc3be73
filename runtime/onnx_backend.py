"""The onnxruntime backend: ONNX files written by `sparrow convert SRC OUT.onnx` (converters/onnx_export.py), run
with onnxruntime behind the interface the native runtime has, so chat, generate, speculative decoding (a draft tree
verified in one pass through the graph's attention_bias input) and `sparrow bench` run on it unchanged.

Shape legend: T = tokens in one pass, P = cached tokens, S = P + T, NKV = kv heads, D = head dim, V = vocabulary.

    OnnxModel     the file: an onnxruntime InferenceSession factory, and the tokenizer, which travels inside the file
                  (metadata "sparrow.vocab_gguf": a vocab-only GGUF read by the native tokenizer)
    OnnxSession   a KV cache ([1, NKV, P, D] float32 arrays per layer) with Session's methods: eval (positions, tree
                  mask), prefill, truncate, keep, reuse_prefix, resync; runtime.native.generate_tokens and
                  runtime.speculative.speculative_tokens take it as they take a native Session
    (runtime.backends.OnnxBackend is NativeBackend's interface over the two)

Only files with Sparrow's interface are accepted (the checks in OnnxModel say what is missing); other ONNX decoders
(onnxruntime-genai's builder, optimum) name and shape their inputs in their own ways and carry no tokenizer.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .native import Model, Session, Timings

REQUIRED_INPUTS = ("input_ids", "attention_mask", "position_ids", "attention_bias", "logits_keep")


class OnnxModelError(ValueError):
    """An ONNX file this backend cannot run (not Sparrow's interface, damaged, unsupported operators)."""


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class OnnxModel:
    """An exported model file: its graph's interface, the tokenizer (a native vocab-only Model), and sessions."""

    def __init__(self, path: str | os.PathLike, *, n_threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError("ONNX models need onnxruntime, which is not installed: pip install onnxruntime") \
                from None
        self.path = str(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = n_threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.ort = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime's Fail, InvalidArgument, InvalidGraph, ... (no common base)
            raise OnnxModelError(f"onnxruntime cannot load {self.path}: {str(e).strip()[:500]}") from None
        meta = self.ort.get_modelmeta().custom_metadata_map
        inputs = {i.name: i for i in self.ort.get_inputs() + self.ort.get_overridable_initializers()}
        missing = [n for n in REQUIRED_INPUTS if n not in inputs]
        self.n_layer = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        if missing or not self.n_layer or "sparrow.vocab_gguf" not in meta:
            what = (f"inputs {', '.join(missing)}" if missing else "no KV cache inputs (past_key_values.N.key)"
                    if not self.n_layer else "no tokenizer (metadata sparrow.vocab_gguf)")
            raise OnnxModelError(f"{self.path} is not a Sparrow ONNX export ({what}); export one with "
                                 "`sparrow convert MODEL.gguf OUT.onnx`")
        outputs = {o.name for o in self.ort.get_outputs()}
        for l in range(self.n_layer):
            for kv in ("key", "value"):
                if f"past_key_values.{l}.{kv}" not in inputs or f"present.{l}.{kv}" not in outputs:
                    raise OnnxModelError(f"{self.path}: layer {l} lacks past_key_values.{l}.{kv} or present.{l}.{kv}")
        if "logits" not in outputs:
            raise OnnxModelError(f"{self.path} has no logits output")
        self.kv_shapes: dict[str, tuple[int, int]] = {}  # past_key_values.* -> (NKV, D)
        for name in (f"past_key_values.{l}.{kv}" for l in range(self.n_layer) for kv in ("key", "value")):
            past = inputs[name].shape  # [batch, NKV, past, D]
            if len(past) != 4 or not all(isinstance(d, int) and d > 0 for d in (past[1], past[3])):
                raise OnnxModelError(f"{self.path}: {name} has shape {past}, not [batch, kv heads, past, head dim]")
            self.kv_shapes[name] = (int(past[1]), int(past[3]))
        self.meta_props = dict(meta)
        try:
            kv = json.loads(meta.get("sparrow.kv", "{}"))
            self.n_ctx_train = int(kv.get("context_length", 0))
            self.max_positions = int(kv.get("max_positions", self.n_ctx_train))
        except (ValueError, TypeError, AttributeError):
            raise OnnxModelError(f"{self.path}: bad metadata sparrow.kv") from None
        self._check_genai_config()
        self.vocab = _vocab_model(meta["sparrow.vocab_gguf"], self.path)
        self.info = self.vocab.info
        if self.n_ctx_train <= 0:
            self.n_ctx_train = self.info.n_ctx_train
        if self.max_positions <= 0:
            self.max_positions = self.n_ctx_train

    def _check_genai_config(self) -> None:
        """A genai_config.json beside the file that describes it (onnxruntime-genai loads the folder by it) must
        agree with the graph: a clear error instead of a folder that one runtime reads one way and one another."""
        path = Path(self.path).parent / "genai_config.json"
        if not path.is_file():
            return
        try:
            decoder = json.loads(path.read_text(encoding="utf-8"))["model"]["decoder"]
            named = decoder["filename"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise OnnxModelError(f"{path} beside the model is not a valid genai_config.json ({type(e).__name__}: "
                                 f"{e}); fix or remove it") from None
        if named != Path(self.path).name:
            return
        key = self.kv_shapes["past_key_values.0.key"]
        graph = {"num_hidden_layers": self.n_layer, "num_key_value_heads": key[0], "head_size": key[1]}
        wrong = [f"{k} {decoder.get(k)!r} (the graph: {v})" for k, v in graph.items() if decoder.get(k) != v]
        if wrong:
            raise OnnxModelError(f"{path} does not match {named}: " + ", ".join(wrong) + "; export the model again "
                                 "or remove the file")

    def close(self) -> None:
        self.vocab.close()
        self.ort = None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int, *, render_special: bool = False) -> bytes:
        return self.vocab.token_bytes(token, render_special=render_special)

    def is_eog(self, token: int) -> bool:
        return self.vocab.is_eog(token)

    def meta(self, key: str) -> str | None:
        return self.vocab.meta(key)

    def session(self, *, n_ctx: int = 2048, n_batch: int = 64) -> OnnxSession:
        return OnnxSession(self, n_ctx=n_ctx, n_batch=n_batch)


def export_info(path: str | os.PathLike) -> dict[str, object]:
    """What the store records of a Sparrow ONNX export, from its metadata (the graph is parsed, not run):
    architecture, weights, source, context_length, has_chat_template. OnnxModelError (saying what is wrong, not
    naming the file) for other files."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError and onnx's own errors share no base
        raise OnnxModelError(f"not an ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise OnnxModelError("keeps its weights in a separate file (too large for one ONNX file); the store takes "
                             "single-file models: run it by its path, or export it with --type int8 or int4")
    if "sparrow.vocab_gguf" not in props:
        raise OnnxModelError("not a Sparrow ONNX export (no tokenizer); export one with "
                             "`sparrow convert MODEL.gguf OUT.onnx`")
    try:
        kv = json.loads(props.get("sparrow.kv", "{}"))
        context = int(kv.get("context_length", 0))
    except (ValueError, TypeError, AttributeError):
        raise OnnxModelError("bad metadata sparrow.kv") from None
    vocab = _vocab_model(props["sparrow.vocab_gguf"], Path(path).name)
    try:
        template = vocab.meta("tokenizer.chat_template") is not None
    finally:
        vocab.close()
    return {"architecture": props.get("sparrow.architecture", "unknown"), "weights": props.get("sparrow.weights",
            "unknown"), "source": props.get("sparrow.source", ""), "context_length": context,
            "has_chat_template": template}


def _vocab_model(encoded: str, where: str) -> Model:
    """The native tokenizer from the base64 vocab-only GGUF a Sparrow export carries."""
    from .native import SparrowError

    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise OnnxModelError(f"{where}: the embedded tokenizer (sparrow.vocab_gguf) is not valid base64") from None
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return Model(tmp, vocab_only=True, use_mmap=False)
        except SparrowError as e:
            raise OnnxModelError(f"{where}: the embedded tokenizer cannot be read: {e}") from None
    finally:
        os.unlink(tmp)


class OnnxSession:
    """A KV cache over an OnnxModel with runtime.native.Session's interface (eval with positions and a tree mask,
    truncate, keep). Not for concurrent use."""

    def __init__(self, model: OnnxModel, *, n_ctx: int = 2048, n_batch: int = 64):
        if n_ctx < 0 or n_batch <= 0:
            raise ValueError("n_ctx must be >= 0 (0: the model's training context) and n_batch positive")
        n_ctx = n_ctx or model.n_ctx_train
        self.model = model
        self.n_ctx = min(n_ctx, model.max_positions)  # the graph's RoPE tables end there
        self.n_batch = n_batch
        self.tokens: list[int] = []
        self.n_evaluated = 0
        self._names = [f"past_key_values.{l}.{kv}" for l in range(model.n_layer) for kv in ("key", "value")]
        self._kv: list[np.ndarray] = [np.zeros((1, model.kv_shapes[n][0], 0, model.kv_shapes[n][1]), np.float32)
                                      for n in self._names]  # [1, NKV, P, D]: key, value per layer
        self._outputs = ["logits"] + [f"present.{l}.{kv}" for l in range(model.n_layer) for kv in ("key", "value")]
        self._timings = Timings(0, 0, 0.0, 0.0, 0.0, 0.0)

    def close(self) -> None:
        self._kv = []

    def __enter__(self) -> OnnxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def eval(self, tokens: Sequence[int], *, pos: Sequence[int] | None = None, mask: np.ndarray | None = None,
             logits: str = "last", out: np.ndarray | None = None) -> np.ndarray | None:
        """Evaluate up to n_batch tokens in one pass (runtime.native.Session.eval's contract): pos [T] positions
        (default n_past..), mask [T, T] (mask[i, j] != 0: token i sees token j of this pass; default causal),
        logits "last" -> [V], "all" -> [T, V], "none"."""
        T, P, V = len(tokens), self.n_past, self.model.info.n_vocab
        if T == 0 or T > self.n_batch:
            raise ValueError(f"a pass takes 1 to n_batch = {self.n_batch} tokens, not {T}")
        if P + T > self.n_ctx:
            raise ValueError(f"the KV cache holds {self.n_ctx} tokens; {P} are used and {T} more do not fit")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be in [0, {V})")
        positions = np.arange(P, P + T, dtype=np.int64) if pos is None else np.asarray(pos, dtype=np.int64)
        if positions.shape != (T,) or positions.min() < 0 or positions.max() >= self.model.max_positions:
            raise ValueError(f"pos must hold {T} positions in [0, {self.model.max_positions})")
        bias = np.zeros((1, 1, 1, 1), dtype=np.float32)
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != (T, T):
                raise ValueError(f"mask must be [{T}, {T}]")
            bias = np.zeros((1, 1, T, P + T), dtype=np.float32)
            bias[0, 0, :, P:][m == 0] = -np.inf
            if not np.all(np.diagonal(m)):
                raise ValueError("mask[i, i] must be set: every token sees itself")
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, P + T), dtype=np.int64),
                 "position_ids": positions[None], "attention_bias": bias,
                 "logits_keep": np.array(0 if logits == "all" else 1, dtype=np.int64)}
        feeds.update(zip(self._names, self._kv))
        result = self.model.ort.run(self._outputs, feeds)
        t = self._timings
        self._timings = Timings(t.n_evals + 1, t.n_tokens + T, 0.0, 0.0, 0.0, 0.0)
        self._kv = result[1:]
        self.tokens.extend(int(x) for x in ids)
        self.n_evaluated += T
        if logits == "none":
            return None
        lg = result[0][0]  # [T', V]
        lg = lg[-1] if logits == "last" else lg
        if out is not None:
            out[...] = lg
            return out
        return np.ascontiguousarray(lg, dtype=np.float32)

    prefill = Session.prefill            # n_batch chunks through eval: the same code as the native Session's

    def truncate(self, n: int) -> None:
        if n < 0:
            raise ValueError("truncate needs n >= 0")
        n = min(n, self.n_past)
        self._kv = [kv[:, :, :n] for kv in self._kv]
        del self.tokens[n:]

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only these KV cache slots (strictly increasing), in order."""
        idx = np.asarray(slots, dtype=np.int64)
        if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= self.n_past):
            raise ValueError("keep takes strictly increasing slots inside the cache")
        self._kv = [np.ascontiguousarray(kv[:, :, idx]) for kv in self._kv]
        self.tokens = [self.tokens[i] for i in idx]

    reuse_prefix = Session.reuse_prefix  # keeps the longest cached prefix but the last token, through truncate

    def resync(self) -> None:
        """The cache and `tokens` always agree here (eval updates both after the pass): nothing to do."""

    def timings(self) -> Timings:
        """Passes and tokens; onnxruntime does not split a pass's time by phase (those fields stay 0)."""
        return self._timings

    def reset_timings(self) -> None:
        self._timings = Timings(0, 0, 0.0, 0.0, 0.0, 0.0)

    def sparsity(self, layer: int | None = None) -> None:
        """onnxruntime does not report which experts ran."""

    def reset_sparsity(self) -> None:
        pass
