"""APIClient against a small fake OpenAI-compatible server (real HTTP on 127.0.0.1, in a thread)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from servekit.client import APIClient, APIConnectionError, APIError

MODEL = "fake-model"


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _sse(payloads: list[Any]) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for payload in payloads:
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def echo_reply(messages: list[dict[str, Any]]) -> str:
    """What the fake model answers: how many messages it saw and the last one, so history shows."""
    return f"[{len(messages)}] you said: {messages[-1]['content']}"


def build_fake_app(api_key: str | None, started: threading.Event, seen: list[dict[str, Any]]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.set()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid API key")
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        if body.get("model") != MODEL:
            return _error(404, f"model {body.get('model')!r} not found", "model")
        if body.get("temperature", 1.0) < 0:
            return _error(400, "temperature must be non-negative", "temperature")
        text = echo_reply(body["messages"])
        if not body.get("stream"):
            message = {"role": "assistant", "content": text}
            return {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        if body["messages"][-1]["content"] == "fail midway":
            return _sse(
                [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, {"error": {"message": "boom"}}]
            )
        chunks: list[Any] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        chunks += [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in text.split(" ")[:1]]
        chunks += [
            {"choices": [{"index": 0, "delta": {"content": " " + word}}]} for word in text.split(" ")[1:]
        ]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        return _sse(chunks)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        text = f"completion of {body['prompt']!r}"
        if not body.get("stream"):
            return {
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            }
        return _sse([{"choices": [{"index": 0, "text": piece}]} for piece in (text[:5], text[5:])])

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        if body.get("stream"):
            return _sse([{"text": "a"}, {"text": "ab"}])
        return {"text": "generated", "meta_info": {"id": body.get("rid")}}

    @app.post("/v1/chat/interactive")
    async def interactive(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        if body.get("stream"):  # JSON lines, as LMDeploy streams this route
            lines = [{"text": "hi", "finish_reason": None}, {"text": "!", "finish_reason": "stop"}]
            if body["prompt"] == "fail midway":
                lines[1] = {"error": {"message": "session boom"}}
            ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
            return Response(ndjson, media_type="application/x-ndjson")
        return {"text": f"session {body['session_id']}", "finish_reason": "stop"}

    return app


class FakeServer:
    """A fake OpenAI-compatible server on a free local port, for the client and the terminal chat."""

    def __init__(self, api_key: str | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        started = threading.Event()
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)  # connections queue from now on, even before uvicorn accepts them
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(
            build_fake_app(api_key, started, self.seen), log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        if not started.wait(timeout=20):
            raise RuntimeError("the fake server did not start")

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self._socket.close()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


def test_available_models(server: FakeServer) -> None:
    assert APIClient(server.url).available_models == [MODEL]


def test_chat_completion_non_streamed_yields_one_response(server: FakeServer) -> None:
    client = APIClient(server.url)
    messages = [{"role": "user", "content": "hello"}]
    responses = list(client.chat_completions_v1(MODEL, messages, temperature=0.5, max_tokens=8))
    assert len(responses) == 1
    assert responses[0]["choices"][0]["message"]["content"] == "[1] you said: hello"
    sent = server.seen[-1]
    assert sent["temperature"] == 0.5 and sent["max_tokens"] == 8 and "stream" not in sent
    assert "top_p" not in sent  # unset parameters are left to the server's defaults


def test_chat_completion_stream_yields_chunks_up_to_done(server: FakeServer) -> None:
    client = APIClient(server.url)
    chunks = list(client.chat_completions_v1(MODEL, "hi there", stream=True, tools=[{"type": "function"}]))
    assert server.seen[-1]["stream"] is True and server.seen[-1]["tools"] == [{"type": "function"}]
    deltas = [chunk["choices"][0]["delta"].get("content", "") for chunk in chunks]
    assert "".join(deltas) == "[1] you said: hi there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_stream_and_not(server: FakeServer) -> None:
    client = APIClient(server.url)
    whole = next(client.completions_v1(MODEL, "abc", max_tokens=4))
    streamed = "".join(c["choices"][0]["text"] for c in client.completions_v1(MODEL, "abc", stream=True))
    assert whole["choices"][0]["text"] == streamed == "completion of 'abc'"


def test_native_endpoints(server: FakeServer) -> None:
    client = APIClient(server.url)
    result = next(client.generate(text="x", sampling_params={"max_new_tokens": 3}, rid="r1"))
    assert result == {"text": "generated", "meta_info": {"id": "r1"}}
    assert server.seen[-1]["sampling_params"] == {"max_new_tokens": 3}
    assert [c["text"] for c in client.generate(input_ids=[1, 2], stream=True)] == ["a", "ab"]
    with pytest.raises(ValueError):
        next(client.generate())
    reply = next(client.chat_interactive_v1("hi", session_id=7, interactive_mode=True))
    assert reply["text"] == "session 7" and server.seen[-1]["interactive_mode"] is True
    assert [c["text"] for c in client.chat_interactive_v1("hi", session_id=7, stream=True)] == ["hi", "!"]
    assert "max_tokens" not in server.seen[-1]
    next(client.chat_interactive_v1("hi", request_output_len=5))
    assert server.seen[-1]["max_tokens"] == 5
    with pytest.raises(APIError, match="session boom"):
        list(client.chat_interactive_v1("fail midway", stream=True))


def test_errors_carry_the_servers_message_and_status(server: FakeServer) -> None:
    client = APIClient(server.url)
    with pytest.raises(APIError) as bad_value:
        next(client.chat_completions_v1(MODEL, "hi", temperature=-1))
    assert bad_value.value.status_code == 400
    assert "temperature must be non-negative" in str(bad_value.value)
    with pytest.raises(APIError) as unknown:
        list(client.chat_completions_v1("other", "hi", stream=True))
    assert unknown.value.status_code == 404
    with pytest.raises(APIError, match="boom"):
        list(client.chat_completions_v1(MODEL, "fail midway", stream=True))


def test_api_key_is_sent_as_a_bearer_token() -> None:
    secured = FakeServer(api_key="s3cret")
    try:
        with pytest.raises(APIError) as denied:
            _ = APIClient(secured.url).available_models
        assert denied.value.status_code == 401 and "invalid API key" in str(denied.value)
        assert APIClient(secured.url, api_key="s3cret").available_models == [MODEL]
    finally:
        secured.close()


def test_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(APIConnectionError, match="cannot reach the server"):
        _ = APIClient(f"127.0.0.1:{port}", timeout=5).available_models
