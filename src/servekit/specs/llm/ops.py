"""What the LLM server's front sends to its workers: one ``Op`` per request, over the core's transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OpKind = Literal[
    "chat",
    "completion",
    "generate",
    "tokenize",
    "detokenize",
    "encode",
    "abort",
    "flush_cache",
    "stats",
    "model_info",
]


@dataclass
class Op:
    """``kind`` names the operation; ``body`` is its validated request model (or None)."""

    kind: OpKind
    body: Any = None
