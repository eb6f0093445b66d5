"""benchmarks/topk_agreement.py: top-1 agreement and tail-bucketed KL of a top-K answer against a full
reference distribution (what bench_int8.py reports for llama.cpp)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from topk_agreement import TopK, agreement, kl_with_tail, restrict


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_the_whole_vocabulary_gives_the_full_kl() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(50, generator=generator, dtype=torch.float64) * 3
    other = reference + torch.randn(50, generator=generator, dtype=torch.float64)
    order = other.argsort(descending=True).tolist()
    top = restrict(other, order)
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    full = float((log_p.exp() * (log_p - log_q)).sum())
    assert full > 0.05
    assert kl_with_tail(reference, top) == pytest.approx(full, rel=1e-9)


def test_a_truncated_answer_lumps_the_rest_into_one_bucket() -> None:
    # p = (.5, .3, .15, .05); q names tokens 1 and 0 with .6 and .25, so q's tail is .15 and p's .2.
    reference = logits_of([0.5, 0.3, 0.15, 0.05])
    top = TopK([1, 0], [math.log(0.6), math.log(0.25)])
    expected = 0.3 * math.log(0.3 / 0.6) + 0.5 * math.log(0.5 / 0.25) + 0.2 * math.log(0.2 / 0.15)
    assert kl_with_tail(reference, top) == pytest.approx(expected, rel=1e-9)
    assert top.mass == pytest.approx(0.85)


def test_bucketing_never_raises_the_kl_and_identical_distributions_give_zero() -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        reference = torch.randn(200, generator=generator, dtype=torch.float64) * 2
        other = reference + 0.5 * torch.randn(200, generator=generator, dtype=torch.float64)
        log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
        full = float((log_p.exp() * (log_p - log_q)).sum())
        top = restrict(other, other.argsort(descending=True)[:20].tolist())
        assert 0.0 <= kl_with_tail(reference, top) <= full + 1e-12
        same = restrict(reference, reference.argsort(descending=True)[:20].tolist())
        assert kl_with_tail(reference, same) == pytest.approx(0.0, abs=1e-12)


def test_a_tail_the_answer_claims_empty_is_penalised() -> None:
    # q's returned mass is all of it while p keeps .4 outside: the tail term dominates, it is not dropped.
    reference = logits_of([0.6, 0.4])
    top = TopK([0], [0.0])
    assert kl_with_tail(reference, top) > 0.4 * math.log(0.4 / 1e-6)


def test_agreement_counts_top1_matches_and_reports_the_smallest_mass() -> None:
    reference = torch.stack(
        [logits_of([0.7, 0.2, 0.1]), logits_of([0.1, 0.3, 0.6]), logits_of([0.2, 0.5, 0.3])]
    )
    tops = [
        TopK([0, 1], [math.log(0.7), math.log(0.2)]),  # agrees, mass .9
        TopK([1, 2], [math.log(0.5), math.log(0.45)]),  # disagrees (reference's top is 2), mass .95
        TopK([1, 2, 0], [math.log(0.5), math.log(0.3), math.log(0.2)]),  # agrees, exact, mass 1
    ]
    found = agreement(reference, tops)
    assert found.positions == 3
    assert found.top1 == pytest.approx(2 / 3)
    assert found.min_mass == pytest.approx(0.9)
    kls = [kl_with_tail(row, top) for row, top in zip(reference, tops, strict=True)]
    assert kls[2] == pytest.approx(0.0, abs=1e-12)
    assert found.kl_max == pytest.approx(max(kls)) and found.kl_max > 0.0
    assert found.kl_mean == pytest.approx(sum(kls) / 3)


def test_malformed_answers_are_refused() -> None:
    reference = logits_of([0.5, 0.5])
    with pytest.raises(ValueError):
        kl_with_tail(reference, TopK([0, 0], [math.log(0.5), math.log(0.5)]))
    with pytest.raises(ValueError):
        agreement(reference.unsqueeze(0), [])
