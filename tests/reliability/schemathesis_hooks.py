"""Hooks schemathesis loads (``SCHEMATHESIS_HOOKS``): strategies for the string formats servekit's
/openapi.json declares beyond JSON Schema's own."""

from __future__ import annotations

import json

import schemathesis
from hypothesis import strategies as st

from servekit.openai.sampling import JSON_OBJECT_FORMAT

_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
schemathesis.openapi.format(
    JSON_OBJECT_FORMAT, st.dictionaries(st.text(max_size=8), _scalars, max_size=4).map(json.dumps)
)
