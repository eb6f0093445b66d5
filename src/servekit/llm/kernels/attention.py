"""Python face of the C decode-attention kernel (``paged_attention.c``)."""

from __future__ import annotations

import torch

from servekit.llm.kernels import DTYPE_CODES, load_library

# Cached keys (x kv heads, over every sequence's block table) per thread below which the kernel runs
# on the calling thread alone: waking a second thread costs ~20 us here (AMD EPYC, passive waiting),
# as much as one sequence's 3 kv heads over ~500 keys take (batch 1: 2 threads won from ~1,000 keys).
KEYS_PER_THREAD = 1536


def attention_threads(num_seqs: int, max_blocks: int, block_size: int, num_kv_heads: int) -> int:
    """Threads for a decode-attention call of this size on PyTorch's pool (at least one)."""
    work = num_seqs * max_blocks * block_size * num_kv_heads
    return max(1, min(torch.get_num_threads(), work // KEYS_PER_THREAD))


def paged_decode_attention(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """One query token per sequence over its cached context; returns ``[num_seqs, heads * head_dim]``.

    ``query``: ``[num_seqs, heads, head_dim]``; ``layer_cache``: ``[num_blocks, 2, kv_heads,
    block_size, head_dim]`` (contiguous; float32, bfloat16 or float16, not necessarily the query's); ``block_tables``: int32 ``[num_seqs,
    max_blocks]``; ``context_lens``: int32 ``[num_seqs]``, keys visible to each sequence (its new
    token included, already written to the cache).
    """
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    num_seqs, num_heads, head_dim = query.shape
    _, _, num_kv_heads, block_size, _ = layer_cache.shape
    if query.dtype not in DTYPE_CODES or layer_cache.dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported dtypes: query {query.dtype}, cache {layer_cache.dtype}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if not layer_cache.is_contiguous():
        raise ValueError("the layer cache must be contiguous")
    if not query.is_contiguous():
        query = query.contiguous()
    if not block_tables.is_contiguous():
        block_tables = block_tables.contiguous()
    if not context_lens.is_contiguous():
        context_lens = context_lens.contiguous()
    out = torch.empty((num_seqs, num_heads * head_dim), dtype=query.dtype)
    status = library.paged_decode_attention(
        query.data_ptr(),
        layer_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        num_seqs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        block_tables.shape[1],
        sliding_window or 0,
        DTYPE_CODES[query.dtype],
        DTYPE_CODES[layer_cache.dtype],
        head_dim**-0.5 if scale is None else scale,
        num_threads or attention_threads(num_seqs, block_tables.shape[1], block_size, num_kv_heads),
    )
    if status != 0:
        raise MemoryError("paged_decode_attention could not allocate its scratch memory")
    return out


def rotary_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    slots: torch.Tensor,
    layer_cache: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rotate the query and key heads of ``qkv`` (float32 ``[tokens, (heads + 2 * kv_heads) *
    head_dim]``, rows ``[q | k | v]``) in place and write keys and values into the cache slots.

    ``cos``/``sin``: float32 ``[tokens, 1, rotary_dim]`` as ``RotaryEmbedding.cos_sin`` gives them
    (None: no rotary); ``slots``: int64 ``[tokens]``, block * block_size + offset; ``layer_cache``:
    ``[num_blocks, 2, kv_heads, block_size, head_dim]`` contiguous, of any kernel dtype.
    """
    library = load_library()
    if library is None:
        raise RuntimeError("the C kernels are not available (see servekit.llm.kernels)")
    tokens = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dtype != torch.float32 or qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be float32 [tokens, {width}] with unit column stride")
    if layer_cache.dtype not in DTYPE_CODES or not layer_cache.is_contiguous():
        raise ValueError("the layer cache must be contiguous, of a kernel dtype")
    if slots.dtype != torch.int64 or slots.shape != (tokens,) or not slots.is_contiguous():
        raise ValueError("slots must be contiguous int64 [tokens]")
    rotary_dim = 0
    if cos is not None and sin is not None:
        rotary_dim = cos.shape[-1]
        if (
            cos.dtype != torch.float32
            or sin.dtype != torch.float32
            or cos.numel() != tokens * rotary_dim
            or sin.shape != cos.shape
            or rotary_dim % 2
            or rotary_dim > head_dim
        ):
            raise ValueError("cos and sin must be float32 [tokens, 1, rotary_dim <= head_dim]")
        cos, sin = cos.contiguous(), sin.contiguous()
    library.rotary_write_kv(
        qkv.data_ptr(),
        qkv.stride(0),
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        rotary_dim,
        slots.data_ptr(),
        layer_cache.data_ptr(),
        DTYPE_CODES[layer_cache.dtype],
        tokens,
        num_heads,
        num_kv_heads,
        head_dim,
        layer_cache.shape[3],
    )
