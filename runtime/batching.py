"""Continuous batching: many independent requests decoded together over one multi-sequence session.

The engine under `sparrow batch` and `sparrow serve`. Each forward pass carries one token of every request that is
decoding plus, in the room left (n_batch), pieces of the prompts of requests that are starting; requests join as
sequences free up and leave when they finish, between passes. A CPU reads the weights once per pass whatever the
number of sequences in it, so several requests together cost far less than one after another. Each request samples
with its own C sampler (its own parameters and seed); a request's tokens do not depend on what else is in the batch
(BatchSession's contract), so a seeded request gives the same text alone or among others.

    engine = Engine(model, n_seq=8)
    engine.submit(Request(prompt=model.tokenize("Once upon a time"), max_tokens=64))
    while engine.busy:
        for event in engine.step():
            print(event.request.tag, event.text, event.finish_reason)
"""
from __future__ import annotations

import codecs
import functools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import chat_template
from .backends import BackendError, tokenize_segments
from .native import BatchSession, Model, Sampler, SamplerParams, SparrowError, control_tokens

MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 64  # as the C generator's (SP_GEN_MAX_STOP, SP_GEN_MAX_STOP_LEN)


@dataclass(eq=False)
class Request:
    """One generation: prompt tokens in, text out. tag is the caller's (an id). cancel() may be called from any
    thread; the engine drops the request at its next step."""

    prompt: list[int]
    max_tokens: int = 256
    params: SamplerParams = field(default_factory=SamplerParams.greedy)
    stop: tuple[str, ...] = ()
    stop_at_eog: bool = True
    tag: Any = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Event:
    """What one engine step produced for one request: new text (whole UTF-8 characters; text that may be the start of
    a stop string is held back until it is not), and once it is over, why: "stop" (end of generation or a stop
    string), "length" (max_tokens, or the context is full) or "cancelled"."""

    request: Request
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def check_request(req: Request, *, n_ctx: int, n_vocab: int) -> None:
    """ValueError unless an engine of n_ctx tokens per sequence can run req: a prompt of 1..n_ctx-1 valid tokens,
    max_tokens >= 1, stop strings within the limits, and sampling parameters the C sampler takes."""
    if not req.prompt:
        raise ValueError("the prompt is empty")
    if len(req.prompt) >= n_ctx:
        raise ValueError(f"the prompt is {len(req.prompt)} tokens; the context holds {n_ctx} "
                         "(prompt and answer together)")
    if min(req.prompt) < 0 or max(req.prompt) >= n_vocab:
        raise ValueError(f"prompt token ids must be in [0, {n_vocab})")
    if req.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in req.stop):
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of 1..{MAX_STOP_CHARS} characters")
    try:
        Sampler(n_vocab, req.params)  # bad sampling parameters fail here, not in the middle of a pass
    except SparrowError as e:  # its message names the parameter
        raise ValueError(str(e)) from None


class _Live:
    """A request holding a sequence of the session."""

    def __init__(self, req: Request, seq: int, sampler: Sampler):
        self.req, self.seq, self.sampler = req, seq, sampler
        self.fed = 0              # prompt tokens evaluated so far
        self.tokens: list[int] = []  # generated
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""            # decoded so far (cut at a stop string once found)
        self.sent = 0             # characters of text already handed out

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.req.prompt)


