"""Which model implementation serves which ``ModelConfig.architecture``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from servekit.llm.attention import AttentionMetadata
from servekit.llm.kv_cache import PagedKVCache
from servekit.llm.model_config import ModelConfig
from servekit.llm.models.llama import LlamaForCausalLM


class CausalLM(Protocol):
    """What the model runner needs from a model implementation."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        max_position: int,
        kv_cache: PagedKVCache,
        attention: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class CausalLMFactory(Protocol):
    def __call__(
        self, config: ModelConfig, *, dtype: torch.dtype, max_model_len: int, quantization: str | None = None
    ) -> CausalLM: ...


_ARCHITECTURES: dict[str, CausalLMFactory] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "smollm2": LlamaForCausalLM,
}

# Hugging Face `architectures` class names, accepted as well as `model_type` names.
_CLASS_NAMES = {
    "llamaforcausallm": "llama",
    "mistralforcausallm": "mistral",
    "qwen2forcausallm": "qwen2",
    "qwen3forcausallm": "qwen3",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(architecture: str) -> CausalLMFactory:
    """The implementation for ``architecture`` (a ``model_type`` such as "qwen2", or an HF class name)."""
    key = architecture.lower()
    key = _CLASS_NAMES.get(key, key)
    try:
        return _ARCHITECTURES[key]
    except KeyError:
        supported = ", ".join(supported_architectures())
        raise ValueError(
            f"unsupported model architecture {architecture!r} (supported: {supported})"
        ) from None
