"""Which model implementation serves which architecture, and how its HF config reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from servekit.llm.attention import AttentionMetadata
from servekit.llm.distributed import SINGLE, TPGroup
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.kv_cache import PagedKVCache
from servekit.llm.model_config import ModelConfig
from servekit.llm.models import (
    bloom,
    deepseek,
    falcon,
    gemma,
    gpt2,
    gptj,
    llama,
    moe_families,
    neox,
    olmo2,
    opt,
    phi3,
    remote_code,
    starcoder2,
)
from servekit.llm.models.family import Family


class CausalLM(Protocol):
    """What the model runner needs from a model implementation."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None: ...

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
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        max_model_len: int,
        quantization: str | None = None,
        device: torch.device | str = "cpu",
        tp: TPGroup = SINGLE,
    ) -> CausalLM: ...


FAMILIES: dict[str, Family] = {
    **llama.FAMILIES,
    **gpt2.FAMILIES,
    **neox.FAMILIES,
    **gemma.FAMILIES,
    **moe_families.FAMILIES,
    **phi3.FAMILIES,
    **starcoder2.FAMILIES,
    **olmo2.FAMILIES,
    **gptj.FAMILIES,
    **opt.FAMILIES,
    **bloom.FAMILIES,
    **falcon.FAMILIES,
    **remote_code.FAMILIES,
    **deepseek.FAMILIES,
}

# Hugging Face `architectures` class names, accepted as well as `model_type` names.
_CLASS_NAMES = {name.lower(): model_type for model_type, f in FAMILIES.items() for name in f.hf_classes}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_of(architecture: str, *, what: str = "model architecture") -> Family:
    """The family of ``architecture`` (a ``model_type`` such as "qwen2", or an HF class name)."""
    key = architecture.lower()
    key = _CLASS_NAMES.get(key, key)
    try:
        return FAMILIES[key]
    except KeyError:
        supported = ", ".join(supported_architectures())
        raise ValueError(f"unsupported {what} {architecture!r} (supported: {supported})") from None


def get_model_class(architecture: str) -> CausalLMFactory:
    """The implementation for ``architecture`` (a ``model_type`` such as "qwen2", or an HF class name)."""
    return family_of(architecture).model


def architectures_table() -> str:
    """The supported architectures as an aligned text table (``servekit models``)."""
    rows = [("model_type", "HF class", "GGUF", "what is special")]
    for model_type in supported_architectures():
        family = FAMILIES[model_type]
        rows.append(
            (model_type, ", ".join(family.hf_classes) or "-", "yes" if family.gguf else "-", family.summary)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )
