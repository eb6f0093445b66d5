"""FlashAttention for fresh prefill chunks on CUDA, when the ``flash-attn`` package is installed.

Optional, never required: imported lazily on first use; without it (or on other devices, or in
float32, which it does not take) the caller's SDPA path runs.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


@functools.cache
def flash_attn_func() -> Callable[..., Any] | None:
    """``flash_attn.flash_attn_func``, or None when the package is not installed."""
    try:
        module = importlib.import_module("flash_attn")
    except ImportError:
        return None
    logger.info(
        "flash-attn %s found: fresh prefill chunks on CUDA use it", getattr(module, "__version__", "?")
    )
    function: Callable[..., Any] = module.flash_attn_func
    return function


def flash_applies(query: torch.Tensor) -> bool:
    return query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)


def flash_causal_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor | None:
    """Causal attention of one chunk with nothing cached before it: ``query [tokens, heads, dim]``,
    ``key``/``value [tokens, kv_heads, dim]`` (grouped-query heads as they are) -> ``[tokens, heads,
    dim]``; None when FlashAttention does not apply here."""
    if not flash_applies(query):
        return None
    function = flash_attn_func()
    if function is None:
        return None
    out: torch.Tensor = function(
        query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), softmax_scale=scale, causal=True
    )
    return out[0]
