"""Render a model's own chat template (the GGUF key `tokenizer.chat_template`, Jinja) in a sandbox.

Templates come from model files, i.e. from strangers: they are rendered in jinja2's ImmutableSandboxedEnvironment,
and any attempt to reach Python internals (`''.__class__`, `cycler.__init__.__globals__`, ...) stops rendering with
ChatTemplateError instead of silently printing nothing.

    render(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}

# Used when a GGUF has no template: ChatML, which most small instruct models (SmolLM2, Qwen) were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template is invalid, failed, or tried to escape the sandbox."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but touching an unsafe attribute raises at once instead of yielding an Undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {e}") from None


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render messages with template (a Jinja string from the model file) in the sandbox."""
    compiled = _compile(template)
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except SecurityError as e:
        raise ChatTemplateError(f"the model's chat template tried to escape the sandbox (an operation it forbids) and was refused: {e}") from None
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ChatTemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
