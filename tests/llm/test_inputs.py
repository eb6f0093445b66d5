"""The engine's input step: prompts and params checked against the model once, chat rendering."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from servekit.llm.errors import EngineInputError, PromptTooLongError
from servekit.llm.inputs import InputProcessor, message_dict
from servekit.llm.sampling_params import SamplingParams

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


def processor(template: str | None = TEMPLATE) -> InputProcessor:
    # A character-level "tokenizer": enough to check what reaches the engine.
    tokenizer: Any = SimpleNamespace(
        bos_token=None,
        eos_token=None,
        encode=lambda text, add_special_tokens=True: [ord(c) % 97 for c in text],
    )
    return InputProcessor(tokenizer, vocab_size=97, max_model_len=32, chat_template=template)


def test_prompt_ids_are_checked_against_vocabulary_and_context() -> None:
    inputs = processor()
    prepared = inputs.prepare(None, None, [1, 2, 3])
    assert prepared.prompt_token_ids == [1, 2, 3] and prepared.params == SamplingParams()
    with pytest.raises(PromptTooLongError) as long:
        inputs.prepare(None, None, list(range(32)))
    assert long.value.param == "prompt" and long.value.code == "context_length_exceeded"
    assert isinstance(long.value, ValueError) and "32" in str(long.value)
    with pytest.raises(EngineInputError, match="out of range") as bad:
        inputs.prepare(None, None, [1, 97])
    assert bad.value.param == "prompt"
    with pytest.raises(EngineInputError, match="empty"):
        inputs.prepare(None, None, [])


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (SamplingParams(stop_token_ids=[5, 200]), "stop_token_ids"),
        (SamplingParams(logit_bias={-1: 1.0}), "logit_bias"),
    ],
)
def test_sampling_token_ids_are_checked(params: SamplingParams, param: str) -> None:
    with pytest.raises(EngineInputError) as bad:
        processor().prepare("hi", params)
    assert bad.value.param == param


def test_chat_is_rendered_with_text_parts_joined() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    prepared = processor().prepare_chat(messages)
    assert prepared.prompt == "<user>ab<a>"
    assert messages[0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert processor().render_chat(messages, add_generation_prompt=False) == "<user>ab"


def test_chat_errors_name_their_parameter() -> None:
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(EngineInputError) as part:
        processor().prepare_chat([{"role": "system", "content": "s"}, image])
    assert part.value.param == "messages[1].content"
    with pytest.raises(EngineInputError) as none:
        processor(None).prepare_chat([{"role": "user", "content": "x"}])
    assert none.value.param == "messages"
    with pytest.raises(EngineInputError) as missing:
        processor().prepare_chat([{"role": "user", "content": "x"}], chat_template="/no/such/template.jinja")
    assert missing.value.param == "chat_template"


def test_tool_call_arguments_reach_the_template_as_objects() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert message_dict(message, 0)["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert call["function"]["arguments"] == '{"x": 1}'  # the caller's message is left as it was
