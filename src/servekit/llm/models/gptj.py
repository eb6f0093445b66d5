"""GPT-J and GLM-4: rotary applied to interleaved pairs of dims, on part of each head.

Their q/k rows are permuted on load into the rotate-half layout (``rotary.interleaved_to_half``),
so they run the shared rotary code. GPT-J is a parallel block on one LayerNorm with a biased head;
GLM-4 is Llama with fused gate/up and norms after attention and MLP as well as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig
from servekit.llm.models import llama
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family, set_partial_rotary
from servekit.llm.models.llama import LLAMA_ATTENTION, LLAMA_TOP
from servekit.llm.models.phi3 import FusedLlamaForCausalLM
from servekit.llm.models.rotary import interleaved_to_half, rotary_dim_of
from servekit.llm.models.weights import NameMap, Tensors

GPTJ_NAMES = NameMap(
    "transformer.h.",
    {
        "ln_1": "attn_norm",
        "attn.q_proj": "q",
        "attn.k_proj": "k",
        "attn.v_proj": "v",
        "attn.out_proj": "o",
        "mlp.fc_in": "up",
        "mlp.fc_out": "down",
    },
    {"transformer.wte": "embed", "transformer.ln_f": "final_norm", "lm_head": "lm_head"},
)
GLM4_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_ATTENTION,
        "mlp.gate_up_proj": "gate_up",
        "mlp.down_proj": "down",
        "input_layernorm": "attn_norm",
        "post_self_attn_layernorm": "post_attn_norm",
        "post_attention_layernorm": "mlp_norm",
        "post_mlp_layernorm": "post_mlp_norm",
    },
    LLAMA_TOP,
)


def deinterleave(model: DecoderLM, pairs: Tensors) -> Tensors:
    config = model.config
    for canonical, part in pairs:
        if canonical.endswith((".q.weight", ".q.bias")):
            part = interleaved_to_half(part, config.num_attention_heads, rotary_dim_of(config))
        elif canonical.endswith((".k.weight", ".k.bias")):
            part = interleaved_to_half(part, config.num_key_value_heads, rotary_dim_of(config))
        yield canonical, part


class GPTJForCausalLM(DecoderLM):
    names = GPTJ_NAMES

    def map_weight(self, name: str, tensor: torch.Tensor) -> Tensors:
        return deinterleave(self, super().map_weight(name, tensor))


class Glm4ForCausalLM(FusedLlamaForCausalLM):
    names = GLM4_NAMES

    def map_weight(self, name: str, tensor: torch.Tensor) -> Tensors:
        return deinterleave(self, super().map_weight(name, tensor))


def configure_gptj(raw: Mapping[str, Any], config: ModelConfig) -> None:
    config.norm, config.norm_bias = "layer", True
    config.residual = "parallel_shared"
    config.mlp, config.mlp_bias = "plain", True
    config.lm_head_bias = True
    config.rotary_dim = int(raw.get("rotary_dim") or config.head_dim)


def configure_glm4(raw: Mapping[str, Any], config: ModelConfig) -> None:
    llama.configure(raw, config)
    config.o_bias = False
    config.sandwich_norms = True
    set_partial_rotary(raw, config)


FAMILIES = {
    "gptj": Family(
        GPTJForCausalLM, configure_gptj, ("GPTJForCausalLM",), "interleaved partial rotary, parallel block"
    ),
    "glm4": Family(
        Glm4ForCausalLM,
        configure_glm4,
        ("Glm4ForCausalLM",),
        "interleaved partial rotary, sandwich norms, fused gate_up",
    ),
}
