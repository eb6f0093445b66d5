"""Python face of the C elementwise kernels (``elementwise.c``), with PyTorch fallbacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servekit.llm.kernels import DTYPE_CODES, load_library


def add_norm(
    hidden: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
    fused: bool,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hidden += delta + extra`` (in place, each when given; the two summed first), then RMSNorm
    (``rms``: ``bias`` must be None) or LayerNorm of ``hidden`` over its last axis, times ``weight``
    (plus ``bias``).

    ``hidden``/``delta``/``extra``: ``[rows, cols]``, ``hidden`` contiguous, ``weight``/``bias``:
    ``[cols]``, all one dtype. ``extra`` only with ``delta``.
    """
    assert extra is None or delta is not None
    if not fused:
        if delta is not None:
            hidden.add_(delta if extra is None else delta + extra)
        if rms:
            return F.rms_norm(hidden, (hidden.shape[-1],), weight, eps)
        return F.layer_norm(hidden, (hidden.shape[-1],), weight, bias, eps)
    library = load_library()
    assert library is not None and hidden.is_contiguous() and not (rms and bias is not None)
    rows, cols = hidden.shape
    delta, extra = (None if t is None else t.contiguous() for t in (delta, extra))
    out = torch.empty_like(hidden)
    library.add_norm(
        hidden.data_ptr(),
        None if delta is None else delta.data_ptr(),
        None if extra is None else extra.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        cols,
        eps,
        int(rms),
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
