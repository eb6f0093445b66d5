"""Python face of the prefill GEMM on GGUF's quantised weight blocks (``quantized_gemm.c``): the
many-rows counterpart of ``quantized.quantized_matmul``, with the same arguments and numbers."""

from __future__ import annotations

import torch

from servekit.llm.kernels import load_library
from servekit.llm.kernels.quantized import MatmulCall


def quantized_gemm_lanes() -> int:
    """The float32 lanes of the GEMM's vectors on this CPU (16: AVX-512, 8: AVX2 + FMA, 4: the
    generic path; 0: no kernels). Its tiles are 2 vectors of x rows."""
    library = load_library()
    return 0 if library is None else int(library.quantized_gemm_lanes())


def quantized_gemm(
    x: torch.Tensor,
    blocks: torch.Tensor,
    ggml_type: int,
    bias: torch.Tensor | None = None,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in float32, ``W`` being ``blocks`` (``[out, bytes per row]`` uint8, GGUF's
    blocks of ``ggml_type``) dequantised; ``x``: float32 ``[rows, in]``. Faster than
    ``quantized_matmul`` from a dozen rows up (prefill, large decode batches)."""
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    return MatmulCall.of(x, blocks, ggml_type, bias, num_threads).run(library.quantized_gemm)
