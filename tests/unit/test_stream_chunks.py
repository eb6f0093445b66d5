"""The encoded stream chunks of the OpenAI responses are byte for byte orjson's encoding of their dicts."""

from __future__ import annotations

import orjson
import pytest

from servekit.openai import responses as fmt

TEXTS = ["a", "", ' "quoted" \\ back', "é\n\t\x00\x1f\u2028 😀", "</script>"]
MODELS = ["tiny", 'we"ird "choices":[] model', "модель"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("with_usage", [False, True])
def test_completion_text_chunks_equal_the_encoded_dicts(model: str, with_usage: bool) -> None:
    chunks = fmt.CompletionChunks("cmpl-1", model, 1700000000, with_usage)
    for index in (0, 3, 12):
        for text in TEXTS:
            expected = fmt.completion_body(
                "cmpl-1", model, 1700000000, [fmt.completion_choice(index, text, None)], None, with_usage
            )
            assert chunks.text(index, text) == orjson.dumps(expected)


@pytest.mark.parametrize("model", MODELS)
def test_any_choices_through_the_envelope(model: str) -> None:
    choices = [
        fmt.completion_choice(0, "x", "stop", {"tokens": ["x"], "token_logprobs": [-0.5]}, "</s>"),
        fmt.completion_choice(1, "y", None),
    ]
    chunks = fmt.CompletionChunks("cmpl-2", model, 5, True)
    assert chunks.encode(choices) == orjson.dumps(fmt.completion_body("cmpl-2", model, 5, choices, None))
    assert chunks.encode([]) == orjson.dumps(fmt.completion_body("cmpl-2", model, 5, [], None))
    deltas = [fmt.chat_choice_delta(0, {"content": "hi"}), fmt.chat_choice_delta(1, {}, "length")]
    for with_usage in (False, True):
        chat = fmt.ChunkEncoder(fmt.chat_chunk("chatcmpl-3", model, 5, [], with_usage))
        assert chat.encode(deltas) == orjson.dumps(fmt.chat_chunk("chatcmpl-3", model, 5, deltas, with_usage))
