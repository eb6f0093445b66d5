"""The endpoints of ``servekit serve``: an OpenAI-compatible LLM server as a spec of the serving core.

``LLMServerSpec`` (front: routes, validation, SSE framing) and ``LLMServerAPI`` (worker: the
``AsyncEngine``) are imported lazily, so importing this package loads neither torch nor the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servekit.specs.llm.api import LLMServerAPI
    from servekit.specs.llm.config import ServeConfig
    from servekit.specs.llm.spec import LLMServerSpec

_EXPORTS = {
    "LLMServerAPI": "servekit.specs.llm.api",
    "LLMServerSpec": "servekit.specs.llm.spec",
    "ServeConfig": "servekit.specs.llm.config",
}

__all__ = ["LLMServerAPI", "LLMServerSpec", "ServeConfig"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
