"""Render a model's own chat template (the GGUF key `tokenizer.chat_template`, Jinja) in a sandbox, with limits.

Templates come from model files, i.e. from strangers:
- they are rendered in jinja2's ImmutableSandboxedEnvironment, and any attempt to reach Python internals
  (`''.__class__`, `cycler.__init__.__globals__`, ...) stops rendering with ChatTemplateError;
- every render has limits (Limits): wall time (checked on every line the template executes), output size, memory
  (the address space may grow by at most `memory_bytes` while it runs, where the OS lets Sparrow set that limit),
  the size of `**` and sequence `*` results, and no `lipsum`. Exceeding one is a ChatTemplateError that says which;
- every failure, whatever Python raised inside (OverflowError, ZeroDivisionError, RecursionError, MemoryError, ...),
  is a ChatTemplateError.

Message contents are data, not markup: render_segments() says which parts of the rendered text came from message
contents, so that only the template's own text is searched for special tokens (runtime.backends.Chat).

    render(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""
from __future__ import annotations

import math
import operator
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

try:
    import resource
except ImportError:  # not on Windows: the memory limit is then the output limit alone
    resource = None  # type: ignore[assignment]

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}

# Used when a GGUF has no template: ChatML, which most small instruct models (SmolLM2, Qwen) were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# MiniCPM's SFT chat format (MiniCPM-2B-sft; the BlockFFN SFT checkpoints were tuned on it): "<用户>" before each
# user turn, "<AI>" before each assistant turn and as the generation prompt; a system message is its content alone
# (MiniCPM has no system role). `sparrow models pull` writes it into a converted BlockFFN checkpoint whose
# tokenizer_config.json has no chat_template (runtime.store.checkpoint).
MINICPM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<AI>' + message['content'] }}{% else %}{{ message['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"
)


@dataclass(frozen=True)
class Limits:
    """What one render may use. Real chat templates render in about a millisecond into a few KB."""

    seconds: float = 2.0               # wall time
    output_chars: int = 4 << 20        # rendered text
    memory_bytes: int = 1 << 30        # growth of the process's address space while rendering
    power_bits: int = 4096             # largest integer a ** may produce
    template_chars: int = 1 << 20      # the template's own source


DEFAULT_LIMITS = Limits()


class ChatTemplateError(ValueError):
    """The chat template is invalid, failed, exceeded a limit, or tried to escape the sandbox."""


class _LimitExceeded(Exception):
    """Raised inside the template's code when it runs past a limit (becomes ChatTemplateError)."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but touching an unsafe attribute raises at once instead of yielding an Undefined; `**`
    and `*` are checked before they run, so one expression cannot build a huge number or string."""

    intercepted_binops = frozenset({"**", "*"})
    limits: Limits = DEFAULT_LIMITS

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                    and right * math.log2(abs(left)) > self.limits.power_bits:
                raise _LimitExceeded(f"{left} ** {right} would exceed {self.limits.power_bits} bits")
            return operator.pow(left, right)
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.limits.output_chars:
                raise _LimitExceeded(f"a {type(seq).__name__} repeated {n} times would exceed "
                                     f"{self.limits.output_chars} items")
        return operator.mul(left, right)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    if len(template) > DEFAULT_LIMITS.template_chars:
        raise ChatTemplateError(f"the model's chat template is {len(template)} characters; the limit is "
                                f"{DEFAULT_LIMITS.template_chars}")
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs: nothing a chat template needs
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {e}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:  # the compiler's own errors
        raise ChatTemplateError(f"the model's chat template could not be compiled: {type(e).__name__}: {e}") from None


class _Guard:
    """Enforces Limits while a template renders: a trace function on the template's own frames checks the clock
    (every line) and the process's peak memory (every 64 lines); RLIMIT_AS caps what one operation can allocate."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.lines = 0
        self.rss_base = self._maxrss()
        self.prev_trace = None
        self.prev_as = None

    @staticmethod
    def _maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if resource is not None else 0

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if time.monotonic() > self.deadline:
                raise _LimitExceeded(f"rendering took more than {self.limits.seconds:g} s")
            if self.lines % 64 == 0 and resource is not None \
                    and self._maxrss() - self.rss_base > self.limits.memory_bytes:
                raise _LimitExceeded(f"rendering used more than {self.limits.memory_bytes >> 20} MiB")
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename == "<template>" else None

    def __enter__(self) -> _Guard:
        self.prev_trace = sys.gettrace()
        sys.settrace(self._global)
        if resource is not None and os.path.exists("/proc/self/statm"):
            try:
                with open("/proc/self/statm") as f:
                    vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
                soft, hard = resource.getrlimit(resource.RLIMIT_AS)
                cap = vm + self.limits.memory_bytes
                if soft == resource.RLIM_INFINITY or soft > cap:
                    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
                    self.prev_as = (soft, hard)
            except (OSError, ValueError):
                self.prev_as = None
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self.prev_trace)
        if self.prev_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.prev_as)


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", limits: Limits = DEFAULT_LIMITS, **extra: Any) -> str:
    """Render messages with template (a Jinja string from the model file) in the sandbox, within limits."""
    compiled = _compile(template)
    compiled.environment.limits = limits  # type: ignore[attr-defined]
    out: list[str] = []
    size = 0
    try:
        with _Guard(limits):
            for chunk in compiled.generate(messages=[dict(m) for m in messages],
                                           add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                           eos_token=eos_token, **extra):
                size += len(chunk)
                if size > limits.output_chars:
                    raise _LimitExceeded(f"the output passed {limits.output_chars} characters")
                out.append(chunk)
    except SecurityError as e:
        raise ChatTemplateError(f"the model's chat template tried to escape the sandbox (an operation it forbids) "
                                f"and was refused: {e}") from None
    except ChatTemplateError:
        raise
    except _LimitExceeded as e:
        raise ChatTemplateError(f"the model's chat template was stopped at a limit: {e}") from None
    except MemoryError:
        out.clear()
        raise ChatTemplateError(f"the model's chat template was stopped at a limit: it tried to use more than "
                                f"{limits.memory_bytes >> 20} MiB") from None
    except RecursionError:
        raise ChatTemplateError("the model's chat template failed: it recursed too deeply") from None
    except Exception as e:  # noqa: BLE001  (whatever the template's code raised: it is the template's failure)
        raise ChatTemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    return "".join(out)


