"""The paged key/value cache: fixed-size blocks of token slots, shared by every sequence.

Layout, per layer: ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` where index 0 of the
second axis is the key and 1 the value. Within a block, one KV head's keys (and values) are
contiguous rows: the decode kernel streams them straight from memory, and one ``index_select`` of
whole blocks gathers a sequence's keys and values together for the PyTorch path.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MEMORY_BYTES = 1 << 30


def kv_cache_block_bytes(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block occupies across all layers (keys and values)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return num_layers * block_size * 2 * num_kv_heads * head_dim * element_size


def num_blocks_for_budget(
    memory_bytes: int,
    *,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """How many whole blocks fit in ``memory_bytes``."""
    per_block = kv_cache_block_bytes(
        num_layers=num_layers,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    return memory_bytes // per_block


class PagedKVCache:
    """One preallocated tensor holding every layer's key/value blocks."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block (got num_blocks={num_blocks})")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive (got {block_size})")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self._storage = torch.zeros(
            (num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim), dtype=dtype, device=device
        )
        self._layers = list(self._storage.unbind(0))  # one view per layer, made once
        logger.info(
            "allocated KV cache on %s: %d blocks x %d tokens, %.1f MiB",
            self._storage.device,
            num_blocks,
            block_size,
            self._storage.numel() * self._storage.element_size() / (1 << 20),
        )

    @property
    def memory_bytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    def layer(self, index: int) -> torch.Tensor:
        """Layer ``index``'s blocks, ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` (a view)."""
        return self._layers[index]

    def keys(self, layer: int) -> torch.Tensor:
        """``[num_blocks, num_kv_heads, block_size, head_dim]`` view of one layer's keys."""
        return self._storage[layer, :, 0]

    def values(self, layer: int) -> torch.Tensor:
        """``[num_blocks, num_kv_heads, block_size, head_dim]`` view of one layer's values."""
        return self._storage[layer, :, 1]
