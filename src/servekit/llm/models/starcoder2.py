"""StarCoder2: Llama's attention (GQA, biases) with LayerNorms and a plain GELU MLP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.llama import LLAMA_ATTENTION, LLAMA_TOP
from servekit.llm.models.weights import NameMap

STARCODER2_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_ATTENTION,
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "mlp_norm",
        "mlp.c_fc": "up",
        "mlp.c_proj": "down",
    },
    LLAMA_TOP,
)


class Starcoder2ForCausalLM(DecoderLM):
    names = STARCODER2_NAMES


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    config.norm, config.norm_bias = "layer", True
    config.mlp = "plain"
    config.attention_bias = config.o_bias = config.mlp_bias = bool(raw.get("use_bias", True))
    config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))


FAMILIES = {
    "starcoder2": Family(
        Starcoder2ForCausalLM,
        configure,
        ("Starcoder2ForCausalLM",),
        "LayerNorm, GELU MLP, GQA, biases",
        gguf=True,
    ),
}
