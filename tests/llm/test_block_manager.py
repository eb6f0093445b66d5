"""BlockManager invariants: free counts, ref counts, prefix sharing, LRU eviction."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from servekit.llm.block_manager import BlockManager


@dataclass
class Owner:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0


def compute(bm: BlockManager, owner: Owner, num_tokens: int) -> bool:
    """What the engine does around one forward: allocate, 'compute', register full blocks."""
    if not bm.allocate_slots(owner, num_tokens):
        return False
    owner.num_computed_tokens += num_tokens
    bm.cache_full_blocks(owner)
    return True


def admit(bm: BlockManager, owner: Owner) -> bool:
    owner.num_computed_tokens = bm.allocate_cached_prefix(owner)
    ok = compute(bm, owner, len(owner.token_ids) - owner.num_computed_tokens)
    if not ok:
        bm.free(owner)
        owner.num_computed_tokens = 0
    return ok


def check_invariants(bm: BlockManager, live: list[Owner]) -> None:
    holders: dict[int, int] = {}
    for owner in live:
        assert len(owner.block_table) == len(set(owner.block_table)), "a table holds a block twice"
        for block_id in owner.block_table:
            holders[block_id] = holders.get(block_id, 0) + 1
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == holders.get(block_id, 0)
        if holders.get(block_id, 0) > 1:
            assert bm.is_cached(block_id), "only cached (full, hashed) blocks may be shared"
    assert bm.num_free_blocks == bm.num_blocks - len(holders)


def test_allocate_append_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = Owner(list(range(10))), Owner(list(range(100, 103)))
    assert admit(bm, a) and admit(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    for token in range(6):  # decode: one token at a time
        a.token_ids.append(1000 + token)
        assert compute(bm, a, 1)
    assert len(a.block_table) == 4
    check_invariants(bm, [a, b])
    bm.free(a)
    bm.free(b)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 10


def test_out_of_blocks_is_refused_without_side_effects() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = Owner(list(range(9)))
    assert admit(bm, a)
    b = Owner(list(range(50, 55)))
    assert not bm.can_allocate(b, 5)
    assert not admit(bm, b)
    assert b.block_table == []
    check_invariants(bm, [a])


def test_prefix_hit_shares_full_blocks_and_leaves_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    system = list(range(12))
    a = Owner([*system, 40, 41])
    assert admit(bm, a)
    b = Owner([*system, 50, 51, 52])
    hit = bm.allocate_cached_prefix(b)
    assert hit == 12
    assert b.block_table == a.block_table[:3]
    b.num_computed_tokens = hit
    assert compute(bm, b, 3)
    check_invariants(bm, [a, b])
    # A prompt equal to cached blocks still computes its last token (it needs the logits).
    c = Owner(list(system))
    assert bm.allocate_cached_prefix(c) == 8
    bm.free(c)
    bm.free(a)
    bm.free(b)
    check_invariants(bm, [])


def test_hash_chain_distinguishes_same_block_after_different_prefix() -> None:
    bm = BlockManager(num_blocks=20, block_size=2)
    a = Owner([1, 2, 3, 4, 9])
    assert admit(bm, a)
    b = Owner([7, 8, 3, 4, 9])  # second block equal, first differs: no hit at all
    assert bm.allocate_cached_prefix(b) == 0
    bm.free(b)
    bm.free(a)


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Owner([1, 2, 3, 4, 5])
    assert admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 2
    again = Owner([1, 2, 3, 4, 6])
    assert bm.allocate_cached_prefix(again) == 4
    bm.free(again)
    # Fill the cache with unrelated content: the old blocks get evicted, the first one last.
    filler = Owner([20, 21, 22, 23, 24, 25, 26])
    assert admit(bm, filler)
    bm.free(filler)
    probe = Owner([1, 2, 3, 4, 5])
    assert bm.allocate_cached_prefix(probe) == 0
    bm.free(probe)
    check_invariants(bm, [])


def test_prefix_caching_disabled_never_shares() -> None:
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    a = Owner([1, 2, 3, 4, 5])
    b = Owner([1, 2, 3, 4, 5])
    assert admit(bm, a) and admit(bm, b)
    assert not set(a.block_table) & set(b.block_table)
    check_invariants(bm, [a, b])


@pytest.mark.parametrize("seed", range(5))
def test_random_mix_keeps_invariants_and_returns_all_blocks(seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=48, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    live: list[Owner] = []
    for _ in range(600):
        action = rng.random()
        if action < 0.35:
            prompt = list(rng.choice(prefixes)) + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
            owner = Owner(prompt)
            if admit(bm, owner):
                live.append(owner)
        elif action < 0.8 and live:
            owner = rng.choice(live)
            owner.token_ids.append(rng.randrange(50))
            if not compute(bm, owner, 1):
                bm.free(owner)  # preempted
                live.remove(owner)
        elif live:
            owner = live.pop(rng.randrange(len(live)))
            bm.free(owner)
        check_invariants(bm, live)
    for owner in live:
        bm.free(owner)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 48
    assert bm.prefix_hits <= bm.prefix_queries
