"""GPT-2 and GPT BigCode (StarCoder 1, SantaCoder): LayerNorm, learned positions, GELU MLP.

Their checkpoints store projections as ``Conv1D`` (``[in, out]``, the transpose of a linear weight)
with q/k/v fused in ``c_attn``; BigCode stores ordinary linears and uses multi-query attention (its
``c_attn`` holds all query heads then one key and one value head).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.weights import NameMap, Tensors

GPT2_NAMES = NameMap(
    "transformer.h.",
    {
        "ln_1": "attn_norm",
        "attn.c_attn": "qkv",
        "attn.c_proj": "o",
        "ln_2": "mlp_norm",
        "mlp.c_fc": "up",
        "mlp.c_proj": "down",
    },
    {
        "transformer.wte": "embed",
        "transformer.wpe": "pos_embed",
        "transformer.ln_f": "final_norm",
        "lm_head": "lm_head",
    },
)


class GPT2ForCausalLM(DecoderLM):
    names = GPT2_NAMES
    conv1d = True  # weights stored [in, out]

    def map_weight(self, name: str, tensor: torch.Tensor) -> Tensors:
        if self.conv1d and tensor.dim() == 2 and name.startswith(self.names.layer_prefix):
            tensor = tensor.t()
        return super().map_weight(name, tensor)


class GPTBigCodeForCausalLM(GPT2ForCausalLM):
    conv1d = False


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    if raw.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx are not supported")
    config.norm, config.norm_bias = "layer", True
    config.mlp, config.mlp_bias = "plain", True
    config.attention_bias = config.o_bias = True
    config.positions = "learned"
    config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))
    if raw.get("model_type") == "gpt_bigcode" and raw.get("multi_query", True):
        config.num_key_value_heads = 1
    if not raw.get("scale_attn_weights", True):
        config.attention_scale = 1.0


FAMILIES = {
    "gpt2": Family(
        GPT2ForCausalLM,
        configure,
        ("GPT2LMHeadModel",),
        "LayerNorm, learned positions, Conv1D weights",
        gguf=True,
    ),
    "gpt_bigcode": Family(
        GPTBigCodeForCausalLM, configure, ("GPTBigCodeForCausalLM",), "GPT-2 layout, multi-query attention"
    ),
}
