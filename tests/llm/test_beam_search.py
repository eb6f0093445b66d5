"""Beam search against exhaustive search and a plain-Python reference on synthetic next-token tables."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from servekit.llm.beam_search import BeamHypothesis, beam_score, beam_search
from servekit.llm.sampling_params import SamplingParams

torch.set_num_threads(1)

EOS = 0
VOCAB = 4
PROMPT = [2, 3]


def table(salt: int) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """A fixed random next-token distribution for every token sequence."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logprobs(sequence: tuple[int, ...]) -> torch.Tensor:
        if sequence not in cache:
            generator = torch.Generator().manual_seed(hash((salt, *sequence)) & 0x7FFFFFFF)
            cache[sequence] = torch.log_softmax(2.0 * torch.randn(VOCAB, generator=generator), dim=-1)
        return cache[sequence]

    return logprobs


NextLogprobs = Callable[[tuple[int, ...]], torch.Tensor]


def stepper(
    next_logprobs: NextLogprobs, calls: list[int] | None = None
) -> Callable[[list[list[int]]], torch.Tensor]:
    def step(sequences: list[list[int]]) -> torch.Tensor:
        if calls is not None:
            calls.append(len(sequences))
        return torch.stack([next_logprobs(tuple(s)) for s in sequences])

    return step


def exhaustive(
    next_logprobs: NextLogprobs, params: SamplingParams, max_tokens: int
) -> list[tuple[list[int], float]]:
    """Every finished sequence (eos or length), scored; the n best."""
    results: list[tuple[list[int], float, float]] = []
    for length in range(1, max_tokens + 1):
        for generated in itertools.product(range(VOCAB), repeat=length):
            if EOS in generated[:-1]:
                continue
            ends_on_eos = generated[-1] == EOS
            if ends_on_eos and length <= params.min_tokens:
                continue
            if not ends_on_eos and length < max_tokens:
                continue
            cumulative = sum(
                float(next_logprobs(tuple(PROMPT) + generated[:i])[generated[i]]) for i in range(length)
            )
            scored_len = len(PROMPT) + length - (1 if ends_on_eos else 0)
            results.append(
                (list(generated), cumulative, beam_score(cumulative, scored_len, params.length_penalty))
            )
    results.sort(key=lambda r: r[2], reverse=True)
    return [(tokens, score) for tokens, _, score in results[: params.n]]


def reference_beam_search(
    next_logprobs: NextLogprobs, params: SamplingParams, max_tokens: int
) -> list[tuple[list[int], float]]:
    """HF's beam search rules, one candidate at a time in plain Python."""
    width = params.num_candidates
    live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    finished: list[tuple[tuple[int, ...], float]] = []  # (tokens, score)

    def score(tokens: tuple[int, ...], cumulative: float, on_eos: bool) -> float:
        return beam_score(cumulative, len(PROMPT) + len(tokens) - (1 if on_eos else 0), params.length_penalty)

    for generated in range(max_tokens):
        candidates = []
        for tokens, cumulative in live:
            row = next_logprobs(tuple(PROMPT) + tokens).tolist()
            for token_id, value in enumerate(row):
                if token_id == EOS and generated < params.min_tokens:
                    continue
                candidates.append((cumulative + value, (*tokens, token_id)))
        candidates.sort(key=lambda c: c[0], reverse=True)
        next_live = []
        for rank, (cumulative, tokens) in enumerate(candidates[: 2 * width]):
            if tokens[-1] == EOS:
                if rank < width:
                    finished.append((tokens, score(tokens, cumulative, True)))
            else:
                next_live.append((tokens, cumulative))
                if len(next_live) == width:
                    break
        live = next_live
        if not live:
            break
        if len(finished) >= width:
            worst = sorted((s for _, s in finished), reverse=True)[width - 1]
            best = max(c for _, c in live)
            if params.early_stopping or worst >= score(live[0][0], best, False):
                live = []
                break
    finished.extend((tokens, score(tokens, cumulative, False)) for tokens, cumulative in live)
    finished.sort(key=lambda f: f[1], reverse=True)
    return [(list(tokens), s) for tokens, s in finished[: params.n]]


def as_pairs(hypotheses: list[BeamHypothesis]) -> list[tuple[list[int], float]]:
    return [(h.token_ids, h.score) for h in hypotheses]


