"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every token against every expert; each token goes to its ``top_k`` experts, weighted
by their softmax probabilities (renormalised over the chosen ones when the family does). Tokens are
then grouped by expert, so each active expert runs one matmul pair over all its tokens of the step
(never a loop over tokens), and the weighted results are scattered back with ``index_add_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servekit.llm.model_config import MoEConfig
from servekit.llm.models.layers import DenseMLP, Projection


@dataclass
class SparseMoE:
    router: Projection  # hidden -> num_experts
    experts: list[DenseMLP]
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        flat = chosen.view(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of = order // self.top_k
        weight_of = weights.view(-1)[order].to(x.dtype).unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                rows = token_of[start : start + count]
                out.index_add_(0, rows, expert(x.index_select(0, rows)) * weight_of[start : start + count])
                start += count
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(x))
            out += shared
        return out