class Engine:
    """Continuous batching over a BatchSession of n_seq sequences of n_ctx tokens each. Not thread-safe: one thread
    calls submit/step (Request.cancel is the exception)."""

    def __init__(self, model: Model, *, n_seq: int = 8, n_ctx: int = 2048, n_batch: int = 64, n_threads: int = 0):
        if n_seq < 1 or n_seq > n_batch:
            raise ValueError(f"n_seq must be 1..n_batch ({n_batch}): each pass carries one token of every sequence")
        self.model = model
        self.session = BatchSession(model, n_seq=n_seq, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads)
        self.n_seq, self.n_ctx, self.n_batch = n_seq, self.session.n_ctx, n_batch
        self.n_vocab = model.info.n_vocab
        self.waiting: deque[Request] = deque()
        self.live: dict[int, _Live] = {}
        self.free = list(range(n_seq - 1, -1, -1))
        self.n_passes = 0
        self.n_decoded = 0  # tokens generated, all requests
        self._out = np.empty((n_batch, self.n_vocab), dtype=np.float32)  # every pass's logits, reused

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.live)

    def check(self, req: Request) -> None:
        """ValueError unless the engine can run req (check_request); submit() checks the same."""
        check_request(req, n_ctx=self.n_ctx, n_vocab=self.n_vocab)

    def submit(self, req: Request) -> None:
        self.check(req)
        self.waiting.append(req)

    def step(self) -> list[Event]:
        """Admit waiting requests into free sequences, run one forward pass, sample, and return what changed."""
        events: list[Event] = []
        for live in [lv for lv in self.live.values() if lv.req.cancelled]:
            events.append(self._finish(live, "cancelled"))
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            events.append(Event(req, "", "cancelled", len(req.prompt), 0))
        while self.waiting and self.free:
            req = self.waiting.popleft()
            sampler = Sampler(self.n_vocab, req.params)
            for t in req.prompt:  # the repetition penalty's history starts with the prompt, as in plain decoding
                sampler.accept(t)
            seq = self.free.pop()
            self.session.truncate(seq, 0)
            self.live[seq] = _Live(req, seq, sampler)
        if not self.live:
            return events
        runs: list[tuple[int, list[int]]] = []
        room = self.n_batch
        decoding = [lv for lv in self.live.values() if lv.decoding]
        for lv in decoding:  # every decoding request moves one token per pass
            runs.append((lv.seq, [lv.tokens[-1]]))
            room -= 1
        fed: list[tuple[_Live, int]] = []
        for lv in self.live.values():  # prompts fill the room left, oldest first
            if lv.decoding or room == 0:
                continue
            n = min(room, len(lv.req.prompt) - lv.fed)
            runs.append((lv.seq, lv.req.prompt[lv.fed:lv.fed + n]))
            fed.append((lv, n))
            room -= n
        logits = self.session.eval(runs, out=self._out[:len(runs)])  # the first rows of one buffer: contiguous
        self.n_passes += 1
        for lv, n in fed:
            lv.fed += n
        by_seq = {seq: i for i, (seq, _) in enumerate(runs)}
        for lv in decoding + [lv for lv, _ in fed if lv.decoding]:
            ev = self._advance(lv, logits[by_seq[lv.seq]])
            if ev is not None:
                events.append(ev)
        return events

    def _advance(self, lv: _Live, logits: np.ndarray) -> Event | None:
        """Sample lv's next token from its logits; the event it makes, if any."""
        req = lv.req
        token = lv.sampler.sample(logits)
        lv.sampler.accept(token)
        if req.stop_at_eog and self.model.is_eog(token):
            return self._finish(lv, "stop")
        lv.tokens.append(token)
        self.n_decoded += 1
        lv.text += lv.decoder.decode(self.model.token_bytes(token))
        if req.stop and self._cut_at_stop(lv):
            return self._finish(lv, "stop", cut=True)
        if len(lv.tokens) >= req.max_tokens or len(req.prompt) + len(lv.tokens) >= self.n_ctx:
            return self._finish(lv, "length")
        hold = max(map(len, req.stop)) - 1 if req.stop else 0
        safe = len(lv.text) - hold
        if safe > lv.sent:
            piece, lv.sent = lv.text[lv.sent:safe], safe
            return Event(req, piece, None, len(req.prompt), len(lv.tokens))
        return None

    @staticmethod
    def _cut_at_stop(lv: _Live) -> bool:
        """Cut lv.text at the first stop string in it (searching only where a new one can be); whether one was."""
        longest = max(map(len, lv.req.stop))
        start = max(0, lv.sent - longest)
        hits = [i for i in (lv.text.find(s, start) for s in lv.req.stop) if i >= 0]
        if not hits:
            return False
        lv.text = lv.text[:min(hits)]
        return True

    def _finish(self, lv: _Live, reason: str, *, cut: bool = False) -> Event:
        """Free lv's sequence; the last event hands out the text not yet sent (none for a cancelled request). cut:
        the text ends at a stop string, so bytes the decoder still holds lie beyond it."""
        if reason == "cancelled":
            piece = ""
        else:
            if not cut:
                lv.text += lv.decoder.decode(b"", final=True)
            piece = lv.text[lv.sent:]
        del self.live[lv.seq]
        self.session.truncate(lv.seq, 0)
        self.free.append(lv.seq)
        return Event(lv.req, piece, reason, len(lv.req.prompt), len(lv.tokens))


