"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every token against every expert; each token goes to its ``top_k`` experts, weighted
by their softmax probabilities (renormalised over the chosen ones when the family does). Tokens are
then grouped by expert, so each active expert runs one matmul pair over all its tokens of the step
(never a loop over tokens), and the weighted results are scattered back with ``index_add_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servekit.llm.models.layers import DenseMLP, Projection


@dataclass
class SparseMoE:
    router: Projection  # hidden -> num_experts
    experts: list[DenseMLP]
    top_k: int
    normalize_top_k: bool
    shared: DenseMLP | None = None
    shared_gate: Projection | None = None  # hidden -> 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
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
