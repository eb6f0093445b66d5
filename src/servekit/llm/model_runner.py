"""Runs one engine step: a batch of prefill chunks and decode tokens in a single forward pass.

The runner owns the model weights and the paged KV cache. The scheduler hands it, per sequence, the
tokens to compute this step, how many tokens of that sequence are already cached, and its block
table; the runner writes the new keys/values into their slots, attends over each sequence's context
and returns float32 logits for the last token of every sequence (and, on request, for every token of
the step, for prompt logprobs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from servekit.llm.attention import AttentionMetadata, build_attention_metadata
from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.kv_cache import (
    DEFAULT_KV_CACHE_MEMORY_BYTES,
    PagedKVCache,
    num_blocks_for_budget,
)
from servekit.llm.model_config import ModelConfig
from servekit.llm.models.registry import get_model_class

logger = logging.getLogger(__name__)


@dataclass
class ForwardBatch:
    token_ids: list[
        list[int]
    ]  # per sequence: tokens computed this step (a prefill chunk, or the newest token)
    start_positions: list[
        int
    ]  # per sequence: position of its first token this step (= tokens already cached)
    block_tables: list[list[int]]  # per sequence: physical KV block ids covering positions [0, start + len)
    all_logits: list[bool] | None = None  # per sequence: also return logits for every position of this step


@dataclass
class ForwardOutput:
    last_logits: torch.Tensor  # [num_seqs, vocab] float32, logits of each sequence's last token this step
    all_logits: list[torch.Tensor | None]  # per sequence [len, vocab] float32 when asked, else None


class ModelRunner:
    """The model plus its paged KV cache; ``execute`` runs one batched forward pass."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]],
        *,
        dtype: torch.dtype = torch.float32,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        quantization: str | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.block_size = block_size
        self.max_model_len = max_model_len or config.max_position_embeddings
        factory = get_model_class(config.architecture)
        with torch.no_grad():
            self.model = factory(
                config, dtype=dtype, max_model_len=self.max_model_len, quantization=quantization
            )
            self.model.load_weights(weights)
        if num_blocks is None:
            budget = (
                kv_cache_memory_bytes if kv_cache_memory_bytes is not None else DEFAULT_KV_CACHE_MEMORY_BYTES
            )
            num_blocks = num_blocks_for_budget(
                budget,
                num_layers=config.num_hidden_layers,
                block_size=block_size,
                num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                dtype=self.kv_cache_dtype,
            )
            if num_blocks <= 0:
                raise ValueError(f"kv_cache_memory_bytes={budget} is too small for even one KV block")
        self.num_blocks = num_blocks
        # The C decode kernel cannot soft-cap or add ALiBi biases: such models attend in PyTorch.
        self.decode_kernel = kernels_available(dtype, self.kv_cache_dtype) and not config.eager_attention
        # Every sliding window a layer uses (None: full attention), the first layer's first.
        self.windows = list(dict.fromkeys(config.window_of(i) for i in range(config.num_hidden_layers)))
        self.kv_cache = PagedKVCache(
            num_layers=config.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=self.kv_cache_dtype,
        )

    def execute(self, batch: ForwardBatch) -> ForwardOutput:
        """One forward pass over every sequence of ``batch`` (see ``ForwardBatch``)."""
        num_seqs = len(batch.token_ids)
        if num_seqs == 0:
            raise ValueError("empty batch")
        if len(batch.start_positions) != num_seqs or len(batch.block_tables) != num_seqs:
            raise ValueError("token_ids, start_positions and block_tables must have one entry per sequence")
        want_all = batch.all_logits or [False] * num_seqs
        block_size = self.block_size
        for tokens, start, table in zip(
            batch.token_ids, batch.start_positions, batch.block_tables, strict=True
        ):
            end = start + len(tokens)
            if not tokens:
                raise ValueError("every sequence needs at least one token this step")
            if end > self.max_model_len:
                raise ValueError(f"sequence of {end} tokens exceeds max_model_len={self.max_model_len}")
            if len(table) * block_size < end:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {end} tokens")
            # The C attention kernel reads blocks by id without bounds checks: refuse bad ids here.
            if min(table) < 0 or max(table) >= self.num_blocks:
                raise ValueError(
                    f"block table {table[:8]}... refers to blocks outside 0..{self.num_blocks - 1}"
                )

        decode = [i for i in range(num_seqs) if len(batch.token_ids[i]) == 1]
        prefill = [i for i in range(num_seqs) if len(batch.token_ids[i]) > 1]

        flat_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_offset = [0] * num_seqs
        for i in decode:
            start = batch.start_positions[i]
            row_offset[i] = len(flat_ids)
            flat_ids.append(batch.token_ids[i][0])
            positions.append(start)
            slots.append(batch.block_tables[i][start // block_size] * block_size + start % block_size)
        for i in prefill:
            start = batch.start_positions[i]
            table = batch.block_tables[i]
            row_offset[i] = len(flat_ids)
            flat_ids.extend(batch.token_ids[i])
            span = range(start, start + len(batch.token_ids[i]))
            positions.extend(span)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)

        def metadata_for(window: int | None) -> AttentionMetadata:
            return build_attention_metadata(
                block_size=block_size,
                decode_block_tables=[batch.block_tables[i] for i in decode],
                decode_context_lens=[batch.start_positions[i] + 1 for i in decode],
                prefill_block_tables=[batch.block_tables[i] for i in prefill],
                prefill_starts=[batch.start_positions[i] for i in prefill],
                prefill_lens=[len(batch.token_ids[i]) for i in prefill],
                slot_mapping=slot_mapping,
                dtype=self.dtype,
                sliding_window=window,
                decode_kernel=self.decode_kernel,
            )

        slot_mapping = torch.tensor(slots, dtype=torch.long)
        metadata = metadata_for(self.windows[0])
        for window in self.windows[1:]:
            metadata.variants[window] = metadata_for(window)

        # Rows of the hidden states to turn into logits, in the caller's sequence order.
        logit_rows: list[int] = []
        last_index: list[int] = []
        all_spans: list[tuple[int, int] | None] = []
        for i in range(num_seqs):
            length = len(batch.token_ids[i])
            if want_all[i]:
                all_spans.append((len(logit_rows), length))
                logit_rows.extend(range(row_offset[i], row_offset[i] + length))
                last_index.append(len(logit_rows) - 1)
            else:
                all_spans.append(None)
                last_index.append(len(logit_rows))
                logit_rows.append(row_offset[i] + length - 1)

        # no_grad rather than inference_mode: callers (the sampler) may modify the logits in place.
        with torch.no_grad():
            hidden = self.model.forward(
                torch.tensor(flat_ids, dtype=torch.long),
                torch.tensor(positions, dtype=torch.long),
                max(positions),
                self.kv_cache,
                metadata,
            )
            if len(logit_rows) == hidden.shape[0] and logit_rows == list(range(len(logit_rows))):
                selected = hidden  # a pure decode step: every row, already in order
            else:
                selected = hidden.index_select(0, torch.tensor(logit_rows, dtype=torch.long))
            logits = self.model.compute_logits(selected)
            last_logits = logits.index_select(0, torch.tensor(last_index)) if any(want_all) else logits
        all_logits: list[torch.Tensor | None] = [
            None if span is None else logits[span[0] : span[0] + span[1]] for span in all_spans
        ]
        return ForwardOutput(last_logits=last_logits, all_logits=all_logits)
