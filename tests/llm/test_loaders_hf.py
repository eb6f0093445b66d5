"""Loading Hugging Face checkpoint directories: config, weights (plain and sharded), tokenizer, template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from servekit.llm.loaders import ModelSource, load_model_source
from servekit.llm.loaders.hf import model_config_from_hf, rope_settings
from tests.llm.tiny_models import CHAT_TEMPLATE, build_sharded_checkpoint, build_tiny_checkpoint

torch.set_num_threads(1)


def reference_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_weights_and_config_match_transformers(tmp_path: Path, arch: str) -> None:
    directory = build_tiny_checkpoint(tmp_path / arch, arch)  # type: ignore[arg-type]
    source = load_model_source(str(directory))
    assert isinstance(source, ModelSource)
    assert source.name == arch
    config = source.config
    assert config.architecture == arch
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.num_key_value_heads == 2
    assert config.head_dim == 16
    assert config.vocab_size == source.tokenizer.vocab_size
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == (arch == "qwen3")
    assert config.tie_word_embeddings is False
    assert config.rope_theta == (10000.0 if arch == "llama" else 1000000.0)

    weights = dict(source.iter_weights())
    reference = reference_state_dict(directory)
    assert set(weights) == set(reference)
    for name, tensor in weights.items():
        assert tensor.is_floating_point()
        torch.testing.assert_close(tensor.float(), reference[name], rtol=0, atol=0, msg=name)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in weights
    if arch == "qwen3":
        assert weights["model.layers.1.self_attn.q_norm.weight"].shape == (16,)


def test_sharded_tied_checkpoint(tmp_path: Path) -> None:
    directory = build_sharded_checkpoint(tmp_path / "sharded", tie_word_embeddings=True)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    source = load_model_source(str(directory))
    assert source.config.tie_word_embeddings is True
    weights = dict(source.iter_weights())
    assert "lm_head.weight" not in weights
    reference = reference_state_dict(directory)
    assert set(weights) | {"lm_head.weight"} == set(reference)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    # iter_weights is re-iterable: each call reads afresh.
    assert [n for n, _ in source.iter_weights()] == list(weights)


def test_generation_config_eos_ids_and_chat_template(tmp_path: Path) -> None:
    directory = build_tiny_checkpoint(tmp_path / "m", "llama")
    source = load_model_source(str(directory))
    tokenizer = source.tokenizer
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    assert eos is not None and bos is not None
    # generation_config.json lists [eos, bos]; both end generation.
    assert source.generation_config["eos_token_id"] == [eos, bos]
    assert source.config.eos_token_ids == [eos, bos]
    assert tokenizer.eos_token_ids == [eos, bos]
    assert source.chat_template == CHAT_TEMPLATE


def test_chat_template_from_jinja_file(tmp_path: Path) -> None:
    directory = build_tiny_checkpoint(tmp_path / "m", "qwen2", chat_template_in_config=False)
    assert (directory / "chat_template.jinja").is_file()
    assert load_model_source(str(directory)).chat_template == CHAT_TEMPLATE


def test_bfloat16_checkpoint_keeps_stored_dtype(tmp_path: Path) -> None:
    directory = build_tiny_checkpoint(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    source = load_model_source(str(directory))
    assert source.config.torch_dtype == "bfloat16"
    assert {t.dtype for _, t in source.iter_weights()} == {torch.bfloat16}


def test_llama3_rope_scaling(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    directory = build_tiny_checkpoint(
        tmp_path / "rope", "llama", config_overrides={"rope_scaling": dict(scaling), "rope_theta": 500000.0}
    )
    config = load_model_source(str(directory)).config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None
    assert {k: config.rope_scaling[k] for k in scaling} == scaling


def test_config_translation_of_legacy_and_v5_keys() -> None:
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_settings(legacy) == (500000.0, {"rope_type": "linear", "factor": 2.0})
    v5 = {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
    assert rope_settings(v5) == (1e6, None)
    smollm2_like = {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    config = model_config_from_hf(smollm2_like, {"eos_token_id": [2, 0]})
    assert config.head_dim == 64
    assert config.tie_word_embeddings
    assert config.eos_token_ids == [2, 0]
    mistral = dict(smollm2_like, model_type="mistral", sliding_window=4096)
    assert model_config_from_hf(mistral).sliding_window == 4096
    qwen2 = dict(smollm2_like, model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    assert model_config_from_hf(qwen2).sliding_window is None
    with pytest.raises(ValueError, match=r"unsupported model_type 'rwkv'.*supported: .*gpt2.*llama"):
        model_config_from_hf(dict(smollm2_like, model_type="rwkv"))


def test_unknown_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model_source(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model_source(str(tmp_path))
