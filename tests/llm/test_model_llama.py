"""Building blocks of the Llama-family model: registry, packed linear layers, rotary embeddings."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from servekit.llm.model_config import ModelConfig
from servekit.llm.models import LlamaForCausalLM, get_model_class, supported_architectures
from servekit.llm.models.linear import Linear, onednn_available
from servekit.llm.models.rotary import RotaryEmbedding, rope_frequencies


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "architecture": "llama",
        "vocab_size": 50,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 64,
    }
    values.update(overrides)
    return ModelConfig(**values)


@pytest.mark.parametrize(
    "name", ["llama", "mistral", "qwen2", "qwen3", "LlamaForCausalLM", "Qwen2ForCausalLM", "QWEN3"]
)
def test_registry_resolves_model_types_and_class_names(name: str) -> None:
    assert get_model_class(name) is LlamaForCausalLM


def test_registry_rejects_unknown_architectures() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(supported_architectures())
    with pytest.raises(ValueError, match=r"unsupported model architecture 'rwkv' \(supported: .*gpt2"):
        get_model_class("rwkv")


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)]
)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_packed_linear_matches_plain_linear(dtype: torch.dtype, atol: float, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = (0.1 * torch.randn(48, 40, generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(48, generator=generator)).to(dtype)
    x = torch.randn(rows, 40, generator=generator).to(dtype)
    expected = F.linear(x.float(), weight.float(), bias.float())
    packed = Linear(weight, bias, pack=True)
    plain = Linear(weight, bias, pack=False)
    assert plain.packed is None
    if onednn_available() and dtype == torch.float32:
        assert packed.packed is not None
    for layer in (packed, plain):
        out = layer(x)
        assert out.shape == (rows, 48) and out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0.02)


def test_dynamic_rope_only_changes_beyond_the_trained_context() -> None:
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    config = tiny_config(rope_scaling=scaling)
    plain, _ = rope_frequencies(tiny_config(), 64)
    within, _ = rope_frequencies(config, 64)
    beyond, _ = rope_frequencies(config, 256)
    torch.testing.assert_close(within, plain)
    assert (beyond[1:] < plain[1:]).all(), "a larger base lowers every frequency but the first"


def test_unknown_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'made-up'"):
        rope_frequencies(tiny_config(rope_scaling={"rope_type": "made-up", "factor": 2.0}), 64)


def test_rotary_tables_grow_on_demand() -> None:
    rotary = RotaryEmbedding(tiny_config(), max_model_len=16, dtype=torch.float32)
    positions = torch.tensor([3, 40])
    cos, sin = rotary.cos_sin(positions, 40)
    assert cos.shape == (2, 1, 8)
    angle = 40 * rotary.inv_freq[1]
    torch.testing.assert_close(cos[1, 0, 1], angle.cos())
    torch.testing.assert_close(sin[1, 0, 5], angle.sin())
    torch.testing.assert_close(sin[1, 0, 1], -angle.sin())


def test_rotary_apply_matches_rotate_half_formula() -> None:
    rotary = RotaryEmbedding(tiny_config(), max_model_len=16, dtype=torch.float32)
    x = torch.randn(3, 2, 8)
    positions = torch.tensor([0, 5, 9])
    cos, sin = rotary.cos_sin(positions, 9)
    angles = torch.outer(positions.float(), rotary.inv_freq)
    full_cos = torch.cat((angles.cos(), angles.cos()), -1).unsqueeze(1)
    full_sin = torch.cat((angles.sin(), angles.sin()), -1).unsqueeze(1)
    rotated_half = torch.cat((-x[..., 4:], x[..., :4]), -1)
    torch.testing.assert_close(rotary.apply(x, cos, sin), x * full_cos + rotated_half * full_sin)


def test_model_must_be_loaded_before_running() -> None:
    model = LlamaForCausalLM(tiny_config(), max_model_len=64)
    with pytest.raises(RuntimeError, match="load_weights"):
        model.forward(torch.tensor([1]), torch.tensor([0]), 0, None, None)  # type: ignore[arg-type]


def test_unsupported_activation_is_rejected() -> None:
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaForCausalLM(tiny_config(hidden_act="gelu"), max_model_len=64)
