"""The decode-attention kernel's row stream: many sequences of uneven lengths, odd block sizes,
sliding windows and thread counts, against attention written out by hand.

The kernel prefetches along each thread's rows across the end of a unit into the next one (and
stops at the last), and locates rows block by block; lengths shorter than its prefetch distance,
not multiples of the block size or of the vector width, and table entries past a sequence's last
block (set to an index no cache has, so reading one would crash) check both.
"""

from __future__ import annotations

import random

import pytest
import torch

from servekit.llm import kernels
from servekit.llm.kernels.attention import paged_decode_attention

pytestmark = pytest.mark.skipif(
    kernels._compiler() is None or kernels.load_library() is None, reason="no C kernels on this machine"
)

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
# Shorter than the prefetch distance (32 rows), around block and vector multiples, and long.
LENGTHS = [1, 3, 16, 17, 31, 32, 33, 47, 100, 129, 200, 255, 2, 64]


def make_case(
    block_size: int, kv_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(block_size)
    lengths = LENGTHS[:]
    rng.shuffle(lengths)
    per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(per_seq) * 3 // 2  # spare blocks, as after churn
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables = torch.full(
        (len(lengths), max(per_seq) + 2), 1 << 30, dtype=torch.int32
    )  # past the end: no block
    for s, count in enumerate(per_seq):
        tables[s, :count] = torch.tensor([order.pop() for _ in range(count)], dtype=torch.int32)
    generator = torch.Generator().manual_seed(block_size)
    cache = torch.randn((num_blocks, 2, KV_HEADS, block_size, HEAD_DIM), generator=generator).to(kv_dtype)
    query = torch.randn((len(lengths), HEADS, HEAD_DIM), generator=generator)
    return query, cache, tables, torch.tensor(lengths, dtype=torch.int32)


def by_hand(
    query: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, window: int | None
) -> torch.Tensor:
    block_size, group = cache.shape[3], HEADS // KV_HEADS
    out = torch.empty((query.shape[0], HEADS, HEAD_DIM))
    for s, length in enumerate(lengths.tolist()):
        first = max(0, length - window) if window else 0
        blocks = [int(tables[s, t // block_size]) for t in range(first, length)]
        offsets = [t % block_size for t in range(first, length)]
        for h in range(KV_HEADS):
            keys = cache[blocks, 0, h, offsets].float()
            values = cache[blocks, 1, h, offsets].float()
            for g in range(h * group, (h + 1) * group):
                weights = torch.softmax(keys @ query[s, g] / HEAD_DIM**0.5, dim=0)
                out[s, g] = weights @ values
    return out.reshape(query.shape[0], HEADS * HEAD_DIM)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", [None, 21])
def test_uneven_sequences_match_attention_by_hand_at_any_thread_count(
    kv_dtype: torch.dtype, block_size: int, window: int | None
) -> None:
    query, cache, tables, lengths = make_case(block_size, kv_dtype)
    expected = by_hand(query, cache, tables, lengths, window)
    outputs = [
        paged_decode_attention(query, cache, tables, lengths, sliding_window=window, num_threads=threads)
        for threads in (1, 2, 3)
    ]
    torch.testing.assert_close(outputs[0], expected, atol=1e-5, rtol=0)
    # Each (sequence, KV head) is computed the same way whichever thread runs it and whatever it
    # prefetched before: the same bits at every thread count.
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])
