"""What the proxy reads of a request before routing it: the model, the session and the prompt's text.
The body itself is forwarded unchanged."""

from __future__ import annotations

from typing import Any

import orjson

from servekit.openai.errors import invalid
from servekit.proxy.strategies import Route

SESSION_HEADER = b"x-session-id"


def _text(value: Any) -> str:
    """A prompt-like value as text: strings as they are, anything else as its JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return orjson.dumps(value).decode()


def _prompt(data: dict[str, Any]) -> str:
    if "messages" in data:
        messages = data["messages"]
        if isinstance(messages, list):
            # role and content of each message in order: requests sharing a conversation prefix
            # share a text prefix
            return "".join(
                f"<{m.get('role')}>{_text(m.get('content'))}" if isinstance(m, dict) else _text(m)
                for m in messages
            )
        return _text(messages)
    for key in ("prompt", "text", "input", "input_ids"):
        if key in data:
            return _text(data[key])
    return ""


def route_of(data: dict[str, Any], session: str | None, with_prompt: bool = True) -> Route:
    """``session``: the ``X-Session-Id`` header's value, which comes before the body's fields;
    ``with_prompt``: whether routing looks at the prompt's text (only then is it put together)."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string", "model")
    if session is None:
        for key in ("session_id", "user"):
            value = data.get(key)
            if value is not None and not isinstance(value, dict | list):
                session = str(value)
                break
    return Route(model=model, session=session, prompt=_prompt(data) if with_prompt else "")
