"""Chat templates from model files render in a sandbox: the default model's own template, and escapes refused."""
from __future__ import annotations

import pytest
from sparrow.runtime.chat_template import CHATML_TEMPLATE, ChatTemplateError, render
from sparrow.runtime.routing import read_gguf_header


@pytest.fixture(scope="module")
def smollm_template(smollm_path) -> str:
    template = read_gguf_header(smollm_path).metadata["tokenizer.chat_template"]
    assert isinstance(template, str)
    return template


def test_default_model_template(smollm_template):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]
    assert render(smollm_template, messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(smollm_template, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_history_prefix_is_stable(smollm_template):
    """Turn n+1's prompt starts with turn n's prompt + answer: what lets the KV cache be reused across turns."""
    turn1 = [{"role": "user", "content": "Hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert render(smollm_template, turn2).startswith(render(smollm_template, turn1) + "Hello!")


def test_chatml_fallback():
    assert render(CHATML_TEMPLATE, [{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.__class__ }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ joiner.__init__.__globals__['__builtins__'] }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{{ (messages|first).update({'role': 'system'}) }}",
])
def test_sandbox_escapes_are_refused(template):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render(template, [{"role": "user", "content": "hi"}])


def test_raise_exception_and_bad_syntax():
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    assert render(strict, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        render(strict, [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render("{% for %}", [])
