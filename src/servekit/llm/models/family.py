"""What the registry knows of one architecture (each family module lists its own)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM


@dataclass(frozen=True)
class Family:
    """An architecture: its implementation, its config.json reader, what is special about it."""

    model: type[DecoderLM]
    configure: Callable[[Mapping[str, Any], ModelConfig], None]  # its fields beyond the common ones
    hf_classes: tuple[str, ...]  # transformers `architectures` names
    summary: str
    gguf: bool = False  # also loads from GGUF files
