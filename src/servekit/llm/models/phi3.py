"""Phi-3/3.5: Llama's math with fused ``qkv_proj`` and ``gate_up_proj`` and LongRoPE scaling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models import llama
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family, set_partial_rotary
from servekit.llm.models.llama import LLAMA_LAYER, LLAMA_TOP
from servekit.llm.models.weights import NameMap

FUSED_NAMES = NameMap(
    "model.layers.", {**LLAMA_LAYER, "self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"}, LLAMA_TOP
)


class FusedLlamaForCausalLM(DecoderLM):
    """Llama whose checkpoints fuse q/k/v rows and gate/up rows (Phi-3; GLM-4's gate/up)."""

    names = FUSED_NAMES


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    llama.configure(raw, config)
    set_partial_rotary(raw, config)
    if config.rope_scaling is not None and raw.get("original_max_position_embeddings"):
        config.rope_scaling.setdefault(
            "original_max_position_embeddings", raw["original_max_position_embeddings"]
        )


FAMILIES = {
    "phi3": Family(
        FusedLlamaForCausalLM, configure, ("Phi3ForCausalLM",), "fused qkv and gate_up, LongRoPE", gguf=True
    ),
}
