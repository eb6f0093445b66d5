"""Multi-head latent attention (DeepSeek-V2/V3), with the compressed KV in the paged cache.

Each token's keys and values are one latent vector ``c`` (``kv_lora_rank`` wide, normed) plus one
rotary key ``k_rot`` shared by every head. The cache stores exactly that, as a single KV head of
width ``kv_lora_rank + rope_dim``: key ``[c ; k_rot]``, value ``[c ; 0]``. Queries are absorbed into
the latent space (``q_nope @ W_uk`` per head), so attention runs as multi-query attention straight
over the latents, and each head's output is lifted back with ``W_uv`` before the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servekit.llm.attention import AttentionMetadata, AttentionOptions, paged_attention
from servekit.llm.models.layers import Norm, Projection
from servekit.llm.models.rotary import RotaryEmbedding
from servekit.llm.models.self_attention import CosSin


@dataclass
class LatentAttention:
    q: Projection | None  # hidden -> heads * (nope + rope), when queries are not low-rank
    q_a: Projection | None  # hidden -> q_lora_rank
    q_a_norm: Norm | None
    q_b: Projection | None  # q_lora_rank -> heads * (nope + rope)
    kv_a: Projection  # hidden -> kv_lora_rank + rope
    kv_norm: Norm
    w_uk: torch.Tensor  # [heads, nope, kv_lora_rank]
    w_uv: torch.Tensor  # [heads, kv_lora_rank, v_dim] (transposed for the matmul)
    o: Projection
    num_heads: int
    nope_dim: int
    rope_dim: int
    latent_dim: int

    def __call__(
        self,
        normed: torch.Tensor,
        rotary: CosSin | None,
        layer_cache: torch.Tensor,
        metadata: AttentionMetadata,
        options: AttentionOptions,
    ) -> torch.Tensor:
        tokens, heads, rank, rope = normed.shape[0], self.num_heads, self.latent_dim, self.rope_dim
        if self.q is not None:
            query = self.q(normed)
        else:
            assert self.q_a is not None and self.q_a_norm is not None and self.q_b is not None
            query = self.q_b(self.q_a_norm(self.q_a(normed)))
        query = query.view(tokens, heads, self.nope_dim + rope)
        compressed = self.kv_a(normed)
        latent = self.kv_norm(compressed[:, :rank]).unsqueeze(1)  # [tokens, 1, rank]
        q_rot, k_rot = query[..., self.nope_dim :], compressed[:, rank:].view(tokens, 1, rope)
        if rotary is not None:
            q_rot, k_rot = RotaryEmbedding.apply(q_rot, *rotary), RotaryEmbedding.apply(k_rot, *rotary)
        absorbed = torch.bmm(query[..., : self.nope_dim].transpose(0, 1), self.w_uk).transpose(0, 1)
        attended = paged_attention(
            torch.cat((absorbed, q_rot), dim=-1),
            torch.cat((latent, k_rot), dim=-1),
            torch.cat((latent, torch.zeros_like(k_rot)), dim=-1),
            layer_cache,
            metadata,
            options,
        ).view(tokens, heads, rank + rope)[..., :rank]
        lifted = torch.bmm(attended.transpose(0, 1), self.w_uv).transpose(0, 1)  # [tokens, heads, v_dim]
        return self.o(lifted.reshape(tokens, -1))
