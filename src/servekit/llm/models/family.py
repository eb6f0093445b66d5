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


def rotary_fraction(raw: Mapping[str, Any]) -> float:
    """The share of each head's dims that RoPE rotates (transformers 4 and 5 key names)."""
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, Mapping) and parameters.get("partial_rotary_factor") is not None:
        return float(parameters["partial_rotary_factor"])
    for key in ("partial_rotary_factor", "rotary_pct"):
        if raw.get(key) is not None:
            return float(raw[key])
    return 1.0


def set_partial_rotary(raw: Mapping[str, Any], config: ModelConfig) -> None:
    fraction = rotary_fraction(raw)
    if fraction < 1.0:
        config.rotary_dim = int(config.head_dim * fraction)
    if config.rope_scaling is not None:
        config.rope_scaling.pop("partial_rotary_factor", None)


def set_layer_windows(raw: Mapping[str, Any], config: ModelConfig) -> None:
    """Per-layer sliding windows from ``layer_types`` ("sliding_attention" / "full_attention")."""
    types = raw.get("layer_types")
    window = raw.get("sliding_window")
    if not types or window is None:
        return
    config.layer_sliding_windows = [int(window) if t == "sliding_attention" else None for t in types]
    config.sliding_window = None
