"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every token against every expert; each token goes to its ``top_k`` experts, weighted
by their softmax probabilities (renormalised over the chosen ones when the family does). Tokens are
then grouped by expert (never a loop over tokens) and the weighted results scattered back with
``index_add_``.

Float experts are held stacked (``StackedExperts``: one ``[experts, hidden, width]`` tensor per
projection). Float32 experts on a CPU where the C kernels build are packed once into column panels
for the C grouped matmul (``kernels.expert_matmul``): a counting sort of the tokens by expert, then
one call per projection that gathers each expert's rows itself (and applies SwiGLU's
SiLU-and-multiply) or writes the weighted results in slot order, summed over the ``top_k`` slots; at a decode step's few rows per expert it runs about
twice as fast as a loop of per-expert GEMMs, which stall packing weights and waiting on memory.
Otherwise, on CPUs where PyTorch has a grouped matmul (``F.grouped_mm``), the tokens sorted by
expert go through it: one operator per projection, no padding. Elsewhere, when every expert gets a
few tokens (a decode step of a batch), the groups are padded to the largest one and all experts run
in one batched matmul per projection; when the groups are uneven or large (prefill), each active
expert runs its own matmul pair over its tokens. A single token (a decode step of one sequence)
skips the grouping and runs its ``top_k`` experts straight off the stacked weights. Quantised
experts stay one ``DenseMLP`` each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servekit.llm.kernels import load_library
from servekit.llm.kernels.elementwise import silu_mul
from servekit.llm.kernels.expert_matmul import PackedExperts, expert_matmul, expert_order, gated_fits
from servekit.llm.model_config import MoEConfig
from servekit.llm.models.layers import DenseMLP, Projection
from servekit.llm.models.linear import Linear

# Batched over all experts only while padding the groups at most doubles the rows computed.
MAX_PADDING = 2.0


