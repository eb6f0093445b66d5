"""OpenAISpec through a real server and the official ``openai`` client (and raw HTTP for the framing)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.e2e.serving import serve_script, wait_for_text

pytestmark = pytest.mark.timeout(120)


def client_for(url: str, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def ask(client: openai.OpenAI, text: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": text}], **kwargs
    )


def sse_events(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event; ``[DONE]`` kept as a string."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def test_every_output_shape_and_the_request_fields(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo"}) as server:
        client = client_for(server.url)
        for prompt, expected in [
            ("capital", "Canberra"),
            ("dict", "from a dict"),
            ("list", "from a list"),
            ("role", "with a role"),
            ("history", "the reply"),
            ("hello", "echo: hello"),
        ]:
            completion = ask(client, prompt)
            assert completion.object == "chat.completion"
            assert completion.model == "my-model"
            assert completion.choices[0].message.role == "assistant"
            assert completion.choices[0].message.content == expected
            assert completion.choices[0].finish_reason == "stop"

        words = ask(client, "words")
        assert words.choices[0].message.content == "one two three"
        assert (words.usage.prompt_tokens, words.usage.completion_tokens, words.usage.total_tokens) == (
            7,
            3,
            10,
        )
        assert ask(client, "length").choices[0].finish_reason == "length"

        context = ask(client, "context", temperature=0.25, max_tokens=12).choices[0].message.content
        assert context == "temperature=0.25 max_tokens=12 n=1"

        many = ask(client, "words", n=3)
        assert [c.index for c in many.choices] == [0, 1, 2]
        assert all(c.message.content == "one two three" for c in many.choices)
        assert many.usage.prompt_tokens == 7 and many.usage.completion_tokens == 9

        roles = client.chat.completions.create(
            model="m",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "roles"},
            ],
        )
        assert roles.choices[0].message.content == "system,user,assistant,user"

        models = client.models.list()
        assert [m.id for m in models.data] == ["EchoChatAPI"]
        assert client.models.retrieve("EchoChatAPI").id == "EchoChatAPI"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("unknown-model")


def test_image_parts_reach_predict(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo"}) as server:
        client = client_for(server.url)
        data_url = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
        completion = client.chat.completions.create(
            model="vision",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "images"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                        {"type": "image_url", "image_url": {"url": data_url, "detail": "low"}},
                    ],
                }
            ],
        )
        assert completion.choices[0].message.content == f"images: https://example.com/cat.png {data_url}"


def test_streaming_framing(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo"}) as server:
        client = client_for(server.url)
        chunks = list(ask(client, "words", stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
        finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 10
        assert len({c.id for c in chunks}) == 1

        # Without include_usage there is no usage chunk; with n=2 each choice is streamed and finished.
        chunks = list(ask(client, "words", stream=True, n=2))
        assert all(c.choices for c in chunks)
        for index in (0, 1):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
            assert mine[0].delta.role == "assistant"
            assert "".join(c.delta.content or "" for c in mine) == "one two three"
            assert mine[-1].finish_reason == "stop"

        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "capital"}], "stream": True},
            timeout=30,
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        assert events[-1] == "[DONE]"
        assert [e["object"] for e in events[:-1]] == ["chat.completion.chunk"] * 3
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[1]["choices"][0]["delta"] == {"content": "Canberra"}
        assert events[2]["choices"][0]["finish_reason"] == "stop"


def test_errors_use_the_openai_envelope(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo"}) as server:
        url = f"{server.url}/v1/chat/completions"
        cases = [
            ({"messages": [{"content": "no role"}]}, "messages[0].role"),
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature"),
            ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
            ({"model": "m"}, "messages"),
        ]
        for body, param in cases:
            response = httpx.post(url, json=body, timeout=10)
            assert response.status_code == 400, body
            error = response.json()["error"]
            assert error["param"] == param
            assert param in error["message"]
            assert error["type"] == "invalid_request_error"
        not_json = httpx.post(url, content=b"{not json", timeout=10)
        assert not_json.status_code == 400
        assert "not valid JSON" in not_json.json()["error"]["message"]
        too_big = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 100_000}]}, timeout=10)
        assert too_big.status_code == 413
        assert "larger than the limit" in too_big.json()["error"]["message"]

        client = client_for(server.url)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], top_p=3)
        assert bad.value.body["param"] == "top_p"  # type: ignore[index]

        failed = httpx.post(url, json={"messages": [{"role": "user", "content": "fail"}]}, timeout=10)
        assert failed.status_code == 500
        assert failed.json()["error"]["message"] == "Internal server error"
        assert failed.json()["error"]["type"] == "server_error"
        with pytest.raises(openai.InternalServerError):
            ask(client, "fail")

        # A stream that fails before its first item gets a real status code...
        failed_stream = httpx.post(
            url, json={"messages": [{"role": "user", "content": "fail"}], "stream": True}, timeout=10
        )
        assert failed_stream.status_code == 500
        assert failed_stream.json()["error"]["message"] == "Internal server error"
        # ...one that fails later sends an error event, then [DONE].
        late = httpx.post(
            url, json={"messages": [{"role": "user", "content": "fail-later"}], "stream": True}, timeout=10
        )
        assert late.status_code == 200
        events = sse_events(late)
        assert events[1]["choices"][0]["delta"]["content"] == "partial "
        assert events[-2] == {
            "error": {
                "message": "Internal server error",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        assert events[-1] == "[DONE]"
        with pytest.raises(openai.APIError, match="Internal server error"):
            list(ask(client, "fail-later", stream=True))

        # The server is still fine.
        assert ask(client, "capital").choices[0].message.content == "Canberra"


def test_api_key_errors_use_the_openai_envelope(tmp_path: Path) -> None:
    key = "sk-test-123"
    with serve_script(
        "openai_chat.py",
        tmp_path,
        env={"CHAT_API": "echo", "LIT_SERVER_API_KEY": key},
        health_headers={"X-API-Key": key},
    ) as server:
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            ask(client_for(server.url, api_key="wrong"), "capital")
        assert ask(client_for(server.url, api_key=key), "capital").choices[0].message.content == "Canberra"
        assert client_for(server.url, api_key=key).models.list().data


def test_predict_that_returns_and_reports_usage(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "plain"}) as server:
        client = client_for(server.url)
        completion = client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
        assert completion.model == "plain-model"
        assert completion.choices[0].message.content == "returned: hi"
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 2)
        assert completion.usage.total_tokens == 7
        chunks = list(ask(client, "hi", stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "returned: hi"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_reach_decode_request_and_tool_calls_reach_the_client(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "tools"}) as server:
        client = client_for(server.url)
        completion = ask(client, "weather in Paris?", tools=[WEATHER_TOOL])
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert (call.id, call.type, call.function.name) == ("call_1", "function", "get_weather")
        assert orjson.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(ask(client, "weather in Paris?", tools=[WEATHER_TOOL], stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert len(calls) == 1
        assert (calls[0].index, calls[0].id, calls[0].function.name) == (0, "call_1", "get_weather")
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        plain = ask(client, "no tools here")
        assert plain.choices[0].message.content == "no tools for no tools here"
        assert plain.choices[0].finish_reason == "stop"


def test_custom_spec_overriding_populate_context(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "custom_spec"}) as server:
        completion = ask(client_for(server.url), "x", user="alice")
        assert completion.choices[0].message.content == "user=alice"


def test_client_disconnect_stops_predict(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo"}) as server:
        url = f"{server.url}/v1/chat/completions"
        streamed = tmp_path / "streamed-closed"
        body = {"messages": [{"role": "user", "content": f"endless:{streamed}"}], "stream": True}
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        assert wait_for_text(streamed) == "closed"

        # Not streamed: the client goes away while the server is still collecting the reply.
        whole = tmp_path / "whole-closed"
        payload = orjson.dumps({"messages": [{"role": "user", "content": f"endless:{whole}"}]})
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            # Disconnect only once predict runs (a request dropped while still queued never starts).
            assert wait_for_text(Path(f"{whole}.started")) == "started"
        assert wait_for_text(whole) == "closed"

        # The worker is free for the next request.
        assert ask(client_for(server.url), "capital").choices[0].message.content == "Canberra"


def test_timeout_is_a_504_in_the_openai_envelope(tmp_path: Path) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo", "TIMEOUT": "1"}) as server:
        marker = tmp_path / "timed-out"
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"endless:{marker}"}]},
            timeout=30,
        )
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        assert wait_for_text(marker) == "closed"  # the worker stopped predict
