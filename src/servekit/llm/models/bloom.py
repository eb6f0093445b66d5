"""BLOOM and MPT: ALiBi attention biases instead of position embeddings, LayerNorm, GELU MLP.

BLOOM fuses q/k/v per head and normalises the embeddings; MPT fuses them as plain q, k, v rows and
has no biases at all (its LayerNorms neither). Both attend on the PyTorch path (``eager_attention``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.alibi import mpt_alibi_slopes
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.weights import NameMap

BLOOM_NAMES = NameMap(
    "transformer.h.",
    {
        "input_layernorm": "attn_norm",
        "self_attention.query_key_value": "qkv",
        "self_attention.dense": "o",
        "post_attention_layernorm": "mlp_norm",
        "mlp.dense_h_to_4h": "up",
        "mlp.dense_4h_to_h": "down",
    },
    {
        "transformer.word_embeddings": "embed",
        "transformer.word_embeddings_layernorm": "embed_norm",
        "transformer.ln_f": "final_norm",
        "lm_head": "lm_head",
    },
)
MPT_NAMES = NameMap(
    "transformer.blocks.",
    {
        "norm_1": "attn_norm",
        "attn.Wqkv": "qkv",
        "attn.out_proj": "o",
        "norm_2": "mlp_norm",
        "ffn.up_proj": "up",
        "ffn.down_proj": "down",
    },
    {"transformer.wte": "embed", "transformer.norm_f": "final_norm", "lm_head": "lm_head"},
)


class BloomForCausalLM(DecoderLM):
    names = BLOOM_NAMES
    qkv_layout = "heads"


class MptForCausalLM(DecoderLM):
    names = MPT_NAMES

    def alibi_slopes(self) -> torch.Tensor:
        max_bias = float(self.config.family_options.get("alibi_bias_max", 8.0))
        return mpt_alibi_slopes(self.config.num_attention_heads, max_bias)


def configure_bloom(raw: Mapping[str, Any], config: ModelConfig) -> None:
    if raw.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM checkpoints with apply_residual_connection_post_layernorm are not supported")
    config.norm, config.norm_bias = "layer", True
    config.hidden_act = "gelu_pytorch_tanh"
    config.mlp, config.mlp_bias = "plain", True
    config.attention_bias = config.o_bias = True
    config.positions, config.embedding_norm = "alibi", True
    config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))


def configure_mpt(raw: Mapping[str, Any], config: ModelConfig) -> None:
    attn = raw.get("attn_config") or {}
    if attn.get("qk_ln") or attn.get("clip_qkv") or not attn.get("alibi", True):
        raise ValueError("MPT checkpoints with qk_ln, clip_qkv or without ALiBi are not supported")
    if attn.get("softmax_scale"):
        config.attention_scale = float(attn["softmax_scale"])
    config.norm, config.norm_bias = "layer", not raw.get("no_bias", True)
    config.hidden_act = "gelu"
    config.mlp = "plain"
    config.attention_bias = config.o_bias = config.mlp_bias = config.norm_bias
    config.intermediate_size = int(raw.get("expansion_ratio", 4)) * config.hidden_size
    config.positions = "alibi"
    config.family_options["alibi_bias_max"] = float(attn.get("alibi_bias_max", 8.0))
    config.tie_word_embeddings = True


FAMILIES = {
    "bloom": Family(
        BloomForCausalLM,
        configure_bloom,
        ("BloomForCausalLM",),
        "ALiBi, embedding LayerNorm, per-head fused qkv",
        gguf=True,
    ),
    "mpt": Family(MptForCausalLM, configure_mpt, ("MptForCausalLM",), "ALiBi, no biases, fused qkv"),
}
