"""Decode steps replayed as CUDA graphs (opt-in: ``EngineConfig.cuda_graphs``), eager otherwise.

A pure decode step (one new token per sequence, no prompt logits) of ``n`` sequences runs in the
graph captured for the smallest size >= n (1, 2, 4, 8, ... up to the largest): the step's ids,
positions, cache slots, context lengths and block tables are copied into that graph's static
inputs and the graph replays the whole forward, logits included. Shapes are fixed by padding:
every sequence attends over ``ceil(max_model_len / block_size)`` blocks (masked past its length)
and padding rows write their keys into a scratch block no sequence owns. Steps of other shapes, and
batches larger than the largest size, run eagerly as usual.

With ``capture=False`` the same static-shape step runs eagerly (no graph): that is how the CPU tests
check the padding and masking against the ordinary path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from servekit.llm.attention import AttentionMetadata

if TYPE_CHECKING:
    from servekit.llm.model_runner import ForwardBatch, ModelRunner

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 64


def graph_sizes(max_num_seqs: int) -> list[int]:
    limit = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [1]
    while sizes[-1] < limit:
        sizes.append(min(sizes[-1] * 2, limit))
    return sizes


@dataclass
class _Static:
    token_ids: torch.Tensor  # [size]
    positions: torch.Tensor  # [size]
    slots: torch.Tensor  # [size]
    lens: torch.Tensor  # [size] context length (position + 1); 1 for padding rows
    block_ids: torch.Tensor  # [size * max_blocks]
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, scratch_block: int, *, capture: bool) -> None:
        self.runner = runner
        self.scratch_block = scratch_block
        self.capture = capture
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.sizes = graph_sizes(max_num_seqs)
        self._static: dict[int, _Static] = {}
        self._pool: Any = None
        for size in reversed(self.sizes):  # the largest first: the others reuse its memory pool
            self._static[size] = self._prepare(size)

    def supports(self, batch: ForwardBatch) -> bool:
        return (
            len(batch.token_ids) <= self.sizes[-1]
            and not (batch.all_logits and any(batch.all_logits))
            and all(len(tokens) == 1 for tokens in batch.token_ids)
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[len(batch), vocab]`` of a decode step ``supports`` accepted."""
        count = len(batch.token_ids)
        size = next(s for s in self.sizes if s >= count)
        static = self._static[size]
        block_size = self.runner.block_size
        pad = size - count
        starts = batch.start_positions
        slots = [
            table[p // block_size] * block_size + p % block_size
            for table, p in zip(batch.block_tables, starts, strict=True)
        ]
        tables = [
            list(t[: self.max_blocks]) + [self.scratch_block] * (self.max_blocks - len(t[: self.max_blocks]))
            for t in batch.block_tables
        ]
        host = torch.tensor(
            [
                [tokens[0] for tokens in batch.token_ids] + [0] * pad,
                list(starts) + [0] * pad,
                slots + [self.scratch_block * block_size] * pad,
                [p + 1 for p in starts] + [1] * pad,
            ],
            dtype=torch.long,
        )
        blocks = torch.tensor(
            [b for table in tables for b in table] + [self.scratch_block] * (pad * self.max_blocks),
            dtype=torch.long,
        )
        device = self.runner.device
        host, blocks = host.to(device, non_blocking=True), blocks.to(device, non_blocking=True)
        static.token_ids.copy_(host[0])
        static.positions.copy_(host[1])
        static.slots.copy_(host[2])
        static.lens.copy_(host[3])
        static.block_ids.copy_(blocks)
        if static.graph is not None:
            static.graph.replay()
            assert static.logits is not None
            return static.logits[:count]
        return self._forward(static)[:count]

    def _prepare(self, size: int) -> _Static:
        device = self.runner.device
        scratch_slot = self.scratch_block * self.runner.block_size

        def zeros(n: int, fill: int = 0) -> torch.Tensor:
            return torch.full((n,), fill, dtype=torch.long, device=device)

        static = _Static(
            token_ids=zeros(size),
            positions=zeros(size),
            slots=zeros(size, scratch_slot),
            lens=zeros(size, 1),
            block_ids=zeros(size * self.max_blocks, self.scratch_block),
        )
        if not self.capture:
            return static
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialisation must not happen during capture
                self._forward(static)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static.logits = self._forward(static)
        self._pool = graph.pool()
        static.graph = graph
        return static

    def _metadata(self, static: _Static, window: int | None) -> AttentionMetadata:
        runner = self.runner
        key_len = self.max_blocks * runner.block_size
        keys = torch.arange(key_len, device=runner.device).unsqueeze(0)
        lens = static.lens.unsqueeze(1)
        visible = keys < lens
        if window is not None:
            visible &= keys > lens - 1 - window
        mask = torch.zeros(visible.shape, dtype=runner.dtype, device=runner.device)
        mask = mask.masked_fill(~visible, float("-inf")).view(-1, 1, 1, key_len)
        return AttentionMetadata(
            write_blocks=torch.div(static.slots, runner.block_size, rounding_mode="floor"),
            write_offsets=torch.remainder(static.slots, runner.block_size),
            num_decode=static.token_ids.shape[0],
            decode_block_ids=static.block_ids,
            decode_num_blocks=self.max_blocks,
            decode_key_len=key_len,
            decode_mask=mask,
            prefills=[],
            sliding_window=window,
        )

    def _forward(self, static: _Static) -> torch.Tensor:
        runner = self.runner
        with torch.no_grad():
            metadata = self._metadata(static, runner.windows[0])
            for window in runner.windows[1:]:
                metadata.variants[window] = self._metadata(static, window)
            hidden = runner.model.forward(
                static.token_ids, static.positions, runner.max_model_len - 1, runner.kv_cache, metadata
            )
            return runner.model.compute_logits(hidden)
