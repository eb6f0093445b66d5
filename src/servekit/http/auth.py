"""API-key authentication: ``X-API-Key`` or ``Authorization: Bearer``, compared in constant time."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from servekit.errors import ServerError


class APIKeyCheck:
    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    def __call__(self, request: Request) -> None:
        headers = request.headers
        supplied = headers.get("x-api-key")
        if supplied is None:
            authorization = headers.get("authorization", "")
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                supplied = credentials.strip()
        if supplied is None or not hmac.compare_digest(supplied.encode(), self._key):
            raise ServerError(401, "Invalid or missing API key", headers={"WWW-Authenticate": "Bearer"})
