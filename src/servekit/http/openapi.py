"""``/openapi.json`` for routes whose handlers read the request themselves (spec routes, the proxy):
the request body's schema is the pydantic model the handler validates with, path parameters are
declared, and error answers are documented in the route's envelope."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

SCHEMAS = "#/components/schemas/"
OPENAI_ERROR = "OpenAIErrorResponse"
CORE_ERROR = "HTTPErrorResponse"

# OpenAI's envelope (servekit.openai.errors) and the core's FastAPI-style one.
ENVELOPES: dict[str, dict[str, Any]] = {
    OPENAI_ERROR: {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    CORE_ERROR: {"type": "object", "required": ["detail"], "properties": {"detail": {}}},
}

_ERRORS = {
    400: "Invalid request",
    401: "Invalid or missing API key",
    404: "Unknown model or resource",
    405: "Method not allowed",
    413: "Request body too large",
    422: "The body does not match the request model (FastAPI's detail list)",
    431: "Request headers too large",
    499: "Client disconnected",
    502: "The upstream node failed",
    503: "Overloaded or no worker ready (see Retry-After)",
    504: "Request timed out",
}
_PATH_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?}")


class OpenAPIDoc:
    """Operations of routes FastAPI cannot describe itself, and the component schemas they refer to;
    ``apply`` writes them into a generated document."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = dict(ENVELOPES)
        self.operations: dict[tuple[str, str], dict[str, Any]] = {}

    def schema(self, body: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
        return dict(body) if isinstance(body, dict) else self.ref(body)

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
        self.schemas.update(schema.pop("$defs", {}))
        self.schemas[model.__name__] = schema
        return {"$ref": SCHEMAS + model.__name__}

    def add(
        self,
        path: str,
        methods: Iterable[str],
        *,
        body: type[BaseModel] | dict[str, Any] | None = None,
        media_types: Iterable[str] = ("application/json",),
        envelope: str = OPENAI_ERROR,
        errors: Iterable[int] = tuple(_ERRORS),
    ) -> None:
        """Document ``path`` (Starlette syntax: ``{name}`` or ``{name:converter}``)."""
        error = {"application/json": {"schema": {"$ref": SCHEMAS + envelope}}}
        content: dict[str, Any] = {m: {"schema": {}} for m in media_types}
        responses: dict[str, Any] = {"200": {"description": "Successful Response", "content": content}}
        for status in errors:
            responses[str(status)] = {"description": _ERRORS[status], "content": error}
        if "404" in responses and _PATH_PARAM.search(path):
            # A parameter no route matches (a line break in it, say) gets the app's own 404.
            either = [{"$ref": SCHEMAS + envelope}, {"$ref": SCHEMAS + CORE_ERROR}]
            responses["404"] = {
                "description": _ERRORS[404],
                "content": {"application/json": {"schema": {"anyOf": either}}},
            }
        for method in methods:
            operation: dict[str, Any] = {"responses": responses}
            if body is not None and method.upper() != "GET":
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": self.schema(body)}},
                }
            parameters = path_parameters(path)
            if parameters:
                operation["parameters"] = parameters
            self.operations[(_PATH_PARAM.sub(r"{\1}", path), method.lower())] = operation

    def document(self, title: str, version: str) -> dict[str, Any]:
        """A whole document of these operations alone (for apps FastAPI does not build)."""
        return self.apply({"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": {}})

    def apply(self, document: dict[str, Any]) -> dict[str, Any]:
        for (path, method), operation in self.operations.items():
            document.setdefault("paths", {}).setdefault(path, {}).setdefault(method, {}).update(operation)
        document.setdefault("components", {}).setdefault("schemas", {}).update(self.schemas)
        return document

    def wrap(self, build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        """FastAPI's ``app.openapi`` (which caches its document) with these operations applied."""
        applied: list[dict[str, Any]] = []

        def openapi() -> dict[str, Any]:
            document = build()
            if not applied or applied[0] is not document:
                applied[:] = [self.apply(document)]
            return document

        return openapi


# What Starlette's converters match: one segment, or the rest of the path (no line break).
_CONVERTER_PATTERNS = {"": "^[^/]+$", "str": "^[^/]+$", "path": "^[^\n]+$"}


def path_parameters(path: str) -> list[dict[str, Any]]:
    parameters = []
    for name, converter in _PATH_PARAM.findall(path):
        schema: dict[str, Any] = {"type": "string", "minLength": 1}
        if converter in _CONVERTER_PATTERNS:
            schema["pattern"] = _CONVERTER_PATTERNS[converter]
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return parameters
