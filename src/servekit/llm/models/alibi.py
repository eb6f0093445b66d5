"""ALiBi: per-head linear biases on attention scores instead of position embeddings (BLOOM, MPT)."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """The geometric slopes of the ALiBi paper, extended by interleaving for non-power-of-2 heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-max_bias / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-max_bias / (2 * closest))
        slopes += [extra ** (i + 1) for i in range(0, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def mpt_alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """MPT's slopes: the next power of two's, odd ones first, cut to ``num_heads``."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    slopes = [2.0 ** (-max_bias * (i + 1) / padded) for i in range(padded)]
    if padded != num_heads:
        slopes = (slopes[1::2] + slopes[::2])[:num_heads]
    return torch.tensor(slopes, dtype=torch.float32)
