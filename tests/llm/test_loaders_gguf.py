"""GGUF loading: a GGUF we write ourselves round-trips to the HF tensors; the SmolLM2 GGUF matches
transformers' own GGUF loading (tokenizer and dequantised weights)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from servekit.llm.loaders import default_model_path, load_model_source
from servekit.llm.loaders.gguf import hf_tensor_name, unpermute_rows
from tests.llm.tiny_models import SAMPLE_TEXTS, add_gguf_tokenizer, build_tiny_checkpoint, reference_tokenizer

torch.set_num_threads(1)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q_proj/k_proj rows (re-implemented for the test)."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        module, _, suffix = rest.rpartition(".")
        return f"blk.{layer}.{GGUF_NAMES[module]}.{suffix}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def write_gguf(
    directory: Path, out: Path, arch: str, block_type: Callable[[str], Any] | None = None
) -> dict[str, np.ndarray]:
    """Convert a tiny HF checkpoint to GGUF as llama.cpp would; return the exact float32 tensors a
    correct loader must give back (quantisation applied, permutation not). ``block_type``: the GGML
    type of each 2-D tensor by HF name (default: F16 and Q8_0 alternating)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((directory / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    add_gguf_tokenizer(writer, directory)
    writer.add_chat_template(json.loads((directory / "tokenizer_config.json").read_text())["chat_template"])

    expected: dict[str, np.ndarray] = {}
    weights = load_file(str(directory / "model.safetensors"))
    for index, (name, value) in enumerate(sorted(weights.items())):
        array = value.astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(array, heads)
        elif arch == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(array, kv_heads)
        else:
            stored = array
        # Mix the storage types: norms/biases F32, then alternate F16 and Q8_0.
        if array.ndim == 1:
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = array
        elif block_type is None and index % 2 == 0:
            writer.add_tensor(gguf_name(name), stored.astype(np.float16))
            expected[name] = array.astype(np.float16).astype(np.float32)
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0 if block_type is None else block_type(name)
            quantized = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), quantized, raw_dtype=qtype)
            roundtrip = gguf.quants.dequantize(quantized, qtype)
            if arch == "llama" and ".q_proj." in name:
                roundtrip = unpermute_rows(torch.from_numpy(roundtrip), heads).numpy()
            elif arch == "llama" and ".k_proj." in name:
                roundtrip = unpermute_rows(torch.from_numpy(roundtrip), kv_heads).numpy()
            expected[name] = roundtrip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(weight, 6)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rows(torch.from_numpy(permuted), 6).numpy(), weight)


def test_tensor_name_mapping() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.11.attn_q.bias") == "model.layers.11.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="unknown GGUF tensor"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_written_gguf_round_trips_to_hf_tensors(tmp_path: Path, arch: str) -> None:
    directory = build_tiny_checkpoint(tmp_path / "hf", arch)  # type: ignore[arg-type]
    gguf_file = tmp_path / f"tiny-{arch}.gguf"
    expected = write_gguf(directory, gguf_file, arch)
    source = load_model_source(str(gguf_file))
    assert source.name == f"tiny-{arch}"
    hf = load_model_source(str(directory))
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        assert getattr(source.config, field) == getattr(hf.config, field), field
    assert source.config.head_dim == hf.config.head_dim
    assert source.config.rope_theta == hf.config.rope_theta
    assert source.config.attention_bias == (arch == "qwen2")
    assert source.config.tie_word_embeddings is False
    assert source.quantization == "Q8_0"  # F16 and F32 tensors are not "quantised"
    assert hf.quantization is None
    weights = dict(source.iter_weights())
    assert set(weights) == set(expected)
    for name, tensor in weights.items():
        np.testing.assert_array_equal(tensor.float().numpy(), expected[name], err_msg=name)

    reference = reference_tokenizer(directory)
    assert source.tokenizer.eos_token_id == reference.eos_token_id
    assert source.tokenizer.bos_token_id == reference.bos_token_id
    assert source.chat_template == hf.chat_template
    for text in SAMPLE_TEXTS:
        ids = source.tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert source.tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)


# -- the real default model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Any:
    return load_model_source(None)


def test_default_model_is_the_smollm2_gguf(smollm2: Any) -> None:
    assert default_model_path().endswith(".gguf")
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1"
    assert smollm2.quantization == "Q4_1, Q8_0"
    config = smollm2.config
    assert (config.architecture, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rope_theta == 100000.0
    assert config.max_position_embeddings == 8192
    tokenizer = smollm2.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert 2 in tokenizer.eos_token_ids
    assert smollm2.chat_template is not None and "<|im_start|>" in smollm2.chat_template


def test_smollm2_tokenizer_matches_transformers(smollm2: Any) -> None:
    from transformers import AutoTokenizer

    directory, filename = os.path.split(default_model_path())
    reference = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    tokenizer = smollm2.tokenizer
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_id == reference.eos_token_id
    assert tokenizer.vocab_size == len(reference)
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one, like SmolLM2's own tokenizer.json.
    digits = tokenizer.encode("2024")
    assert [tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loading(smollm2: Any) -> None:
    """transformers' GGUF tensor loading (its own dequantisation and q/k un-permutation) is the
    reference; AutoModelForCausalLM(gguf_file=...) would need ``accelerate``, so the parameter names
    come from a model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    config_values = dict(load_gguf_checkpoint(path)["config"])
    config = AutoConfig.for_model(config_values.pop("model_type"), **config_values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    reference = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    names = set()
    for name, tensor in smollm2.iter_weights():
        names.add(name)
        assert tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor.float(), reference[name].float(), rtol=0, atol=1e-6, msg=name)
    assert names == set(reference) - {"lm_head.weight"}
