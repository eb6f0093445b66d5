"""The LLM server's worker side, in this process: ``servekit serve``'s OpenAI handlers without HTTP.

The LiteLLM provider's in-process backend and the RunPod worker run requests through it, so they
answer exactly what ``servekit serve`` answers (same validation, same chunks, same errors).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel

from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.completions import CompletionRequest
from servekit.openai.errors import OpenAIError, openai_error
from servekit.openai.sse import new_id
from servekit.specs.llm.api import LLMServerAPI
from servekit.specs.llm.config import ServeConfig
from servekit.specs.llm.ops import Op, OpKind
from servekit.specs.llm.spec import model_card

logger = logging.getLogger(__name__)

_REQUEST_MODELS: dict[str, tuple[OpKind, type[BaseModel], str]] = {
    "chat": ("chat", ChatCompletionRequest, "chatcmpl"),
    "completion": ("completion", CompletionRequest, "cmpl"),
}


class _InProcessAPI(LLMServerAPI):
    """No supervisor to tell: a dead engine loop is logged, and its requests fail with 503."""

    def report_unhealthy(self, reason: str) -> None:
        logger.error("the in-process engine failed: %s", reason)


class LocalServer:
    """The model loaded once (here, now), and OpenAI requests run on it in the caller's event loop."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.api = _InProcessAPI(config)
        self.api.setup("cpu")
        self.runtime: Any = self.api.runtime
        self.model_name: str = self.runtime.model_name

    def parse(self, kind: str, body: dict[str, Any]) -> Any:
        """The validated request model of ``body`` (400 naming the field if it is invalid)."""
        _, model, prefix = _REQUEST_MODELS[kind]
        try:
            request = model.model_validate(body)
        except Exception as error:
            raise _mapped(error) from None
        request.request_id = request.request_id or new_id(prefix)  # type: ignore[attr-defined]
        return request

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise OpenAIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    async def run(self, kind: str, request: Any) -> AsyncIterator[dict[str, Any]]:
        """A parsed chat or completion request's items: one response body, or its stream's chunks."""
        op_kind, _, _ = _REQUEST_MODELS[kind]
        async for item in self.api.predict(Op(op_kind, request)):
            # A stream's chunks come encoded already (the HTTP path sends them as they are).
            yield orjson.loads(item) if isinstance(item, bytes) else item

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``'s body."""
        info = await anext(self.api.predict(Op("model_info")))
        return {"object": "list", "data": [model_card(info)]}

    def shutdown(self) -> None:
        self.runtime.engine.shutdown()


def _mapped(error: BaseException) -> OpenAIError:
    return openai_error(error) or OpenAIError(500, f"{type(error).__name__}: {error}")
