"""Falcon, both layouts: the old one (7B: multi-query, one norm feeding attention and MLP in
parallel) and the new decoder architecture (40B/180B: grouped KV heads, two parallel norms)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.weights import NameMap

FALCON_NAMES = NameMap(
    "transformer.h.",
    {
        "input_layernorm": "attn_norm",
        "ln_attn": "attn_norm",
        "post_attention_layernorm": "mlp_norm",
        "ln_mlp": "mlp_norm",
        "self_attention.query_key_value": "qkv",
        "self_attention.dense": "o",
        "mlp.dense_h_to_4h": "up",
        "mlp.dense_4h_to_h": "down",
    },
    {"transformer.word_embeddings": "embed", "transformer.ln_f": "final_norm", "lm_head": "lm_head"},
)


class FalconForCausalLM(DecoderLM):
    names = FALCON_NAMES

    @property
    def qkv_layout(self) -> str:  # type: ignore[override]
        config = self.config
        if config.family_options.get("new_decoder_architecture"):
            return "grouped"
        return "heads" if config.num_key_value_heads == config.num_attention_heads else "rows"


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    if raw.get("alibi"):
        raise ValueError("Falcon checkpoints with alibi=True are not supported")
    new = bool(raw.get("new_decoder_architecture"))
    config.family_options["new_decoder_architecture"] = new
    if new:
        config.num_key_value_heads = int(raw.get("num_kv_heads") or config.num_attention_heads)
        two_norms = int(raw.get("num_ln_in_parallel_attn") or 2) == 2
        config.residual = "parallel" if two_norms else "parallel_shared"
    else:
        config.num_key_value_heads = 1 if raw.get("multi_query", True) else config.num_attention_heads
        config.residual = "parallel_shared" if raw.get("parallel_attn", True) else "pre"
    config.norm, config.norm_bias = "layer", True
    config.mlp = "plain"
    config.attention_bias = config.o_bias = config.mlp_bias = bool(raw.get("bias", False))
    config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))
    config.hidden_act = str(raw.get("activation") or "gelu")
    if raw.get("ffn_hidden_size") is None:
        config.intermediate_size = 4 * config.hidden_size


FAMILIES = {
    "falcon": Family(
        FalconForCausalLM,
        configure,
        ("FalconForCausalLM",),
        "old and new decoder layouts, MQA/GQA",
        gguf=True,
    ),
}
