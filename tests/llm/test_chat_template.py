# ruff: noqa: RUF001  (the test texts use non-ASCII look-alike characters on purpose)
"""Chat templates render exactly what transformers' apply_chat_template(tokenize=False) renders."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm.chat_template import ChatTemplate, ChatTemplateError, resolve_chat_template
from servekit.llm.loaders import default_model_path
from tests.llm.tiny_models import CHAT_TEMPLATE, build_tiny_checkpoint, reference_tokenizer

torch.set_num_threads(1)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, in °C <b>now</b>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say 'hello' & <wave> 👋"},
    ],
    [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "user", "content": "Thanks. 日本語で？"},
    ],
]


@functools.cache
def smollm2_template() -> str:
    import gguf

    reader = gguf.GGUFReader(default_model_path())
    value = reader.fields["tokenizer.chat_template"].contents()
    assert isinstance(value, str)
    return value


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return reference_tokenizer(build_tiny_checkpoint(tmp_path_factory.mktemp("chat"), "llama"))


@pytest.mark.parametrize("template_name", ["tiny", "smollm2"])
@pytest.mark.parametrize("use_tools", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_matches_transformers(
    reference: Any, template_name: str, use_tools: bool, add_generation_prompt: bool
) -> None:
    source = CHAT_TEMPLATE if template_name == "tiny" else smollm2_template()
    template = ChatTemplate(source, bos_token=reference.bos_token, eos_token=reference.eos_token)
    tools = TOOLS if use_tools else None
    for messages in CONVERSATIONS:
        if template_name == "smollm2" and any(m.get("content") is None for m in messages):
            continue  # SmolLM2's template concatenates content, so it cannot render tool calls
        expected = reference.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            chat_template=source,
        )
        rendered = template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        assert rendered == expected


def test_tojson_does_not_escape_html_and_keeps_unicode() -> None:
    template = ChatTemplate(
        "{{ tools[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=true) }}"
    )
    rendered = template.render([], tools=TOOLS)
    tool_json, sorted_json = rendered.split("|")
    assert json.loads(tool_json) == TOOLS[0]
    assert "<b>now</b>" in tool_json and "°C" in tool_json and "Zürich" in tool_json
    assert sorted_json == json.dumps({"a": [1, 2], "b": 1}, indent=2)


def test_raise_exception_is_a_chat_template_error() -> None:
    template = ChatTemplate(CHAT_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="Unknown role: wizard"):
        template.render([{"role": "wizard", "content": "boo"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_syntax_and_runtime_errors_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns._x }}").render([])


def test_globals_bos_eos_strftime_loop_controls_and_extra_variables() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
        "{{ eos_token }}{{ strftime_now('%Y') | length }}{{ enable_thinking }}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    messages = [{"role": "user", "content": str(i)} for i in range(4)]
    assert template.render(messages, enable_thinking=False) == "<s>[0][1]</s>4False>"
    assert (
        template.render(messages, add_generation_prompt=False, enable_thinking=True) == "<s>[0][1]</s>4True"
    )


def test_continue_final_message(reference: Any) -> None:
    template = ChatTemplate(CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    expected = reference.apply_chat_template(
        messages, tokenize=False, continue_final_message=True, chat_template=CHAT_TEMPLATE
    )
    assert template.render(messages, continue_final_message=True) == expected
    assert expected.endswith("1, 2,")


def test_resolve_chat_template_from_file_or_inline(tmp_path: Path) -> None:
    jinja_file = tmp_path / "t.jinja"
    jinja_file.write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(jinja_file)) == "{{ messages[0]['content'] }}"
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps({"chat_template": "X{{ 1 }}"}))
    assert resolve_chat_template(str(json_file)) == "X{{ 1 }}"
    assert resolve_chat_template("{{ 'inline' }}") == "{{ 'inline' }}"
    with pytest.raises(ChatTemplateError, match="does not exist"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
