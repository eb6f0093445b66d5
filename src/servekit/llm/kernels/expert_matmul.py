"""Python face of the mixture-of-experts grouped matmul (``expert_matmul.c``): expert weights packed
once into column panels, then each group of rows multiplied by its expert's weights in one call."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from servekit.llm.kernels import load_library


@dataclass(frozen=True)
class PackedExperts:
    """Stacked ``[experts, in, out]`` float32 weights as the kernel reads them: ``panels`` is
    ``[experts, ceil(out / NB), in, NB]``, columns past ``out_features`` zero."""

    panels: torch.Tensor
    out_features: int

    @property
    def num_experts(self) -> int:
        return self.panels.shape[0]

    @property
    def in_features(self) -> int:
        return self.panels.shape[2]

    @classmethod
    def of(cls, stacked: torch.Tensor) -> PackedExperts:
        library = _library()
        if stacked.dtype != torch.float32 or stacked.dim() != 3 or stacked.device.type != "cpu":
            raise ValueError(
                f"expected CPU float32 [experts, in, out] weights, got {stacked.dtype} {tuple(stacked.shape)}"
            )
        experts, in_features, out_features = stacked.shape
        columns = int(library.expert_panel_columns())
        panels = -(-out_features // columns)
        padded = stacked.new_zeros(experts, in_features, panels * columns)
        padded[:, :, :out_features] = stacked
        packed = padded.view(experts, in_features, panels, columns).permute(0, 2, 1, 3).contiguous()
        return cls(packed, out_features)

    def unpacked(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s ``[in, out]`` weight (a copy)."""
        panel = self.panels[expert]
        return panel.permute(1, 0, 2).reshape(self.in_features, -1)[:, : self.out_features]


def gated_fits(weights: PackedExperts) -> bool:
    """Whether the gate and up halves of ``weights``' columns fall on whole panels (``gated``)."""
    return weights.out_features % (2 * int(_library().expert_panel_columns())) == 0


def expert_order(chosen: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's chosen experts (int64 ``[tokens, top_k]``) sorted by expert, stably: the slot
    (``token * top_k + j``) of every sorted row, its token, and where each expert's rows end (int32)."""
    library = _library()
    if chosen.dtype != torch.int64 or chosen.dim() != 2:
        raise ValueError(f"chosen must be int64 [tokens, top_k], got {chosen.dtype} {tuple(chosen.shape)}")
    chosen = chosen.contiguous()
    order = torch.empty(chosen.numel(), dtype=torch.int32)
    tokens = torch.empty(chosen.numel(), dtype=torch.int32)
    ends = torch.empty(num_experts, dtype=torch.int32)
    status = library.expert_order(
        chosen.data_ptr(),
        chosen.numel(),
        chosen.shape[1],
        num_experts,
        order.data_ptr(),
        tokens.data_ptr(),
        ends.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"expert ids must be in 0..{num_experts - 1}")
    return order, tokens, ends


def expert_matmul(
    x: torch.Tensor,
    ends: torch.Tensor,
    experts: torch.Tensor,
    weights: PackedExperts,
    *,
    x_rows: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    gated: bool = False,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``out[out_rows[r]] = scale[out_rows[r]] * x[x_rows[r]] @ W[experts[g]]`` for the sorted rows
    ``r`` of group ``g`` (rows ``ends[g-1]`` to ``ends[g]``); without ``x_rows`` / ``out_rows`` row
    ``r`` itself, without ``scale`` 1. ``x``: float32 ``[.., in]``; ``ends``, ``experts``, ``x_rows``,
    ``out_rows``: int32; ``scale``: float32 ``[out rows]``. ``out`` has ``ends[-1]`` rows; ``out_rows``
    must be a permutation of them. ``gated``: ``W``'s columns are ``[gate | up]`` and ``out`` gets
    ``silu(gate) * up`` (half the columns); needs ``gated_fits``."""
    library = _library()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != weights.in_features:
        raise ValueError(f"x must be float32 [rows, {weights.in_features}], got {x.dtype} {tuple(x.shape)}")
    if ends.dtype != torch.int32 or experts.dtype != torch.int32 or ends.shape != experts.shape:
        raise ValueError("ends and experts must be int32 tensors of one length")
    rows = int(ends[-1]) if ends.numel() else 0
    for name, index in (("x_rows", x_rows), ("out_rows", out_rows)):
        if index is not None and (index.dtype != torch.int32 or index.shape != (rows,)):
            raise ValueError(f"{name} must be int32 [{rows}]")
    if x_rows is None and x.shape[0] != rows:
        raise ValueError(f"the last group must end at row {x.shape[0]}, not {rows}")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (rows,)):
        raise ValueError(f"scale must be float32 [{rows}]")
    x, ends, experts = x.contiguous(), ends.contiguous(), experts.contiguous()
    x_rows = None if x_rows is None else x_rows.contiguous()
    out_rows = None if out_rows is None else out_rows.contiguous()
    scale = None if scale is None else scale.contiguous()
    if gated and not gated_fits(weights):
        raise ValueError(
            f"a gated projection needs a multiple of {2 * _library().expert_panel_columns()} columns"
        )
    out = torch.empty(
        (rows, weights.out_features // 2 if gated else weights.out_features), dtype=torch.float32
    )
    status = library.expert_matmul(
        x.data_ptr(),
        x.shape[0],
        weights.in_features,
        None if x_rows is None else x_rows.data_ptr(),
        ends.data_ptr(),
        experts.data_ptr(),
        ends.numel(),
        weights.num_experts,
        weights.panels.data_ptr(),
        weights.out_features,
        out.data_ptr(),
        None if out_rows is None else out_rows.data_ptr(),
        None if scale is None else scale.data_ptr(),
        int(gated),
        num_threads or torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("expert_matmul: ends must be non-decreasing, experts and rows in range")
    return out


def _library() -> ctypes.CDLL:
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    return library
