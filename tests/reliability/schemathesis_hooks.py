"""Hooks schemathesis loads (``SCHEMATHESIS_HOOKS``): strategies for the string formats servekit's
/openapi.json declares beyond JSON Schema's own."""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from hypothesis import strategies as st

from servekit.openai.sampling import JSON_OBJECT_FORMAT

_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
schemathesis.openapi.format(
    JSON_OBJECT_FORMAT, st.dictionaries(st.text(max_size=8), _scalars, max_size=4).map(json.dumps)
)


# What a server refuses with 400 although JSON Schema cannot say it, as (error code, message start).
# Each is a rule about a value's length in tokens or about two fields together; nothing else is
# dropped, and the other checks still run on these responses.
INEXPRESSIBLE = (
    ("context_length_exceeded", ""),  # the prompt's length in *tokens* (text has no token bound)
    # one field bounded by another
    ("invalid_value", "min_tokens must not exceed max_tokens"),
    ("invalid_value", "best_of must be at least n"),
    ("invalid_value", "rid has "),  # /generate: as many rids as prompts
    # what a jinja2 template accepts: the request's own chat_template, and the conversations the
    # model's template renders (its roles are in the schema; their order and contents are not)
    ("invalid_value", "invalid chat template"),
    ("invalid_value", "cannot render the messages"),
)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Drop a positive_data_acceptance failure (ST202) only for a rejection in ``INEXPRESSIBLE``."""
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    try:
        error = response.json()["error"]
        code, message = error.get("code"), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return True
    return not any(code == known and message.startswith(start) for known, start in INEXPRESSIBLE)


# How much generation one schema-valid request may ask for in these runs (n x prompts x tokens, at
# up to 128 x 16 x the context, is minutes of CPU on the shared machine). Capping keeps every value
# schema-valid (each cap is within the field's bounds, and fields bounded by one another get the same
# cap), so it bounds the run's time without excluding a case from any check.
WORK_CAP = 2
TOKENS_CAP = 8
_TOKEN_COUNTS = {"max_tokens", "max_new_tokens", "max_completion_tokens", "min_tokens", "min_new_tokens"}
_CANDIDATES = {"n", "best_of"}
_BATCHES = {"prompt", "text", "input_ids", "rid", "input"}
_LENGTH_FIELD = {"/v1/chat/completions": "max_tokens", "/v1/chat/interactive": "max_tokens"}


def _capped(body: dict[str, Any]) -> dict[str, Any]:
    capped: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, int) and not isinstance(value, bool) and key in _TOKEN_COUNTS:
            value = min(value, TOKENS_CAP)
        elif isinstance(value, int) and not isinstance(value, bool) and key in _CANDIDATES:
            value = min(value, WORK_CAP)
        elif key in _BATCHES and isinstance(value, list) and value and not isinstance(value[0], int):
            value = value[:WORK_CAP]
        elif key == "sampling_params" and isinstance(value, dict):
            value = _capped(value)
        capped[key] = value
    return capped


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Positive cases only: a negative one keeps the value that makes it invalid."""
    meta = getattr(case, "meta", None)
    mode = getattr(getattr(getattr(meta, "generation", None), "mode", None), "value", None)
    if mode == "positive" and isinstance(case.body, dict):
        body = _capped(case.body)
        # A length left out (or null) means "up to the context": given the cap instead.
        path = getattr(getattr(case, "operation", None), "path", None)
        if path in _LENGTH_FIELD and body.get(_LENGTH_FIELD[path]) is None:
            body[_LENGTH_FIELD[path]] = TOKENS_CAP
        if path == "/generate":
            sampling = body.get("sampling_params")
            sampling = dict(sampling) if isinstance(sampling, dict) else {}
            if sampling.get("max_new_tokens") is None and sampling.get("max_tokens") is None:
                sampling["max_new_tokens"] = TOKENS_CAP
            body["sampling_params"] = sampling
        case.body = body
    return case
