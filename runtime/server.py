"""`sparrow serve`: a local OpenAI-compatible HTTP server on the batching engine.

    POST /v1/chat/completions   messages in, the assistant's answer out (stream: server-sent events)
    POST /v1/completions        a raw text prompt continued
    GET  /v1/models             the model served
    GET  /health                {"status": "ok", "running": n, "waiting": m}

Concurrent requests share forward passes (runtime.batching.Engine, one thread of its own); requests beyond what the
engine holds wait in a queue of bounded length, and beyond that get 429. A client that disconnects cancels its
request at the engine's next step. Bound to 127.0.0.1 unless told otherwise; with an API key every request must
carry it (Authorization: Bearer KEY).

Why Starlette and uvicorn: a small, well-kept ASGI toolkit and server (streaming responses for server-sent events,
no code generation or model layer to carry); requests are validated here by hand, so every error says exactly what
is wrong in OpenAI's error format.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import Engine, Event, Request, TextModel, check_messages, integer_field, number_field
from .chat_template import ChatTemplateError
from .native import SamplerParams


@dataclass
class Limits:
    max_queue: int = 64           # requests waiting for a sequence beyond those running (then 429)
    max_tokens: int = 4096        # the most a request may ask for
    default_max_tokens: int = 512
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for box, item in items:
        box.put_nowait(item)


class EngineThread:
    """Runs the engine on a thread of its own. submit() hands a request over and returns an asyncio queue that
    receives its events (the last one has a finish_reason)."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.inbox: queue.Queue[tuple[Request, asyncio.Queue, asyncio.AbstractEventLoop, bool] | None] = queue.Queue()
        self.outboxes: dict[int, tuple[asyncio.Queue, asyncio.AbstractEventLoop, bool]] = {}
        self.held: dict[int, list[str]] = {}  # the text so far of requests that do not stream
        self.pending = 0  # submitted and not finished (guarded by lock)
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sparrow-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request, stream: bool) -> asyncio.Queue:
        if self.error is not None or not self.thread.is_alive():
            raise ApiError(503, f"the engine has stopped: {self.error}", kind="server_error")
        with self.lock:
            if self.pending >= self.engine.n_seq + self.limits.max_queue:
                raise ApiError(429, f"the server is busy ({self.pending} requests running or waiting); try again "
                               "shortly", code="rate_limit_exceeded", kind="rate_limit_error")
            self.pending += 1
        box: asyncio.Queue = asyncio.Queue()
        self.inbox.put((req, box, asyncio.get_running_loop(), stream))
        return box

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def _deliver(self, events: list[Event]) -> None:
        """Hand one step's events to their requests' queues: one wake-up of each event loop per step, and for a
        request that does not stream only its last event (carrying the whole text). Every wake-up of the server's
        thread takes a core from the forward pass's threads for a moment, so they are kept few."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for ev in events:
            box, loop, stream = self.outboxes[id(ev.request)]
            if not stream:
                held = self.held.setdefault(id(ev.request), [])
                held.append(ev.text)
                if ev.finish_reason is None:
                    continue
                ev.text = "".join(self.held.pop(id(ev.request)))
            if ev.finish_reason is not None:
                del self.outboxes[id(ev.request)]
                with self.lock:
                    self.pending -= 1
            by_loop.setdefault(loop, []).append((box, ev))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _run(self) -> None:
        try:
            while True:
                # wait for work while idle; between passes take whatever arrived, without waiting
                items = [] if self.engine.busy else [self.inbox.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        items.append(self.inbox.get_nowait())
                for item in items:
                    if item is None:
                        return
                    req, box, loop, stream = item
                    self.outboxes[id(req)] = (box, loop, stream)
                    self.engine.submit(req)  # checked by the handler already
                if self.engine.busy:
                    self._deliver(self.engine.step())
        except BaseException as e:  # noqa: BLE001  (a failed engine fails every request that waits on it)
            self.error = e
            for box, loop, _stream in list(self.outboxes.values()):
                loop.call_soon_threadsafe(box.put_nowait, e)


def _field(read: Callable[..., Any], body: dict, key: str, *args: Any) -> Any:
    """A request field through batching's number_field / integer_field; its ValueError as a 400 naming the field."""
    try:
        return read(body, key, *args)
    except ValueError as e:
        raise ApiError(400, str(e), param=key) from None


