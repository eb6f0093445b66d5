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
from servekit.llm.cuda_graphs import DecodeGraphs
from servekit.llm.device import kv_budget_from_memory
from servekit.llm.distributed import SINGLE, TPGroup, head_split
from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.kv_cache import (
    DEFAULT_KV_CACHE_MEMORY_BYTES,
    PagedKVCache,
    kv_cache_block_bytes,
    num_blocks_for_budget,
)
from servekit.llm.model_config import ModelConfig
from servekit.llm.models.native_decode import NativeDecode, native_decode_enabled, native_decode_step
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
    # per sequence: whether its last token's logits are wanted (None: every sequence's). A prompt chunk
    # that does not complete its prompt samples nothing: its LM-head row (49152 x 576 multiply-adds for
    # the default model) is skipped.
    sampled: list[bool] | None = None


@dataclass
class ForwardOutput:
    # [sequences, vocab] float32, logits of the last token this step of each sequence ``sampled`` wants
    # (all of them when it is None), in batch order
    last_logits: torch.Tensor
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
        device: torch.device | str = "cpu",
        tp: TPGroup = SINGLE,
        gpu_memory_utilization: float | None = None,
        profile_tokens: int = 2048,
        cuda_graphs: bool = False,
        max_num_seqs: int = 256,
    ) -> None:
        """``tp``: this process's rank when the model is split over several (``distributed``); every
        rank builds its runner the same way and runs the same ``forward`` calls. ``cuda_graphs``:
        decode steps replay captured graphs (``cuda_graphs``; on a CPU the same padded static-shape
        step runs eagerly, for tests)."""
        self.config = config
        self.device = torch.device(device)
        self.tp = tp
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.block_size = block_size
        self.max_model_len = max_model_len or config.max_position_embeddings
        factory = get_model_class(config.architecture)
        with torch.no_grad():
            self.model = factory(
                config,
                dtype=dtype,
                max_model_len=self.max_model_len,
                quantization=quantization,
                device=self.device,
                tp=tp,
            )
            self.model.load_weights(weights)
        self.num_kv_heads = head_split(config, tp).num_kv_heads
        # The C decode kernel runs on CPUs only, and cannot soft-cap or add ALiBi biases: such models
        # attend in PyTorch (gathered blocks + SDPA), as every model does on other devices.
        self.decode_kernel = (
            self.device.type == "cpu"
            and kernels_available(dtype, self.kv_cache_dtype)
            and not config.eager_attention
        )
        # Every sliding window a layer uses (None: full attention), the first layer's first.
        self.windows = list(dict.fromkeys(config.window_of(i) for i in range(config.num_hidden_layers)))
        if num_blocks is None and gpu_memory_utilization is not None:
            num_blocks = self._profiled_num_blocks(gpu_memory_utilization, profile_tokens)
        if num_blocks is None:
            budget = (
                kv_cache_memory_bytes if kv_cache_memory_bytes is not None else DEFAULT_KV_CACHE_MEMORY_BYTES
            )
            num_blocks = num_blocks_for_budget(
                budget,
                num_layers=config.num_hidden_layers,
                block_size=block_size,
                num_kv_heads=self.num_kv_heads,
                head_dim=config.head_dim,
                dtype=self.kv_cache_dtype,
            )
            if num_blocks <= 0:
                raise ValueError(f"kv_cache_memory_bytes={budget} is too small for even one KV block")
        self.num_blocks = num_blocks
        # With decode graphs one more block, past those the block manager hands out, takes the
        # keys of padding rows.
        self.kv_cache = self._new_cache(num_blocks + 1 if cuda_graphs else num_blocks)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            self.graphs = self._decode_graphs(max_num_seqs)
        # Decode-only steps in one C call (native_decode: one sequence, or GEMM-sized batches), where
        # the model allows.
        self.native_decode: NativeDecode | None = None
        if self.decode_kernel and not tp.enabled and self.graphs is None and native_decode_enabled():
            self.native_decode = native_decode_step(self.model, self.kv_cache)

    def _decode_graphs(self, max_num_seqs: int) -> DecodeGraphs | None:
        capture = self.device.type == "cuda"
        try:
            graphs = DecodeGraphs(self, max_num_seqs, self.num_blocks, capture=capture)
        except RuntimeError as error:  # capture is best effort: decode then runs eagerly
            logger.warning("CUDA graph capture failed, decoding eagerly: %s", error)
            return None
        logger.info("decode steps of %s sequences run as CUDA graphs", graphs.sizes)
        return graphs

    def _new_cache(self, num_blocks: int) -> PagedKVCache:
        return PagedKVCache(
            num_layers=self.config.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=self.kv_cache_dtype,
            device=self.device,
        )

    def _profiled_num_blocks(self, utilization: float, profile_tokens: int) -> int:
        """CUDA: the KV blocks that fit in ``utilization`` of the GPU after the weights and the
        activations of the largest step (one prefill of ``profile_tokens`` tokens, run once here)."""
        device = self.device
        tokens = min(profile_tokens, self.max_model_len)
        probe_blocks = -(-tokens // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        self.num_blocks = probe_blocks
        self.kv_cache = self._new_cache(probe_blocks)
        self.forward(ForwardBatch([[0] * tokens], [0], [list(range(probe_blocks))]))
        torch.cuda.synchronize(device)
        probe_bytes = self.kv_cache.memory_bytes
        del self.kv_cache
        free, total = torch.cuda.mem_get_info(device)
        others = (total - free) - torch.cuda.memory_reserved(device)  # other processes, CUDA context
        used = others + torch.cuda.max_memory_allocated(device) - probe_bytes
        torch.cuda.empty_cache()
        budget = kv_budget_from_memory(total, used, utilization)
        num_blocks = budget // kv_cache_block_bytes(
            num_layers=self.config.num_hidden_layers,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=self.kv_cache_dtype,
        )
        if self.tp.enabled:  # every rank holds the same blocks: the tightest rank decides
            import torch.distributed as dist

            agreed = torch.tensor([num_blocks], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.tp.group)
            num_blocks = int(agreed.item())
        logger.info(
            "gpu_memory_utilization=%s: %.2f GiB in use after a %d-token profile step, %d KV blocks",
            utilization,
            used / 2**30,
            tokens,
            num_blocks,
        )
        return num_blocks

    def execute(self, batch: ForwardBatch) -> ForwardOutput:
        """One forward pass over every sequence of ``batch`` (see ``ForwardBatch``); the logits are on
        the runner's device."""
        self.check(batch)
        return self.forward(batch)

    def check(self, batch: ForwardBatch) -> None:
        """Raise ValueError when ``batch`` cannot run (before any rank starts on it)."""
        num_seqs = len(batch.token_ids)
        if num_seqs == 0:
            raise ValueError("empty batch")
        if len(batch.start_positions) != num_seqs or len(batch.block_tables) != num_seqs:
            raise ValueError("token_ids, start_positions and block_tables must have one entry per sequence")
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

    def forward(self, batch: ForwardBatch) -> ForwardOutput:
        """``execute`` without the checks (tensor-parallel ranks run batches rank 0 checked)."""
        num_seqs = len(batch.token_ids)
        if self.graphs is not None and self.graphs.supports(batch):
            return ForwardOutput(self.graphs.run(batch), [None] * num_seqs)
        want_all = batch.all_logits or [False] * num_seqs
        if self.native_decode is not None and num_seqs == 1 and len(batch.token_ids[0]) == 1:
            with torch.no_grad():
                logits = self.native_decode(
                    batch.token_ids[0][0], batch.start_positions[0], batch.block_tables[0]
                )
            return ForwardOutput(logits, [logits if want_all[0] else None])
        if (
            self.native_decode is not None
            and self.native_decode.runs_batch(num_seqs)
            and all(len(ids) == 1 for ids in batch.token_ids)
            and (batch.sampled is None or all(batch.sampled))
        ):
            with torch.no_grad():
                logits = self.native_decode.batch(
                    [ids[0] for ids in batch.token_ids], batch.start_positions, batch.block_tables
                )
            return ForwardOutput(
                logits, [logits[i : i + 1] if want_all[i] else None for i in range(num_seqs)]
            )
        block_size = self.block_size
        device = self.device

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
                device=device,
            )

        # Host-side lists become device tensors here, one copy each per step.
        slot_mapping = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        metadata = metadata_for(self.windows[0])
        for window in self.windows[1:]:
            metadata.variants[window] = metadata_for(window)

        # Rows of the hidden states to turn into logits, in the caller's sequence order.
        logit_rows: list[int] = []
        last_index: list[int] = []
        all_spans: list[tuple[int, int] | None] = []
        sampled = batch.sampled or [True] * num_seqs
        for i in range(num_seqs):
            length = len(batch.token_ids[i])
            if want_all[i]:
                all_spans.append((len(logit_rows), length))
                logit_rows.extend(range(row_offset[i], row_offset[i] + length))
                if sampled[i]:
                    last_index.append(len(logit_rows) - 1)
            else:
                all_spans.append(None)
                if sampled[i]:
                    last_index.append(len(logit_rows))
                    logit_rows.append(row_offset[i] + length - 1)

        # no_grad rather than inference_mode: callers (the sampler) may modify the logits in place.
        with torch.no_grad():
            hidden = self.model.forward(
                torch.tensor(flat_ids, dtype=torch.long).to(device, non_blocking=True),
                torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
                max(positions),
                self.kv_cache,
                metadata,
            )
            if not logit_rows:  # only prompt chunks that do not complete their prompts
                logits = torch.empty((0, self.config.vocab_size), dtype=torch.float32, device=device)
            elif len(logit_rows) == hidden.shape[0] and logit_rows == list(range(len(logit_rows))):
                logits = self.model.compute_logits(hidden)  # a pure decode step: every row, in order
            else:
                rows = torch.tensor(logit_rows, dtype=torch.long).to(device, non_blocking=True)
                logits = self.model.compute_logits(hidden.index_select(0, rows))
            if any(want_all):
                index = torch.tensor(last_index, dtype=torch.long).to(device, non_blocking=True)
                last_logits = logits.index_select(0, index)
            else:
                last_logits = logits
        all_logits: list[torch.Tensor | None] = [
            None if span is None else logits[span[0] : span[0] + span[1]] for span in all_spans
        ]
        return ForwardOutput(last_logits=last_logits, all_logits=all_logits)