@dataclass
class StackedExperts:
    """Every expert's ``down(act(gate(x)) * up(x))`` (or ``down(act(up(x)))``), weights stacked:
    plain ``[experts, in, out]`` tensors, or packed once for the C grouped matmul (``panels``, CPU
    float32 where the kernels build), never both."""

    up: torch.Tensor | None  # [experts, hidden, width]: [gate | up] columns when gated
    down: torch.Tensor | None  # [experts, intermediate, hidden]
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    fused: bool = False  # the C SiLU-and-multiply kernel may run
    panels: tuple[PackedExperts, PackedExperts] | None = None  # (up, down) for expert_matmul

    def __post_init__(self) -> None:
        self.expert_ids = torch.arange(len(self), dtype=torch.int32)  # each expert its own group

    @classmethod
    def of(cls, experts: list[DenseMLP], *, pack: bool = True) -> StackedExperts | None:
        """The experts stacked, or None when they cannot be (quantised, biased, or not float).
        ``pack``: packed for the C grouped matmul when it can run here."""
        weights = [(_plain(e.up), _plain(e.down)) for e in experts]
        ups = [up for up, _ in weights if up is not None]
        downs = [down for _, down in weights if down is not None]
        if not experts or len(ups) != len(experts) or len(downs) != len(experts):
            return None
        up = torch.stack([w.t() for w in ups]).contiguous()
        down = torch.stack([w.t() for w in downs]).contiguous()
        first = experts[0]
        fused = first.fused and up.device.type == "cpu"
        if pack and up.dtype == torch.float32 and up.device.type == "cpu" and load_library() is not None:
            panels = (PackedExperts.of(up), PackedExperts.of(down))
            return cls(None, None, first.act, first.gated, fused, panels)
        return cls(up, down, first.act, first.gated, fused)

    def __len__(self) -> int:
        return self.panels[0].num_experts if self.panels is not None else self._plain()[0].shape[0]

    def _plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.up is not None and self.down is not None, "the experts are packed"
        return self.up, self.down

    def _activate(self, up: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.act(up)
        width = up.shape[-1] // 2
        if self.act is F.silu and self.fused:
            return silu_mul(up.reshape(-1, 2 * width), fused=True).view(*up.shape[:-1], width)
        return self.act(up[..., :width]).mul_(up[..., width:])

    def one(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        up, down = self._plain()
        return self._activate(x @ up[expert]) @ down[expert]

    def grouped_runs(self, x: torch.Tensor) -> bool:
        """Whether ``grouped`` runs here: PyTorch's grouped matmul (no padding, one operator per
        projection) on CPU float tensors where it exists (older CPU builds also want 16-byte aligned
        operands)."""
        if self.panels is not None:
            return False
        up, down = self._plain()
        return (
            hasattr(F, "grouped_mm")
            and x.device.type == "cpu"
            and x.dtype == up.dtype
            and up.data_ptr() % 16 == 0
            and down.data_ptr() % 16 == 0
        )

    def grouped(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """``x``: every expert's rows one after the other, expert ``e``'s ending at ``ends[e]`` (int32)."""
        up, down = self._plain()
        return F.grouped_mm(self._activate(F.grouped_mm(x, up, offs=ends)), down, offs=ends)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Packed experts: every token's ``top_k`` results, weighted and summed, in two calls of the
        C grouped matmul (rows gathered by token, results written weighted in slot order)."""
        assert self.panels is not None
        up, down = self.panels
        order, tokens, ends = expert_order(chosen, len(self))
        experts = self.expert_ids
        if self.gated and self.act is F.silu and gated_fits(up):  # SiLU-and-multiply in the kernel
            hidden = expert_matmul(x, ends, experts, up, x_rows=tokens, gated=True)
        else:
            hidden = self._activate(expert_matmul(x, ends, experts, up, x_rows=tokens))
        slots = expert_matmul(hidden, ends, experts, down, out_rows=order, scale=weights.reshape(-1).float())
        return slots.view(*chosen.shape, -1).sum(dim=1)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[experts, rows, hidden]`` (each expert's rows, zero-padded) -> ``[experts, rows, hidden]``."""
        up, down = self._plain()
        return torch.bmm(self._activate(torch.bmm(x, up)), down)


def _plain(projection: Projection | None) -> torch.Tensor | None:
    """The projection's float weight, if it has one and no bias."""
    if not isinstance(projection, Linear) or projection.bias is not None:
        return None
    weight = projection.weight
    return weight if weight is not None and weight.is_floating_point() else None


@dataclass
class SparseMoE:
    router: Projection  # hidden -> num_experts
    experts: StackedExperts | list[DenseMLP]
    config: MoEConfig
    shared: DenseMLP | None = None
    shared_gate: Projection | None = None  # hidden -> 1
    score_bias: torch.Tensor | None = None  # [num_experts], float32

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's ``top_k`` experts and their weights (float32), the family's way."""
        config = self.config
        logits = self.router(x).float()
        if self._top_k_softmax():
            # softmax over all experts renormalised over the chosen ones is softmax over their logits.
            top, chosen = logits.topk(config.top_k, dim=-1)
            return torch.softmax(top, dim=-1), chosen
        scores = torch.sigmoid(logits) if config.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores if self.score_bias is None else scores + self.score_bias
        if config.num_groups > 1:
            grouped = choice.view(choice.shape[0], config.num_groups, -1)
            if config.group_score == "top2":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            best = group_scores.topk(config.top_groups, dim=-1).indices
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            hidden = torch.tensor(float("-inf") if self.score_bias is not None else 0.0)
            choice = grouped.masked_fill(~eligible.unsqueeze(-1), hidden).view_as(choice)
        chosen = choice.topk(config.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if config.normalize_top_k:
            weights = weights / (
                weights.sum(dim=-1, keepdim=True) + (1e-20 if config.scoring == "sigmoid" else 0.0)
            )
        if config.routed_scaling != 1.0:
            weights = weights * config.routed_scaling
        return weights, chosen

    def _top_k_softmax(self) -> bool:
        config = self.config
        return (
            config.scoring == "softmax"
            and config.normalize_top_k
            and config.num_groups == 1
            and self.score_bias is None
            and config.routed_scaling == 1.0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        if isinstance(self.experts, StackedExperts) and self.experts.panels is not None:
            out = self.experts.routed(x, weights, chosen)
        elif x.shape[0] == 1 and isinstance(self.experts, StackedExperts):
            out = self._single_token(x, weights, chosen)
        else:
            out = self._grouped(x, weights, chosen)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(x))
            out += shared
        return out

    def _single_token(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """One token: its experts' results, weighted, summed; no sorting, gathering or scattering."""
        assert isinstance(self.experts, StackedExperts)
        out: torch.Tensor | None = None
        for expert, weight in zip(chosen[0].tolist(), weights[0].tolist(), strict=True):
            result = self.experts.one(expert, x)
            out = result.mul_(weight) if out is None else out.add_(result, alpha=weight)
        assert out is not None
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert: one batched matmul over padded groups, or one per active expert."""
        flat = chosen.view(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts))
        token_of = order // self.top_k
        weight_of = weights.view(-1)[order].to(x.dtype).unsqueeze(1)
        out = torch.zeros_like(x)
        if isinstance(self.experts, StackedExperts) and self.experts.grouped_runs(x):
            results = self.experts.grouped(x.index_select(0, token_of), counts.cumsum(0, dtype=torch.int32))
            return out.index_add_(0, token_of, results * weight_of)
        widest = int(counts.max())
        if isinstance(self.experts, StackedExperts) and len(self.experts) * widest <= MAX_PADDING * len(flat):
            expert_of = flat[order]
            row_of = torch.arange(len(flat)) - (counts.cumsum(0) - counts)[expert_of]
            grouped = x.new_zeros(len(self.experts), widest, x.shape[1])
            grouped[expert_of, row_of] = x.index_select(0, token_of)
            results = self.experts.batched(grouped)[expert_of, row_of]
            out.index_add_(0, token_of, results * weight_of)
        else:
            start = 0
            for expert, count in enumerate(counts.tolist()):
                if count:
                    rows = token_of[start : start + count]
                    results = self._expert(expert, x.index_select(0, rows))
                    out.index_add_(0, rows, results * weight_of[start : start + count])
                    start += count
        return out

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.experts, StackedExperts):
            return self.experts.one(expert, x)
        return self.experts[expert](x)
