"""Families that need ``trust_remote_code`` in transformers but are Llama under another weight
layout, loaded by renaming (no remote code runs here):

* InternLM2: q/k/v fused per KV group in ``attention.wqkv`` (``[kv_heads, group + 2, head_dim]``),
  ``feed_forward.w1/w3/w2``, ``tok_embeddings``, ``output``;
* Baichuan (7B layout): q/k/v rows fused in ``self_attn.W_pack``; Baichuan 2's ``NormHead`` (its
  vocabulary of 125696) normalises each lm_head row on load;
* Aquila and the first Yi releases (``ln1``/``ln2`` norm names): Llama's names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from servekit.llm.model_config import ModelConfig
from servekit.llm.models import llama
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.family import Family
from servekit.llm.models.llama import LLAMA_LAYER, LLAMA_TOP
from servekit.llm.models.weights import NameMap, Tensors

INTERNLM2_NAMES = NameMap(
    "model.layers.",
    {
        "attention.wqkv": "qkv",
        "attention.wo": "o",
        "feed_forward.w1": "gate",
        "feed_forward.w3": "up",
        "feed_forward.w2": "down",
        "attention_norm": "attn_norm",
        "ffn_norm": "mlp_norm",
    },
    {"model.tok_embeddings": "embed", "model.norm": "final_norm", "output": "lm_head"},
)
BAICHUAN_NAMES = NameMap("model.layers.", {**LLAMA_LAYER, "self_attn.W_pack": "qkv"}, LLAMA_TOP)
YI_NAMES = NameMap("model.layers.", {**LLAMA_LAYER, "ln1": "attn_norm", "ln2": "mlp_norm"}, LLAMA_TOP)
BAICHUAN2_VOCAB = 125696
BAICHUAN_13B_HIDDEN = 5120  # the 13B models use ALiBi, told apart by width as their configs do not say


class InternLM2ForCausalLM(DecoderLM):
    names = INTERNLM2_NAMES
    qkv_layout = "grouped"


class BaichuanForCausalLM(DecoderLM):
    names = BAICHUAN_NAMES

    def map_weight(self, name: str, tensor: torch.Tensor) -> Tensors:
        for canonical, part in super().map_weight(name, tensor):
            if canonical == "lm_head.weight" and self.config.family_options.get("norm_head"):
                part = F.normalize(part.float(), dim=1).to(part.dtype)
            yield canonical, part


class YiForCausalLM(DecoderLM):
    names = YI_NAMES


def configure_internlm2(raw: Mapping[str, Any], config: ModelConfig) -> None:
    config.attention_bias = config.o_bias = bool(raw.get("bias", False))


def configure_baichuan(raw: Mapping[str, Any], config: ModelConfig) -> None:
    if config.hidden_size == BAICHUAN_13B_HIDDEN:
        raise ValueError("Baichuan checkpoints of the 13B layout (ALiBi) are not supported; the 7B layout is")
    config.max_position_embeddings = int(
        raw.get("max_position_embeddings") or raw.get("model_max_length") or 4096
    )
    config.family_options["norm_head"] = config.vocab_size == BAICHUAN2_VOCAB


FAMILIES = {
    "internlm2": Family(
        InternLM2ForCausalLM,
        configure_internlm2,
        ("InternLM2ForCausalLM",),
        "Llama, grouped fused wqkv (remote code)",
    ),
    "baichuan": Family(
        BaichuanForCausalLM, configure_baichuan, ("BaichuanForCausalLM",), "Llama, fused W_pack (remote code)"
    ),
    "aquila": Family(
        llama.LlamaForCausalLM, llama.configure, ("AquilaForCausalLM",), "Llama layout (remote code)"
    ),
    "yi": Family(
        YiForCausalLM, llama.configure, ("YiForCausalLM",), "Llama, ln1/ln2 norm names (remote code)"
    ),
}
