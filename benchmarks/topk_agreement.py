"""Comparing next-token distributions when one side is known only by its most probable tokens.

llama-server returns the top ``K`` tokens' log-probabilities of each next-token distribution, not the
whole vocabulary. Against a full reference distribution ``p`` (servekit's exact path) such a top-``K``
``q`` is compared on ``K + 1`` outcomes: each of its ``K`` tokens, and one *tail* bucket holding every
other token (``p``'s tail mass: the sum of ``p`` over the other tokens; ``q``'s: one minus its returned
mass). The KL over these buckets is never above the KL over the full vocabulary (merging outcomes only
loses information: the log-sum inequality), and equal when ``K`` is the whole vocabulary; with a
returned mass of at least 0.999 the tail holds at most 0.1% of ``q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TAIL_FLOOR = 1e-12  # q's tail when its returned mass rounds to 1 (float32 log-probabilities)


@dataclass(frozen=True)
class TopK:
    """The most probable tokens of a next-token distribution, most probable first, and their
    natural-log probabilities."""

    ids: list[int]
    logprobs: list[float]

    @property
    def mass(self) -> float:
        return math.fsum(math.exp(lp) for lp in self.logprobs)

    @property
    def top1(self) -> int:
        return self.ids[0]


def restrict(logits: torch.Tensor, ids: Sequence[int]) -> TopK:
    """The distribution ``softmax(logits)`` seen through the tokens ``ids`` only (as a top-K answer
    naming those tokens would show it): lets a full distribution be compared on the same buckets."""
    logprobs = logits.double().log_softmax(-1)[list(ids)]
    return TopK(list(ids), logprobs.tolist())


def kl_with_tail(reference_logits: torch.Tensor, top: TopK) -> float:
    """KL(p || q) in nats over ``top``'s tokens plus one tail bucket, ``p = softmax(reference_logits)``
    (one row, the whole vocabulary) and ``q`` the distribution ``top`` was taken from."""
    log_p = reference_logits.double().log_softmax(-1)
    ids = torch.tensor(top.ids, dtype=torch.long)
    if ids.unique().numel() != ids.numel():
        raise ValueError("a top-K answer names a token twice")
    log_p_top = log_p[ids]
    log_q_top = torch.tensor(top.logprobs, dtype=torch.float64)
    kl = float((log_p_top.exp() * (log_p_top - log_q_top)).sum())
    outside = torch.ones_like(log_p, dtype=torch.bool)
    outside[ids] = False
    p_tail = float(log_p[outside].exp().sum())
    if p_tail > 0.0:
        q_tail = max(1.0 - top.mass, TAIL_FLOOR)
        kl += p_tail * (math.log(p_tail) - math.log(q_tail))
    return kl


@dataclass(frozen=True)
class Agreement:
    """How a top-K side agrees with a full reference over a sequence of positions."""

    positions: int
    top1: float  # fraction of positions where both sides' most probable token is the same
    kl_mean: float  # nats, tail-bucketed (see the module docstring)
    kl_max: float
    min_mass: float  # the smallest returned mass of the top-K side


def agreement(reference_logits: torch.Tensor, tops: Sequence[TopK]) -> Agreement:
    """``reference_logits`` ``[positions, vocab]`` against one top-K answer per position."""
    if reference_logits.shape[0] != len(tops) or not tops:
        raise ValueError(f"{reference_logits.shape[0]} reference rows for {len(tops)} top-K answers")
    argmax = reference_logits.argmax(-1).tolist()
    kls = [kl_with_tail(row, top) for row, top in zip(reference_logits, tops, strict=True)]
    same = sum(int(a == top.top1) for a, top in zip(argmax, tops, strict=True))
    return Agreement(
        positions=len(tops),
        top1=same / len(tops),
        kl_mean=math.fsum(kls) / len(kls),
        kl_max=max(kls),
        min_mass=min(top.mass for top in tops),
    )
