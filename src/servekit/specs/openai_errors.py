"""Errors of the OpenAI-compatible routes, in OpenAI's envelope: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response

from servekit.errors import ServerError

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


class OpenAIError(Exception):
    """An error to answer with OpenAI's envelope and a status code."""

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def from_server_error(cls, error: ServerError) -> OpenAIError:
        return cls(error.status_code, detail_message(error.detail), headers=error.headers)

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
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status_code,
            headers=self.headers,
            media_type="application/json",
        )

    def sse_event(self) -> bytes:
        """The error as one server-sent event, for a stream that already started."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


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
    return "[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none")


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
    if isinstance(detail, list) and detail and isinstance(detail[0], dict) and "msg" in detail[0]:
        first = detail[0]
        loc = [part for part in first.get("loc", []) if part != "body"]
        param = field_path(loc)
        return f"Invalid value for '{param}': {first['msg']}" if param else str(first["msg"])
    return orjson.dumps(detail, default=str).decode()


def openai_error_response(error: ServerError) -> Response:
    """The OpenAI envelope for an error the core raised on an OpenAI route (e.g. 401 from auth)."""
    return OpenAIError.from_server_error(error).response()
