"""Gemma, Gemma 2, Gemma 3 (text): Llama's layout with scaled embeddings and (1 + w) RMSNorms.

Gemma 2 adds norms after attention and around the MLP, soft-capped attention scores and logits, a
query scale from ``query_pre_attn_scalar`` and alternating sliding-window/global layers; Gemma 3
drops the soft-capping, adds per-head q/k norms and gives its sliding layers their own rope base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family, set_layer_windows
from servekit.llm.models.llama import LLAMA_ATTENTION, LLAMA_MLP, LLAMA_NAMES, LLAMA_TOP
from servekit.llm.models.weights import NameMap

SANDWICH_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_ATTENTION,
        **LLAMA_MLP,
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    },
    LLAMA_TOP,
)


class GemmaForCausalLM(DecoderLM):
    names = LLAMA_NAMES
    norm_offset = 1.0


class Gemma2ForCausalLM(GemmaForCausalLM):
    names = SANDWICH_NAMES


def configure_gemma(raw: Mapping[str, Any], config: ModelConfig) -> None:
    config.hidden_act = str(raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh")
    config.embedding_scale = config.hidden_size**0.5
    config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))
    config.attention_bias = config.o_bias = bool(raw.get("attention_bias", False))


def configure_gemma2(raw: Mapping[str, Any], config: ModelConfig) -> None:
    configure_gemma(raw, config)
    config.sandwich_norms = True
    if raw.get("query_pre_attn_scalar"):
        config.attention_scale = float(raw["query_pre_attn_scalar"]) ** -0.5
    config.attn_softcap = raw.get("attn_logit_softcapping")
    config.final_softcap = raw.get("final_logit_softcapping")
    set_layer_windows(raw, config)


def configure_gemma3(raw: Mapping[str, Any], config: ModelConfig) -> None:
    configure_gemma2(raw, config)
    config.qk_norm = True
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, Mapping) and "full_attention" in parameters:
        full = dict(parameters["full_attention"])
        config.rope_theta = float(full.pop("rope_theta", 1_000_000.0))
        config.rope_scaling = None if full.get("rope_type", "default") == "default" else full
        config.local_rope_theta = float(parameters.get("sliding_attention", {}).get("rope_theta", 10_000.0))
    else:
        config.local_rope_theta = float(raw.get("rope_local_base_freq", 10_000.0))


FAMILIES = {
    "gemma": Family(
        GemmaForCausalLM, configure_gemma, ("GemmaForCausalLM",), "(1+w) RMSNorm, scaled embeddings, GeGLU"
    ),
    "gemma2": Family(
        Gemma2ForCausalLM,
        configure_gemma2,
        ("Gemma2ForCausalLM",),
        "Gemma + sandwich norms, soft-capping, sliding/global layers",
        gguf=True,
    ),
    "gemma3_text": Family(
        Gemma2ForCausalLM,
        configure_gemma3,
        ("Gemma3ForCausalLM",),
        "Gemma 2 without soft-capping + q/k norms, local rope base",
        gguf=True,
    ),
}
