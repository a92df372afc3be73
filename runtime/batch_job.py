"""`sparrow batch IN.jsonl -o OUT.jsonl`: offline generation over a file of requests, on the batching engine.

Input: one JSON object per line,
    {"id": "q1", "prompt": "Once upon a time"}                                  raw text to continue, or
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0}
with optional per-line "max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed" and "stop"
(a string or a list of strings). "id" is optional (default: "line-N").

Output: one JSON object per input line, in the order they finish:
    {"id": "q1", "line": 1, "text": "...", "finish_reason": "stop"|"length",
     "usage": {"prompt_tokens": 5, "completion_tokens": 42}}
or, for a line that cannot run (invalid JSON, unknown fields, bad parameters, a prompt longer than the context, a
duplicated id), {"id": ..., "line": N, "error": {"message": "..."}}: a bad line never stops the run.

Resumable and idempotent: OUT is appended one whole record (one write) at a time; a run started again with the same
arguments skips the lines OUT already answers and finishes the rest (a line cut short by a kill is dropped and
redone), so after kill -9 the same command leaves every line answered exactly once. Deterministic given --seed:
a line without its own seed samples with seed + its line number, and a request's tokens do not depend on what else
runs beside it.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batching import Engine, Request, TextModel, check_messages, check_request, integer_field, number_field
from .chat_template import ChatTemplateError
from .native import Model, SamplerParams

MAX_LINE_BYTES = 1 << 20
MAX_ID_CHARS = 256
FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
          "seed", "stop"}


class BatchFileError(RuntimeError):
    """IN or OUT cannot be used as they are (nothing was changed)."""


@dataclass
class Settings:
    max_tokens: int = 256
    max_tokens_limit: int = 4096  # the most a line may ask for
    params: SamplerParams = field(default_factory=SamplerParams.chat)
    seed: int = 0


def parse_line(obj: Any, line: int, text: TextModel, settings: Settings) -> Request:
    """The request of one input line (already JSON-decoded); ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")  # noqa: TRY004  (a bad line: its error record)
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError('give exactly one of "prompt" (text) and "messages" (a chat)')
    d = settings.params
    params = SamplerParams(
        temperature=number_field(obj, "temperature", d.temperature, 0.0, 10.0),
        top_k=integer_field(obj, "top_k", d.top_k, 0, 1 << 30),
        top_p=number_field(obj, "top_p", d.top_p, 0.0, 1.0),
        min_p=number_field(obj, "min_p", d.min_p, 0.0, 1.0),
        repeat_penalty=number_field(obj, "repeat_penalty", d.repeat_penalty, 0.0, 10.0),
        repeat_last_n=d.repeat_last_n,
        seed=integer_field(obj, "seed", (settings.seed + line) % 2**64, 0, 2**64 - 1))
    max_tokens = integer_field(obj, "max_tokens", settings.max_tokens, 1, settings.max_tokens_limit)
    stop = obj.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError("prompt must be a non-empty string")
        tokens = text.prompt_tokens(obj["prompt"])
    else:
        try:
            tokens = text.chat_tokens(check_messages(obj["messages"]))
        except ChatTemplateError as e:
            raise ValueError(str(e)) from None
    return Request(prompt=tokens, max_tokens=max_tokens, params=params, stop=tuple(stop), tag=line)


def _line_id(obj: Any, line: int) -> str:
    if isinstance(obj, dict) and "id" in obj:
        value = obj["id"]
        if isinstance(value, (str, int)) and not isinstance(value, bool) and len(str(value)) <= MAX_ID_CHARS:
            return str(value)
    return f"line-{line}"


