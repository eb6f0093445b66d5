"""Sparse-MoE families: Mixtral (top-k renormalised), Qwen2-MoE (shared expert), Qwen3-MoE.

Attention is Llama's (Qwen2-MoE with q/k/v biases, Qwen3-MoE with per-head q/k norms); the MLP of
every sparse layer is ``servekit.llm.models.moe.SparseMoE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servekit.llm.model_config import ModelConfig, MoEConfig
from servekit.llm.models import llama
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.llama import LLAMA_LAYER, LLAMA_TOP
from servekit.llm.models.weights import NameMap

MIXTRAL_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_LAYER,
        "block_sparse_moe.gate": "router",
        "block_sparse_moe.experts.*.w1": "experts.*.gate",
        "block_sparse_moe.experts.*.w3": "experts.*.up",
        "block_sparse_moe.experts.*.w2": "experts.*.down",
    },
    LLAMA_TOP,
)
QWEN_MOE_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_LAYER,
        "mlp.gate": "router",
        "mlp.experts.*.gate_proj": "experts.*.gate",
        "mlp.experts.*.up_proj": "experts.*.up",
        "mlp.experts.*.down_proj": "experts.*.down",
        "mlp.shared_expert.gate_proj": "shared.gate",
        "mlp.shared_expert.up_proj": "shared.up",
        "mlp.shared_expert.down_proj": "shared.down",
        "mlp.shared_expert_gate": "shared_gate",
    },
    LLAMA_TOP,
)


class MixtralForCausalLM(DecoderLM):
    names = MIXTRAL_NAMES


class QwenMoeForCausalLM(DecoderLM):
    names = QWEN_MOE_NAMES


def configure_mixtral(raw: Mapping[str, Any], config: ModelConfig) -> None:
    llama.configure(raw, config)
    config.moe = MoEConfig(
        num_experts=int(raw["num_local_experts"]),
        top_k=int(raw["num_experts_per_tok"]),
        intermediate_size=config.intermediate_size,
        normalize_top_k=True,
    )


def configure_qwen_moe(raw: Mapping[str, Any], config: ModelConfig) -> None:
    llama.configure(raw, config)
    if raw.get("model_type") == "qwen2_moe":
        config.attention_bias = bool(raw.get("qkv_bias", True))
    step = int(raw.get("decoder_sparse_step") or 1)
    only_dense = set(raw.get("mlp_only_layers") or [])
    dense = [i for i in range(config.num_hidden_layers) if i in only_dense or (i + 1) % step]
    shared = int(raw.get("shared_expert_intermediate_size") or 0)
    config.moe = MoEConfig(
        num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
        top_k=int(raw["num_experts_per_tok"]),
        intermediate_size=int(raw["moe_intermediate_size"]),
        normalize_top_k=bool(raw.get("norm_topk_prob", False)),
        shared_intermediate_size=shared,
        shared_expert_gate=shared > 0,
        dense_layers=dense,
    )


FAMILIES = {
    "mixtral": Family(
        MixtralForCausalLM, configure_mixtral, ("MixtralForCausalLM",), "sparse MoE, top-k renormalised"
    ),
    "qwen2_moe": Family(
        QwenMoeForCausalLM,
        configure_qwen_moe,
        ("Qwen2MoeForCausalLM",),
        "sparse MoE + gated shared expert",
        gguf=True,
    ),
    "qwen3_moe": Family(
        QwenMoeForCausalLM,
        configure_qwen_moe,
        ("Qwen3MoeForCausalLM",),
        "sparse MoE, q/k norms",
        gguf=True,
    ),
}
