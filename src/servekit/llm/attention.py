"""Attention over the paged KV cache for a flattened (varlen) batch.

The runner orders a step's tokens as: every single-token (decode) sequence first, one token each,
then every multi-token (prefill chunk) sequence, its tokens contiguous. ``AttentionMetadata`` is
built once per step and shared by all layers; ``paged_attention`` runs per layer:

* the new keys/values are written into their cache slots;
* decode sequences are attended by the C kernel straight over their blocks
  (``servekit.llm.kernels``) when it is available; otherwise in one batched
  ``scaled_dot_product_attention`` call over their gathered blocks, padded to the longest context
  and masked (the query heads sharing a KV head are folded into the query axis, so GQA needs no
  repeated keys);
* each prefill chunk is attended on its own: straight over its fresh keys/values with a causal mask
  when nothing is cached before it (through FlashAttention on CUDA when ``flash-attn`` is installed:
  ``servekit.llm.flash``), else over its gathered blocks with an offset causal mask.

Families that soft-cap attention scores (Gemma 2) or add ALiBi biases (BLOOM, MPT) take an eager
PyTorch path (scores, cap, bias, mask, softmax), for decode rows too: the C kernel lacks both, so the
runner builds such models' metadata without it. Models whose layers use different sliding windows
(Gemma 2/3) get one metadata per window, built once per step (``AttentionMetadata.for_window``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from servekit.llm.flash import flash_causal_prefill
from servekit.llm.kernels.attention import paged_decode_attention


@dataclass
class PrefillChunk:
    """Where one multi-token chunk sits in the step, and what it attends to."""

    token_offset: int  # first row of this chunk in the flattened batch
    num_tokens: int
    block_ids: torch.Tensor | None  # blocks covering its whole context; None when nothing is cached before it
    mask: torch.Tensor | None  # [num_tokens, len(block_ids) * block_size] additive (0 / -inf); None: causal
    start: int = 0  # position of its first token


@dataclass
class AttentionMetadata:
    # Where every new token's key/value goes: its cache slot (block * block_size + offset), split.
    write_blocks: torch.Tensor  # [num_tokens]
    write_offsets: torch.Tensor  # [num_tokens]
    num_decode: int  # the first num_decode rows are single-token sequences
    decode_block_ids: torch.Tensor | None  # [num_decode * decode_num_blocks], padded block tables, flattened
    decode_num_blocks: int
    decode_key_len: int  # keys to attend per decode sequence: the gathered blocks, cut to the longest context
    decode_mask: (
        torch.Tensor | None
    )  # [num_decode, 1, 1, decode_key_len] additive (0 / -inf); None: all visible
    prefills: list[PrefillChunk]
    # Set when the C decode kernel runs: int32 [num_decode, decode_num_blocks] tables, int32 lengths.
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    sliding_window: int | None = None
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]: block * block_size + offset
    # The same step's metadata for the other sliding windows some layers use, keyed by window.
    variants: dict[int | None, AttentionMetadata] = field(default_factory=dict)

    def for_window(self, window: int | None) -> AttentionMetadata:
        """The metadata of layers attending within ``window`` tokens (None: the whole context)."""
        if window == self.sliding_window:
            return self
        return self.variants[window]


def build_attention_metadata(
    *,
    block_size: int,
    decode_block_tables: Sequence[Sequence[int]],
    decode_context_lens: Sequence[int],
    prefill_block_tables: Sequence[Sequence[int]],
    prefill_starts: Sequence[int],
    prefill_lens: Sequence[int],
    slot_mapping: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    decode_kernel: bool = False,
    device: torch.device | None = None,
) -> AttentionMetadata:
    """Tensors every layer reuses this step (decode sequences first, then prefill chunks).

    Masks are built additive, in the model dtype, once per step: handing SDPA a boolean mask makes it
    convert the mask again in every layer. With ``decode_kernel`` the decode rows get int32 block
    tables and lengths for the C kernel instead of gathered ids and a mask. The tensors are built on
    the CPU and moved to ``device`` (where ``slot_mapping`` already is) together, once per step.
    """
    num_decode = len(decode_block_tables)
    decode_block_ids: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    decode_num_blocks = 0
    decode_key_len = 0
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    if num_decode and decode_kernel:
        decode_num_blocks = max(len(table) for table in decode_block_tables)
        padded = [list(table) + [0] * (decode_num_blocks - len(table)) for table in decode_block_tables]
        decode_tables = torch.tensor(padded, dtype=torch.int32)
        decode_lens = torch.tensor(decode_context_lens, dtype=torch.int32)
        decode_key_len = max(decode_context_lens)
    elif num_decode:
        decode_key_len = max(decode_context_lens)
        decode_num_blocks = (decode_key_len + block_size - 1) // block_size
        padded = [
            list(table[:decode_num_blocks]) + [0] * (decode_num_blocks - min(len(table), decode_num_blocks))
            for table in decode_block_tables
        ]
        decode_block_ids = torch.tensor(padded, dtype=torch.long).view(-1)
        window_applies = sliding_window is not None and decode_key_len > sliding_window
        if window_applies or min(decode_context_lens) != decode_key_len:
            key_positions = torch.arange(decode_key_len).unsqueeze(0)
            lengths = torch.tensor(decode_context_lens, dtype=torch.long).unsqueeze(1)
            visible = key_positions < lengths
            if sliding_window is not None:
                visible &= key_positions > lengths - 1 - sliding_window
            decode_mask = _additive(visible, dtype).view(num_decode, 1, 1, -1)

    prefills: list[PrefillChunk] = []
    offset = num_decode
    for table, start, length in zip(prefill_block_tables, prefill_starts, prefill_lens, strict=True):
        window_applies = sliding_window is not None and start + length > sliding_window
        if start == 0 and not window_applies:
            prefills.append(PrefillChunk(offset, length, None, None, start))
        else:
            num_blocks = (start + length + block_size - 1) // block_size
            block_ids = torch.tensor(list(table[:num_blocks]), dtype=torch.long)
            query_positions = torch.arange(start, start + length).unsqueeze(1)
            key_positions = torch.arange(num_blocks * block_size).unsqueeze(0)
            mask = key_positions <= query_positions
            if sliding_window is not None:
                mask &= key_positions > query_positions - sliding_window
            prefills.append(PrefillChunk(offset, length, block_ids, _additive(mask, dtype), start))
        offset += length
    if device is not None and device.type != "cpu":
        decode_block_ids, decode_mask = _to(decode_block_ids, device), _to(decode_mask, device)
        for chunk in prefills:
            chunk.block_ids, chunk.mask = _to(chunk.block_ids, device), _to(chunk.mask, device)
    return AttentionMetadata(
        write_blocks=torch.div(slot_mapping, block_size, rounding_mode="floor"),
        write_offsets=torch.remainder(slot_mapping, block_size),
        num_decode=num_decode,
        decode_block_ids=decode_block_ids,
        decode_num_blocks=decode_num_blocks,
        decode_key_len=decode_key_len,
        decode_mask=decode_mask,
        prefills=prefills,
        decode_tables=decode_tables,
        decode_lens=decode_lens,
        sliding_window=sliding_window,
        slot_mapping=slot_mapping,
    )


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, float("-inf"))


@dataclass(frozen=True)
class AttentionOptions:
    """How a layer scores queries against keys, beyond plain scaled dot products."""

    scale: float | None = None  # None: head_dim ** -0.5
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
    alibi_slopes: torch.Tensor | None = None  # [num_heads]: scores += slope * key position (BLOOM, MPT)

    @property
    def eager(self) -> bool:
        return self.softcap is not None or self.alibi_slopes is not None


PLAIN = AttentionOptions()


def _eager_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    options: AttentionOptions,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """Attention written out, for what SDPA cannot express; ``queries [b, heads, q, dim]``, ``keys``
    and ``values [b, kv_heads, k, dim]`` (repeated here to the query heads), ``mask`` additive."""
    group = queries.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    scale = options.scale if options.scale is not None else queries.shape[-1] ** -0.5
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale
    if options.softcap is not None:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    if options.alibi_slopes is not None:
        # softmax ignores a per-row constant, so slope * key position equals slope * (key - query).
        scores = scores + options.alibi_slopes.to(scores.dtype).view(1, -1, 1, 1) * key_positions.to(
            scores.dtype
        ).view(1, 1, 1, -1)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_cache: torch.Tensor,
    metadata: AttentionMetadata,
    options: AttentionOptions = PLAIN,
    *,
    cached: bool = False,
) -> torch.Tensor:
    """Write the new keys/values into the cache and attend; returns ``[num_tokens, heads * head_dim]``.

    ``cached``: the caller already wrote them (``kernels.attention.rotary_write_kv``).

    ``query``: ``[num_tokens, num_heads, head_dim]``; ``key``, ``value``: ``[num_tokens, num_kv_heads,
    head_dim]`` (rotary embedding already applied to queries and keys); ``layer_cache``: ``[num_blocks,
    2, num_kv_heads, block_size, head_dim]``, possibly narrower than the query (a bfloat16 cache for a
    float32 model): keys/values are rounded to it when written and widened back when read.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    block_size = layer_cache.shape[3]
    if layer_cache.dtype != key.dtype:
        # Attend to what the cache holds, also within a fresh prefill: the same tokens then give the
        # same results whether their keys come from this step or from the (prefix) cache.
        key = key.to(layer_cache.dtype)
        value = value.to(layer_cache.dtype)
    if not cached:
        layer_cache[metadata.write_blocks, 0, :, metadata.write_offsets] = key
        layer_cache[metadata.write_blocks, 1, :, metadata.write_offsets] = value
    if key.dtype != query.dtype:
        key = key.to(query.dtype)
        value = value.to(query.dtype)

    decoded: torch.Tensor | None = None  # [num_decode, heads * head_dim]
    num_decode = metadata.num_decode
    # Prefill chunks write their heads straight into their rows of one output (rows in token order:
    # the decodes, then each chunk at its offset), not into a copy each and then a cat of them.
    result = query.new_empty(query.shape[0], num_heads * head_dim) if metadata.prefills else None
    if num_decode and metadata.decode_lens is not None:
        assert metadata.decode_tables is not None and not options.eager
        out = paged_decode_attention(
            query[:num_decode] if num_decode < query.shape[0] else query,
            layer_cache,
            metadata.decode_tables,
            metadata.decode_lens,
            sliding_window=metadata.sliding_window,
            scale=options.scale,
        )
        decoded = out
    elif num_decode:
        assert metadata.decode_block_ids is not None
        # [num_decode, blocks, 2, kv_heads, block_size, head_dim] -> keys [num_decode, kv_heads, keys, head_dim]
        context = layer_cache.index_select(0, metadata.decode_block_ids).view(
            num_decode, metadata.decode_num_blocks, 2, num_kv_heads, block_size, head_dim
        )
        keys, values = (
            context[:, :, part]
            .transpose(1, 2)
            .reshape(num_decode, num_kv_heads, -1, head_dim)[:, :, : metadata.decode_key_len]
            .to(query.dtype)
            for part in (0, 1)
        )
        if options.eager:
            out = _eager_attention(
                query[:num_decode].unsqueeze(2),
                keys,
                values,
                metadata.decode_mask,
                options,
                torch.arange(metadata.decode_key_len, device=query.device),
            )
        else:
            queries = query[:num_decode].view(num_decode, num_kv_heads, group, head_dim)
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=metadata.decode_mask, scale=options.scale
            )
        decoded = out.reshape(num_decode, num_heads * head_dim)

    for chunk in metadata.prefills:
        rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
        queries = query[rows].transpose(0, 1).unsqueeze(0)
        if chunk.block_ids is None:
            keys = key[rows].transpose(0, 1).unsqueeze(0)
            values = value[rows].transpose(0, 1).unsqueeze(0)
            if options.eager:
                causal = _additive(
                    torch.ones(
                        chunk.num_tokens, chunk.num_tokens, dtype=torch.bool, device=query.device
                    ).tril_(),
                    query.dtype,
                )
                key_positions = torch.arange(chunk.start, chunk.start + chunk.num_tokens, device=query.device)
                out = _eager_attention(queries, keys, values, causal, options, key_positions)
            else:
                flash = flash_causal_prefill(query[rows], key[rows], value[rows], options.scale)
                if flash is not None:
                    assert result is not None
                    result[rows] = flash.reshape(chunk.num_tokens, num_heads * head_dim)
                    continue
                out = F.scaled_dot_product_attention(
                    queries, keys, values, is_causal=True, enable_gqa=group > 1, scale=options.scale
                )
        else:
            context = layer_cache.index_select(0, chunk.block_ids)  # [blocks, 2, kv_heads, block_size, dim]
            keys, values = (
                context[:, part].transpose(0, 1).reshape(1, num_kv_heads, -1, head_dim).to(query.dtype)
                for part in (0, 1)
            )
            if options.eager:
                key_positions = torch.arange(keys.shape[2], device=query.device)
                out = _eager_attention(queries, keys, values, chunk.mask, options, key_positions)
            else:
                out = F.scaled_dot_product_attention(
                    queries, keys, values, attn_mask=chunk.mask, enable_gqa=group > 1, scale=options.scale
                )
        assert result is not None
        result[rows].view(chunk.num_tokens, num_heads, head_dim).copy_(out[0].transpose(0, 1))

    if result is None:
        assert decoded is not None, "a step of no tokens"
        return decoded
    if decoded is not None:
        result[:num_decode] = decoded
    return result