class Server:
    def __init__(self, engine: Engine, model_name: str, *, api_key: str | None = None, limits: Limits | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.limits = limits or Limits()
        self.text = TextModel(engine.model)
        self.runner: EngineThread | None = None
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.runner = EngineThread(self.engine, self.limits)
        try:
            yield
        finally:
            self.runner.close()

    def _authorize(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key",
                           kind="authentication_error")

    async def _body(self, http: HttpRequest) -> dict:
        self._authorize(http)
        size = 0
        chunks = []
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server runs {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        return body

    def _request(self, body: dict, prompt: list[int], tag: str) -> Request:
        d = SamplerParams()  # OpenAI's defaults: temperature 1, top_p 1
        params = SamplerParams(temperature=_field(number_field, body, "temperature", 1.0, 0.0, 2.0),
                               top_p=_field(number_field, body, "top_p", 1.0, 0.0, 1.0),
                               top_k=0, min_p=0.0, repeat_penalty=1.0, repeat_last_n=d.repeat_last_n,
                               seed=_field(integer_field, body, "seed", secrets.randbits(63), 0, 2**63 - 1))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(integer_field, body, key, self.limits.default_max_tokens, 1, self.limits.max_tokens)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        ignore_eos = body.get("ignore_eos", False)  # llama.cpp's server's extension: generate max_tokens tokens
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "ignore_eos must be true or false", param="ignore_eos")
        req = Request(prompt=prompt, max_tokens=max_tokens, params=params, stop=tuple(stop),
                      stop_at_eog=not ignore_eos, tag=tag)
        try:
            self.engine.check(req)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise ApiError(400, str(e), code=code) from None
        return req

    async def health(self, http: HttpRequest) -> Response:
        """Liveness and load, without a key: {"status": "ok", "running": n, "waiting": m} (503 once the engine
        failed)."""
        runner = self.runner
        if runner is None or runner.error is not None:
            return JSONResponse({"status": "error", "error": str(runner.error) if runner else "not started"},
                                status_code=503)
        with runner.lock:
            pending = runner.pending
        running = len(self.engine.live)
        return JSONResponse({"status": "ok", "running": running, "waiting": max(0, pending - running)})

    async def models(self, http: HttpRequest) -> Response:
        try:
            self._authorize(http)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                         "owned_by": "sparrow"}]})

    async def chat_completions(self, http: HttpRequest) -> Response:
        try:
            body = await self._body(http)
            try:
                messages = check_messages(body.get("messages"))
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
            try:
                prompt = self.text.chat_tokens(messages)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), param="messages") from None
            req = self._request(body, prompt, "chatcmpl-" + secrets.token_hex(12))
        except ApiError as e:
            return e.response()
        return await self._answer(http, body, req, chat=True)

    async def completions(self, http: HttpRequest) -> Response:
        try:
            body = await self._body(http)
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "prompt must be a non-empty string", param="prompt")
            req = self._request(body, self.text.prompt_tokens(prompt), "cmpl-" + secrets.token_hex(12))
        except ApiError as e:
            return e.response()
        return await self._answer(http, body, req, chat=False)

    async def _answer(self, http: HttpRequest, body: dict, req: Request, *, chat: bool) -> Response:
        assert self.runner is not None
        try:
            box = self.runner.submit(req, bool(body.get("stream")))
        except ApiError as e:
            return e.response()
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(self._stream(http, req, box, created, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces: list[str] = []
        watcher = asyncio.ensure_future(self._watch_disconnect(http, req))
        try:
            while True:
                ev = await box.get()
                if isinstance(ev, BaseException):
                    return ApiError(500, f"the engine failed: {ev}", kind="server_error").response()
                pieces.append(ev.text)
                if ev.finish_reason is not None:
                    break
        finally:
            watcher.cancel()
        text = "".join(pieces)
        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                 "total_tokens": ev.prompt_tokens + ev.completion_tokens}
        choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({"id": req.tag, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.model_name, "choices": [choice], "usage": usage})

    @staticmethod
    async def _watch_disconnect(http: HttpRequest, req: Request) -> None:
        """Cancel req when the client goes away: with the body read, the next ASGI message is the disconnect."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        req.cancel()

    async def _stream(self, http: HttpRequest, req: Request, box: asyncio.Queue, created: int,
                      chat: bool) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, *, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text else {})
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": req.tag, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        try:  # a client that goes away ends this generator (GeneratorExit / CancelledError): finally cancels req
            if chat:
                yield chunk(None, None, first=True)
            while True:
                ev = await box.get()
                if isinstance(ev, BaseException):
                    err = {"error": {"message": f"the engine failed: {ev}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
                    return
                if ev.text or ev.finish_reason:
                    yield chunk(ev.text, ev.finish_reason)
                if ev.finish_reason is not None:
                    break
            yield b"data: [DONE]\n\n"
        finally:  # the client went away (the response is cancelled) or the answer ended
            req.cancel()


def serve(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          limits: Limits | None = None) -> None:
    import uvicorn

    server = Server(engine, model_name, api_key=api_key, limits=limits)
    uvicorn.run(server.app, host=host, port=port, log_level="warning")
