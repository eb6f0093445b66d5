"""Beam search as its own decoding path (vLLM's ``use_beam_search``; HF's scoring and stopping rules).

The search is written against one callable, ``step``, that returns the next-token scores of a list
of token sequences; the engine implements it with the model runner (and prefix caching, since the
beams share their prompt). The search itself is deterministic: no temperature, no sampling.

Scoring: ``cumulative_logprob / length ** length_penalty`` where ``length`` counts the prompt and the
generated tokens but not a final eos or stop token (as vLLM and HF do).
Stopping: the search ends once ``beam_width`` hypotheses have finished and either
``early_stopping`` is set or no live beam can still beat the worst of them at its current length;
otherwise at ``max_tokens``, when the live beams join the finished ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from servekit.llm.sampling_params import SamplingParams

# Token sequences (prompt + generated) of the live beams -> [num_beams, vocab] next-token logits or
# logprobs (normalised with log_softmax here, so either works).
BeamStep = Callable[[list[list[int]]], torch.Tensor]


@dataclass
class BeamHypothesis:
    token_ids: list[int]  # generated tokens, including the final eos / stop token when it stopped on one
    cumulative_logprob: float
    score: float  # the length-penalised score that ranks hypotheses
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None = None  # the stop token id when it was one of params.stop_token_ids
    token_logprobs: list[float] = field(default_factory=list)


@dataclass
class _Beam:
    token_ids: list[int]
    cumulative_logprob: float
    token_logprobs: list[float]


def beam_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    return cumulative_logprob / (max(length, 1) ** length_penalty)


def beam_search(
    step: BeamStep,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    max_tokens: int,
) -> list[BeamHypothesis]:
    """The ``params.n`` best hypotheses of a beam search of width ``params.num_candidates``, best first."""
    width = params.num_candidates
    prompt = list(prompt_token_ids)
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids.update(eos_token_ids)

    def hypothesis(beam: _Beam, finish_reason: str) -> BeamHypothesis:
        scored_len = len(prompt) + len(beam.token_ids) - (1 if finish_reason == "stop" else 0)
        last = beam.token_ids[-1] if beam.token_ids else None
        return BeamHypothesis(
            token_ids=beam.token_ids,
            cumulative_logprob=beam.cumulative_logprob,
            score=beam_score(beam.cumulative_logprob, scored_len, params.length_penalty),
            finish_reason=finish_reason,
            stop_reason=last if finish_reason == "stop" and last in params.stop_token_ids else None,
            token_logprobs=beam.token_logprobs,
        )

    finished: list[BeamHypothesis] = []
    live = [_Beam([], 0.0, [])]
    for generated in range(max_tokens):
        logprobs = torch.log_softmax(step([prompt + beam.token_ids for beam in live]).float(), dim=-1)
        if generated < params.min_tokens and stop_ids:
            in_vocab = [t for t in stop_ids if 0 <= t < logprobs.shape[-1]]
            logprobs[:, in_vocab] = float("-inf")
        live = _extend(live, logprobs, width, stop_ids, finished, hypothesis)
        if not live or _done(live, finished, width, params, len(prompt) + generated + 1):
            live = []
            break
    finished.extend(hypothesis(beam, "length") for beam in live)
    finished.sort(key=lambda h: h.score, reverse=True)
    return finished[: params.n]


def _extend(
    live: list[_Beam],
    logprobs: torch.Tensor,
    width: int,
    stop_ids: set[int],
    finished: list[BeamHypothesis],
    hypothesis: Callable[[_Beam, str], BeamHypothesis],
) -> list[_Beam]:
    """Grow the beams by one token: the best ``width`` continuations stay live; stop tokens among the
    best ``width`` candidates become finished hypotheses (HF's rule)."""
    vocab_size = logprobs.shape[-1]
    totals = logprobs + torch.tensor([b.cumulative_logprob for b in live]).unsqueeze(1)
    num_candidates = min(2 * width, totals.numel())
    top = torch.topk(totals.flatten(), num_candidates)
    next_live: list[_Beam] = []
    for rank, (total, flat_index) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        if total == float("-inf"):
            break
        parent = live[flat_index // vocab_size]
        token_id = flat_index % vocab_size
        beam = _Beam(
            [*parent.token_ids, token_id],
            total,
            [*parent.token_logprobs, float(logprobs[flat_index // vocab_size, token_id])],
        )
        if token_id in stop_ids:
            if rank < width:
                finished.append(hypothesis(beam, "stop"))
        else:
            next_live.append(beam)
            if len(next_live) == width:
                break
    return next_live


def _done(
    live: list[_Beam], finished: list[BeamHypothesis], width: int, params: SamplingParams, length: int
) -> bool:
    if len(finished) < width:
        return False
    if params.early_stopping:
        return True
    worst_kept = sorted((h.score for h in finished), reverse=True)[width - 1]
    best_live = max(beam.cumulative_logprob for beam in live)
    return worst_kept >= beam_score(best_live, length, params.length_penalty)
