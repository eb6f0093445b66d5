"""OPT: LayerNorm, learned positions offset by two rows, ReLU MLP, biases everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.weights import NameMap

OPT_NAMES = NameMap(
    "model.decoder.layers.",
    {
        "self_attn_layer_norm": "attn_norm",
        "self_attn.q_proj": "q",
        "self_attn.k_proj": "k",
        "self_attn.v_proj": "v",
        "self_attn.out_proj": "o",
        "final_layer_norm": "mlp_norm",
        "fc1": "up",
        "fc2": "down",
    },
    {
        "model.decoder.embed_tokens": "embed",
        "model.decoder.embed_positions": "pos_embed",
        "model.decoder.final_layer_norm": "final_norm",
        "lm_head": "lm_head",
    },
)


class OPTForCausalLM(DecoderLM):
    names = OPT_NAMES


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    if not raw.get("do_layer_norm_before", True) or raw.get("_remove_final_layer_norm"):
        raise ValueError(
            "OPT checkpoints with post-LayerNorm layers (do_layer_norm_before=False) are not supported"
        )
    if int(raw.get("word_embed_proj_dim") or config.hidden_size) != config.hidden_size:
        raise ValueError("OPT checkpoints with word_embed_proj_dim != hidden_size are not supported")
    config.norm, config.norm_bias = "layer", True
    config.rms_norm_eps = 1e-5  # torch's LayerNorm default: OPT configs do not name it
    config.mlp = "plain"
    biased = bool(raw.get("enable_bias", True))
    config.attention_bias = config.o_bias = config.mlp_bias = biased
    config.positions, config.position_offset = "learned", 2
    config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))


FAMILIES = {
    "opt": Family(
        OPTForCausalLM, configure, ("OPTForCausalLM",), "LayerNorm, learned positions (offset 2), ReLU"
    ),
}
