"""Values that JSON does not know natively, as the JSON they stand for (pydantic models, tensors,
NumPy values, sets and tuples): the one conversion every encoder of servekit uses."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


def jsonable(value: Any) -> Any:
    """The ``default`` hook of ``json.dumps``/``orjson.dumps``."""
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic models
        return value.model_dump(mode="json")
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def validate_json(model: type[ModelT], body: bytes, *, strict: bool | None = None) -> ModelT:
    """``model.model_validate_json``, but with JSON Schema's integers: 1.0 is the integer 1 (what
    /openapi.json declares ``integer`` takes), which pydantic's strict mode refuses. Raises
    ``ValidationError`` (and ``orjson.JSONDecodeError`` never: invalid JSON is a ValidationError)."""
    try:
        return model.model_validate_json(body, strict=strict)
    except ValidationError as error:
        if not any(e["type"] == "int_type" and isinstance(e["input"], float) for e in error.errors()):
            raise
        # The standard library's encoder: orjson cannot write an integer past 64 bits, and 1e300 is as
        # much an integer to JSON Schema (and to pydantic, written as digits) as 1.0 is.
        retry = json.dumps(_integral_floats_as_ints(orjson.loads(body)))
    return model.model_validate_json(retry, strict=strict)


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value
