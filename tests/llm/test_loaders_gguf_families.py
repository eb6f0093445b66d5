"""GGUF files of non-Llama families, written as llama.cpp's converter writes them (its tensor names
via the ``gguf`` package's table, its metadata keys, its transposes and norm offsets): loaded here,
they give transformers' logits for the checkpoint they were converted from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from tests.llm.tiny_models import LLAMA_LIKE, add_gguf_tokenizer, build_family_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# family -> (GGUF architecture, transformers config kwargs)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "starcoder2": ("starcoder2", LLAMA_LIKE),
    "stablelm": ("stablelm", {**LLAMA_LIKE, "partial_rotary_factor": 0.25}),
    "phi3": ("phi3", LLAMA_LIKE),
    "bloom": ("bloom", {"hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "qwen2_moe": (
        "qwen2moe",
        {
            **LLAMA_LIKE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
        },
    ),
    "falcon": ("falcon", {**LLAMA_LIKE, "multi_query": True, "bias": False}),
    "falcon-new": (
        "falcon",
        {**LLAMA_LIKE, "new_decoder_architecture": True, "num_kv_heads": 2, "bias": True},
    ),
    "gemma2": ("gemma2", {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 16}),
    "gemma3_text": (
        "gemma3",
        {
            **LLAMA_LIKE,
            "num_hidden_layers": 6,
            "head_dim": 16,
            "sliding_window": 5,
            "query_pre_attn_scalar": 16,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        },
    ),
    "qwen3_moe": (
        "qwen3moe",
        {
            **LLAMA_LIKE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),
    # LongRoPE with a context past the original: the long factors apply.
    "phi3-longrope": (
        "phi3",
        {
            **LLAMA_LIKE,
            "max_position_embeddings": 128,
            "original_max_position_embeddings": 8,
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0 + i / 8 for i in range(8)],
                "long_factor": [2.0 + i / 4 for i in range(8)],
            },
        },
    ),
}
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors stacked into one ``[experts, rows, cols]`` tensor per layer and projection,
    under the name gguf's table knows (``...mlp.experts.gate_proj.weight``), as llama.cpp does."""
    out: dict[str, np.ndarray] = {}
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for name, value in tensors.items():
        match = re.match(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if match is None:
            out[name] = value
        else:
            grouped.setdefault(f"{match.group(1)}.{match.group(3)}.weight", {})[int(match.group(2))] = value
    for name, experts in grouped.items():
        out[name] = np.stack([experts[e] for e in sorted(experts)])
    return out


def write_gguf(directory: Path, out: Path, arch: str) -> None:
    from safetensors.numpy import load_file

    model = transformers.AutoConfig.from_pretrained(str(directory))
    heads, hidden = model.num_attention_heads, model.hidden_size
    kv_heads = getattr(model, "num_kv_heads", None) or getattr(model, "num_key_value_heads", None) or heads
    if arch == "falcon" and not model.new_decoder_architecture:
        kv_heads = 1 if model.multi_query else heads
    head_dim = getattr(model, "head_dim", None) or hidden // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(model.num_hidden_layers)
    writer.add_context_length(getattr(model, "max_position_embeddings", None) or 2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(
        getattr(model, "intermediate_size", None) or getattr(model, "n_inner", None) or 4 * hidden
    )
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_vocab_size(model.vocab_size)
    if arch in ("qwen2moe", "qwen3moe"):
        writer.add_expert_count(model.num_experts)
        writer.add_expert_used_count(model.num_experts_per_tok)
        writer.add_expert_feed_forward_length(model.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(model.shared_expert_intermediate_size)
    if arch in ("phi3", "gemma2", "gemma3", "qwen2moe", "qwen3moe"):
        writer.add_layer_norm_rms_eps(model.rms_norm_eps)
    else:
        writer.add_layer_norm_eps(
            getattr(model, "layer_norm_epsilon", None)
            or getattr(model, "norm_epsilon", None)
            or model.layer_norm_eps
        )
    if arch not in ("gpt2", "bloom"):
        rope = model.rope_parameters
        rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' (llama.cpp's only) base
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        if rope.get("rope_type") == "longrope":  # as llama.cpp's Phi-3 converter writes it
            original = model.original_max_position_embeddings
            writer.add_rope_scaling_orig_ctx_len(original)
            scale = model.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))
            writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(model.sliding_window)
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(model.attn_logit_softcapping)
            writer.add_final_logit_softcapping(model.final_logit_softcapping)
    add_gguf_tokenizer(writer, directory)
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), model.num_hidden_layers
    )
    tensors = stack_experts(load_file(str(directory / "model.safetensors")))
    for name, value in sorted(tensors.items()):
        array = value.astype(np.float32)
        if name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)  # llama.cpp stores Qwen2-MoE's [1, hidden] gate as [hidden]
        if arch == "gpt2" and name.endswith(CONV1D):
            array = np.ascontiguousarray(array.T)
        if arch == "falcon" and ".query_key_value." in name:  # grouped per KV head -> q, k, v rows
            grouped = array.reshape(kv_heads, heads // kv_heads + 2, head_dim, -1)
            array = np.concatenate(
                [
                    grouped[:, :-2].reshape(-1, *array.shape[1:]),
                    grouped[:, -2].reshape(-1, *array.shape[1:]),
                    grouped[:, -1].reshape(-1, *array.shape[1:]),
                ]
            )
        if arch == "bloom" and ".query_key_value." in name:  # per-head [heads, 3, d] -> q, k, v rows
            array = np.ascontiguousarray(
                array.reshape(heads, 3, head_dim, -1).swapaxes(0, 1).reshape(array.shape)
            )
        if arch == "bloom":
            name = name.removeprefix("transformer.")
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp's Gemma graphs scale by the stored weight
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_family_gives_transformers_logits(family: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    arch, config = FAMILIES[family]
    directory = build_family_checkpoint(tmp_path / "hf", family.split("-")[0], config)
    max_model_len = getattr(
        transformers.AutoConfig.from_pretrained(str(directory)), "max_position_embeddings", 64
    )
    file = tmp_path / f"{family}.gguf"
    write_gguf(directory, file, arch)

    source = load_model_source(str(file))
    assert source.config.architecture == family.split("-")[0]
    hf_source = load_model_source(str(directory))
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = source.tokenizer.encode(prompt)
    assert ids == hf_source.tokenizer.encode(prompt)
    runner = ModelRunner(
        source.config,
        source.iter_weights(),
        block_size=4,
        num_blocks=32,
        max_model_len=min(max_model_len, 128),
    )
    out = runner.execute(ForwardBatch([ids], [0], [list(range(len(ids) // 4 + 1))], all_logits=[True]))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert out.all_logits[0] is not None
    torch.testing.assert_close(out.all_logits[0], expected, atol=1e-4, rtol=0)
