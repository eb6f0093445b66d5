"""DeepSeek-V2/V3: multi-head latent attention (``mla.py``) and a fine-grained MoE.

The MoE has always-on shared experts and, after the first ``first_k_dense_replace`` dense layers,
routed experts: V2 by softmax (optionally group-limited), V3 by sigmoid with a learnt bias for the
choice only, limited to the best groups by their top-two scores, renormalised; both scaled by
``routed_scaling_factor``. Rotary pairs are interleaved (V2 always, V3 by ``rope_interleave``) and
permuted on load into the rotate-half layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig, MoEConfig
from servekit.llm.models.decoder import Attention, DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.llama import LLAMA_MLP, LLAMA_TOP
from servekit.llm.models.mla import LatentAttention
from servekit.llm.models.rotary import yarn_mscale
from servekit.llm.models.weights import NameMap, Tensors

DEEPSEEK_NAMES = NameMap(
    "model.layers.",
    {
        **LLAMA_MLP,
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "mlp_norm",
        "self_attn.q_proj": "q",
        "self_attn.q_a_proj": "q_a",
        "self_attn.q_a_layernorm": "q_a_norm",
        "self_attn.q_b_proj": "q_b",
        "self_attn.kv_a_proj_with_mqa": "kv_a",
        "self_attn.kv_a_layernorm": "kv_norm",
        "self_attn.kv_b_proj": "kv_b",
        "self_attn.o_proj": "o",
        "mlp.gate": "router",
        "mlp.experts.*.gate_proj": "experts.*.gate",
        "mlp.experts.*.up_proj": "experts.*.up",
        "mlp.experts.*.down_proj": "experts.*.down",
        "mlp.shared_experts.gate_proj": "shared.gate",
        "mlp.shared_experts.up_proj": "shared.up",
        "mlp.shared_experts.down_proj": "shared.down",
    },
    LLAMA_TOP,
)


def _half_layout_rows(weight: torch.Tensor, block: int, rope: int) -> torch.Tensor:
    """Reorder, in every ``block`` of rows, the last ``rope`` rows from interleaved pairs to halves."""
    keep = block - rope
    order = [*range(keep), *range(keep, block, 2), *range(keep + 1, block, 2)]
    return weight.reshape(-1, block, *weight.shape[1:])[:, order].reshape(weight.shape)


class DeepseekForCausalLM(DecoderLM):
    names = DEEPSEEK_NAMES

    def _options(self, key: str) -> int:
        return int(self.config.family_options[key])

    def attention_weights(self) -> dict[str, bool]:
        biased = self.config.attention_bias
        names = {"kv_a": biased, "kv_norm": False, "kv_b": False, "o": biased}
        if self.config.family_options.get("q_lora_rank"):
            names.update(q_a=biased, q_a_norm=False, q_b=False)
        else:
            names["q"] = False
        return names

    def map_weight(self, name: str, tensor: torch.Tensor) -> Tensors:
        options = self.config.family_options
        rope = self._options("qk_rope_head_dim")
        for canonical, part in super().map_weight(name, tensor):
            if options.get("rope_interleave") and canonical.endswith((".q.weight", ".q_b.weight")):
                part = _half_layout_rows(part, self._options("qk_nope_head_dim") + rope, rope)
            elif options.get("rope_interleave") and canonical.endswith((".kv_a.weight", ".kv_a.bias")):
                part = _half_layout_rows(part, part.shape[0], rope)
            yield canonical, part

    def _attention(self, store: dict[str, torch.Tensor], prefix: str) -> Attention:
        heads = self.config.num_attention_heads
        nope, rope = self._options("qk_nope_head_dim"), self._options("qk_rope_head_dim")
        rank, v_dim = self._options("kv_lora_rank"), self._options("v_head_dim")
        kv_b = store.pop(f"{prefix}kv_b.weight").view(heads, nope + v_dim, rank)
        low_rank = f"{prefix}q_a.weight" in store
        kv_norm = self._norm(store, f"{prefix}kv_norm")
        assert kv_norm is not None
        return LatentAttention(
            q=None if low_rank else self._linear(store, f"{prefix}q"),
            q_a=self._linear(store, f"{prefix}q_a") if low_rank else None,
            q_a_norm=self._norm(store, f"{prefix}q_a_norm") if low_rank else None,
            q_b=self._linear(store, f"{prefix}q_b") if low_rank else None,
            kv_a=self._linear(store, f"{prefix}kv_a"),
            kv_norm=kv_norm,
            w_uk=kv_b[:, :nope].contiguous(),
            w_uv=kv_b[:, nope:].transpose(1, 2).contiguous(),
            o=self._linear(store, f"{prefix}o"),
            num_heads=heads,
            nope_dim=nope,
            rope_dim=rope,
            latent_dim=rank,
        )


def configure(raw: Mapping[str, Any], config: ModelConfig) -> None:
    nope, rope = int(raw["qk_nope_head_dim"]), int(raw["qk_rope_head_dim"])
    rank = int(raw["kv_lora_rank"])
    config.family_options.update(
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        kv_lora_rank=rank,
        v_head_dim=int(raw["v_head_dim"]),
        q_lora_rank=raw.get("q_lora_rank"),
        rope_interleave=raw.get("model_type") == "deepseek_v2" or bool(raw.get("rope_interleave", True)),
    )
    # The cache holds one latent "KV head" per token: [c ; k_rot].
    config.num_key_value_heads, config.head_dim, config.rotary_dim = 1, rank + rope, rope
    config.attention_bias = config.o_bias = bool(raw.get("attention_bias", False))
    scale = (nope + rope) ** -0.5
    scaling = config.rope_scaling or {}
    if scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    config.attention_scale = scale
    v3 = raw.get("model_type") == "deepseek_v3"
    experts = int(raw.get("n_routed_experts") or raw.get("num_local_experts") or 0)
    groups = int(raw.get("n_group") or 1)
    group_limited = v3 or raw.get("topk_method") == "group_limited_greedy"
    config.moe = MoEConfig(
        num_experts=experts,
        top_k=int(raw["num_experts_per_tok"]),
        intermediate_size=int(raw["moe_intermediate_size"]),
        normalize_top_k=v3 and bool(raw.get("norm_topk_prob", True)),
        shared_intermediate_size=int(raw["moe_intermediate_size"]) * int(raw.get("n_shared_experts") or 0),
        dense_layers=list(range(int(raw.get("first_k_dense_replace") or 0))),
        scoring="sigmoid" if v3 else "softmax",
        num_groups=groups if group_limited else 1,
        top_groups=int(raw.get("topk_group") or 1),
        group_score="top2" if v3 else "max",
        score_bias=v3,
        routed_scaling=float(raw.get("routed_scaling_factor") or 1.0),
    )


FAMILIES = {
    "deepseek_v2": Family(
        DeepseekForCausalLM,
        configure,
        ("DeepseekV2ForCausalLM",),
        "MLA (latent KV cache), shared + routed experts",
    ),
    "deepseek_v3": Family(
        DeepseekForCausalLM,
        configure,
        ("DeepseekV3ForCausalLM",),
        "MLA (latent KV cache), sigmoid group-limited routing with bias",
    ),
}
