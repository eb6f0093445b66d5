"""API-key authentication (``X-API-Key`` or ``Authorization: Bearer``) and the shutdown API's key;
keys are compared in constant time."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from servekit.errors import ServerError


def _bearer_token(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


class APIKeyCheck:
    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    def __call__(self, request: Request) -> None:
        supplied = request.headers.get("x-api-key")
        if supplied is None:
            supplied = _bearer_token(request)
        if supplied is None or not hmac.compare_digest(supplied.encode(), self._key):
            raise ServerError(401, "Invalid or missing API key", headers={"WWW-Authenticate": "Bearer"})


class ShutdownKeyCheck:
    """The shutdown API's key, as LitServe checks it: ``Authorization: Bearer <LIT_SHUTDOWN_API_KEY>``."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def __call__(self, request: Request) -> None:
        supplied = _bearer_token(request)
        if not supplied:
            raise ServerError(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(supplied.encode(), self._key):
            raise ServerError(
                401,
                "Invalid Bearer token for the shutdown API: send 'Authorization: Bearer <LIT_SHUTDOWN_API_KEY>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
