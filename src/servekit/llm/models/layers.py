"""Layers the decoder families share: norms, activations, dense MLPs (gated or plain)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servekit.llm.kernels.elementwise import gelu_tanh, silu_mul
from servekit.llm.models.linear import Int8Linear, Linear
from servekit.llm.models.quantized_linear import QuantizedLinear

Projection = Linear | Int8Linear | QuantizedLinear


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@dataclass
class DenseMLP:
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one projection, or ``down(act(up(x)))``."""

    up: Projection  # [gate | up] rows when gated
    down: Projection
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    fused: bool = False  # the C elementwise kernels (SiLU-and-multiply, tanh GELU) may run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        fused = self.fused and up.device.type == "cpu"
        if not self.gated:
            return self.down(gelu_tanh(up, fused=True) if fused and self.act is _gelu_tanh else self.act(up))
        if self.act is F.silu:
            return self.down(silu_mul(up, fused=fused))
        width = up.shape[1] // 2
        return self.down(self.act(up[:, :width]).mul_(up[:, width:]))