def assert_same(ours: list[tuple[list[int], float]], expected: list[tuple[list[int], float]]) -> None:
    assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in expected]
    assert [score for _, score in ours] == pytest.approx([score for _, score in expected], abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("salt", [0, 1, 2])
def test_a_beam_wide_enough_is_exhaustive_search(length_penalty: float, salt: int) -> None:
    max_tokens = 4
    params = SamplingParams(
        n=5, best_of=VOCAB**max_tokens, use_beam_search=True, length_penalty=length_penalty
    )
    next_logprobs = table(salt)
    ours = beam_search(stepper(next_logprobs), PROMPT, params, [EOS], max_tokens)
    assert_same(as_pairs(ours), exhaustive(next_logprobs, params, max_tokens))


@pytest.mark.parametrize("salt", range(8))
@pytest.mark.parametrize(
    "settings",
    [
        {"n": 1, "best_of": 2},
        {"n": 2, "best_of": 3, "length_penalty": 0.5},
        {"n": 3, "length_penalty": 2.0, "early_stopping": True},
        {"n": 2, "best_of": 2, "min_tokens": 2},
        {"n": 2, "best_of": 4, "length_penalty": 0.0, "early_stopping": True},
    ],
)
def test_matches_the_reference_beam_search(salt: int, settings: dict[str, Any]) -> None:
    params = SamplingParams(use_beam_search=True, **settings)
    next_logprobs = table(100 + salt)
    ours = beam_search(stepper(next_logprobs), PROMPT, params, [EOS], 6)
    assert_same(as_pairs(ours), reference_beam_search(next_logprobs, params, 6))


def test_finds_what_greedy_misses() -> None:
    # greedy takes 1 (p=0.6) and then faces a flat distribution; 2 (p=0.4) leads to a certain eos
    flat = torch.full((VOCAB,), 0.25).log()
    rows = {
        (5,): torch.tensor([1e-9, 0.6, 0.4, 1e-9]).log(),
        (5, 2): torch.tensor([1.0 - 3e-9, 1e-9, 1e-9, 1e-9]).log(),
    }

    def next_logprobs(sequence: tuple[int, ...]) -> torch.Tensor:
        return rows.get(sequence, flat)

    params = SamplingParams(n=1, best_of=2, use_beam_search=True, length_penalty=0.0)
    best = beam_search(stepper(next_logprobs), [5], params, [EOS], 3)[0]
    assert best.token_ids == [2, EOS]
    assert best.finish_reason == "stop" and best.stop_reason is None
    assert best.cumulative_logprob == pytest.approx(float(torch.tensor(0.4).log()), abs=1e-5)
    assert best.token_logprobs == pytest.approx([float(torch.tensor(0.4).log()), 0.0], abs=1e-5)
    greedy = SamplingParams(n=1, use_beam_search=True, length_penalty=0.0)
    assert beam_search(stepper(next_logprobs), [5], greedy, [EOS], 3)[0].token_ids[0] == 1


def test_length_finish_and_ignore_eos() -> None:
    always_eos = torch.tensor([0.97, 0.01, 0.01, 0.01]).log()
    params = SamplingParams(n=2, use_beam_search=True, ignore_eos=True)
    hypotheses = beam_search(stepper(lambda _: always_eos), PROMPT, params, [EOS], 3)
    assert len(hypotheses) == 2
    assert all(h.finish_reason == "length" and len(h.token_ids) == 3 for h in hypotheses)
    assert hypotheses[0].token_ids == [EOS, EOS, EOS]


def test_stop_token_ids_end_beams_with_a_stop_reason() -> None:
    likes_three = torch.tensor([0.01, 0.01, 0.01, 0.97]).log()
    params = SamplingParams(n=1, best_of=2, use_beam_search=True, stop_token_ids=[3])
    best = beam_search(stepper(lambda _: likes_three), PROMPT, params, [EOS], 5)[0]
    assert (best.token_ids, best.finish_reason, best.stop_reason) == ([3], "stop", 3)


def test_early_stopping_makes_fewer_steps() -> None:
    next_logprobs = table(7)
    calls_early: list[int] = []
    calls_full: list[int] = []
    base: dict[str, Any] = {"n": 2, "best_of": 2, "use_beam_search": True, "length_penalty": -1.0}
    beam_search(
        stepper(next_logprobs, calls_early), PROMPT, SamplingParams(**base, early_stopping=True), [EOS], 30
    )
    beam_search(stepper(next_logprobs, calls_full), PROMPT, SamplingParams(**base), [EOS], 30)
    assert len(calls_early) <= len(calls_full)
    assert max(calls_early + calls_full) <= 2  # never more live beams than the width
