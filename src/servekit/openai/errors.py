"""OpenAI's error envelope, ``{"error": {message, type, param, code}}``, and the one mapping from
exceptions (validation errors, core errors, engine errors) to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response

from servekit.errors import ServerError
from servekit.json_values import ModelT, validate_json
from servekit.llm.errors import EngineClosedError, EngineInputError, QueueFullError
from servekit.openai.sse import sse_json

RETRY_AFTER_S = "1"


# OpenAI's error types by status code; anything else in the 4xx range is an invalid request.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_type_for(status_code: int) -> str:
    if status_code in _ERROR_TYPES:
        return _ERROR_TYPES[status_code]
    return "server_error" if status_code >= 500 else "invalid_request_error"


class OpenAIError(ServerError):
    """An error answered with OpenAI's envelope. It is a ``ServerError`` whose detail is
    ``{"message", "param", "code"}``, so a worker can raise it and the front gets its fields back."""

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, {"message": message, "param": param, "code": code}, headers)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status_code, self.message, self.param, self.code, self.headers)

    @classmethod
    def from_server_error(cls, error: ServerError) -> OpenAIError:
        if isinstance(error, OpenAIError):
            return error
        detail = error.detail
        if isinstance(detail, dict) and "message" in detail and "error" not in detail:
            param, code = detail.get("param"), detail.get("code")
            return cls(error.status_code, str(detail["message"]), param, code, error.headers)
        if error.status_code == 422 and _is_validation_detail(detail):
            # A user hook's validation error: OpenAI routes answer 400 naming the field, not 422.
            loc = [part for part in detail[0].get("loc", []) if part != "body"]
            return cls(400, detail_message(detail), field_path(loc) or None, "invalid_value", error.headers)
        return cls(error.status_code, detail_message(detail), headers=error.headers)

    @classmethod
    def from_validation_error(cls, error: ValidationError) -> OpenAIError:
        """400 naming the first invalid field, as ``messages[0].role``."""
        first = error.errors(include_url=False)[0]
        param = field_path(first["loc"])
        message = first["msg"]
        if param:
            message = f"Invalid value for '{param}': {message}"
        remaining = error.error_count() - 1
        if remaining:
            message += f" (and {remaining} more error{'s' if remaining > 1 else ''})"
        return cls(400, message, param=param or None, code="invalid_value")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": error_type_for(self.status_code),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        headers = dict(self.headers or {})
        if self.status_code in (429, 503):
            headers.setdefault("Retry-After", RETRY_AFTER_S)
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status_code,
            headers=headers or None,
            media_type="application/json",
        )

    def sse_event(self) -> bytes:
        """The error as one server-sent event, for a stream that already started."""
        return sse_json(self.body())


def invalid(message: str, param: str | None, code: str = "invalid_value") -> OpenAIError:
    """A 400 naming ``param``."""
    return OpenAIError(400, message, param=param, code=code)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; 400 for anything else."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise OpenAIError(400, f"The request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object", code="invalid_json")
    return data


def parse_body(body: bytes, model: type[ModelT]) -> ModelT:
    """A JSON object body validated by ``model``, strictly as JSON Schema reads /openapi.json (no
    false for 0, no "1" for 1, but 1.0 is the integer 1); every failure is a 400 naming the field."""
    try:
        return validate_json(model, body, strict=True)
    except ValidationError as error:
        json_object(body)  # not JSON, or not an object: told so
        raise OpenAIError.from_validation_error(error) from None


def openai_error(error: BaseException, rename: Callable[[str], str] | None = None) -> OpenAIError | None:
    """The client-facing error for ``error``, or None when it is a server bug (a 500).

    ``rename`` maps an engine input name (``prompt``, ``logit_bias``, ...) to the request's own
    parameter name (``messages``, ``sampling_params.logit_bias``, ...).
    """
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, ServerError):
        return OpenAIError.from_server_error(error)
    if isinstance(error, ValidationError):
        return OpenAIError.from_validation_error(error)
    if isinstance(error, EngineInputError):
        param = error.param
        if param is not None and rename is not None:
            param = rename(param)
        return OpenAIError(400, str(error), param=param, code=error.code or "invalid_value")
    if isinstance(error, QueueFullError):
        return OpenAIError(503, f"The server is overloaded: {error}. Retry later.", code="overloaded")
    if isinstance(error, EngineClosedError):
        return OpenAIError(503, f"The engine stopped: {error}")
    return None


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``; union-branch tags are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_tag(part):
            path += f".{part}" if path else part
    return path


def _is_union_tag(part: str) -> bool:
    # pydantic names the branch it tried in a union: "str", "list[...]", "function-after[...]", ...
    # A constrained branch (min_length, ge, ...) is "constrained-str", "constrained-int", ...
    return "[" in part or part.startswith("constrained-") or part in _TYPE_TAGS


_TYPE_TAGS = ("str", "int", "float", "bool", "dict", "list", "none")


def _is_validation_detail(detail: Any) -> bool:
    return isinstance(detail, list) and bool(detail) and isinstance(detail[0], dict) and "msg" in detail[0]


def detail_message(detail: Any) -> str:
    """A readable message out of a core error detail (a string, a FastAPI-style list, or a dict)."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict):
        error = detail.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in detail:
            return str(detail["message"])
    if _is_validation_detail(detail):
        first = detail[0]
        loc = [part for part in first.get("loc", []) if part != "body"]
        param = field_path(loc)
        return f"Invalid value for '{param}': {first['msg']}" if param else str(first["msg"])
    return orjson.dumps(detail, default=str).decode()
