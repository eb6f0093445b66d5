"""The Llama family: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2 (and Yi, Aquila: Llama layout).

Differences between members are configuration, not code: grouped-query attention, q/k/v biases
(Qwen2), per-head RMSNorm on queries and keys (Qwen3), tied embeddings, rope scaling. Every other
family reuses this module's checkpoint names where it shares them (``LLAMA_LAYER``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.weights import NameMap

LLAMA_ATTENTION = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
}
LLAMA_MLP = {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
LLAMA_LAYER = {
    **LLAMA_ATTENTION,
    **LLAMA_MLP,
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}
LLAMA_TOP = {"model.embed_tokens": "embed", "model.norm": "final_norm", "lm_head": "lm_head"}
LLAMA_NAMES = NameMap("model.layers.", LLAMA_LAYER, LLAMA_TOP)


class LlamaForCausalLM(DecoderLM):
    """Decoder-only transformer of the Llama family, inference only."""

    names = LLAMA_NAMES

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (the Llama family uses 'silu')")
        super().__init__(config, dtype=dtype, **kwargs)


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    model_type = raw.get("model_type")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not raw.get(
        "use_sliding_window", False
    ):
        config.sliding_window = None
    config.attention_bias = model_type in ("qwen2", "qwen2_moe") or bool(raw.get("attention_bias", False))
    config.qk_norm = model_type in ("qwen3", "qwen3_moe")
    config.o_bias = bool(raw.get("attention_bias", False)) and model_type not in ("qwen2", "qwen2_moe")
    config.mlp_bias = bool(raw.get("mlp_bias", False))


FAMILIES = {
    "llama": Family(
        LlamaForCausalLM, configure, ("LlamaForCausalLM",), "RMSNorm, SwiGLU, RoPE, GQA", gguf=True
    ),
    "mistral": Family(LlamaForCausalLM, configure, ("MistralForCausalLM",), "Llama + sliding window"),
    "qwen2": Family(LlamaForCausalLM, configure, ("Qwen2ForCausalLM",), "Llama + q/k/v biases", gguf=True),
    "qwen3": Family(
        LlamaForCausalLM, configure, ("Qwen3ForCausalLM",), "Llama + per-head q/k RMSNorm", gguf=True
    ),
    "smollm2": Family(LlamaForCausalLM, configure, (), "Llama layout"),
}
