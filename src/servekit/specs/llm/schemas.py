"""``/openapi.json`` as the loaded model reads it: the request bodies' schemas (the pydantic models of
``servekit.openai`` and ``protocol``) with what only the running server knows written in, so that
every schema-valid body is one the server accepts. One function, used by ``servekit serve`` and by
the proxy (from a node's ``/model_info``).

What it writes, each being a check the server makes itself:

- token ids (``x-token-id`` in the models' schemas) get ``maximum`` vocab_size - 1; token ids as
  JSON object keys (``x-token-id-key``, logit_bias) a pattern of the numbers below the vocab size;
- a message's ``role`` gets an ``enum`` of the roles the model's chat template renders (no enum when
  it renders any role);
- content parts: text only (the engine refuses images and audio);
- what ``servekit serve`` refuses of OpenAI's fields: ``suffix``, ``max_tokens`` 0, ``top_p`` 0;
- ``/v1/embeddings`` is left out when the model is a generation model (it answers every body with
  400 ``model_not_supported``).

What JSON Schema cannot say (a prompt's length in tokens, one field bounded by another) is left to
the server's 400s; the reliability suite's schemathesis hooks name each such case.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from servekit.llm.errors import EngineInputError
from servekit.openai.sampling import TOKEN_ID, TOKEN_ID_KEY

if TYPE_CHECKING:
    from servekit.llm.inputs import InputProcessor

SCHEMAS = "#/components/schemas/"
BOUNDS = ("vocab_size", "chat_roles", "is_generation")  # what bound_document reads of model_info
EMBEDDINGS = "/v1/embeddings"


_ROLES = ("system", "user", "assistant", "tool", "developer")
_UNLISTED_ROLE = "servekit-probe-unlisted-role"  # rendered, the template takes any role


def chat_roles(inputs: InputProcessor) -> list[str] | None:
    """The roles the model's chat template renders, alone or after a user message (None: any role,
    or no template to ask)."""
    if inputs.chat_template_source is None:
        return None

    def renders(*roles: str) -> bool:
        try:
            inputs.render_chat([{"role": role, "content": "x"} for role in roles])
        except EngineInputError:
            return False
        return True

    if renders(_UNLISTED_ROLE):
        return None
    return [role for role in _ROLES if renders(role) or renders("user", role)]


def bound_document(document: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with the model's bounds (``info``: the worker's ``model_info``)."""
    bounded = copy.deepcopy(dict(document))
    schemas: dict[str, Any] = bounded.get("components", {}).get("schemas", {})
    vocab = info.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        for schema in _subschemas(schemas):
            if schema.pop(TOKEN_ID, False):
                schema["maximum"] = vocab - 1
            if schema.pop(TOKEN_ID_KEY, False):
                schema["pattern"] = f"^0*(?:{below(vocab)})$"
    roles = info.get("chat_roles")
    message = schemas.get("ChatMessage", {}).get("properties", {})
    if isinstance(roles, list) and "role" in message:
        message["role"] = {"type": "string", "enum": list(roles)}
    if "content" in message:
        text_parts = {"type": "array", "items": {"$ref": SCHEMAS + "TextContent"}}
        message["content"] = {"anyOf": [{"type": "string"}, text_parts, {"type": "null"}]}
    _set(schemas, "CompletionRequest", "suffix", {"type": "null", "description": "not supported"})
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        for field in ("max_tokens", "max_completion_tokens"):
            _raise_minimum(schemas, name, field, 1)
        top_p = schemas.get(name, {}).get("properties", {}).get("top_p")
        for choice in _choices(top_p):
            if choice.get("type") == "number":
                choice.pop("minimum", None)
                choice["exclusiveMinimum"] = 0
    if info.get("is_generation", True):
        bounded.get("paths", {}).pop(EMBEDDINGS, None)
    return bounded


def below(bound: int) -> str:
    """A regular expression of the decimal numbers 0 .. bound - 1 (no leading zeros; ``bound`` > 0)."""
    digits = str(bound - 1)
    width = len(digits)
    shorter = ["[0-9]"] if width > 1 else []
    if width > 2:
        shorter.append(f"[1-9][0-9]{{1,{width - 2}}}")
    same = []
    for i, digit in enumerate(digits):
        low = 1 if i == 0 and width > 1 else 0
        if int(digit) > low:
            rest = f"[0-9]{{{width - i - 1}}}" if width - i - 1 else ""
            same.append(f"{digits[:i]}[{low}-{int(digit) - 1}]{rest}")
    same.append(digits)
    return "|".join(shorter + same)


def _subschemas(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _subschemas(item)
    elif isinstance(value, list):
        for item in value:
            yield from _subschemas(item)


def _choices(schema: Any) -> list[dict[str, Any]]:
    if not isinstance(schema, dict):
        return []
    return [c for c in schema.get("anyOf", [schema]) if isinstance(c, dict)]


def _set(schemas: dict[str, Any], name: str, field: str, schema: dict[str, Any]) -> None:
    properties = schemas.get(name, {}).get("properties")
    if isinstance(properties, dict) and field in properties:
        properties[field] = schema


def _raise_minimum(schemas: dict[str, Any], name: str, field: str, minimum: int) -> None:
    for choice in _choices(schemas.get(name, {}).get("properties", {}).get(field)):
        if choice.get("type") == "integer":
            choice["minimum"] = max(minimum, choice.get("minimum", minimum))
