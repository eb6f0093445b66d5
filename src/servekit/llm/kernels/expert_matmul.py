"""Python face of the mixture-of-experts grouped matmul (``expert_matmul.c``): expert weights packed
once into column panels, then each group of rows multiplied by its expert's weights in one call."""

from __future__ import annotations

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
        library = load_library()
        if library is None:
            raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
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


def expert_matmul(
    x: torch.Tensor,
    ends: torch.Tensor,
    experts: torch.Tensor,
    weights: PackedExperts,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``out[r] = x[r] @ W[experts[g]]`` for the rows ``r`` of group ``g`` (rows ``ends[g-1]`` to
    ``ends[g]``); ``x``: float32 ``[rows, in]``, ``ends``/``experts``: int32 ``[groups]``."""
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != weights.in_features:
        raise ValueError(f"x must be float32 [rows, {weights.in_features}], got {x.dtype} {tuple(x.shape)}")
    if ends.dtype != torch.int32 or experts.dtype != torch.int32 or ends.shape != experts.shape:
        raise ValueError("ends and experts must be int32 tensors of one length")
    if ends.numel() and int(ends[-1]) != x.shape[0]:
        raise ValueError(f"the last group must end at row {x.shape[0]}, not {int(ends[-1])}")
    x, ends, experts = x.contiguous(), ends.contiguous(), experts.contiguous()
    out = torch.empty((x.shape[0], weights.out_features), dtype=torch.float32)
    status = library.expert_matmul(
        x.data_ptr(),
        weights.in_features,
        ends.data_ptr(),
        experts.data_ptr(),
        ends.numel(),
        weights.num_experts,
        weights.panels.data_ptr(),
        weights.out_features,
        out.data_ptr(),
        num_threads or torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("expert_matmul: ends must be non-decreasing and experts in range")
    return out
