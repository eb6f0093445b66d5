"""Projections and embeddings computed straight on GGUF's quantised weight blocks.

A ``QuantizedTensor`` (``servekit.llm.kernels.quantized``) is a 2-D weight as the GGUF file stores
it: for each output row, its blocks' bytes (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K). ``QuantizedLinear`` multiplies by it with the C kernels
(``servekit.llm.kernels.quantized``), which dequantise the blocks on the fly and compute in float32
with the activations unrounded: the numbers are those of the dequantised float32 weight, up to
summation order, from 4-8x fewer bytes of weights, and no float32 copy of the weight is kept.
"""

from __future__ import annotations

import torch

from servekit.llm.kernels.quantized import QuantizedTensor, RowKernel
from servekit.llm.kernels.quantized_gemm import quantized_gemm

# Rows of x from which the GEMM (quantized_gemm.c) beats the row-by-row kernel: CPU time on the AVX2
# EPYC, SmolLM2's Q4_1 shapes: 8 rows 1.61 ms (row kernel) vs 1.79 ms, 12 rows 2.36 vs 1.76 ms.
GEMM_FROM_ROWS = 12


class QuantizedLinear:
    """``y = x @ W.T + bias`` in float32 with ``W`` the row-wise concatenation of ``parts`` (fused
    projections such as q/k/v may store their parts in different types: each runs its own kernel)."""

    __slots__ = ("bias", "in_features", "out_features", "parts", "row_kernels")

    def __init__(self, parts: list[QuantizedTensor], bias: torch.Tensor | None = None) -> None:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("a quantized projection needs parts of one input width")
        merged: list[QuantizedTensor] = []
        for part in parts:  # adjacent parts of one type become one matrix: one kernel call
            if merged and merged[-1].ggml_type == part.ggml_type:
                last = merged.pop()
                blocks = torch.cat([last.blocks, part.blocks])
                part = QuantizedTensor(blocks, part.ggml_type, (last.shape[0] + part.shape[0], part.shape[1]))
            merged.append(part)
        self.parts = merged
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = None if bias is None else bias.float().contiguous()
        self.row_kernels = [
            RowKernel(part, bias) for part, bias in zip(merged, self.part_biases(), strict=True)
        ]

    def part_biases(self) -> list[torch.Tensor | None]:
        biases: list[torch.Tensor | None] = []
        start = 0
        for part in self.parts:
            rows = part.shape[0]
            biases.append(None if self.bias is None else self.bias[start : start + rows].contiguous())
            start += rows
        return biases

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        source = x if x.dtype == torch.float32 else x.float()
        if source.shape[0] < GEMM_FROM_ROWS:
            pieces = [kernel(source) for kernel in self.row_kernels]
        else:
            pieces = [
                quantized_gemm(source, part.blocks, part.ggml_type, bias)
                for part, bias in zip(self.parts, self.part_biases(), strict=True)
            ]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out if x.dtype == torch.float32 else out.to(x.dtype)
