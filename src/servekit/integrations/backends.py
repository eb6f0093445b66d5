"""Where the integrations send OpenAI requests: a running servekit server over HTTP, or the model
loaded in this process. Both take and give OpenAI bodies (dicts) and raise ``OpenAIError``s."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import httpx
import orjson

from servekit.openai.errors import OpenAIError, detail_message

Body = dict[str, Any]
Timeout = float | httpx.Timeout | None


class Backend(Protocol):
    async def chat(self, body: Body) -> Body: ...

    def chat_stream(self, body: Body) -> AsyncIterator[Body]: ...

    async def embeddings(self, body: Body) -> Body: ...

    async def images(self, body: Body) -> Body: ...


def v1_url(api_base: str) -> str:
    """A server's ``/v1`` URL from its root URL or its ``/v1`` URL."""
    root = api_base.rstrip("/")
    return root if root.endswith("/v1") else f"{root}/v1"


class RemoteBackend:
    """A running ``servekit serve`` (or any servekit OpenAI spec server)."""

    def __init__(self, api_base: str, api_key: str | None = None, timeout: Timeout = 600.0) -> None:
        self.url = v1_url(api_base)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout)

    async def _post(self, path: str, body: Body) -> Body:
        async with self._client() as client:
            try:
                response = await client.post(path, json=body)
            except httpx.TimeoutException as error:
                raise OpenAIError(504, f"servekit at {self.url} did not answer in time: {error}") from None
            except httpx.HTTPError as error:
                raise OpenAIError(503, f"servekit at {self.url} is unreachable: {error}") from None
            if response.status_code != 200:
                raise _http_error(response.status_code, response.content)
            result: Body = response.json()
            return result

    async def chat(self, body: Body) -> Body:
        return await self._post("/chat/completions", {**body, "stream": False})

    async def chat_stream(self, body: Body) -> AsyncIterator[Body]:
        async with self._client() as client:
            try:
                async with client.stream(
                    "POST", "/chat/completions", json={**body, "stream": True}
                ) as response:
                    if response.status_code != 200:
                        raise _http_error(response.status_code, await response.aread())
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[len("data: ") :]
                        if data == "[DONE]":
                            return
                        event = orjson.loads(data)
                        if "error" in event:  # the stream failed after its first byte
                            raise OpenAIError(500, detail_message(event))
                        yield event
            except httpx.TimeoutException as error:
                raise OpenAIError(504, f"servekit at {self.url} did not answer in time: {error}") from None
            except httpx.HTTPError as error:
                raise OpenAIError(503, f"servekit at {self.url} is unreachable: {error}") from None

    async def embeddings(self, body: Body) -> Body:
        return await self._post("/embeddings", body)

    async def images(self, body: Body) -> Body:
        return await self._post("/images/generations", body)


def _http_error(status_code: int, content: bytes) -> OpenAIError:
    """The server's error, with its status and message (its OpenAI envelope or a core ``detail``)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return OpenAIError(status_code, content.decode(errors="replace") or f"HTTP {status_code}")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return OpenAIError(status_code, str(error.get("message")), error.get("param"), error.get("code"))
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return OpenAIError(status_code, detail_message(detail))


class LocalBackend:
    """The model loaded in this process (once per model), run with ``servekit serve``'s handlers."""

    def __init__(self, server: Any) -> None:
        self.server = server  # a servekit.integrations.local.LocalServer

    async def _items(self, kind: str, body: Body) -> AsyncIterator[Body]:
        server = self.server
        request = server.parse(kind, {**body, "model": server.model_name})
        async for item in server.run(kind, request):
            yield item

    async def chat(self, body: Body) -> Body:
        items = self._items("chat", {**body, "stream": False})
        try:
            return await anext(items)
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    def chat_stream(self, body: Body) -> AsyncIterator[Body]:
        return self._items("chat", {**body, "stream": True})

    async def embeddings(self, body: Body) -> Body:
        raise OpenAIError(
            400,
            f"The model `{self.server.model_name}` is a generation model, not an embedding model.",
            "model",
            "model_not_supported",
        )

    async def images(self, body: Body) -> Body:
        raise OpenAIError(
            400, "Image generation needs a servekit server (api_base); it cannot run in-process.", "model"
        )


class LocalServers:
    """In-process servers by model, each loaded once on first use and kept for the process's life."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self._lock = threading.Lock()
        self._servers: dict[str, Any] = {}

    def get(self, model: str) -> LocalBackend:
        """Blocks while the model loads (the first time); callers in an event loop run it in a thread."""
        from servekit.integrations.local import LocalServer
        from servekit.specs.llm.config import ServeConfig

        with self._lock:
            server = self._servers.get(model)
            if server is None:
                flags = {**self.options, "model": None if model == "default" else model}
                server = LocalServer(ServeConfig.resolve(flags))
                self._servers[model] = server
        return LocalBackend(server)

    def models(self) -> list[str]:
        with self._lock:
            return list(self._servers)

    def shutdown(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.shutdown()
