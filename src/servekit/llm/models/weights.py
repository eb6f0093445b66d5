"""Checkpoint tensor names -> the decoder's canonical names, and which names a config needs.

Canonical names (``servekit.llm.models.decoder`` builds the layers from them): ``embed``,
``pos_embed``, ``final_norm``, ``lm_head`` at the top; per layer ``layers.{i}.`` + ``attn_norm``,
``mlp_norm``, ``post_attn_norm``, ``post_mlp_norm``, ``q``, ``k``, ``v``, ``o``, ``q_norm``,
``k_norm``, ``gate``, ``up``, ``down``, and for MoE ``router``, ``experts.{e}.{gate,up,down}``,
``shared.{gate,up,down}``, ``shared_gate``; each with ``.weight`` and possibly ``.bias``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from servekit.llm.model_config import ModelConfig

Tensors = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class NameMap:
    """Module paths of one family's checkpoints: ``top`` and per-layer (under ``layer_prefix``)."""

    layer_prefix: str
    layer: Mapping[str, str]
    top: Mapping[str, str]
    ignored: re.Pattern[str] = field(
        default=re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias|\.attention\.bias)$")
    )

    def canonical(self, name: str) -> str | None:
        """The canonical name of checkpoint tensor ``name``; None when the family does not know it."""
        module, _, kind = name.rpartition(".")
        if module in self.top:
            return f"{self.top[module]}.{kind}"
        if not module.startswith(self.layer_prefix):
            return None
        index, _, rest = module[len(self.layer_prefix) :].partition(".")
        if not index.isdigit():
            return None
        expert = re.match(r"^(.*\.experts)\.(\d+)\.(.+)$", rest)
        if expert is not None:
            target = self.layer.get(f"{expert.group(1)}.*.{expert.group(3)}")
            if target is None:
                return None
            return f"layers.{index}.{target.replace('*', expert.group(2))}.{kind}"
        if rest not in self.layer:
            return None
        return f"layers.{index}.{self.layer[rest]}.{kind}"

    def checkpoint_name(self, canonical: str) -> str:
        """The checkpoint's name for a canonical one, for messages (itself when not a plain rename)."""
        module, _, kind = canonical.rpartition(".")
        for source, target in self.top.items():
            if target == module:
                return f"{source}.{kind}"
        match = re.match(r"^layers\.(\d+)\.(.+)$", module)
        if match is not None:
            for source, target in self.layer.items():
                if target == match.group(2):
                    return f"{self.layer_prefix}{match.group(1)}.{source}.{kind}"
        return canonical


def split_rows(name: str, tensor: torch.Tensor, parts: Mapping[str, int]) -> Tensors:
    """``layers.{i}.fused.weight`` cut along rows into ``layers.{i}.{part}.weight`` of given sizes."""
    prefix, _, kind = name.rpartition(".")
    prefix = prefix.rpartition(".")[0]
    start = 0
    for part, rows in parts.items():
        yield f"{prefix}.{part}.{kind}", tensor[start : start + rows]
        start += rows


def expected_names(config: ModelConfig, attention: Mapping[str, bool]) -> tuple[set[str], set[str]]:
    """``(required, optional)`` canonical names for ``config`` (``attention``: each layer's attention
    weights -> biased): optional ones are biases a checkpoint may carry beyond what the config says
    (they are loaded when present)."""
    required = {"embed.weight", "final_norm.weight"}
    optional: set[str] = set()
    norm_names = ["final_norm"]
    if not config.tie_word_embeddings:
        required.add("lm_head.weight")
        (required if config.lm_head_bias else optional).add("lm_head.bias")
    if config.positions == "learned":
        required.add("pos_embed.weight")
    if config.embedding_norm:
        norm_names.append("embed_norm")
    for index in range(config.num_hidden_layers):
        prefix = f"layers.{index}."
        norms: list[str] = []
        if config.residual != "post":
            norms.append("attn_norm")
        if config.residual in ("pre", "parallel"):
            norms.append("mlp_norm")
        if config.sandwich_norms or config.residual == "post":
            norms += ["post_attn_norm", "post_mlp_norm"]
        norm_names += [prefix + n for n in norms]
        linears = dict(attention)
        moe = config.moe
        if moe is None or index in moe.dense_layers:
            mlp = ["gate", "up", "down"] if config.mlp == "gated" else ["up", "down"]
            linears.update(dict.fromkeys(mlp, config.mlp_bias))
        else:
            linears["router"] = False
            for expert in range(moe.num_experts):
                linears.update({f"experts.{expert}.{p}": False for p in ("gate", "up", "down")})
            if moe.shared_intermediate_size:
                linears.update({f"shared.{p}": False for p in ("gate", "up", "down")})
            if moe.shared_expert_gate:
                linears["shared_gate"] = False
            if moe.score_bias:
                required.add(f"{prefix}router.e_score_correction_bias")
        for linear, biased in linears.items():
            required.add(f"{prefix}{linear}.weight")
            (required if biased else optional).add(f"{prefix}{linear}.bias")
    for norm in norm_names:
        required.add(f"{norm}.weight")
        (required if config.norm_bias else optional).add(f"{norm}.bias")
    return required, optional


def split_fused_qkv(
    name: str, tensor: torch.Tensor, layout: str, heads: int, kv_heads: int, head_dim: int
) -> Tensors:
    """``layers.{i}.qkv.*`` as ``q``, ``k``, ``v``. Layouts: "rows" (every q row, then k, then v),
    "heads" (``[heads, 3, head_dim]``: NeoX, BLOOM), "grouped" (``[kv_heads, group + 2, head_dim]``:
    each KV head's query heads, then its key and value: Falcon's new layout, InternLM2)."""
    if layout == "rows":
        yield from split_rows(
            name, tensor, {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
        )
        return
    prefix, _, kind = name.rpartition(".")
    prefix = prefix.rpartition(".")[0]
    rest = tensor.shape[1:]
    if layout == "heads":
        per_head = tensor.reshape(heads, 3, head_dim, *rest)
        parts = [per_head[:, index] for index in range(3)]
    elif layout == "grouped":
        group = heads // kv_heads
        grouped = tensor.reshape(kv_heads, group + 2, head_dim, *rest)
        parts = [grouped[:, :group], grouped[:, group], grouped[:, group + 1]]
    else:
        raise ValueError(f"unknown fused qkv layout {layout!r}")
    for part, values in zip(("q", "k", "v"), parts, strict=True):
        yield f"{prefix}.{part}.{kind}", values.reshape(-1, *rest)
