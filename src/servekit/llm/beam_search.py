"""Beam search as its own decoding path (vLLM's ``use_beam_search``; HF's scoring and stopping rules).

The search is written against one callable, ``step``, that returns the next-token scores of a list
of token sequences; the engine implements it with the model runner (and prefix caching, since the
beams share their prompt). The search itself is deterministic: no temperature, no sampling.

Scoring: ``cumulative_logprob / length ** length_penalty`` where ``length`` counts the prompt and the
generated tokens but not a final eos or stop token (as vLLM and HF do).
Stopping: the search ends once ``beam_width`` hypotheses have finished and either
``early_stopping`` is set or no live beam can still beat the worst of them at its current length;
otherwise at ``max_tokens``, when the live beams join the finished ones.

``BeamSearchRequests`` is the engine's side: beam-search requests wait in their own queue, and each
runs to the end within one engine step, its beams' forwards going through the paged KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from servekit.llm.model_runner import ForwardBatch, ForwardOutput
from servekit.llm.outputs import RequestOutput, logprob_entry
from servekit.llm.sampling_params import SamplingParams
from servekit.llm.sequence import Sequence as Seq
from servekit.llm.sequence import SequenceGroup
from servekit.llm.stop import effective_max_tokens

if TYPE_CHECKING:
    from servekit.llm.block_manager import BlockManager
    from servekit.llm.tokenizer import Tokenizer

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


class BeamSearchRequests:
    """The engine's beam-search requests: queued apart from the scheduler's, each run to the end at once
    (it holds the engine meanwhile), with prefix reuse (the beams share their prompt and history)."""

    def __init__(
        self,
        block_manager: BlockManager,
        execute: Callable[[ForwardBatch], ForwardOutput],
        tokenizer: Tokenizer,
        eos_token_ids: Sequence[int],
        max_model_len: int,
    ) -> None:
        self.block_manager = block_manager
        self.execute = execute
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: list[SequenceGroup] = []

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def discard(self, group: SequenceGroup) -> None:
        if group in self.waiting:
            self.waiting.remove(group)

    def next_runnable(self, others_running: bool) -> SequenceGroup | None:
        """The first waiting request, taken from the queue, if the KV cache holds all its beams at full
        length beside the other running requests."""
        if not self.waiting:
            return None
        group = self.waiting[0]
        if others_running:
            params = group.params
            prompt_len = len(group.prompt_token_ids)
            longest = prompt_len + effective_max_tokens(params, prompt_len, self.max_model_len)
            needed = params.num_candidates * self.block_manager.blocks_needed(longest)
            if self.block_manager.num_free_blocks < needed:
                return None
        return self.waiting.pop(0)

    def run(self, group: SequenceGroup) -> RequestOutput | None:
        """Search to the end; the group gets one finished sequence per returned hypothesis."""
        params = group.params
        max_tokens = effective_max_tokens(params, len(group.prompt_token_ids), self.max_model_len)
        group.metrics.first_scheduled_time = time.time()
        hypotheses = beam_search(self._step, group.prompt_token_ids, params, self.eos_token_ids, max_tokens)
        for index, hyp in enumerate(hypotheses):
            seq = Seq(group, index, params, None, max_tokens)
            seq.output_token_ids = list(hyp.token_ids)
            seq.token_ids.extend(hyp.token_ids)
            seq.cumulative_logprob = hyp.cumulative_logprob
            if seq.logprobs is not None:
                seq.logprobs = [
                    logprob_entry(self.tokenizer, tid, lp, [])
                    for tid, lp in zip(hyp.token_ids, hyp.token_logprobs, strict=True)
                ]
            shown = hyp.token_ids
            if hyp.finish_reason == "stop" and hyp.token_ids and not params.include_stop_str_in_output:
                shown = hyp.token_ids[:-1]
            seq.text = self.tokenizer.decode(
                shown,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            )
            seq.finish(hyp.finish_reason, hyp.stop_reason)
            group.seqs.append(seq)
        now = time.time()
        group.metrics.first_token_time = group.metrics.last_token_time = group.metrics.finished_time = now
        return group.make_output()

    def _step(self, sequences: list[list[int]]) -> torch.Tensor:
        """Next-token logits of each token sequence, computed through the paged KV cache."""
        bm = self.block_manager
        holders = [_BlockHolder(tokens) for tokens in sequences]
        try:
            for holder in holders:
                holder.num_computed_tokens = bm.allocate_cached_prefix(holder)
                if not bm.allocate_slots(holder, len(holder.token_ids) - holder.num_computed_tokens):
                    raise RuntimeError("the KV cache is too small for this beam search")
            batch = ForwardBatch(
                token_ids=[h.token_ids[h.num_computed_tokens :] for h in holders],
                start_positions=[h.num_computed_tokens for h in holders],
                block_tables=[h.block_table for h in holders],
            )
            result = self.execute(batch)
            for holder in holders:
                holder.num_computed_tokens = len(holder.token_ids)
                bm.cache_full_blocks(holder)
            return result.last_logits
        finally:
            for holder in holders:
                bm.free(holder)


@dataclass
class _BlockHolder:
    """A transient block-table owner for one beam-search forward."""

    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0
