"""A generated sequence and the request (group of sequences) it belongs to."""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

from servekit.llm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from servekit.llm.sampling_params import SamplingParams
from servekit.llm.stop import stream_holdback

if TYPE_CHECKING:
    import torch

    from servekit.llm.detokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One token stream: the prompt, what was generated so far, and where its KV cache lives.

    Implements the sampler's ``SamplingState`` protocol (``sampling_params``, ``prompt_token_ids``,
    ``output_token_ids``, ``generator``). ``token_ids`` is prompt + output; the first
    ``num_computed_tokens`` of it have their K/V in the blocks of ``block_table``.
    """

    _ids = itertools.count()

    def __init__(
        self,
        group: SequenceGroup,
        index: int,
        sampling_params: SamplingParams,
        generator: torch.Generator | None,
        max_tokens: int,
    ) -> None:
        self.seq_id = next(Sequence._ids)
        self.group = group
        self.index = index
        self.sampling_params = sampling_params
        self.generator = generator
        self.max_tokens = max_tokens  # the effective limit: params.max_tokens bounded by the context left
        self.prompt_token_ids = group.prompt_token_ids
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(group.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.was_scheduled = False
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # content hash of each full block of token_ids, chained
        self.num_registered_blocks = 0  # leading blocks of block_table already in the prefix cache
        self.cumulative_logprob = 0.0
        self.logprobs: SampleLogprobs | None = [] if sampling_params.logprobs is not None else None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # Streaming bookkeeping: how much text / how many tokens / logprobs were already reported.
        self.num_sent_chars = 0
        self.num_sent_tokens = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prompt_len

    def append_token(self, token_id: int, logprob: float | None, entry: dict[int, Logprob] | None) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob
        if self.logprobs is not None and entry is not None:
            self.logprobs.append(entry)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def reset_for_recompute(self) -> None:
        """Preempted: its KV blocks are gone; every token (prompt + output) is computed again."""
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.group.metrics.num_preemptions += 1
        self.group.drop_partial_prompt_logits()

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.group.request_id!r}, index={self.index}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, status={self.status.value})"
        )


class SequenceGroup:
    """One request: a prompt and its ``n`` (or ``best_of``) sequences.

    The sequences after the first wait until the first one has computed the prompt, so that they
    find its full blocks in the prefix cache instead of computing the prompt again.
    """

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.prompt_computed = False  # the first sequence has computed the whole prompt once
        self.prompt_logprobs: PromptLogprobs | None = None
        self._prompt_logit_chunks: list[torch.Tensor] = []
        self.aborted = False

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    def add_prompt_logits(self, logits: torch.Tensor) -> None:
        self._prompt_logit_chunks.append(logits)

    def take_prompt_logits(self) -> list[torch.Tensor]:
        chunks, self._prompt_logit_chunks = self._prompt_logit_chunks, []
        return chunks

    def drop_partial_prompt_logits(self) -> None:
        self._prompt_logit_chunks = []

    def may_schedule(self, seq: Sequence, prefix_caching: bool) -> bool:
        """Followers of a group start once the leader's prompt blocks are in the prefix cache."""
        if seq.index == 0 or not prefix_caching:
            return True
        return self.prompt_computed or self.leader.is_finished

    def make_output(self, final_only: bool = False) -> RequestOutput | None:
        """The request's output now: cumulative text/tokens plus what is new since the last output.

        ``best_of > n`` requests only report once finished, with the ``n`` sequences of highest
        cumulative logprob. Returns None when there is nothing to report yet.
        """
        finished = self.is_finished
        params = self.params
        choose_best = params.best_of is not None and params.best_of > params.n
        if (final_only or choose_best) and not finished:
            return None
        seqs = self.seqs
        if choose_best:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
        completions = [
            _completion_of(seq, renumber, self.user_wants_logprobs) for renumber, seq in enumerate(seqs)
        ]
        if not choose_best:
            for completion, seq in zip(completions, seqs, strict=True):
                completion.index = seq.index
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=completions,
            finished=finished,
            metrics=self.metrics,
        )

    @property
    def user_wants_logprobs(self) -> bool:
        return self.params.logprobs is not None


def _completion_of(seq: Sequence, index: int, with_logprobs: bool) -> CompletionOutput:
    if seq.is_finished or seq.detokenizer is None:
        visible = seq.text
    else:
        text = seq.detokenizer.text
        visible = text[: len(text) - stream_holdback(seq.sampling_params, text)]
    text_delta = visible[seq.num_sent_chars :] if len(visible) > seq.num_sent_chars else ""
    seq.num_sent_chars = max(seq.num_sent_chars, len(visible))
    token_ids_delta = seq.output_token_ids[seq.num_sent_tokens :]
    logprobs_delta = None
    if with_logprobs and seq.logprobs is not None:
        logprobs_delta = seq.logprobs[seq.num_sent_tokens :]
    seq.num_sent_tokens = len(seq.output_token_ids)
    return CompletionOutput(
        index=index,
        text=visible,
        token_ids=list(seq.output_token_ids),
        cumulative_logprob=seq.cumulative_logprob if with_logprobs else None,
        logprobs=list(seq.logprobs) if with_logprobs and seq.logprobs is not None else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        text_delta=text_delta,
        token_ids_delta=token_ids_delta,
        logprobs_delta=logprobs_delta,
    )
