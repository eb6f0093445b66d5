"""Values that JSON does not know natively, as the JSON they stand for (pydantic models, tensors,
NumPy values, sets and tuples): the one conversion every encoder of servekit uses."""

from __future__ import annotations

from typing import Any


def jsonable(value: Any) -> Any:
    """The ``default`` hook of ``json.dumps``/``orjson.dumps``."""
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic models
        return value.model_dump(mode="json")
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
