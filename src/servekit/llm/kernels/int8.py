"""Python face of the C int8 row kernels (``int8_rows.c``)."""

from __future__ import annotations

import torch

from servekit.llm.kernels import DTYPE_CODES, load_library


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[rows, cols]`` -> int8 ``[rows, cols]`` and float32 scales ``[rows, 1]`` (x ~ q * scale)."""
    library = load_library()
    assert library is not None and x.dtype in DTYPE_CODES
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.int8)
    scales = torch.empty((rows, 1), dtype=torch.float32)
    library.quantize_rows_int8(
        x.data_ptr(), DTYPE_CODES[x.dtype], rows, cols, out.data_ptr(), scales.data_ptr()
    )
    return out, scales


def dequantize(
    acc: torch.Tensor,
    row_scales: torch.Tensor,
    col_scales: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``acc * row_scales * col_scales + bias`` as ``dtype`` (acc int32 ``[rows, cols]``; scales and
    bias float32, contiguous)."""
    library = load_library()
    assert library is not None and acc.dtype == torch.int32 and acc.is_contiguous()
    rows, cols = acc.shape
    out = torch.empty((rows, cols), dtype=dtype)
    library.dequantize_int32(
        acc.data_ptr(),
        rows,
        cols,
        row_scales.data_ptr(),
        col_scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[dtype],
    )
    return out
