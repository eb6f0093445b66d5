"""servekit: a high-throughput serving engine for AI models (LitServe-compatible API)."""

import importlib
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from servekit import specs
from servekit.api import LitAPI
from servekit.callbacks import Callback
from servekit.errors import ServerError
from servekit.loggers import Logger
from servekit.specs import LitSpec

if TYPE_CHECKING:
    from servekit.server import LitServer

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The HTTP server (FastAPI) is imported on first use: inference workers never need it.
    if name == "LitServer":
        from servekit.server import LitServer

        return LitServer
    # The OpenAI specs pull in their pydantic models: imported on first use only.
    if name in ("OpenAISpec", "OpenAIEmbeddingSpec", "OpenAIImageSpec"):
        return getattr(specs, name)
    if name in ("set_trace", "set_trace_if_debug"):
        from servekit import debug

        return getattr(debug, name)
    # ``ls.mcp``, ``ls.schema``, and the ready-made APIs (``ls.examples``, and ``ls.test_examples`` as
    # LitServe names them): imported on first use; the APIs import NumPy/PyTorch only when they run.
    if name in ("mcp", "schema", "examples", "test_examples"):
        return importlib.import_module(f"servekit.{name}")
    raise AttributeError(f"module 'servekit' has no attribute {name!r}")


__all__ = [
    "Callback",
    "LitAPI",
    "LitServer",
    "LitSpec",
    "Logger",
    "OpenAIEmbeddingSpec",
    "OpenAIImageSpec",
    "OpenAISpec",
    "Request",
    "Response",
    "ServerError",
    "__version__",
    "examples",
    "mcp",
    "schema",
    "set_trace",
    "set_trace_if_debug",
    "specs",
    "test_examples",
]
