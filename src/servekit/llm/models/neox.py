"""GPT-NeoX (Pythia, Dolly, StableLM-alpha), Phi-1.5/2 and StableLM: LayerNorm, partial rotary.

NeoX fuses q/k/v per head (``[heads, 3, head_dim]`` rows) and runs attention and MLP in parallel
off two norms; Phi runs them in parallel off one norm with a biased head; StableLM is Llama's layout
with LayerNorms and partial rotary (parallel off one norm when ``use_parallel_residual``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family, set_partial_rotary
from servekit.llm.models.llama import LLAMA_NAMES
from servekit.llm.models.weights import NameMap

NEOX_NAMES = NameMap(
    "gpt_neox.layers.",
    {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "mlp_norm",
        "attention.query_key_value": "qkv",
        "attention.dense": "o",
        "mlp.dense_h_to_4h": "up",
        "mlp.dense_4h_to_h": "down",
    },
    {"gpt_neox.embed_in": "embed", "gpt_neox.final_layer_norm": "final_norm", "embed_out": "lm_head"},
)


class GPTNeoXForCausalLM(DecoderLM):
    names = NEOX_NAMES
    qkv_layout = "heads"


PHI_NAMES = NameMap(
    "model.layers.",
    {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "q",
        "self_attn.k_proj": "k",
        "self_attn.v_proj": "v",
        "self_attn.dense": "o",
        "mlp.fc1": "up",
        "mlp.fc2": "down",
    },
    {"model.embed_tokens": "embed", "model.final_layernorm": "final_norm", "lm_head": "lm_head"},
)


class PhiForCausalLM(DecoderLM):
    names = PHI_NAMES


class StableLmForCausalLM(DecoderLM):
    names = LLAMA_NAMES


def _layer_norms(raw: Mapping[str, Any], config: ModelConfig) -> None:
    if raw.get("qk_layernorm"):
        raise ValueError(f"{config.architecture} checkpoints with qk_layernorm are not supported")
    config.norm, config.norm_bias = "layer", True
    set_partial_rotary(raw, config)


def configure_neox(raw: Mapping[str, Any], config: ModelConfig) -> None:
    _layer_norms(raw, config)
    config.residual = "parallel" if raw.get("use_parallel_residual", True) else "pre"
    config.mlp, config.mlp_bias = "plain", True
    config.attention_bias = config.o_bias = bool(raw.get("attention_bias", True))


def configure_phi(raw: Mapping[str, Any], config: ModelConfig) -> None:
    _layer_norms(raw, config)
    config.residual = "parallel_shared"
    config.mlp, config.mlp_bias = "plain", True
    config.attention_bias = config.o_bias = config.lm_head_bias = True


def configure_stablelm(raw: Mapping[str, Any], config: ModelConfig) -> None:
    _layer_norms(raw, config)
    config.residual = "parallel_shared" if raw.get("use_parallel_residual") else "pre"
    config.attention_bias = bool(raw.get("use_qkv_bias", False))


FAMILIES = {
    "gpt_neox": Family(
        GPTNeoXForCausalLM,
        configure_neox,
        ("GPTNeoXForCausalLM",),
        "partial rotary, parallel residual, fused per-head qkv",
    ),
    "phi": Family(
        PhiForCausalLM,
        configure_phi,
        ("PhiForCausalLM",),
        "partial rotary, parallel block on one LayerNorm, biased head",
    ),
    "stablelm": Family(
        StableLmForCausalLM,
        configure_stablelm,
        ("StableLmForCausalLM",),
        "Llama layout + LayerNorm, partial rotary",
        gguf=True,
    ),
}
