"""The attention block over the paged KV cache: fused q/k/v projection, q/k norms, rotary, paged
attention, output projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servekit.llm.attention import AttentionMetadata, AttentionOptions, paged_attention
from servekit.llm.kernels.attention import paged_decode_attention, rotary_write_kv
from servekit.llm.models.layers import Norm, Projection
from servekit.llm.models.rotary import RotaryEmbedding

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SelfAttention:
    qkv: Projection | None  # [q | k | v] rows; None: the block projects them with its MLP's input
    o: Projection
    q_norm: Norm | None
    k_norm: Norm | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_per_head: bool = True  # q/k norms over each head (Qwen3) or over all heads (OLMo 2)
    fused: bool = False  # the C kernels may rotate q/k and write the cache (float32 on a CPU)

    def __call__(
        self,
        normed: torch.Tensor,
        rotary: CosSin | None,
        layer_cache: torch.Tensor,
        metadata: AttentionMetadata,
        options: AttentionOptions,
    ) -> torch.Tensor:
        assert self.qkv is not None, "the block projects q/k/v: call attend"
        return self.attend(self.qkv(normed), rotary, layer_cache, metadata, options)

    @property
    def qkv_width(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def attend(
        self,
        qkv: torch.Tensor,
        rotary: CosSin | None,
        layer_cache: torch.Tensor,
        metadata: AttentionMetadata,
        options: AttentionOptions,
    ) -> torch.Tensor:
        """The block after its q/k/v projection: ``qkv`` ``[tokens, qkv_width]``, unit column stride."""
        tokens = qkv.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        slots = metadata.slot_mapping
        if self.fused and self.q_norm is None and slots is not None and qkv.device.type == "cpu":
            # One C pass instead of ~20 operators: rotary in place, then keys/values into the cache.
            cos, sin = rotary if rotary is not None else (None, None)
            rotary_write_kv(
                qkv, cos, sin, slots, layer_cache, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim
            )
            query = qkv[:, :q_width].view(tokens, heads, head_dim)
            if not metadata.prefills and metadata.decode_tables is not None and not options.eager:
                assert metadata.decode_lens is not None  # a pure decode step: the kernel reads the cache
                out = paged_decode_attention(
                    query,
                    layer_cache,
                    metadata.decode_tables,
                    metadata.decode_lens,
                    sliding_window=metadata.sliding_window,
                    scale=options.scale,
                )
                return self.o(out)
            key = qkv[:, q_width : q_width + kv_width].view(tokens, kv_heads, head_dim)
            value = qkv[:, q_width + kv_width :].view(tokens, kv_heads, head_dim)
            out = paged_attention(query, key, value, layer_cache, metadata, options, cached=True)
            return self.o(out)
        query = qkv[:, :q_width]
        key = qkv[:, q_width : q_width + kv_width]
        value = qkv[:, q_width + kv_width :].view(tokens, kv_heads, head_dim)
        normed_qk = self.q_norm is not None and self.k_norm is not None
        if normed_qk and not self.norm_per_head:
            assert self.q_norm is not None and self.k_norm is not None
            query, key = self.q_norm(query), self.k_norm(key)
        query = query.reshape(tokens, heads, head_dim)
        key = key.reshape(tokens, kv_heads, head_dim)
        if normed_qk and self.norm_per_head:
            assert self.q_norm is not None and self.k_norm is not None
            query, key = self.q_norm(query), self.k_norm(key)
        if rotary is not None:
            query = RotaryEmbedding.apply(query, *rotary)
            key = RotaryEmbedding.apply(key, *rotary)
        return self.o(paged_attention(query, key, value, layer_cache, metadata, options))
