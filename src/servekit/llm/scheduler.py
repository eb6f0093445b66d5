"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
Running sequences go first, in arrival order: a decoding sequence takes one token, a sequence still
in its prompt takes the next chunk of it. Waiting sequences are then admitted first-come
first-served while budget, sequence slots and KV blocks last. While more than one prompt is pending
(being prefilled or waiting), the prompt tokens of a step are capped at ``prefill_tokens_per_step``:
prompts then complete one after another, in arrival order, instead of a burst of them all finishing
their prefill together at the end (a burst of 32 prompts gets its median first token after about half
the burst's prefill instead of three quarters of it, and the decodes they start interleave with the
rest); a lone prompt takes the whole budget. When a running sequence cannot get a
block, the newest running sequence is preempted by recompute: its blocks are freed and it goes back
to the front of the waiting queue, to compute its prompt and output again later (cheaply, when its
blocks are still in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from servekit.llm.block_manager import BlockManager
from servekit.llm.errors import QueueFullError
from servekit.llm.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # position of the first token computed this step
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every known token is computed, so the step's last logits are sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    max_queued_requests: int | None = None
    prefill_tokens_per_step: int = 0  # prompt tokens per step while several prompts are pending; 0: no cap


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < config.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) is smaller than max_model_len "
                f"({config.max_model_len}): long prompts could never run without chunked prefill"
            )
        capacity = block_manager.num_blocks * block_manager.block_size
        if capacity < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len ({config.max_model_len}); "
                "give it more memory or lower max_model_len"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management --------------------------------------------------------------------------

    def check_capacity(self) -> None:
        limit = self.config.max_queued_requests
        if limit is not None and len(self.waiting) >= limit:
            raise QueueFullError(
                f"the engine already has {len(self.waiting)} waiting sequences (limit {limit})"
            )

    def add(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)

    def abort(self, group: SequenceGroup) -> None:
        """Drop every sequence of the group from both queues and free their blocks."""
        members = {seq.seq_id for seq in group.seqs}
        self.waiting = deque(seq for seq in self.waiting if seq.seq_id not in members)
        self.running = [seq for seq in self.running if seq.seq_id not in members]
        for seq in group.seqs:
            self.block_manager.free(seq)
            if not seq.is_finished:
                seq.finish("abort")

    def finish(self, seq: Sequence) -> None:
        """A sequence ended: its blocks go back at once; it leaves ``running`` at the next schedule."""
        self.block_manager.free(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(1 for seq in self.running if not seq.is_finished)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(not seq.is_finished for seq in self.running)

    # -- scheduling --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running = [seq for seq in self.running if not seq.is_finished]
        bm = self.block_manager

        prompt_budget = self._prompt_budget(budget)

        scheduled_running: list[Sequence] = []
        remaining = list(self.running)
        deferred: list[Sequence] = []  # prompts in progress left for a later step by the prompt cap
        while remaining and budget > 0:
            seq = remaining.pop(0)
            prompt = seq.num_uncomputed_tokens > 1
            if prompt and prompt_budget <= 0:
                deferred.append(seq)
                continue
            num_new = min(seq.num_uncomputed_tokens, budget, prompt_budget if prompt else budget)
            if num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
                remaining.insert(0, seq)
                break
            while not bm.allocate_slots(seq, num_new):
                victim = remaining.pop() if remaining else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new))
                scheduled_running.append(seq)
                budget -= num_new
                if prompt:
                    prompt_budget -= num_new
        # Running sequences left without budget stay running (unscheduled this step), in their order.
        order = {seq.seq_id: index for index, seq in enumerate(self.running)}
        self.running = sorted(scheduled_running + deferred + remaining, key=lambda seq: order[seq.seq_id])

        if out.preempted:
            return out
        now = time.time()
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if prompt_budget <= 0 and seq.num_uncomputed_tokens > 1:
                break  # first come first served: no later prompt overtakes it
            group = seq.group
            if not group.may_schedule(seq, bm.enable_prefix_caching):
                skipped.append(self.waiting.popleft())
                continue
            hit = -1
            if not seq.block_table:
                # Prompt logprobs need logits at every prompt position, so no prefix hits then.
                hit = 0 if group.wants_prompt_logprobs else bm.allocate_cached_prefix(seq)
                seq.num_computed_tokens = hit
            prompt = seq.num_uncomputed_tokens > 1
            num_new = min(seq.num_uncomputed_tokens, budget, prompt_budget if prompt else budget)
            if num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
                break
            if not bm.allocate_slots(seq, num_new):
                bm.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if not seq.was_scheduled and hit >= 0:
                bm.record_prefix_lookup(seq.num_tokens, hit)
                if seq.index == 0:
                    group.metrics.num_cached_tokens = hit
            seq.was_scheduled = True
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
            if prompt:
                prompt_budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return out

    def _prompt_budget(self, budget: int) -> int:
        """Prompt tokens this step may compute: ``prefill_tokens_per_step`` while more than one prompt
        is pending (chunked prefill only: without it a prompt is never split), else the whole budget."""
        cap = self.config.prefill_tokens_per_step
        if cap <= 0 or not self.config.enable_chunked_prefill or cap >= budget:
            return budget
        pending = len(self.waiting)
        for seq in self.running:
            if seq.num_uncomputed_tokens > 1:
                pending += 1
                if pending > 1:
                    break
        return cap if pending > 1 else budget

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
