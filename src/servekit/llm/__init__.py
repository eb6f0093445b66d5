"""servekit.llm: a continuous-batching LLM engine (paged KV cache, prefix caching, vLLM-style API).

Names are imported lazily: ``from servekit.llm import LLM`` does not load torch until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servekit.llm.async_engine import AsyncEngine
    from servekit.llm.config import EngineConfig, EngineConfigError
    from servekit.llm.engine import EngineStats, LLMEngine
    from servekit.llm.errors import (
        EngineClosedError,
        EngineInputError,
        PromptTooLongError,
        QueueFullError,
        SamplingParamsError,
    )
    from servekit.llm.inputs import EngineInput
    from servekit.llm.llm import LLM
    from servekit.llm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from servekit.llm.sampling_params import SamplingParams

_EXPORTS = {
    "AsyncEngine": "servekit.llm.async_engine",
    "EngineClosedError": "servekit.llm.errors",
    "EngineInput": "servekit.llm.inputs",
    "EngineInputError": "servekit.llm.errors",
    "EngineConfig": "servekit.llm.config",
    "EngineConfigError": "servekit.llm.config",
    "EngineStats": "servekit.llm.engine",
    "LLMEngine": "servekit.llm.engine",
    "LLM": "servekit.llm.llm",
    "CompletionOutput": "servekit.llm.outputs",
    "Logprob": "servekit.llm.outputs",
    "RequestMetrics": "servekit.llm.outputs",
    "RequestOutput": "servekit.llm.outputs",
    "SamplingParams": "servekit.llm.sampling_params",
    "SamplingParamsError": "servekit.llm.errors",
    "PromptTooLongError": "servekit.llm.errors",
    "QueueFullError": "servekit.llm.errors",
}

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineClosedError",
    "EngineConfig",
    "EngineConfigError",
    "EngineInput",
    "EngineInputError",
    "EngineStats",
    "LLMEngine",
    "Logprob",
    "PromptTooLongError",
    "QueueFullError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
