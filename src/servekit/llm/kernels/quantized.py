"""Python face of the C kernels on GGUF's quantised weight blocks (``quantized_matmul.c``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from servekit.llm.kernels import load_library

# GGML type code -> (weights per block, bytes per block), for the types the kernels compute exactly.
BLOCK_TYPES: dict[int, tuple[int, int]] = {
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    8: (32, 34),  # Q8_0
    12: (256, 144),  # Q4_K
    14: (256, 210),  # Q6_K
}
# Plain float32 rows (GGML's F32), which the kernels read in place, K in whole vectors of 32 values.
GGML_F32 = 0
KERNEL_TYPES: dict[int, tuple[int, int]] = {**BLOCK_TYPES, GGML_F32: (32, 128)}


def quantized_simd_lanes() -> int:
    """The float32 lanes of the quantised matmul's vector path on this CPU (16: AVX-512, 8: AVX2 +
    FMA, 1: the portable loop; 0: no kernels)."""
    library = load_library()
    return 0 if library is None else int(library.quantized_simd_lanes())


def row_bytes(ggml_type: int, in_features: int) -> int:
    """Bytes of one weight row of ``in_features`` values stored as ``ggml_type`` blocks."""
    block_size, block_bytes = KERNEL_TYPES[ggml_type]
    if in_features % block_size:
        raise ValueError(f"{in_features} values are not whole blocks of {block_size}")
    return in_features // block_size * block_bytes


def _check(blocks: torch.Tensor, ggml_type: int, in_features: int) -> None:
    if ggml_type not in KERNEL_TYPES:
        raise ValueError(f"GGML type {ggml_type} has no quantised kernel")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        raise ValueError("blocks must be a contiguous uint8 tensor [rows, bytes per row]")
    if blocks.shape[1] != row_bytes(ggml_type, in_features):
        raise ValueError(f"rows of {blocks.shape[1]} bytes do not hold {in_features} values")


@dataclass(frozen=True)
class MatmulCall:
    """A matmul kernel's checked arguments on ``blocks`` (x, rows, K, blocks, N, bytes per row, type,
    bias or NULL, out, threads) with the tensors they point into, alive as long as the call."""

    arguments: tuple[object, ...]
    out: torch.Tensor
    inputs: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(
        cls,
        x: torch.Tensor,
        blocks: torch.Tensor,
        ggml_type: int,
        bias: torch.Tensor | None,
        num_threads: int | None,
    ) -> MatmulCall:
        if x.dtype != torch.float32 or x.dim() != 2:
            raise ValueError(f"x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
        rows, in_features = x.shape
        _check(blocks, ggml_type, in_features)
        out_features = blocks.shape[0]
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
            raise ValueError("bias must be float32 [out_features]")
        if not x.is_contiguous():
            x = x.contiguous()
        if bias is not None and not bias.is_contiguous():
            bias = bias.contiguous()
        out = torch.empty((rows, out_features), dtype=torch.float32)
        arguments = (
            x.data_ptr(),
            rows,
            in_features,
            blocks.data_ptr(),
            out_features,
            blocks.shape[1],
            ggml_type,
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            num_threads or torch.get_num_threads(),
        )
        return cls(arguments, out, (x, blocks, bias))

    def run(self, kernel: Callable[..., int], *extra: object) -> torch.Tensor:
        """``kernel(*arguments, *extra)``; its output, or the error its status says."""
        _check_status(kernel(*self.arguments, *extra), kernel.__name__)
        return self.out


def _check_status(status: int, name: str) -> None:
    if status == -1:
        raise MemoryError(f"{name} could not allocate its scratch memory")
    if status != 0:
        raise ValueError(f"{name} refused its arguments (status {status})")


class BoundWeight:
    """One weight and its bias bound to the matmul kernels: their checks and pointers made once, so
    a call checks only x (~8 us a call less here: 60 calls a batch-1 step of the default model).
    ``rows(x)`` runs the row kernel (``quantized_matmul``, decode's few rows), ``gemm(x)`` the GEMM
    (``quantized_gemm``, from ``GEMM_FROM_ROWS``); both compute ``x @ W.T + bias`` in float32."""

    __slots__ = ("_fixed", "_keep", "in_features", "out_features")

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        rows, cols = weight.shape
        _check(weight.blocks, weight.ggml_type, cols)
        if bias is not None and (
            bias.dtype != torch.float32 or bias.shape != (rows,) or not bias.is_contiguous()
        ):
            raise ValueError("bias must be contiguous float32 [out_features]")
        self._keep = (weight.blocks, bias)  # alive as long as the pointers below
        bias_pointer = None if bias is None else bias.data_ptr()
        self._fixed = (weight.blocks.data_ptr(), rows, weight.blocks.shape[1], weight.ggml_type, bias_pointer)
        self.in_features, self.out_features = cols, rows

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` by the row kernel; ``x``: float32 ``[rows, in]``."""
        return self._run("quantized_matmul", x)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` by the GEMM; ``x``: float32 ``[rows, in]``."""
        return self._run("quantized_gemm", x)

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        library = load_library()
        if library is None:
            raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be float32 [rows, {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        status = getattr(library, name)(
            x.data_ptr(), x.shape[0], self.in_features, *self._fixed, out.data_ptr(), torch.get_num_threads()
        )
        _check_status(status, name)
        return out


def quantized_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    ggml_type: int,
    bias: torch.Tensor | None = None,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in float32, ``W`` being ``blocks`` (``[out, bytes per row]`` uint8, GGUF's
    blocks of ``ggml_type``) dequantised; ``x``: float32 ``[rows, in]``. The row kernel: made for
    decode's few rows (``quantized_gemm`` is the one for many)."""
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    call = MatmulCall.of(x, blocks, ggml_type, bias, num_threads)
    return call.run(library.quantized_matmul)


# The types q8_matmul takes (q8_rows.c): the 32-weight ones.
Q8_TYPES = (2, 3, 8)


def q8_matmul(
    x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``quantized_matmul`` with 8-bit activations (``q8_rows.c``: each 32-block of an x row as int8
    with one scale, integer dots with the weight codes): not exact, for ``quantization=int8``'s
    batch-1 rows; ``ggml_type`` one of ``Q8_TYPES``."""
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    if ggml_type not in Q8_TYPES:
        raise ValueError(f"GGML type {ggml_type} has no 8-bit-activation kernel")
    return MatmulCall.of(x, blocks, ggml_type, bias, None).run(library.q8_matmul)


def quantized_silu_mlp(
    x: torch.Tensor, gate_up: QuantizedTensor, down: QuantizedTensor, *, num_threads: int | None = None
) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` in float32 with no biases, in one kernel call (one parallel
    region): ``gate_up`` holds the gate rows then the up rows ``[2 * inter, in]``, ``down`` is
    ``[in, inter]``; ``x``: float32 ``[rows, in]``. The decode-sized (row-by-row) schedule."""
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    rows, in_features = x.shape
    inter = gate_up.shape[0] // 2
    if gate_up.shape != (2 * inter, in_features) or down.shape != (in_features, inter):
        raise ValueError(f"gate_up {gate_up.shape} and down {down.shape} do not fit x of {in_features}")
    if not x.is_contiguous():
        x = x.contiguous()
    scratch = torch.empty(rows * 3 * inter, dtype=torch.float32)
    out = torch.empty((rows, in_features), dtype=torch.float32)
    status = library.quantized_silu_mlp(
        x.data_ptr(),
        rows,
        in_features,
        gate_up.blocks.data_ptr(),
        gate_up.blocks.shape[1],
        gate_up.ggml_type,
        inter,
        down.blocks.data_ptr(),
        down.blocks.shape[1],
        down.ggml_type,
        scratch.data_ptr(),
        out.data_ptr(),
        num_threads or torch.get_num_threads(),
    )
    if status == -1:
        raise MemoryError("quantized_silu_mlp could not allocate its scratch memory")
    if status != 0:
        raise ValueError(f"quantized_silu_mlp refused its arguments (status {status})")
    return out


def dequantize_rows(
    blocks: torch.Tensor, ggml_type: int, in_features: int, indices: torch.Tensor
) -> torch.Tensor:
    """Rows ``indices`` of the quantised matrix as float32 ``[*indices.shape, in_features]``."""
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    _check(blocks, ggml_type, in_features)
    flat = indices.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= blocks.shape[0]):
        raise IndexError(f"row index out of range for {blocks.shape[0]} rows")
    out = torch.empty((flat.numel(), in_features), dtype=torch.float32)
    status = library.dequantize_rows(
        blocks.data_ptr(),
        blocks.shape[1],
        ggml_type,
        in_features,
        flat.data_ptr(),
        flat.numel(),
        out.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"dequantize_rows refused its arguments (status {status})")
    return out.reshape(*indices.shape, in_features)


@dataclass(frozen=True)
class QuantizedTensor:
    """``shape`` = (rows, cols) logical float weight, stored as ``blocks``: uint8 ``[rows, bytes per
    row]`` of GGML type ``ggml_type`` (one of ``KERNEL_TYPES``: GGUF's blocks, or ``GGML_F32`` rows)."""

    blocks: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.ggml_type not in KERNEL_TYPES:
            raise ValueError(f"GGML type {self.ggml_type} has no quantised kernel")
        expected = (self.shape[0], row_bytes(self.ggml_type, self.shape[1]))
        if self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != expected:
            raise ValueError(
                f"blocks must be uint8 {expected}, got {self.blocks.dtype} {tuple(self.blocks.shape)}"
            )

    @classmethod
    def of_float32(cls, weight: torch.Tensor) -> QuantizedTensor:
        """A float32 weight ``[rows, cols]`` as ``GGML_F32`` rows: its own memory, viewed as bytes."""
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError(
                f"a float32 [rows, cols] weight is needed, got {weight.dtype} {tuple(weight.shape)}"
            )
        rows, cols = weight.shape
        return cls(weight.contiguous().view(torch.uint8), GGML_F32, (rows, cols))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[rows, cols]``."""
        return self.embedding(torch.arange(self.shape[0]))

    def embedding(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` dequantised (float32 ``[*indices.shape, cols]``): an embedding lookup."""
        return dequantize_rows(self.blocks, self.ggml_type, self.shape[1], indices)

    def permute_rows(self, order: torch.Tensor) -> QuantizedTensor:
        """The rows reordered (``order[i]`` is the source of row ``i``): whole rows of blocks move."""
        return QuantizedTensor(self.blocks[order].contiguous(), self.ggml_type, self.shape)
