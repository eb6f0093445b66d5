"""Calling the user's hooks: optional ``context`` argument, pydantic validation, JSON encoding."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from servekit.errors import ServerError
from servekit.json_values import jsonable, validate_json


def accepts_context(hook: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(hook).parameters
    except (TypeError, ValueError):
        return False
    return "context" in parameters


def first_argument_model(hook: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model a hook's first argument is annotated with, if any."""
    hints = _type_hints(hook)
    try:
        parameters = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters:
        return None
    annotation = hints.get(parameters[0].name)
    return annotation if _is_model(annotation) else None


def return_model(hook: Callable[..., Any]) -> type[BaseModel] | None:
    annotation = _type_hints(hook).get("return")
    return annotation if _is_model(annotation) else None


def _type_hints(hook: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(hook)
    except Exception:
        return {}


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class Hook:
    """One user hook, wrapped once so that each call costs a plain function call."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.wants_context = accepts_context(function)

    def __call__(self, value: Any, context: Any) -> Any:
        if self.wants_context:
            return self.function(value, context=context)
        return self.function(value)


def validation_error_detail(error: ValidationError) -> list[dict[str, Any]]:
    """FastAPI's shape: a list of {type, loc, msg, input} with ``loc`` starting at "body"."""
    return [
        {"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"], "input": e.get("input")}
        for e in error.errors(include_url=False)
    ]


def parse_json_body(body: bytes, model: type[BaseModel] | None) -> Any:
    if model is not None:
        try:
            return validate_json(model, body)
        except ValidationError as error:
            if any(e["type"] == "json_invalid" for e in error.errors()):
                raise ServerError(
                    400, f"Request body is not valid JSON: {error.errors()[0]['msg']}"
                ) from None
            raise ServerError(422, validation_error_detail(error)) from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ServerError(400, f"Request body is not valid JSON: {error}") from None


def validate_form(form: Any, model: type[BaseModel] | None) -> Any:
    """A form's fields checked against the request model like a JSON body's (422 when they do not fit)."""
    if model is None or isinstance(form, model):
        return form
    try:
        return model.model_validate(dict(form))
    except (TypeError, ValueError) as error:
        if isinstance(error, ValidationError):
            raise ServerError(422, validation_error_detail(error)) from None
        raise ServerError(422, f"The form does not fit the request model: {error}") from None


def to_json(value: Any) -> bytes:
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()
    return orjson.dumps(value, default=jsonable, option=orjson.OPT_SERIALIZE_NUMPY)


def validate_output(value: Any, model: type[BaseModel] | None) -> Any:
    if model is None or isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise ServerError(500, f"encode_response returned an invalid {model.__name__}: {error}") from None


def stream_item_bytes(item: Any) -> bytes:
    """One streamed item, as ``LitAPI.format_encoded_response`` framed it, as the client sees it."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return to_json(item) + b"\n"
