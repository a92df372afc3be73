"""One interface over every engine that can run a model: the Backend protocol, its implementations, and Chat.

    backend = sparrow.load("smollm2-135m-instruct")   # runtime.launch: a store name or a path, routed
    chat = Chat(backend)
    for piece in chat.send("Why is the sky blue?"):
        print(piece, end="", flush=True)
    print(chat.last_stats.decode_tok_s)

NativeBackend wraps runtime.native (Model + Session); LlamaCppBackend wraps llama_cpp.Llama (optional dependency,
imported only when a model needs it); OnnxBackend (over runtime.onnx_backend) runs Sparrow's ONNX exports with
onnxruntime. Each keeps the KV cache between calls and evaluates only the tokens after the longest common prefix with
what the cache holds; `n_evaluated` counts tokens run through the forward pass.
"""
from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from . import chat_template
from .native import Device, SamplerParams, control_tokens, parse_device, utf8_pieces
from .routing import Route, choose_backend


class BackendError(RuntimeError):
    """A model cannot be run here (no backend for it, or its backend is not installed)."""


class ContextFullError(RuntimeError):
    """The conversation no longer fits the context window."""


@runtime_checkable
class Backend(Protocol):
    name: str          # "native", "llama.cpp" or "onnxruntime"
    path: str
    n_ctx: int
    n_evaluated: int   # tokens evaluated by the forward pass so far (prompt tokens reused from the cache don't count)

    @property
    def tokens(self) -> list[int]: ...          # what the KV cache holds, in order
    @property
    def chat_template(self) -> str | None: ...  # the model's Jinja chat template, if it has one
    def special_token_text(self, which: str) -> str: ...  # "bos" / "eos" token text, for templates
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    def control_tokens(self) -> dict[str, int]: ...  # text of each control token -> id (what parse_special finds)
    def token_bytes(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...
    def generate_tokens(self, prompt_tokens: Sequence[int], *, max_tokens: int,
                        params: SamplerParams) -> Iterator[int]: ...
    def reset(self) -> None: ...                # empty the KV cache
    def close(self) -> None: ...


class NativeBackend:
    """Sparrow's own C runtime (runtime.native)."""

    name = "native"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0, device: Device = "cpu"):
        from .native import Model

        self.path = str(path)
        self.model = Model(self.path)
        try:
            self.session = self.model.session(n_ctx=n_ctx, n_threads=n_threads, device=device)
        except BaseException:
            self.model.close()
            raise
        self.n_ctx = self.session.n_ctx
        self.n_threads = n_threads  # as requested: 0 = the physical cores
        self.device = self.session.device  # 0: the CPU, k: GPU device k (runtime.native.devices())

    @property
    def n_evaluated(self) -> int:
        return self.session.n_evaluated

    @property
    def tokens(self) -> list[int]:
        return self.session.tokens

    @property
    def chat_template(self) -> str | None:
        return self.model.meta("tokenizer.chat_template")

    def special_token_text(self, which: str) -> str:
        token = {"bos": self.model.info.bos_token, "eos": self.model.info.eos_token}[which]
        return "" if token < 0 else self.model.token_bytes(token, render_special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.model.token_bytes(token)

    @functools.cached_property
    def _control_tokens(self) -> dict[str, int]:
        return control_tokens(self.model)

    def control_tokens(self) -> dict[str, int]:
        return self._control_tokens

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def generate_tokens(self, prompt_tokens: Sequence[int], *, max_tokens: int,
                        params: SamplerParams) -> Iterator[int]:
        from .native import Sampler, generate_tokens

        sampler = Sampler(self.model.info.n_vocab, params)
        try:
            yield from generate_tokens(self.session, list(prompt_tokens), max_tokens=max_tokens, sampler=sampler)
        finally:
            self.session.resync()

    def reset(self) -> None:
        self.session.truncate(0)

    def close(self) -> None:
        self.session.close()
        self.model.close()


class OnnxBackend(NativeBackend):
    """Sparrow's ONNX exports run by onnxruntime (runtime.onnx_backend): an OnnxModel (its tokenizer is a native
    vocab-only Model) and an OnnxSession with the native Session's interface, so everything else is NativeBackend's."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0):
        from .onnx_backend import OnnxModel

        self.path = str(path)
        self.model = OnnxModel(path, n_threads=n_threads)
        try:
            self.session = self.model.session(n_ctx=n_ctx)
        except BaseException:
            self.model.close()
            raise
        self.n_ctx = self.session.n_ctx
        self.n_threads = n_threads


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python, for GGUF architectures the native runtime does not implement."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0):
        try:
            import llama_cpp
        except ImportError:
            raise BackendError("this model needs llama-cpp-python, which is not installed: "
                               "pip install llama-cpp-python") from None
        self._llama_cpp = llama_cpp
        self.path = str(path)
        try:
            self.llm = llama_cpp.Llama(model_path=self.path, n_ctx=n_ctx, n_threads=n_threads or None, verbose=False)
        except ValueError as e:
            raise BackendError(f"llama.cpp could not load {self.path}: {e}") from None
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))  # llama.cpp may pad its own n_ctx upwards
        self.n_evaluated = 0
        evaluate = self.llm.eval

        def counted_eval(tokens: Sequence[int]) -> None:  # Llama.generate calls self.eval: count what it evaluates
            self.n_evaluated += len(tokens)
            evaluate(tokens)

        self.llm.eval = counted_eval  # type: ignore[method-assign]

    @property
    def tokens(self) -> list[int]:
        return [int(t) for t in self.llm._input_ids[: self.llm.n_tokens]]

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def special_token_text(self, which: str) -> str:
        token = self.llm.token_bos() if which == "bos" else self.llm.token_eos()
        return "" if token < 0 else self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.llm.detokenize([token])

    @functools.cached_property
    def _control_tokens(self) -> dict[str, int]:
        lc, vocab = self._llama_cpp, self.llm._model.vocab
        out = {}
        for t in range(lc.llama_vocab_n_tokens(vocab)):
            if lc.llama_vocab_get_attr(vocab, t) & lc.LLAMA_TOKEN_ATTR_CONTROL:
                text = self.llm.detokenize([t], special=True)
                if text:
                    out.setdefault(text.decode("utf-8", "replace"), t)
        return out

    def control_tokens(self) -> dict[str, int]:
        return self._control_tokens

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def generate_tokens(self, prompt_tokens: Sequence[int], *, max_tokens: int,
                        params: SamplerParams) -> Iterator[int]:
        self.llm.set_seed(params.seed & 0xFFFFFFFF)
        temp = params.temperature if params.temperature > 0 else 0.0
        stream = self.llm.generate(list(prompt_tokens), top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                   temp=temp, repeat_penalty=params.repeat_penalty, reset=True)
        try:
            for i, token in enumerate(stream):
                if self.is_eog(token) or i >= max_tokens:
                    return
                yield token
                if self.llm.n_tokens >= self.n_ctx:
                    return
        finally:
            stream.close()

    def reset(self) -> None:
        self.llm.reset()

    def close(self) -> None:
        self.llm.close()


def open_backend(path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0, route: Route | None = None,
                 device: Device = "cpu") -> Backend:
    """Open the model file at path with the backend routing chooses for it. device (runtime.native.parse_device):
    where the native runtime runs it; the other backends run on the CPU only (BackendError for another device)."""
    route = route or choose_backend(path)
    if not route.available:
        raise BackendError(f"cannot run {path} ({route.reason}): {route.problem}")
    check_device(route, device)
    if route.backend == "onnxruntime":
        from .onnx_backend import OnnxModelError

        try:
            return OnnxBackend(path, n_ctx=n_ctx, n_threads=n_threads)
        except OnnxModelError as e:
            raise BackendError(str(e)) from None
    if route.backend == "native":
        return NativeBackend(path, n_ctx=n_ctx, n_threads=n_threads, device=device)
    return LlamaCppBackend(path, n_ctx=n_ctx, n_threads=n_threads)


def check_device(route: Route, device: Device) -> None:
    """BackendError when a GPU device is asked of a backend other than the native runtime (llama.cpp and onnxruntime
    run here on the CPU only); ValueError for a device name parse_device does not take."""
    if parse_device(device) != 0 and route.backend != "native":
        raise BackendError(f"device {device!r} is for Sparrow's native runtime; this model runs on {route.backend} "
                           f"({route.reason}), which Sparrow runs on the CPU only: use device 'cpu' (the default)")


# ---- streaming text with timing, for any backend ----

@dataclass
class GenerationStats:
    prompt_tokens: int = 0        # tokens in the whole prompt
    evaluated_tokens: int = 0     # prompt tokens actually evaluated (the rest came from the KV cache)
    generated_tokens: int = 0
    ttft_s: float = 0.0           # time to first token: prompt evaluation + first sample
    decode_s: float = 0.0         # from the first token to the last
    stop_reason: str = ""         # "eog", "max_tokens", "context_full" or "interrupted"
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tok_s(self) -> float:
        return self.evaluated_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"prompt_tokens": self.prompt_tokens, "evaluated_tokens": self.evaluated_tokens,
                "generated_tokens": self.generated_tokens, "ttft_s": round(self.ttft_s, 6),
                "decode_s": round(self.decode_s, 6), "prompt_tok_s": round(self.prompt_tok_s, 3),
                "decode_tok_s": round(self.decode_tok_s, 3), "stop_reason": self.stop_reason}


def stream_text(backend: Backend, prompt_tokens: Sequence[int], *, max_tokens: int = 512,
                params: SamplerParams | None = None, stats: GenerationStats | None = None) -> Iterator[str]:
    """Generate from prompt_tokens, yielding whole UTF-8 characters as they come; fills stats as it goes."""
    params = params or SamplerParams()
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_tokens)
    if len(prompt_tokens) >= backend.n_ctx:
        raise ContextFullError(f"the prompt is {len(prompt_tokens)} tokens; the context holds {backend.n_ctx}")
    evaluated_before = backend.n_evaluated
    t0 = time.perf_counter()
    t_first = t_last = t0
    stats.stop_reason = "interrupted"

    def timed() -> Iterator[int]:
        nonlocal t_first, t_last
        for token in backend.generate_tokens(prompt_tokens, max_tokens=max_tokens, params=params):
            t_last = time.perf_counter()
            if not stats.tokens:
                t_first = t_last
                stats.evaluated_tokens = backend.n_evaluated - evaluated_before
            stats.tokens.append(token)
            yield token
        if len(backend.tokens) >= backend.n_ctx:
            stats.stop_reason = "context_full"
        elif len(stats.tokens) >= max_tokens:
            stats.stop_reason = "max_tokens"
        else:
            stats.stop_reason = "eog"

    try:
        yield from utf8_pieces(backend.token_bytes, timed())
    finally:
        stats.generated_tokens = len(stats.tokens)
        if not stats.tokens:
            t_first = t_last = time.perf_counter()
            stats.evaluated_tokens = backend.n_evaluated - evaluated_before
        stats.ttft_s = t_first - t0
        stats.decode_s = t_last - t_first


def tokenize_segments(backend: Backend, segments: Sequence[tuple[str, bool]]) -> list[int]:
    """Tokens of rendered chat text given as (text, is_markup) segments (chat_template.render_segments), as the
    backend's tokenize(..., parse_special=True) would give them, except that control-token text counts only inside
    markup. Like llama.cpp, the text is cut at each control token and every run of text between them is tokenized
    on its own, so for contents without control-token text the result equals tokenizing the whole text."""
    controls = backend.control_tokens()
    pattern = _control_pattern(tuple(sorted(controls, key=len, reverse=True)))
    runs: list[str | int] = []  # text runs (markup and content merged) and control token ids
    for text, markup in segments:
        pieces = pattern.split(text) if markup and pattern is not None else [text]
        for i, piece in enumerate(pieces):
            if i % 2:
                runs.append(controls[piece])
            elif piece:
                if runs and isinstance(runs[-1], str):
                    runs[-1] += piece
                else:
                    runs.append(piece)
    tokens = backend.tokenize("", add_special=True, parse_special=False)  # BOS, where the vocabulary asks for it
    for run in runs:
        tokens.extend([run] if isinstance(run, int) else backend.tokenize(run, add_special=False, parse_special=False))
    return tokens


@functools.lru_cache(maxsize=8)
def _control_pattern(texts: tuple[str, ...]) -> re.Pattern[str] | None:
    """A regex with one group that matches any of texts, longest first (llama.cpp's order)."""
    return re.compile("(" + "|".join(re.escape(t) for t in texts) + ")") if texts else None


class Chat:
    """A multi-turn conversation rendered with the model's own chat template; the KV cache is reused across turns."""

    def __init__(self, backend: Backend, *, system: str | None = None, template: str | None = None):
        self.backend = backend
        self.template = template or backend.chat_template or chat_template.CHATML_TEMPLATE
        self.system = system
        self.messages: list[chat_template.Message] = []
        self.last_stats = GenerationStats()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the KV cache is reused as far as the new prompt allows)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_tokens(self, add_generation_prompt: bool = True) -> list[int]:
        """The conversation's tokens. Control tokens come only from the template's own text: message contents are
        tokenized as text, so "<|im_end|>" typed by a user stays characters and cannot forge a turn."""
        segments = chat_template.render_segments(self.template, self.messages,
                                                 add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.backend.special_token_text("bos"),
                                                 eos_token=self.backend.special_token_text("eos"))
        return tokenize_segments(self.backend, segments)

    def send(self, text: str, *, max_tokens: int = 1024, params: SamplerParams | None = None) -> Iterator[str]:
        """Add a user message and stream the assistant's answer. The answer (even a partial one, if the caller stops
        early or Ctrl-C interrupts it) joins the history. ContextFullError if the conversation no longer fits."""
        self.messages.append({"role": "user", "content": text})
        try:
            tokens = self.prompt_tokens()
        except BaseException:
            self.messages.pop()
            raise
        if len(tokens) >= self.backend.n_ctx:
            self.messages.pop()
            raise ContextFullError(f"the conversation is {len(tokens)} tokens and the context holds "
                                   f"{self.backend.n_ctx}")
        self.last_stats = GenerationStats()
        answer: list[str] = []
        try:
            for piece in stream_text(self.backend, tokens, max_tokens=max_tokens, params=params,
                                     stats=self.last_stats):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})

