"""GGUF files of the non-Llama families: llama.cpp's metadata and tensor names, back to HF.

The metadata becomes an HF-style config dict, read by the same ``model_config_from_hf`` as a
checkpoint's config.json; tensor names are mapped back through the ``gguf`` package's own
HF -> GGUF table (``gguf.get_tensor_name_map``), keeping the HF name the family knows; and the
changes llama.cpp's converter makes to some tensors are undone (``to_hf_layout``).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

import torch

from servekit.llm.models.weights import Tensors

if TYPE_CHECKING:
    from servekit.llm.loaders.gguf import GGUFMetadata
    from servekit.llm.model_config import ModelConfig

# GGUF architecture -> HF model_type, for the families read through this module.
GGUF_MODEL_TYPES = {
    "gpt2": "gpt2",
    "starcoder2": "starcoder2",
    "stablelm": "stablelm",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "bloom": "bloom",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "falcon": "falcon",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# GPT-2 stores these as Conv1D ([in, out]); llama.cpp writes them as linears ([out, in]).
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def hf_config_from_gguf(meta: GGUFMetadata, tensor_names: set[str]) -> dict[str, Any]:
    """The config.json a checkpoint of this GGUF file's family would have."""
    model_type = GGUF_MODEL_TYPES[meta.architecture]
    hidden = int(meta.arch("embedding_length"))
    heads = int(meta.arch("attention.head_count"))
    head_dim = int(meta.arch("attention.key_length", hidden // heads))
    layers = int(meta.arch("block_count"))
    eps = meta.arch("attention.layer_norm_rms_epsilon", meta.arch("attention.layer_norm_epsilon", 1e-5))
    config: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(meta.arch("vocab_size", len(meta.get("tokenizer.ggml.tokens") or []))),
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.arch("context_length", 2048)),
        "rms_norm_eps": float(eps),
        "rope_theta": float(meta.arch("rope.freq_base", 10000.0)),
        "partial_rotary_factor": int(meta.arch("rope.dimension_count", head_dim)) / head_dim,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [
            int(i)
            for i in (meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))
            if i is not None
        ],
    }
    if model_type == "starcoder2":
        config["use_bias"] = "blk.0.attn_q.bias" in tensor_names
    if model_type == "stablelm":
        config["use_qkv_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["use_parallel_residual"] = "blk.0.ffn_norm.weight" not in tensor_names
    if model_type in ("gemma2", "gemma3_text"):
        window = int(meta.arch("attention.sliding_window", 4096))
        if model_type == "gemma2":  # llama.cpp: even layers attend within the window, odd ones globally
            sliding = [i % 2 == 0 for i in range(layers)]
        else:  # every `pattern`-th layer global (llama.cpp's default: 6)
            pattern = int(meta.arch("attention.sliding_window_pattern", 6))
            sliding = [(i + 1) % pattern != 0 for i in range(layers)]
        config.update(
            sliding_window=window,
            attn_logit_softcapping=meta.arch("attn_logit_softcapping"),
            final_logit_softcapping=meta.arch("final_logit_softcapping"),
            query_pre_attn_scalar=head_dim,
            layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
            hidden_activation="gelu_pytorch_tanh",
        )
        if model_type == "gemma3_text":
            config["rope_local_base_freq"] = 10_000.0  # fixed in llama.cpp's Gemma 3 graph
            factor = meta.arch("rope.scaling.factor")
            if meta.arch("rope.scaling.type") == "linear" and factor:
                config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        config.update(
            num_experts=int(meta.arch("expert_count")),
            num_experts_per_tok=int(meta.arch("expert_used_count")),
            moe_intermediate_size=int(meta.arch("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(meta.arch("expert_shared_feed_forward_length", 0)),
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            # llama.cpp renormalises Qwen3-MoE's top-k weights unless the file says otherwise.
            norm_topk_prob=bool(meta.arch("expert_weights_norm", model_type == "qwen3_moe")),
        )
    if model_type == "phi3" and "rope_factors_long.weight" in tensor_names:
        config.update(_longrope(meta))
    if model_type == "falcon":
        kv_heads = config["num_key_value_heads"]
        two_norms = "blk.0.attn_norm_2.weight" in tensor_names
        config.update(
            new_decoder_architecture=two_norms or kv_heads not in (1, heads),
            num_ln_in_parallel_attn=2 if two_norms else 1,
            multi_query=kv_heads == 1,
            num_kv_heads=kv_heads,
            parallel_attn=True,
            bias="blk.0.attn_qkv.bias" in tensor_names,
            ffn_hidden_size=config["intermediate_size"],
        )
    if model_type == "gpt2":
        config["activation_function"] = "gelu_new"
    if model_type == "starcoder2":
        config["hidden_act"] = "gelu_pytorch_tanh"
    return config


def _longrope(meta: GGUFMetadata) -> dict[str, Any]:
    """Phi-3's LongRoPE, as llama.cpp stores it: the per-frequency factors as two tensors, the
    original context and the attention factor as metadata."""
    from servekit.llm.loaders.gguf import dequantize_tensor

    factors = {
        t.name: dequantize_tensor(t).tolist()
        for t in meta.reader.tensors
        if t.name.startswith("rope_factors_")
    }
    original = int(meta.arch("rope.scaling.original_context_length", meta.arch("context_length", 4096)))
    scaling: dict[str, Any] = {
        "rope_type": "longrope",
        "long_factor": factors["rope_factors_long.weight"],
        "short_factor": factors.get("rope_factors_short.weight", factors["rope_factors_long.weight"]),
        "original_max_position_embeddings": original,
    }
    attention_factor = meta.arch("rope.scaling.attn_factor")
    if attention_factor is not None:
        scaling["attention_factor"] = float(attention_factor)
    return {"rope_scaling": scaling, "original_max_position_embeddings": original}


@functools.cache
def _inverse_names(architecture: str, num_layers: int) -> dict[str, tuple[str, ...]]:
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    table = gguf.get_tensor_name_map(arch, num_layers)
    inverse: dict[str, list[str]] = {}
    for hf_name, (_, gguf_name) in table.mapping.items():
        inverse.setdefault(gguf_name, []).append(hf_name)
    return {name: tuple(candidates) for name, candidates in inverse.items()}


def hf_name_of(gguf_name: str, architecture: str, config: ModelConfig, rows: int) -> str | None:
    """The HF name (as the family's checkpoints spell it) of a GGUF tensor of ``rows`` rows; None:
    not loaded. Where a family knows a fused and a separate name (Phi-3: ``gate_up_proj`` and
    ``up_proj`` both become ``ffn_up``), the row count tells them apart."""
    from servekit.llm.models.registry import family_of

    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("rope_factors"):
        return None
    names = family_of(config.architecture).model.names
    # llama.cpp's BLOOM converter strips the "transformer." prefix before looking names up.
    candidates = [
        f"{prefix}{c}.{suffix}"
        for c in _inverse_names(architecture, config.num_hidden_layers).get(base, ())
        for prefix in ("", "transformer.")
    ]
    known = [name for name in candidates if names.canonical(name) is not None]
    if not known:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r} for a {architecture} model")
    fused_rows = {
        ".qkv.": (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim,
        ".gate_up.": 2 * config.intermediate_size,
    }
    if config.architecture == "falcon" and config.residual == "parallel":
        # llama.cpp files Falcon's two-norm layers' ln_mlp as attn_norm (and ln_attn as attn_norm_2).
        known.sort(key=lambda name: ".ln_mlp." not in name)
    for name in known:
        canonical = str(names.canonical(name))
        if any(part in canonical and rows == size for part, size in fused_rows.items()):
            return name
    return next((n for n in known if not any(p in str(names.canonical(n)) for p in fused_rows)), known[0])


def hf_tensors(gguf_name: str, tensor: torch.Tensor, architecture: str, config: ModelConfig) -> Tensors:
    """The HF-named tensors of one GGUF tensor: one, or one per expert for llama.cpp's stacked
    ``ffn_*_exps`` ``[experts, rows, cols]`` tensors."""
    match = re.match(r"^blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight$", gguf_name)
    if match is not None:
        layer, kind = match.groups()
        for expert in range(tensor.shape[0]):
            yield f"model.layers.{layer}.mlp.experts.{expert}.{_EXPERTS[kind]}.weight", tensor[expert]
        return
    name = hf_name_of(gguf_name, architecture, config, int(tensor.shape[0]))
    if name is None:
        return
    if name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)  # llama.cpp keeps Qwen2-MoE's [1, hidden] gate as [hidden]
    yield name, to_hf_layout(name, tensor, config)


def to_hf_layout(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Undo what llama.cpp's converter changed: GPT-2's Conv1D transposes, Gemma's (1 + w) norms,
    BLOOM's and Falcon's fused q/k/v regrouped into plain q, k, v rows."""
    if config.architecture == "gpt2" and name.endswith(_CONV1D):
        return tensor.t().contiguous()
    if config.architecture == "falcon" and ".query_key_value." in name:
        # llama.cpp writes all q rows, then k, then v; Falcon stores them grouped per KV head.
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        rest = tensor.shape[1:]
        q, k, v = tensor.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        parts = (
            q.reshape(kv_heads, heads // kv_heads, head_dim, *rest),
            k.reshape(kv_heads, 1, head_dim, *rest),
            v.reshape(kv_heads, 1, head_dim, *rest),
        )
        return torch.cat(parts, dim=1).reshape(tensor.shape)
    if config.architecture == "bloom" and ".query_key_value." in name:
        rest = tensor.shape[1:]
        per_part = tensor.reshape(3, config.num_attention_heads, config.head_dim, *rest)
        return per_part.transpose(0, 1).reshape(tensor.shape).contiguous()
    if config.architecture in ("gemma2", "gemma3_text") and name.endswith("norm.weight"):
        return tensor - 1.0
    return tensor
