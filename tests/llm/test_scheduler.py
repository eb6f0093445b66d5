"""Scheduler behaviour, driven by a fake model that reads its 'KV cache' through the block tables.

The fake model stores each computed token in its (block, offset) slot and predicts the next token
from everything it reads back through the block table, so a wrong block table, a block shared by
mistake or a slot overwritten too early changes the outputs.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest

from servekit.llm.block_manager import BlockManager
from servekit.llm.sampling_params import SamplingParams
from servekit.llm.scheduler import (
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from servekit.llm.sequence import Sequence, SequenceGroup

VOCAB = 97


class SlotModel:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.computed_tokens = 0

    def run(self, plan: SchedulerOutput) -> dict[int, int]:
        """Write every scheduled token, then predict the next token of sequences that completed."""
        size = self.block_size
        for item in plan.scheduled:
            seq = item.seq
            for pos in range(item.start, item.start + item.num_tokens):
                block = seq.block_table[pos // size]
                self.slots[block][pos % size] = seq.token_ids[pos] * 1000 + pos
            self.computed_tokens += item.num_tokens
        predictions: dict[int, int] = {}
        for item in plan.scheduled:
            if not item.completes:
                continue
            seq = item.seq
            total = 0
            for pos in range(item.start + item.num_tokens):
                stored = self.slots[seq.block_table[pos // size]][pos % size]
                assert stored is not None and stored % 1000 == pos, "read a slot of another position"
                total = (total * 31 + stored // 1000 + 7) % 1_000_003
            predictions[seq.seq_id] = total % VOCAB
        return predictions


def make_group(request_id: str, prompt: list[int], max_tokens: int, n: int = 1) -> SequenceGroup:
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0)
    group = SequenceGroup(request_id, None, prompt, params)
    group.seqs = [Sequence(group, i, params, None, max_tokens) for i in range(n)]
    return group


def run_to_completion(
    groups: list[SequenceGroup],
    *,
    num_blocks: int = 256,
    block_size: int = 4,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    max_model_len: int = 256,
    chunked: bool = True,
    prefix_caching: bool = True,
    arrivals: dict[int, list[SequenceGroup]] | None = None,
    prefill_cap: int = 0,
    first_token_work: dict[str, int] | None = None,
) -> tuple[dict[str, list[list[int]]], Scheduler, SlotModel]:
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    config = SchedulerConfig(
        max_num_seqs, max_num_batched_tokens, max_model_len, chunked, prefill_tokens_per_step=prefill_cap
    )
    scheduler = Scheduler(config, bm)
    model = SlotModel(num_blocks, block_size)
    for group in groups:
        scheduler.add(group)
    pending = dict(arrivals or {})
    everything = list(groups) + [g for late in pending.values() for g in late]
    for step in range(10_000):
        for group in pending.pop(step, []):
            scheduler.add(group)
        if not scheduler.has_unfinished() and not pending:
            break
        plan = scheduler.schedule()
        assert plan.num_batched_tokens <= max_num_batched_tokens
        assert len(scheduler.running) <= max_num_seqs
        predictions = model.run(plan)
        for item in plan.scheduled:
            seq = item.seq
            seq.num_computed_tokens = item.start + item.num_tokens
            bm.cache_full_blocks(seq)
            if seq.index == 0 and seq.num_computed_tokens >= seq.prompt_len:
                seq.group.prompt_computed = True
            if item.completes:
                seq.append_token(predictions[seq.seq_id], None, None)
                if first_token_work is not None:  # tokens computed until its first token: its TTFT
                    first_token_work.setdefault(seq.group.request_id, model.computed_tokens)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    seq.finish("length")
                    scheduler.finish(seq)
    else:
        raise AssertionError("did not finish")
    assert bm.num_free_blocks == num_blocks
    outputs = {g.request_id: [list(s.output_token_ids) for s in g.seqs] for g in everything}
    return outputs, scheduler, model


def workload(seed: int, count: int = 12, shared_prefix: int = 0) -> list[SequenceGroup]:
    rng = random.Random(seed)
    prefix = [rng.randrange(VOCAB) for _ in range(shared_prefix)]
    return [
        make_group(
            f"r{i}",
            prefix + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))],
            rng.randrange(1, 24),
        )
        for i in range(count)
    ]


def test_all_requests_finish_with_exact_lengths() -> None:
    outputs, _, _ = run_to_completion(workload(0))
    for group in workload(0):
        assert len(outputs[group.request_id][0]) == group.params.max_tokens


def test_chunked_prefill_gives_the_same_outputs() -> None:
    reference, _, _ = run_to_completion(workload(1), max_num_batched_tokens=4096, chunked=False)
    chunked, _scheduler, _ = run_to_completion(workload(1), max_num_batched_tokens=7)
    assert chunked == reference


def test_preemption_under_tiny_kv_budget_gives_the_same_outputs() -> None:
    reference, _, _ = run_to_completion(workload(2))
    tight, scheduler, _ = run_to_completion(workload(2), num_blocks=20, max_model_len=64)
    assert scheduler.num_preemptions > 0
    assert tight == reference


def test_preemption_without_prefix_caching_gives_the_same_outputs() -> None:
    reference, _, _ = run_to_completion(workload(3), prefix_caching=False)
    tight, scheduler, _ = run_to_completion(
        workload(3), num_blocks=20, max_model_len=64, prefix_caching=False
    )
    assert scheduler.num_preemptions > 0
    assert tight == reference


def test_prefix_caching_computes_shared_prompt_once() -> None:
    without, _, cold = run_to_completion(workload(4, shared_prefix=32), prefix_caching=False, max_num_seqs=1)
    with_cache, scheduler, warm = run_to_completion(workload(4, shared_prefix=32), max_num_seqs=1)
    assert with_cache == without
    assert scheduler.block_manager.prefix_hit_rate > 0
    assert warm.computed_tokens < cold.computed_tokens


def test_max_num_seqs_and_token_budget_are_respected() -> None:
    outputs, _, _ = run_to_completion(workload(5, count=20), max_num_seqs=3, max_num_batched_tokens=16)
    reference, _, _ = run_to_completion(workload(5, count=20))
    assert outputs == reference


def test_decodes_and_prefill_chunks_share_a_step() -> None:
    bm = BlockManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(8, 10, 128, True), bm)
    first = make_group("a", list(range(5)), 4)
    scheduler.add(first)
    plan = scheduler.schedule()
    seq = first.seqs[0]
    seq.num_computed_tokens = 5
    seq.append_token(1, None, None)
    assert plan.scheduled[0].num_tokens == 5
    scheduler.add(make_group("b", list(range(30)), 4))
    plan = scheduler.schedule()
    sizes = [(item.seq.group.request_id, item.num_tokens) for item in plan.scheduled]
    assert sizes == [("a", 1), ("b", 9)]


def test_fcfs_no_starvation_with_continuous_arrivals() -> None:
    long_request = make_group("long", list(range(60)), 8)
    arrivals = {step: [make_group(f"late{step}", [step % VOCAB, 3], 2)] for step in range(1, 60)}
    outputs, _, _ = run_to_completion(
        [long_request], max_num_batched_tokens=8, max_num_seqs=4, arrivals=arrivals, num_blocks=64
    )
    assert len(outputs["long"][0]) == 8


def test_n_children_share_the_prompt_blocks() -> None:
    group = make_group("fan", list(range(40)), 5, n=4)
    outputs, scheduler, model = run_to_completion([group])
    assert len(outputs["fan"]) == 4
    # The leader computes the 40-token prompt; the 3 others only recompute its partial last block.
    assert model.computed_tokens < 40 + 3 * 8 + 4 * 5
    assert scheduler.block_manager.prefix_hits >= 3 * 36


def test_queue_limit() -> None:
    scheduler = Scheduler(SchedulerConfig(4, 64, 32, True, max_queued_requests=1), BlockManager(16, 4))
    scheduler.check_capacity()
    scheduler.add(make_group("x", [1, 2], 1))
    with pytest.raises(QueueFullError):
        scheduler.check_capacity()


def test_kv_cache_smaller_than_context_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="KV cache"):
        Scheduler(SchedulerConfig(4, 64, 128, True), BlockManager(4, 4))


def test_abort_at_random_points_returns_every_block() -> None:
    rng = random.Random(7)
    num_blocks = 40
    bm = BlockManager(num_blocks, 4)
    scheduler = Scheduler(SchedulerConfig(8, 24, 64, True), bm)
    model = SlotModel(num_blocks, 4)
    live: list[SequenceGroup] = []
    added = 0
    while added < 1000 or live:
        if added < 1000 and rng.random() < 0.6:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 50))]
            group = make_group(f"r{added}", prompt, rng.randrange(1, 12), n=rng.choice([1, 1, 2]))
            scheduler.add(group)
            live.append(group)
            added += 1
        if live and rng.random() < 0.4:
            scheduler.abort(live.pop(rng.randrange(len(live))))
        plan = scheduler.schedule()
        predictions = model.run(plan)
        for item in plan.scheduled:
            seq = item.seq
            seq.num_computed_tokens = item.start + item.num_tokens
            bm.cache_full_blocks(seq)
            if seq.index == 0 and seq.num_computed_tokens >= seq.prompt_len:
                seq.group.prompt_computed = True
            if item.completes:
                seq.append_token(predictions[seq.seq_id], None, None)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    seq.finish("length")
                    scheduler.finish(seq)
        live = [g for g in live if not g.is_finished]
    assert not scheduler.has_unfinished()
    assert bm.num_free_blocks == num_blocks


# -- the prompt cap (prefill_tokens_per_step) -----------------------------------------------------


def burst(count: int, length: int, max_tokens: int = 4) -> list[SequenceGroup]:
    rng = random.Random(count * 7 + length)
    return [
        make_group(f"p{i}", [rng.randrange(VOCAB) for _ in range(length)], max_tokens) for i in range(count)
    ]


def apply(plan: SchedulerOutput) -> list[tuple[str, int]]:
    """Mark the plan computed (a token appended where it completes); its (request, tokens) pairs."""
    for item in plan.scheduled:
        item.seq.num_computed_tokens = item.start + item.num_tokens
        if item.completes:
            item.seq.append_token(1, None, None)
    return [(item.seq.group.request_id, item.num_tokens) for item in plan.scheduled]


def test_prompt_cap_takes_pending_prompts_in_arrival_order() -> None:
    scheduler = Scheduler(
        SchedulerConfig(32, 2048, 256, True, prefill_tokens_per_step=256), BlockManager(512, 16)
    )
    for group in burst(8, 100):
        scheduler.add(group)
    assert apply(scheduler.schedule()) == [("p0", 100), ("p1", 100), ("p2", 56)]
    # The decodes ride along; the prompt in progress goes on first, then the next ones in order.
    assert apply(scheduler.schedule()) == [
        ("p0", 1),
        ("p1", 1),
        ("p2", 44),
        ("p3", 100),
        ("p4", 100),
        ("p5", 12),
    ]
    assert apply(scheduler.schedule()) == [
        ("p0", 1), ("p1", 1), ("p2", 1), ("p3", 1), ("p4", 1), ("p5", 88), ("p6", 100), ("p7", 68)
    ]  # fmt: skip


def test_a_lone_prompt_takes_the_whole_budget() -> None:
    scheduler = Scheduler(
        SchedulerConfig(32, 2048, 1024, True, prefill_tokens_per_step=256), BlockManager(512, 16)
    )
    scheduler.add(burst(1, 1000)[0])
    assert apply(scheduler.schedule()) == [("p0", 1000)]
    # Without chunked prefill there is no cap: prompts are never split.
    unchunked = Scheduler(
        SchedulerConfig(32, 2048, 1024, False, prefill_tokens_per_step=256), BlockManager(512, 16)
    )
    for group in burst(3, 300):
        unchunked.add(group)
    assert apply(unchunked.schedule()) == [("p0", 300), ("p1", 300), ("p2", 300)]


def test_prompt_cap_gives_the_same_outputs_and_earlier_first_tokens() -> None:
    capped_work: dict[str, int] = {}
    uncapped_work: dict[str, int] = {}
    common: dict[str, Any] = {"max_num_batched_tokens": 512, "num_blocks": 512, "max_model_len": 128}
    capped, _, _ = run_to_completion(burst(16, 60, 8), prefill_cap=64, first_token_work=capped_work, **common)
    uncapped, _, _ = run_to_completion(burst(16, 60, 8), first_token_work=uncapped_work, **common)
    assert capped == uncapped
    order = [capped_work[f"p{i}"] for i in range(16)]
    assert order == sorted(order)  # first come, first served
    # Uncapped, 8 prompts finish together after 512 tokens of work and the other 8 after ~970; capped,
    # each finishes about 60 tokens after the one before it.
    assert statistics.mean(order) < 0.8 * statistics.mean(uncapped_work.values())