def read_done(out_path: Path) -> dict[int, str]:
    """The lines OUT already answers ({line: id}). A last record cut short (no newline: the writer was killed in
    the middle of it) is removed from the file; any other damage is an error that changes nothing."""
    if not out_path.exists():
        return {}
    data = out_path.read_bytes()
    cut = data.rfind(b"\n") + 1
    done: dict[int, str] = {}
    for k, raw in enumerate(data[:cut].splitlines(), 1):
        try:
            rec = json.loads(raw)
            line, rid = rec["line"], rec["id"]
            if not isinstance(line, int) or not isinstance(rid, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise BatchFileError(f"{out_path} line {k} is not a record sparrow batch wrote; move the file away or "
                                 "name another output") from None
        if line in done:
            raise BatchFileError(f"{out_path} answers input line {line} twice (records {k} and before); it was "
                                 "not written by this command alone")
        done[line] = rid
    if cut < len(data):
        with open(out_path, "r+b") as f:
            f.truncate(cut)
    return done


def _lines(in_path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line's bytes) for every non-blank line; None for a line over MAX_LINE_BYTES."""
    with open(in_path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (more := f.readline(MAX_LINE_BYTES)) and not more.endswith(b"\n"):
                    pass
                yield n, None
                continue
            if raw.strip():
                yield n, raw


@dataclass
class Result:
    """A finished request, as an executor reports it."""

    line: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def engine_results(engine: Engine, requests: list[Request]) -> Iterator[Result]:
    """Run requests (tag = line) on the engine in this process, yielding each as it finishes."""
    for req in requests:
        engine.submit(req)
    texts: dict[int, list[str]] = {}
    while engine.busy:
        for ev in engine.step():
            texts.setdefault(ev.request.tag, []).append(ev.text)
            if ev.finish_reason is not None:
                yield Result(ev.request.tag, "".join(texts.pop(ev.request.tag)), ev.finish_reason, ev.prompt_tokens,
                             ev.completion_tokens)


def run_batch(in_path: Path, out_path: Path, *, model: Model, n_ctx: int, settings: Settings,
              execute: Callable[[list[Request]], Iterator[Result]],
              progress: Callable[[int, int, int], None] | None = None) -> dict[str, int]:
    """Answer every line of in_path not yet answered in out_path; returns counts (done before, ok, errors, total,
    tokens). The lines are read, checked and tokenized here (model: its vocabulary and chat template); execute runs
    the valid ones (engine_results, or ray_results on a cluster) and yields them as they finish; every record is
    written as it comes. progress(done, total, tokens) is called as records are written."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise BatchFileError(f"{in_path} is not a file")
    if out_path.resolve() == in_path.resolve():
        raise BatchFileError("the output file must not be the input file")
    done = read_done(out_path)
    text = TextModel(model)
    n_vocab = model.info.n_vocab
    requests: list[Request] = []
    errors: list[tuple[int, str, str]] = []  # (line, id, message)
    ids: dict[int, str] = {}
    seen: dict[str, int] = {}
    total = 0
    for line, raw in _lines(in_path):
        total += 1
        obj: Any = None
        problem = None
        if raw is None:
            problem = f"the line is longer than {MAX_LINE_BYTES} bytes"
        else:
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                problem = f"not valid JSON: {e}"
        rid = _line_id(obj, line)
        if line in done:
            if done[line] != rid:
                raise BatchFileError(f"{out_path} answers line {line} as id {done[line]!r} but {in_path} line {line} "
                                     f"has id {rid!r}: the output belongs to another input; name another output")
            seen.setdefault(rid, line)
            continue
        if problem is None and rid in seen:
            problem = f"duplicate id {rid!r} (first on line {seen[rid]})"
        seen.setdefault(rid, line)
        ids[line] = rid
        if problem is None:
            try:
                req = parse_line(obj, line, text, settings)
                check_request(req, n_ctx=n_ctx, n_vocab=n_vocab)
                requests.append(req)
                continue
            except ValueError as e:
                problem = str(e)
        errors.append((line, rid, problem))
    counts = {"done_before": len(done), "ok": 0, "errors": 0, "total": total, "tokens": 0}
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        def write(record: dict) -> None:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            os.write(fd, data)  # one write per record: a kill leaves whole records and at most one cut short
            if progress:
                progress(len(done) + counts["ok"] + counts["errors"], total, counts["tokens"])

        for line, rid, message in errors:
            counts["errors"] += 1
            write({"id": rid, "line": line, "error": {"message": message}})
        if requests:
            for r in execute(requests):
                counts["ok"] += 1
                counts["tokens"] += r.completion_tokens
                write({"id": ids[r.line], "line": r.line, "text": r.text, "finish_reason": r.finish_reason,
                       "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}})
        os.fsync(fd)
    finally:
        os.close(fd)
    return counts


def timed_progress(bar: Any) -> Callable[[int, int, int], None]:
    """A progress callback for a tqdm bar: records done, and generated tokens per second in the postfix."""
    t0 = time.perf_counter()

    def update(done: int, total: int, tokens: int) -> None:
        bar.total = total
        bar.n = done
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"{tokens / dt:.1f} tok/s" if dt > 0 else "", refresh=False)
        bar.refresh()

    return update