# ---- text in: prompts and chat messages ----

class TextModel:
    """A Model's text side as the chat code needs it (the parts of runtime.backends.Backend that render and tokenize
    a conversation), for engines that hold a bare Model."""

    def __init__(self, model: Model):
        self.model = model

    @property
    def chat_template(self) -> str:
        return self.model.meta("tokenizer.chat_template") or chat_template.CHATML_TEMPLATE

    def special_token_text(self, which: str) -> str:
        token = {"bos": self.model.info.bos_token, "eos": self.model.info.eos_token}[which]
        return "" if token < 0 else self.model.token_bytes(token, render_special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    @functools.cached_property
    def _controls(self) -> dict[str, int]:
        return control_tokens(self.model)

    def control_tokens(self) -> dict[str, int]:
        return self._controls

    def prompt_tokens(self, prompt: str) -> list[int]:
        """A raw completion prompt: user text, so markup in it stays characters (never control tokens)."""
        return self.tokenize(prompt, add_special=True, parse_special=False)

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Messages rendered with the model's chat template, ready for the assistant's answer; control tokens come
        only from the template, never from the messages' contents (runtime.backends.tokenize_segments)."""
        segments = chat_template.render_segments(self.chat_template, messages, add_generation_prompt=True,
                                                 bos_token=self.special_token_text("bos"),
                                                 eos_token=self.special_token_text("eos"))
        return tokenize_segments(self, segments)


def number_field(obj: dict, key: str, default: float, lo: float, hi: float) -> float:
    """obj[key] as a finite number in [lo, hi] (default when absent or null); ValueError naming the field. The request
    fields of `sparrow batch` lines and `sparrow serve` bodies go through here and integer_field."""
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number")
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be in [{lo}, {hi}], got {value}")
    return float(value)


def integer_field(obj: dict, key: str, default: int, lo: int, hi: int) -> int:
    """obj[key] as an integer in [lo, hi] (default when absent or null); ValueError naming the field."""
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer")  # noqa: TRY004  (a bad request: its error record or 400)
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be in [{lo}, {hi}], got {value}")
    return value


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as the API takes them: a non-empty list of {"role": system|user|assistant, "content": str}.
    ValueError saying what is wrong otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string role and a string content")  # noqa: TRY004
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role must be system, user or assistant, not {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def open_native(model: str | Path | None, *, n_ctx: int, n_seq: int, threads: int | None,
                vocab_only: bool = False) -> tuple[str, Model, int]:
    """Resolve MODEL as the other commands do (store name, file, or the default model, pulled if it is a known one),
    check that it and n_seq sequences of n_ctx tokens fit in memory, and load it in the native runtime, which
    batching needs (vocab_only: only its vocabulary and template, for a driver whose workers run it elsewhere).
    Returns (name, model, threads)."""
    from .launch import run_settings
    from .routing import choose_backend, read_gguf_header
    from .store import REGISTRY, Store, check_memory

    store = Store()
    name = str(model) if model is not None else store.default()
    if store.get(name) is None and not Path(name).expanduser().is_file() and name in REGISTRY:
        store.pull(name, progress=True)
    path = store.resolve(name)
    header = read_gguf_header(path) if path.suffix.lower() != ".onnx" else None
    route = choose_backend(path, header)
    if route.backend != "native" or not route.available:
        raise BackendError(f"{name} runs on {route.backend} ({route.reason}); batching needs the native runtime "
                           "(a GGUF file of an architecture it implements)")
    settings = run_settings(store, name, threads=threads, warn=lambda _m: None)
    if vocab_only:
        return name, Model(path, vocab_only=True), settings.threads
    # n_seq caches of n_ctx tokens hold what one cache of n_seq * n_ctx does
    check_memory(path, n_ctx=n_ctx * n_seq, header=header, backend="native", n_threads=settings.threads)
    return name, Model(path), settings.threads
