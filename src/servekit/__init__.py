"""servekit: a high-throughput serving engine for AI models (LitServe-compatible API)."""

from starlette.requests import Request
from starlette.responses import Response

from servekit import specs
from servekit.api import LitAPI
from servekit.callbacks import Callback
from servekit.errors import ServerError
from servekit.loggers import Logger
from servekit.server import LitServer
from servekit.specs import LitSpec

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The OpenAI specs pull in their pydantic models: imported on first use only.
    if name in ("OpenAISpec", "OpenAIEmbeddingSpec", "OpenAIImageSpec"):
        return getattr(specs, name)
    if name in ("set_trace", "set_trace_if_debug"):
        from servekit import debug

        return getattr(debug, name)
    if name in ("mcp", "schema"):
        import importlib

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
    "mcp",
    "schema",
    "set_trace",
    "set_trace_if_debug",
    "specs",
]
