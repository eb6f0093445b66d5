"""Rotary position embeddings (the "rotate half" form Hugging Face Llama checkpoints use).

Supports the ``rope_scaling`` kinds found in decoder configs: none/"default", "linear",
"dynamic" (NTK, fixed at the longest context the runner serves), "llama3", "yarn" and "longrope"
(Phi-3: the long factors when the runner serves more than the original context, else the short ones).
Partial rotary (GPT-NeoX, Phi, StableLM) rotates the first ``rotary_dim`` dims of each head.
The cos/sin tables are computed once in float32, cast to the model dtype, and grown on demand.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig


def _rope_kind(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any], max_positions: int) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", max_positions))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    base: float, dim: int, scaling: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings") or max_positions)
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale = scaling.get("mscale")
        mscale_all_dim = scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(beta_fast)
    high = correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


def _longrope_inv_freq(
    base: float, dim: int, scaling: dict[str, Any], max_positions: int, max_model_len: int
) -> tuple[torch.Tensor, float]:
    original = int(scaling.get("original_max_position_embeddings") or max_positions)
    factor = max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext_factors = torch.tensor(
        scaling["long_factor"] if max_model_len > original else scaling["short_factor"], dtype=torch.float32
    )
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (ext_factors * base**exponents), float(attention_factor)


def rotary_dim_of(config: ModelConfig) -> int:
    return config.head_dim if config.rotary_dim is None else config.rotary_dim


def rope_frequencies(
    config: ModelConfig, max_model_len: int, *, base: float | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32) and the factor applied to cos/sin."""
    dim = rotary_dim_of(config)
    base = float(config.rope_theta if base is None else base)
    scaling = config.rope_scaling or {}
    kind = _rope_kind(config.rope_scaling)
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim) / float(scaling["factor"]), 1.0
    if kind == "dynamic":
        factor = float(scaling["factor"])
        original = int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
        if max_model_len > original:
            base = base * ((factor * max_model_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(base, dim), scaling, config.max_position_embeddings), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(base, dim, scaling, config.max_position_embeddings)
    if kind == "longrope":
        return _longrope_inv_freq(base, dim, scaling, config.max_position_embeddings, max_model_len)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class RotaryEmbedding:
    """Cos/sin tables indexed by position, applied in place of a ``[tokens, heads, head_dim]`` view."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_model_len: int,
        dtype: torch.dtype,
        base: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.head_dim = config.head_dim
        self.rotary_dim = rotary_dim_of(config)
        self.dtype = dtype
        self.inv_freq, self.attention_scaling = rope_frequencies(config, max_model_len, base=base)
        self._cos = torch.empty(0, self.rotary_dim, dtype=dtype)
        self._sin = torch.empty(0, self.rotary_dim, dtype=dtype)
        self._grow(min(max_model_len, 4096))

    def _grow(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        cos = (freqs.cos() * self.attention_scaling).to(self.dtype)
        sin = (freqs.sin() * self.attention_scaling).to(self.dtype)
        self._cos = torch.cat((cos, cos), dim=-1).to(self.device)
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: the sign lives in the table.
        self._sin = torch.cat((-sin, sin), dim=-1).to(self.device)

    def _cover(self, max_position: int) -> None:
        """The tables grown (at least doubled) to hold ``max_position``."""
        if max_position >= self._cos.shape[0]:
            self._grow(max(max_position + 1, 2 * self._cos.shape[0]))

    def cos_sin(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[tokens, 1, rotary_dim]`` cos and signed sin for ``positions`` (maximum ``max_position``)."""
        self._cover(max_position)
        cos = self._cos.index_select(0, positions).unsqueeze(1)
        sin = self._sin.index_select(0, positions).unsqueeze(1)
        return cos, sin

    def tables(self, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole contiguous ``[positions, rotary_dim]`` cos and signed sin tables, grown to hold
        ``max_position`` (row p is position p)."""
        self._cover(max_position)
        return self._cos, self._sin

    def row(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rotary_dim]`` cos and signed sin of one position (views of the tables, no operator)."""
        self._cover(position)
        return self._cos[position], self._sin[position]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (``[tokens, heads, head_dim]``); returns a new contiguous tensor."""
        rotary_dim = cos.shape[-1]
        if rotary_dim == x.shape[-1]:
            return torch.addcmul(x * cos, x.roll(rotary_dim // 2, -1), sin)
        rotated = x[..., :rotary_dim]
        rotated = torch.addcmul(rotated * cos, rotated.roll(rotary_dim // 2, -1), sin)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def interleaved_to_half(weight: torch.Tensor, num_heads: int, rotary_dim: int) -> torch.Tensor:
    """Rows of a q or k projection reordered from interleaved rotary pairs (GPT-J, GLM: dims 2i and
    2i + 1 rotate together) to the rotate-half layout used here (dims i and i + rotary_dim / 2).
    q and k get the same permutation, so their dot products, and attention, are unchanged."""
    head_dim = weight.shape[0] // num_heads
    order = [*range(0, rotary_dim, 2), *range(1, rotary_dim, 2), *range(rotary_dim, head_dim)]
    per_head = weight.reshape(num_heads, head_dim, *weight.shape[1:])
    return per_head[:, order].reshape(weight.shape)
