"""Python face of the C elementwise kernels (``elementwise.c``), with PyTorch fallbacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servekit.llm.kernels import DTYPE_CODES, load_library


def add_rms_norm(
    hidden: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    fused: bool,
) -> torch.Tensor:
    """``hidden += delta`` (in place, when given), then RMSNorm of ``hidden`` times ``weight``.

    ``hidden``/``delta``: ``[rows, cols]`` contiguous, ``weight``: ``[cols]``, all one dtype.
    """
    if not fused:
        if delta is not None:
            hidden.add_(delta)
        return F.rms_norm(hidden, (hidden.shape[-1],), weight, eps)
    library = load_library()
    assert library is not None and hidden.is_contiguous()
    rows, cols = hidden.shape
    if delta is not None and not delta.is_contiguous():
        delta = delta.contiguous()
    out = torch.empty_like(hidden)
    library.add_rms_norm(
        hidden.data_ptr(),
        None if delta is None else delta.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        cols,
        eps,
        DTYPE_CODES[hidden.dtype],
    )
    return out


def silu_mul(gate_up: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """``silu(gate) * up`` for rows laid out ``[gate | up]``: ``[rows, 2n]`` -> ``[rows, n]``."""
    width = gate_up.shape[1] // 2
    if not fused:
        activated = F.silu(gate_up[:, :width])
        return activated.mul_(gate_up[:, width:])
    library = load_library()
    assert library is not None
    gate_up = gate_up.contiguous()
    out = torch.empty((gate_up.shape[0], width), dtype=gate_up.dtype)
    library.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], width, DTYPE_CODES[gate_up.dtype])
    return out


def gelu_tanh(x: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """GELU in its tanh approximation (``gelu_new``, ``gelu_pytorch_tanh``), one C pass when ``fused``."""
    if not fused:
        return F.gelu(x, approximate="tanh")
    library = load_library()
    assert library is not None
    x = x.contiguous()
    out = torch.empty_like(x)
    library.gelu_tanh(x.data_ptr(), out.data_ptr(), x.numel(), DTYPE_CODES[x.dtype])
    return out
