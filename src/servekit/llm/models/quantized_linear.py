"""Projections and embeddings computed straight on GGUF's quantised weight blocks.

A ``QuantizedTensor`` (``servekit.llm.kernels.quantized``) is a 2-D weight as the GGUF file stores
it: for each output row, its blocks' bytes (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K). ``QuantizedLinear`` multiplies by it with the C kernels
(``servekit.llm.kernels.quantized``), which dequantise the blocks on the fly and compute in float32
with the activations unrounded: the numbers are those of the dequantised float32 weight, up to
summation order, from 4-8x fewer bytes of weights, and no float32 copy of the weight is kept. A float
checkpoint's float32 weights run on the same kernels as ``GGML_F32`` rows, read in place
(``layers.make_linear``).

With ``quantization=int8`` a projection also holds an ``Int8Linear`` of the same weight and runs it
from ``INT8_FROM_ROWS`` rows of x on; below that (batch-1 to batch-4 decode steps, short prompts, where
``Int8Linear`` is no faster than the exact kernels) the blocks are multiplied with 8-bit activations
(``q8_matmul``; the native batch-1 step does the same), faster still; K-quant parts run their exact
kernels there.
"""

from __future__ import annotations

import torch

from servekit.llm.kernels.quantized import BLOCK_TYPES, Q8_TYPES, BoundWeight, QuantizedTensor, q8_matmul
from servekit.llm.models.linear import Int8Linear

# Rows of x from which the GEMM (quantized_gemm.c) beats the row-by-row kernel, SmolLM2's four Q4_1
# projections, 1 thread, CPU time, best of interleaved runs (RESULTS.md, eleventh session). AVX2 (8
# lanes; the AVX2 EPYC): 5 rows 1.10 ms (row kernel) vs 1.28 ms, 6 rows 1.51 vs 1.33, 8 rows 1.41 vs
# 1.33 (its LM head, Q8_0, about even at 6-8 rows: 8.3-8.8 vs 8.7-9.5 ms). AVX-512 (16 lanes; the Zen 5
# EPYC): 5 rows 0.69 vs 0.72 ms, 6 rows 0.96 vs 0.79, 8 rows 0.97 vs 0.77.
GEMM_FROM_ROWS = 6


# Rows of x from which ``Int8Linear`` runs; fewer go to ``q8_matmul`` on the blocks (x rows in groups of
# four against each weight row), which streams the file's 5-bit Q4_1 weights instead of Int8Linear's
# 8-bit ones: at 2-4 rows the step is memory-bound, and there Int8Linear lost to the exact kernels on the
# Zen 5 (thread CPU time, 1 thread, default model: 2 rows 1.03-1.14x, 4 rows 0.95-1.15x of exact) while
# q8_matmul wins (0.62-0.84x); from 5 rows Int8Linear is faster than q8_matmul (RESULTS.md, `acc`).
INT8_FROM_ROWS = 5


class QuantizedLinear:
    """``y = x @ W.T + bias`` in float32 with ``W`` the row-wise concatenation of ``parts`` (fused
    projections such as q/k/v may store their parts in different types: each runs its own kernel).
    ``int8``: also hold the weight requantised for ``Int8Linear``, which runs from ``INT8_FROM_ROWS``
    rows of x."""

    __slots__ = ("bias", "bound", "in_features", "int8", "out_features", "parts")

    def __init__(
        self, parts: list[QuantizedTensor], bias: torch.Tensor | None = None, *, int8: bool = False
    ) -> None:
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
        self.bound = [BoundWeight(part, bias) for part, bias in zip(merged, self.part_biases(), strict=True)]
        self.int8: Int8Linear | None = None
        if int8:
            self.int8 = Int8Linear(torch.cat([part.dequantize() for part in merged]), self.bias)

    def on_gguf_blocks(self) -> bool:
        """Whether every part is GGUF blocks (not ``GGML_F32`` rows): what the fused decode-sized
        paths (one-call MLP, native decode step) are built and tested for."""
        return all(part.ggml_type in BLOCK_TYPES for part in self.parts)

    def exact_rows_below(self) -> int:
        """Rows of x below which the exact row-by-row kernels on the blocks run."""
        return GEMM_FROM_ROWS if self.int8 is None else 0

    def part_biases(self) -> list[torch.Tensor | None]:
        biases: list[torch.Tensor | None] = []
        start = 0
        for part in self.parts:
            rows = part.shape[0]
            biases.append(None if self.bias is None else self.bias[start : start + rows].contiguous())
            start += rows
        return biases

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None and x.shape[0] >= INT8_FROM_ROWS:
            return self.int8(x)
        source = x if x.dtype == torch.float32 else x.float()
        if self.int8 is not None:  # (fewer than INT8_FROM_ROWS rows)
            pieces = [
                q8_matmul(source, part.blocks, part.ggml_type, bias)
                if part.ggml_type in Q8_TYPES
                else bound.rows(source)
                for part, bias, bound in zip(self.parts, self.part_biases(), self.bound, strict=True)
            ]
        elif source.shape[0] < GEMM_FROM_ROWS:
            pieces = [bound.rows(source) for bound in self.bound]
        else:
            pieces = [bound.gemm(source) for bound in self.bound]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out if x.dtype == torch.float32 else out.to(x.dtype)
