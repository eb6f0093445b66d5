"""servekit.openai's one mapping from exceptions to OpenAI's error envelope, and its SSE framing."""

from __future__ import annotations

import pickle

import orjson
import pytest
from pydantic import ValidationError

from servekit.errors import ServerError
from servekit.llm.errors import EngineClosedError, PromptTooLongError, QueueFullError, SamplingParamsError
from servekit.openai import DONE, ChatCompletionRequest, OpenAIError, openai_error, sse_json


def envelope(error: OpenAIError | None) -> tuple[int, dict[str, object]]:
    assert error is not None
    response = error.response()
    return response.status_code, orjson.loads(bytes(response.body))["error"]


def test_validation_errors_are_400s_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user"}], "temperature": 9})
    status, body = envelope(openai_error(caught.value))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"


def test_engine_errors_name_the_requests_own_param() -> None:
    status, body = envelope(openai_error(PromptTooLongError(600, 512), {"prompt": "messages"}.get))
    assert (status, body["param"], body["code"]) == (400, "messages", "context_length_exceeded")
    status, body = envelope(openai_error(SamplingParamsError("top_p must be in (0, 1]", "top_p")))
    assert (status, body["param"], body["code"]) == (400, "top_p", "invalid_value")
    overloaded = openai_error(QueueFullError("8 waiting"))
    assert overloaded is not None and overloaded.response().headers["Retry-After"] == "1"
    assert envelope(overloaded)[1]["type"] == "service_unavailable"
    assert envelope(openai_error(EngineClosedError("gone")))[0] == 503
    assert openai_error(RuntimeError("a bug")) is None  # a 500, logged by the caller


def test_each_route_names_engine_inputs_its_own_way() -> None:
    from servekit.llm.errors import EngineInputError
    from servekit.openai import CompletionRequest
    from servekit.specs.llm.protocol import GenerateRequest

    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    completion = CompletionRequest(prompt="x")
    by_text, by_ids = GenerateRequest(text="x"), GenerateRequest(input_ids=[1])
    names = [
        (chat, "prompt", "messages"),
        (chat, "logit_bias", "logit_bias"),
        (completion, "prompt", "prompt"),
        (by_text, "prompt", "text"),
        (by_ids, "prompt", "input_ids"),
        (by_ids, "request_id", "rid"),
        (by_ids, "temperature", "sampling_params.temperature"),
    ]
    for request, engine_param, param in names:
        error = openai_error(EngineInputError("refused", engine_param), request.param_name)
        assert error is not None and error.param == param, (type(request).__name__, engine_param)


def test_core_errors_keep_their_fields_across_the_transport() -> None:
    raised = OpenAIError(400, "bad stop", param="stop", code="invalid_value")
    sent = pickle.loads(pickle.dumps(raised))  # what a worker's error becomes in the front
    received = ServerError(sent.status_code, sent.detail)
    assert envelope(openai_error(received)) == envelope(raised)
    hook = ServerError(
        422, [{"type": "missing", "loc": ["body", "messages", 0, "role"], "msg": "Field required"}]
    )
    status, body = envelope(openai_error(hook))
    assert status == 400 and body["param"] == "messages[0].role"
    status, body = envelope(openai_error(ServerError(401, "Invalid or missing API key")))
    assert (status, body["type"], body["message"]) == (
        401,
        "authentication_error",
        "Invalid or missing API key",
    )


def test_sse_framing() -> None:
    assert sse_json({"a": 1}) == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    assert OpenAIError(500, "boom").sse_event() == sse_json(
        {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    )
