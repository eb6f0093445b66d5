"""APIClient and the terminal chat against a real `servekit serve` on a tiny random checkpoint."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from servekit.client import APIClient, APIError
from tests.e2e.serving import RunningServer, serve_script
from tests.e2e.test_client_chat import TerminalSession

pytestmark = pytest.mark.timeout(240)

MODEL = "tiny-llama"
SERVER_ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "1024"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from tests.llm.tiny_models import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / MODEL, "llama")
    with serve_script(
        "llm_serve.py", tmp_path_factory.mktemp("server"), env=SERVER_ENV, args=[str(model)]
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> APIClient:
    return APIClient(server.url)


def test_models(client: APIClient) -> None:
    assert client.available_models == [MODEL]


def test_chat_stream_joins_to_the_non_streamed_reply(client: APIClient) -> None:
    kwargs: dict[str, Any] = {"temperature": 1.0, "seed": 3, "max_tokens": 12}
    [whole] = list(client.chat_completions_v1(MODEL, "Tell me about foxes.", **kwargs))
    chunks = list(client.chat_completions_v1(MODEL, "Tell me about foxes.", stream=True, **kwargs))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["finish_reason"] == "length"


def test_completions(client: APIClient) -> None:
    [whole] = list(client.completions_v1(MODEL, "Once upon", max_tokens=5, temperature=0))
    chunks = list(client.completions_v1(MODEL, "Once upon", max_tokens=5, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]


def test_generate_native(client: APIClient) -> None:
    params = {"max_new_tokens": 4, "temperature": 0}
    [result] = list(client.generate(text="Hello", sampling_params=params))
    assert isinstance(result["text"], str)
    pieces = list(client.generate(text="Hello", sampling_params=params, stream=True))
    assert pieces


def test_chat_interactive_keeps_the_session(client: APIClient) -> None:
    # ignore_eos: the random model, sampling, may otherwise end its reply on eos within 4 tokens
    first = list(
        client.chat_interactive_v1(
            "Hi", session_id=11, interactive_mode=True, request_output_len=4, ignore_eos=True
        )
    )
    second = list(
        client.chat_interactive_v1(
            "Again", session_id=11, interactive_mode=True, request_output_len=4, stream=True
        )
    )
    assert len(first) == 1 and first[0]["finish_reason"] == "length"
    assert len(second) >= 2  # streamed pieces
    assert second[-1]["history_tokens"] > 0  # the server kept the first turn
    [ended] = list(client.chat_interactive_v1("", session_id=11, interactive_mode=False))
    assert ended.get("ended") is True


def test_response_format_json_schema_gives_valid_json(client: APIClient) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(2):
        [reply] = list(
            client.chat_completions_v1(
                MODEL,
                "A person:",
                temperature=1.0,
                seed=seed,
                max_tokens=300,
                response_format=response_format,
            )
        )
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SCHEMA)


def test_required_tool_choice_gives_a_valid_call(client: APIClient) -> None:
    [reply] = list(
        client.chat_completions_v1(
            MODEL, "Add 1 and 2", temperature=1.0, seed=1, max_tokens=300, tools=TOOLS, tool_choice="required"
        )
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[0]["function"]["parameters"])


def test_errors_raise_with_the_servers_message(client: APIClient) -> None:
    with pytest.raises(APIError) as error:
        list(client.chat_completions_v1(MODEL, "hi", temperature=-1))
    assert error.value.status_code == 400 and "temperature" in str(error.value)
    with pytest.raises(APIError) as missing:
        list(client.chat_completions_v1("no-such-model", "hi"))
    assert missing.value.status_code == 404


def test_terminal_chat_against_the_server(server: RunningServer, tmp_path: Path) -> None:
    session = TerminalSession([sys.executable, "-m", "servekit.cli", "client", server.url])
    try:
        session.expect(f"Chatting with {MODEL}")
        session.expect(">>> ")
        session.send_line("Hello there")
        session.expect(">>> ", timeout=60)  # the streamed reply ended and the next prompt came
        session.send_line("/exit")
        assert session.wait() == 0
    finally:
        session.kill()
