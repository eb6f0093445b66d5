"""The proxy's ``/openapi.json``: the proxied routes take the bodies the nodes validate (the proxy
reads only their model and session), the registry and its own routes answer in OpenAI's envelope.
When every admitted node reports the same model bounds (``/model_info``), they are written in as
``servekit serve`` writes them (``servekit.specs.llm.schemas``); otherwise the bodies are the
model-independent ones."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from servekit.http.openapi import OpenAPIDoc
from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.completions import CompletionRequest
from servekit.openai.embeddings import EmbeddingRequest
from servekit.proxy.registry import Node
from servekit.proxy.service import HTTP_ERRORS
from servekit.specs.llm.protocol import AbortRequest, GenerateRequest, InteractiveRequest
from servekit.specs.llm.schemas import BOUNDS, bound_document

if TYPE_CHECKING:
    from servekit.proxy.service import Proxy

STREAMED = ("application/json", "text/event-stream")
_PROXIED_ERRORS = (400, 401, 404, 413, 431, 499, 502, 503, 504)
_OWN_ERRORS = (400, 401, 404, 413, 431)

_NODE = {
    "type": "object",
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "description": "the node's base URL, http(s)://host:port"},
        "status": {
            "type": ["object", "null"],
            "properties": {
                "models": {"type": ["array", "null"], "items": {"type": "string"}},
                "speed": {"type": ["number", "null"], "exclusiveMinimum": 0},
            },
        },
        "api_key": {"type": ["string", "null"], "description": "the key the proxy sends to this node"},
    },
}
_NODE_URL = {"type": "object", "properties": {"url": {"type": "string"}}}


def proxy_openapi(version: str, api_key: bool) -> dict[str, Any]:
    doc = OpenAPIDoc()
    proxied_errors = _PROXIED_ERRORS if api_key else tuple(e for e in _PROXIED_ERRORS if e != 401)
    own_errors = _OWN_ERRORS if api_key else tuple(e for e in _OWN_ERRORS if e != 401)
    for path, body, media in (
        ("/v1/chat/completions", ChatCompletionRequest, STREAMED),
        ("/v1/completions", CompletionRequest, STREAMED),
        ("/v1/embeddings", EmbeddingRequest, ("application/json",)),
        ("/generate", GenerateRequest, STREAMED),
        ("/v1/chat/interactive", InteractiveRequest, ("application/json", "application/x-ndjson")),
    ):
        doc.add(path, ["POST"], body=body, media_types=media, errors=proxied_errors)
    doc.add("/abort_request", ["POST"], body=AbortRequest, errors=own_errors)
    doc.add("/flush_cache", ["POST", "GET"], errors=(*own_errors, 502, 503))
    doc.add("/v1/models", ["GET"], errors=own_errors)
    doc.add("/v1/models/{model:path}", ["GET"], errors=own_errors)
    doc.add("/health", ["GET"], errors=(431,))
    health = doc.operations[("/health", "get")]["responses"]
    health["503"] = {"description": "No healthy node", "content": health["200"]["content"]}
    doc.add("/metrics", ["GET"], media_types=("text/plain",), errors=own_errors)
    doc.add("/nodes/status", ["GET"], errors=own_errors)
    doc.add("/nodes/add", ["POST"], body=_NODE, errors=own_errors)
    doc.add("/nodes/remove", ["POST"], body=_NODE_URL, errors=own_errors)
    doc.add("/nodes/terminate", ["POST"], body=_NODE_URL, errors=own_errors)
    doc.add("/nodes/terminate_all", ["GET"], errors=own_errors)
    return doc.document("servekit proxy", version)


def nodes_document(document: dict[str, Any], infos: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """``document`` bounded by the nodes' models when every node answered with the same bounds."""
    bounds = {orjson.dumps({key: info.get(key) for key in BOUNDS}) if info else None for info in infos}
    if len(bounds) != 1 or None in bounds:
        return document
    first = infos[0]
    assert first is not None
    return bound_document(document, first)


async def node_model_infos(proxy: Proxy, timeout: float) -> list[dict[str, Any] | None]:
    """Each admitted node's ``/model_info`` (None for a node that gave none)."""
    now = proxy.now()

    async def one(node: Node) -> dict[str, Any] | None:
        try:
            status, body = await proxy.fetch("GET", node, "/model_info", timeout=timeout)
            info = orjson.loads(body) if status == 200 else None
        except (*HTTP_ERRORS, orjson.JSONDecodeError):
            return None
        return info if isinstance(info, dict) else None

    nodes = [node for node in proxy.registry if node.health.admits(now)]
    return list(await asyncio.gather(*(one(node) for node in nodes)))
