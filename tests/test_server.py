"""`sparrow serve` driven by the official `openai` client on 127.0.0.1: answers, streaming, limits, cancellation.

The server runs as the real command in a subprocess. Oracle for the text: the batching engine in this process with
the same (greedy) settings; streaming must give exactly the non-streaming text."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import package_root
from sparrow.runtime import Model
from sparrow.runtime.batching import Engine, Request, TextModel
from sparrow.runtime.native import SamplerParams

KEY = "test-key-123"
PARALLEL, QUEUE = 2, 1


def call(base: str, method: str, path: str, body: bytes | dict | None = None, *, key: str | None = KEY,
         timeout: float = 30) -> tuple[int, dict]:
    """One plain HTTP request (the standard library's client): (status, JSON body)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "SPARROW_HOME": str(tmp_path_factory.mktemp("store")), "SPARROW_API_KEY": KEY}
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")  # noqa: SIM115  (the server's, till it stops)
    proc = subprocess.Popen([sys.executable, "-m", "sparrow", "serve", "-m", str(smollm_path), "--port", str(port),
                             "--parallel", str(PARALLEL), "--max-queue", str(QUEUE), "--threads", "2", "--ctx", "1024",
                             "--max-tokens", "2000"], cwd=package_root(), env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if call(base, "GET", "/health", timeout=1)[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f"sparrow serve did not start: {log.read()}")
        time.sleep(0.1)
    yield base, Path(smollm_path).name
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


GREEDY = SamplerParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def engine_text(smollm_path, tokens: list[int], max_tokens: int) -> str:
    with Model(smollm_path) as m, Engine(m, n_seq=1, n_ctx=1024) as engine:
        engine.submit(Request(prompt=tokens, max_tokens=max_tokens, params=GREEDY))
        out = []
        while engine.busy:
            out += [ev.text for ev in engine.step()]
        return "".join(out)


def wait_idle(base: str, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        h = call(base, "GET", "/health")[1]
        if h["running"] == 0 and h["waiting"] == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"the server still works on something after {seconds} s: {h}")


def test_models_and_the_api_key(server):
    base, name = server
    assert [m.id for m in client(base).models.list().data] == [name]
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert call(base, "GET", "/health", key=None)[1]["status"] == "ok"  # no key needed to see that it lives


def test_chat_streaming_and_not_give_the_engines_text(server, smollm_path):
    base, name = server
    c = client(base)
    messages = [{"role": "user", "content": "Name three colors."}]
    r = c.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
    with Model(smollm_path) as m:
        tokens = TextModel(m).chat_tokens(messages)
    assert r.choices[0].message.content == engine_text(smollm_path, tokens, 24)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tokens) and r.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_completions_with_a_stop_string(server, smollm_path):
    base, name = server
    c = client(base)
    full = c.completions.create(model=name, prompt="Once upon a time", max_tokens=30, temperature=0)
    with Model(smollm_path) as m:
        tokens = TextModel(m).prompt_tokens("Once upon a time")
    assert full.choices[0].text == engine_text(smollm_path, tokens, 30)
    stop = full.choices[0].text[12:16]
    cut = c.completions.create(model=name, prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=name, prompt="Once upon a time", max_tokens=30, temperature=0,
                                    stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_bad_requests_get_clear_4xx(server):
    base, name = server
    c = client(base)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be in \[1, 2000\], got 5000"):
        c.chat.completions.create(model=name, messages=user, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="context holds 1024") as e:
        c.completions.create(model=name, prompt="word " * 1200, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=name, messages=user, temperature=7)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="gpt-4o", messages=user)
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        c.chat.completions.create(model=name, messages=user, n=2)
    status, r = call(base, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in r["error"]["message"]
    status, r = call(base, "POST", "/v1/completions", b"[" + b"1," * (1 << 20) + b"1]")
    assert status == 413
    status, r = call(base, "POST", "/v1/completions", {"prompt": "x", "ignore_eos": "yes"})
    assert status == 400 and r["error"]["param"] == "ignore_eos"


def test_more_requests_than_the_server_holds_get_429(server):
    base, name = server
    results: list[object] = []

    def one() -> None:
        try:
            r = client(base).completions.create(model=name, prompt="Count:", max_tokens=300,
                                                extra_body={"ignore_eos": True})
            results.append(r.choices[0].finish_reason)
        except openai.RateLimitError as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(PARALLEL + QUEUE + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(busy) >= 2 and results.count("length") >= PARALLEL
    assert "busy" in str(busy[0])
    wait_idle(base, 5)


def test_a_client_that_disconnects_cancels_its_request(server):
    base, name = server
    body = {"model": name, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    t0 = time.monotonic()
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    got = []
    while len(got) < 3:
        line = r.readline()
        if line.startswith(b"data: {"):
            got.append(json.loads(line[6:]))
    assert got[0]["object"] == "text_completion" and call(base, "GET", "/health")[1]["running"] == 1
    conn.close()  # the client goes away in the middle of the answer
    wait_idle(base, 3)  # 2000 tokens would take far longer than this at this model's speed
    # the same for a non-streaming request whose client gives up
    with pytest.raises(TimeoutError):
        call(base, "POST", "/v1/completions", {**body, "stream": False}, timeout=1.0)
    wait_idle(base, 3)
    assert time.monotonic() - t0 < 15
