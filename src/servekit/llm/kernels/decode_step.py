"""Python face of the one-call decode steps (``decode_step.c``: one sequence, or a batch with the
projections as GEMMs): the C structs they read, and the calls.

The structs are filled once, when a model is loaded (``servekit.llm.models.native_decode``): weight
pointers, block types, shapes, the KV cache's layer views and the shared scratch buffers. A step
then passes only the tokens, their positions, their block tables and the rotary rows.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from servekit.llm.kernels import load_library
from servekit.llm.kernels.quantized import QuantizedTensor

MAX_PARTS = 4  # decode_step.c's MAX_PARTS: the parts of one fused projection


class Matrix(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("row_bytes", ctypes.c_int64),
        ("type", ctypes.c_int64),
    ]


class Projection(ctypes.Structure):
    _fields_ = [("part", Matrix * MAX_PARTS), ("parts", ctypes.c_int64), ("rows", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
        ("qkv", Projection),
        ("o", Projection),
        ("gate_up", Projection),
        ("down", Projection),
        ("cache", ctypes.c_void_p),
        ("window", ctypes.c_int64),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        *[
            (name, ctypes.c_int64)
            for name in (
                "layers",
                "hidden",
                "heads",
                "kv_heads",
                "head_dim",
                "inter",
                "vocab",
                "rotary_dim",
                "block_size",
                "cache_dtype",
            )
        ],
        ("eps", ctypes.c_double),
        ("scale", ctypes.c_double),
        ("embed", ctypes.c_void_p),
        ("embed_type", ctypes.c_int64),
        ("embed_row_bytes", ctypes.c_int64),
        ("final_norm", ctypes.c_void_p),
        ("lm_head", Projection),
        ("layer", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in ("residual", "qkv", "attn", "delta", "gate_up")],
        ("q8", ctypes.c_int64),  # 1: 8-bit activations for the 32-weight block types (quantization=int8)
    ]


def projection(parts: list[QuantizedTensor], biases: list[torch.Tensor | None]) -> Projection:
    """The struct of a projection whose output rows are ``parts``' one after the other (each with its
    float32 bias or None); the tensors must outlive it (the caller keeps them)."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"a projection of {len(parts)} parts (1..{MAX_PARTS} supported)")
    value = Projection()
    for i, (part, bias) in enumerate(zip(parts, biases, strict=True)):
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (part.shape[0],)):
            raise ValueError("a bias must be float32 [rows]")
        value.part[i] = Matrix(
            part.blocks.data_ptr(),
            None if bias is None else bias.data_ptr(),
            part.shape[0],
            part.blocks.shape[1],
            part.ggml_type,
        )
    value.parts = len(parts)
    value.rows = sum(part.shape[0] for part in parts)
    return value


@dataclass
class DecodeStepKernel:
    """A filled ``Model`` struct with everything its pointers point into kept alive."""

    model: Model
    layers: ctypes.Array[Layer]
    keep: list[object]

    def __call__(
        self,
        token: int,
        position: int,
        block_table: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        num_threads: int,
    ) -> torch.Tensor:
        """Float32 logits ``[1, vocab]`` of one decode step; ``block_table``: contiguous int32, the
        sequence's blocks; ``cos``/``sin``: contiguous float32 ``[rotary_dim]`` of ``position``."""
        library = _library()
        logits = torch.empty((1, self.model.vocab), dtype=torch.float32)
        status = library.decode_step(
            ctypes.byref(self.model),
            token,
            position,
            block_table.data_ptr(),
            block_table.shape[0],
            None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(),
            logits.data_ptr(),
            num_threads,
        )
        _check("decode_step", status, f"token {token} at position {position}")
        return logits

    def batch(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        cos_table: torch.Tensor | None,
        sin_table: torch.Tensor | None,
        num_threads: int,
    ) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` of one decode step of B sequences, the projections as GEMMs:
        ``tokens``/``positions`` contiguous int64 ``[B]``; ``block_tables`` contiguous int32 ``[B,
        max_blocks]``; ``cos_table``/``sin_table`` contiguous float32 ``[positions, rotary_dim]``
        holding every position of the batch."""
        library = _library()
        batch, max_blocks = block_tables.shape
        if tokens.shape != (batch,) or positions.shape != (batch,):
            raise ValueError("tokens, positions and block tables of different batch sizes")
        if cos_table is not None and int(positions.max()) >= cos_table.shape[0]:
            raise ValueError("a position past the rotary tables")
        logits = torch.empty((batch, self.model.vocab), dtype=torch.float32)
        status = library.decode_step_batch(
            ctypes.byref(self.model),
            tokens.data_ptr(),
            positions.data_ptr(),
            block_tables.data_ptr(),
            max_blocks,
            None if cos_table is None else cos_table.data_ptr(),
            None if sin_table is None else sin_table.data_ptr(),
            logits.data_ptr(),
            batch,
            num_threads,
        )
        _check("decode_step_batch", status, f"its batch of {batch}")
        return logits


def _library() -> ctypes.CDLL:
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    return library


def _check(function: str, status: int, what: str) -> None:
    """A step's status: -1 out of memory, any other non-zero an argument it refused."""
    if status == -1:
        raise MemoryError(f"{function} could not allocate its scratch memory")
    if status != 0:
        raise ValueError(f"{function} refused {what} (status {status})")


def phases_check(threads: int, rounds: int) -> int:
    """Stale values seen past ``decode_step.c``'s phase waits over ``rounds`` phases (0: they hold)."""
    return int(_library().decode_phases_check(threads, rounds))