def render_segments(template: str, messages: Sequence[Message], **kwargs: Any) -> list[tuple[str, bool]]:
    """Render like render(), and split the result into (text, is_markup) segments: is_markup is False for text that
    came from a message's content. Each content is rendered between markers made of a random nonce the content
    cannot guess; a template that cuts or reorders them is refused."""
    nonce = secrets.token_hex(8)
    begin, end = f"\x00<{nonce}:", f"\x00>{nonce}:"
    marked = []
    for i, m in enumerate(messages):
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = f"{begin}{i}\x00{m['content']}{end}{i}\x00"
        marked.append(m)
    text = render(template, marked, **kwargs)
    segments: list[tuple[str, bool]] = []
    pos = 0
    pattern = re.compile(re.escape(begin) + r"(\d+)\x00(.*?)" + re.escape(end) + r"(\d+)\x00", re.DOTALL)
    for match in pattern.finditer(text):
        if match.group(1) != match.group(3) or nonce in match.group(2):
            raise ChatTemplateError("the model's chat template mixed up message contents; refusing to guess where "
                                    "the user's text is")
        segments.append((text[pos:match.start()], True))
        segments.append((match.group(2), False))
        pos = match.end()
    segments.append((text[pos:], True))
    if any(nonce in s for s, _ in segments):
        raise ChatTemplateError("the model's chat template cut a message content apart; refusing to guess where the "
                                "user's text is")
    return [(s, markup) for s, markup in segments if s]
