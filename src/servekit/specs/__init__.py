"""API shapes: the base ``LitSpec`` and the OpenAI-compatible specs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from servekit.specs.base import LitSpec

if TYPE_CHECKING:
    from servekit.specs.openai import OpenAISpec
    from servekit.specs.openai_embedding import OpenAIEmbeddingSpec
    from servekit.specs.openai_image import OpenAIImageSpec

_LAZY = {
    "OpenAISpec": "servekit.specs.openai",
    "OpenAIEmbeddingSpec": "servekit.specs.openai_embedding",
    "OpenAIImageSpec": "servekit.specs.openai_image",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'servekit.specs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["LitSpec", "OpenAIEmbeddingSpec", "OpenAIImageSpec", "OpenAISpec"]
