"""Python face of the C decode-attention kernel (``paged_attention.c``)."""

from __future__ import annotations

import torch

from servekit.llm.kernels import DTYPE_CODES, load_library


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
    query = query.contiguous()
    block_tables = block_tables.contiguous()
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
        num_threads or torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged_decode_attention could not allocate its scratch memory")
    return out
