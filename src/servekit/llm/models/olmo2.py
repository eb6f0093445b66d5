"""OLMo 2: Llama's projections with norms after attention and MLP (not before) and q/k RMSNorms
over all heads at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.llama import LLAMA_ATTENTION, LLAMA_MLP, LLAMA_TOP
from servekit.llm.models.weights import NameMap

OLMO2_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_ATTENTION,
        **LLAMA_MLP,
        "post_attention_layernorm": "post_attn_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    },
    LLAMA_TOP,
)


class Olmo2ForCausalLM(DecoderLM):
    names = OLMO2_NAMES


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    config.residual = "post"
    config.qk_norm, config.qk_norm_per_head = True, False
    config.attention_bias = config.o_bias = bool(raw.get("attention_bias", False))


FAMILIES = {
    "olmo2": Family(
        Olmo2ForCausalLM, configure, ("Olmo2ForCausalLM",), "post-norms, q/k RMSNorm over all heads"
    ),
}
