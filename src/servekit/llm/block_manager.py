"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts and a hash-chained prefix cache.

A block is *free* (ref count 0, no content worth keeping), *cached-free* (ref count 0 but holding
the K/V of a known full block of tokens: reusable on a prefix hit, evicted least-recently-used
first when a fresh block is needed) or *in use* (ref count = the number of live sequences whose
block table holds it). Only full blocks are ever shared, and a full block is never written again,
so sharing needs no copy-on-write.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

_ROOT_HASH = 0x5E7F1C


class BlockOwner(Protocol):
    """What the block manager needs from a sequence."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[int]
    num_registered_blocks: int


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int, token_ids: Seq[int]) -> int:
    """The identity of a full block: its tokens and, through ``parent_hash``, every token before it."""
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached-free blocks, LRU first
        self._by_hash: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    # -- state -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (free plus evictable cached-free)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_id: int) -> bool:
        return self._blocks[block_id].content_hash is not None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reset_prefix_cache(self) -> None:
        """Forget every cached-free block (e.g. after the weights changed)."""
        for block_id in list(self._evictable):
            self._uncache(self._blocks[block_id])
            self._free.append(block_id)
        self._evictable.clear()

    # -- allocation --------------------------------------------------------------------------------

    def can_allocate(self, seq: BlockOwner, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted prompt's lookup in the hit-rate counters (in tokens)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def allocate_cached_prefix(self, seq: BlockOwner) -> int:
        """Give a sequence without blocks the cached blocks of its longest cached prefix.

        Returns the number of tokens covered (a multiple of the block size, always less than the
        sequence length so that the last token is computed and yields logits). The caller sets
        ``num_computed_tokens`` to it.
        """
        if seq.block_table:
            raise RuntimeError("allocate_cached_prefix on a sequence that already has blocks")
        num_tokens = len(seq.token_ids)
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        for index in range(max_blocks):
            block_id = self._by_hash.get(seq.block_hashes[index])
            if block_id is None:
                break
            block = self._blocks[block_id]
            start = index * self.block_size
            if block.token_ids != tuple(seq.token_ids[start : start + self.block_size]):
                break  # a hash collision: treat as a miss
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_registered_blocks = len(seq.block_table)
        return len(seq.block_table) * self.block_size

    def allocate_slots(self, seq: BlockOwner, num_new_tokens: int) -> bool:
        """Make the block table cover ``num_computed_tokens + num_new_tokens``; False if out of blocks."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_fresh_block())
        return True

    def free(self, seq: BlockOwner) -> None:
        """Release a sequence's blocks; full computed blocks stay cached (evicted tail-first)."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if block.ref_count == 0:
                if block.content_hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def cache_full_blocks(self, seq: BlockOwner) -> None:
        """Register the sequence's computed full blocks in the prefix cache (after their K/V exist)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            block = self._blocks[seq.block_table[index]]
            content_hash = seq.block_hashes[index]
            if block.content_hash is None and content_hash not in self._by_hash:
                start = index * self.block_size
                block.content_hash = content_hash
                block.token_ids = tuple(seq.token_ids[start : start + self.block_size])
                self._by_hash[content_hash] = block.block_id
        seq.num_registered_blocks = num_full

    # -- internals ---------------------------------------------------------------------------------

    def _extend_hashes(self, seq: BlockOwner, num_blocks: int) -> None:
        hashes = seq.block_hashes
        size = self.block_size
        for index in range(len(hashes), num_blocks):
            parent = hashes[index - 1] if index else _ROOT_HASH
            hashes.append(chain_hash(parent, seq.token_ids[index * size : (index + 1) * size]))

    def _take_fresh_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            self._uncache(self._blocks[block_id])
        self._blocks[block_id].ref_count = 1
        return block_id

    def _uncache(self, block: _Block) -> None:
        if block.content_hash is not None and self._by_hash.get(block.content_hash) == block.block_id:
            del self._by_hash[block.content_hash]
        block.content_hash = None
        block.token_ids = ()
