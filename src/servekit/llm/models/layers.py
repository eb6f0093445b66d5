"""Layers the decoder families share: norms, activations, dense MLPs (gated or plain)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.elementwise import add_norm, gelu_tanh, silu_mul
from servekit.llm.kernels.quantized import GGML_F32, KERNEL_TYPES, QuantizedTensor, quantized_silu_mlp
from servekit.llm.models.linear import Int8Linear, Linear
from servekit.llm.models.quantized_linear import QuantizedLinear

Projection = Linear | Int8Linear | QuantizedLinear


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None, *, quantization: str | None, pack: bool
) -> Projection:
    """The projection for ``weight``: int8 when asked (and supported); else, for a float32 weight on
    a CPU with the C kernels (``pack``, input width in whole vectors of 32), the kernels reading the
    weight in place (``QuantizedLinear`` over ``GGML_F32`` rows: the row kernel for decode's few rows,
    the GEMM from ``GEMM_FROM_ROWS``); else ``Linear`` (pre-packed for oneDNN when ``pack``).

    Inside the engine's steps the kernels beat oneDNN's packed weights at these models' shapes, though
    oneDNN wins some shapes in a tight loop of one call (RESULTS.md, "Twelfth session"), and they keep
    one copy of the weight. ``quantization`` is already resolved (``EngineConfig`` validates it).
    """
    if quantization is None:
        if (
            pack
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.dim() == 2
            and weight.shape[1] % KERNEL_TYPES[GGML_F32][0] == 0
            and kernels_available(torch.float32)
        ):
            return QuantizedLinear([QuantizedTensor.of_float32(weight)], bias)
        return Linear(weight, bias, pack=pack)
    if quantization != "int8":
        raise ValueError(f"unknown quantization {quantization!r} (a model takes None or 'int8')")
    if not hasattr(torch, "_int_mm"):
        raise ValueError("int8 quantization needs torch._int_mm, which this PyTorch build lacks")
    return Int8Linear(weight, bias)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(x, fused=False)


# HF ``hidden_act`` names -> the function (gelu_new / gelu_pytorch_tanh / gelu_fast are one tanh form).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r} (supported: {', '.join(ACTIVATIONS)})") from None


@dataclass
class Norm:
    """RMSNorm (``bias is None`` and ``rms``) or LayerNorm over the last axis."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    rms: bool
    fused: bool = False  # the C kernel may run (one pass, no OpenMP region at decode sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_fused(x):
            return self.add(x.view(-1, x.shape[-1]), None).view(x.shape)
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def add(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``hidden += delta + extra`` in place (each when given), then the norm of ``hidden`` (2-D)."""
        return add_norm(
            hidden,
            delta,
            self.weight,
            self.bias,
            self.eps,
            rms=self.rms,
            fused=self._runs_fused(hidden),
            extra=extra,
        )

    def _runs_fused(self, x: torch.Tensor) -> bool:
        return self.fused and x.device.type == "cpu" and x.is_contiguous() and x.dtype == self.weight.dtype


@dataclass
class DenseMLP:
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one projection, or ``down(act(up(x)))``."""

    up: Projection | None  # [gate | up] rows when gated; None: the block projects them with q/k/v
    down: Projection
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    fused: bool = False  # the C elementwise kernels (SiLU-and-multiply, tanh GELU) may run

    def __post_init__(self) -> None:
        # Both projections on GGUF blocks, unbiased: decode-sized batches run the whole MLP in one call.
        self.blocks: tuple[QuantizedTensor, QuantizedTensor] | None = None
        self.blocks_below = 0  # rows of x below which the one call runs
        up, down = self.up, self.down
        if (
            self.fused
            and self.gated
            and self.act is F.silu
            and isinstance(up, QuantizedLinear)
            and isinstance(down, QuantizedLinear)
            and up.on_gguf_blocks()
            and down.on_gguf_blocks()
            and len(up.parts) == 1
            and len(down.parts) == 1
            and up.bias is None
            and down.bias is None
        ):
            self.blocks = (up.parts[0], down.parts[0])
            # (from the rows where either projection leaves its exact row kernel, they run one by one)
            self.blocks_below = min(up.exact_rows_below(), down.exact_rows_below())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.blocks is not None
            and x.shape[0] < self.blocks_below
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        ):
            return quantized_silu_mlp(x, *self.blocks)
        assert self.up is not None, "the block projects the MLP's input: call finish"
        return self.finish(self.up(x))

    def finish(self, up: torch.Tensor) -> torch.Tensor:
        """The MLP after its input projection (``up``: ``[rows, width]``, the gate half first when gated)."""
        fused = self.fused and up.device.type == "cpu"
        if not self.gated:
            return self.down(gelu_tanh(up, fused=True) if fused and self.act is _gelu_tanh else self.act(up))
        if self.act is F.silu:
            return self.down(silu_mul(up, fused=fused))
        width = up.shape[1] // 2
        return self.down(self.act(up[:, :width]).mul_(up[:, width:]))
