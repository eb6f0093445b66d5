"""One implementation of the Llama family: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Differences between members are configuration, not code: grouped-query attention, q/k/v biases
(Qwen2), per-head RMSNorm on queries and keys (Qwen3), tied embeddings, rope scaling.

Weights arrive as ``(name, tensor)`` pairs with Hugging Face names and layout and are fused on load
(q/k/v into one projection, gate/up into another, so each layer runs four matmuls), then handed to
oneDNN pre-packed (``servekit.llm.models.linear``).
The model works on a flattened batch (``[num_tokens]`` ids and positions) and reads/writes the paged
KV cache through ``servekit.llm.attention``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servekit.llm.attention import AttentionMetadata, paged_attention
from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.elementwise import add_rms_norm, silu_mul
from servekit.llm.kv_cache import PagedKVCache
from servekit.llm.model_config import ModelConfig
from servekit.llm.models.linear import Int8Linear, Linear, make_linear
from servekit.llm.models.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


@dataclass
class DecoderLayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [heads + kv_heads, head_dim]: q_norm repeated per query head, then k_norm
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None


@dataclass
class DecoderLayer:
    """A layer ready to run: norms plus the four (possibly pre-packed) projections."""

    input_norm: torch.Tensor
    qkv_proj: Linear | Int8Linear
    qk_norm: torch.Tensor | None
    o_proj: Linear | Int8Linear
    post_norm: torch.Tensor
    gate_up_proj: Linear | Int8Linear
    down_proj: Linear | Int8Linear


class LlamaForCausalLM:
    """Decoder-only transformer of the Llama family, inference only."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        max_model_len: int,
        pack_weights: bool = True,
        quantization: str | None = None,
    ) -> None:
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (the Llama family uses 'silu')")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.config = config
        self.dtype = dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.pack_weights = pack_weights
        self.quantization = quantization
        self.fused_elementwise = kernels_available(dtype)
        self.blocks: list[DecoderLayer] = []
        self.lm_head_proj: Linear | Int8Linear | None = None
        self.rotary = RotaryEmbedding(config, max_model_len=max_model_len, dtype=dtype)

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype)

        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.embed_tokens = empty(config.vocab_size, self.hidden_size)
        self.layers = [
            DecoderLayerWeights(
                input_norm=empty(self.hidden_size),
                qkv=empty(qkv_rows, self.hidden_size),
                qkv_bias=empty(qkv_rows) if config.attention_bias else None,
                o_proj=empty(self.hidden_size, self.num_heads * self.head_dim),
                o_bias=None,
                qk_norm=empty(self.num_heads + self.num_kv_heads, self.head_dim) if config.qk_norm else None,
                post_norm=empty(self.hidden_size),
                gate_up=empty(2 * self.intermediate_size, self.hidden_size),
                gate_up_bias=None,
                down=empty(self.hidden_size, self.intermediate_size),
                down_bias=None,
            )
            for _ in range(config.num_hidden_layers)
        ]
        self.norm = empty(self.hidden_size)
        self.lm_head = (
            self.embed_tokens if config.tie_word_embeddings else empty(config.vocab_size, self.hidden_size)
        )

    # ------------------------------------------------------------------ loading

    def _destination(self, name: str) -> tuple[torch.Tensor, int] | None:
        """The packed tensor a checkpoint tensor goes into and its first row there (None: unknown)."""
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, 0
        if name == "model.norm.weight":
            return self.norm, 0
        if name == "lm_head.weight":
            return None if self.config.tie_word_embeddings else (self.lm_head, 0)
        match = _LAYER_PARAM.match(name)
        if match is None or int(match.group(1)) >= len(self.layers):
            return None
        layer = self.layers[int(match.group(1))]
        param = match.group(2)
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        qkv_offsets = {"q_proj": 0, "k_proj": q_rows, "v_proj": q_rows + kv_rows}
        if param == "input_layernorm.weight":
            return layer.input_norm, 0
        if param == "post_attention_layernorm.weight":
            return layer.post_norm, 0
        if param.startswith("self_attn.") and param.endswith("_proj.weight") and param[10:16] in qkv_offsets:
            return layer.qkv, qkv_offsets[param[10:16]]
        if param.startswith("self_attn.") and param.endswith("_proj.bias") and param[10:16] in qkv_offsets:
            if layer.qkv_bias is None:
                layer.qkv_bias = torch.zeros(layer.qkv.shape[0], dtype=self.dtype)
            return layer.qkv_bias, qkv_offsets[param[10:16]]
        if param == "self_attn.o_proj.weight":
            return layer.o_proj, 0
        if param == "self_attn.o_proj.bias":
            layer.o_bias = torch.empty(self.hidden_size, dtype=self.dtype)
            return layer.o_bias, 0
        if param == "mlp.gate_proj.weight":
            return layer.gate_up, 0
        if param == "mlp.up_proj.weight":
            return layer.gate_up, self.intermediate_size
        if param in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
            if layer.gate_up_bias is None:
                layer.gate_up_bias = torch.zeros(2 * self.intermediate_size, dtype=self.dtype)
            return layer.gate_up_bias, 0 if param.startswith("mlp.gate") else self.intermediate_size
        if param == "mlp.down_proj.weight":
            return layer.down, 0
        if param == "mlp.down_proj.bias":
            layer.down_bias = torch.empty(self.hidden_size, dtype=self.dtype)
            return layer.down_bias, 0
        return None

    def _load_qk_norm(self, layer: DecoderLayerWeights, which: str, tensor: torch.Tensor) -> None:
        if layer.qk_norm is None:
            raise ValueError(f"checkpoint has self_attn.{which}.weight but the config has no qk_norm")
        rows = slice(0, self.num_heads) if which == "q_norm" else slice(self.num_heads, None)
        layer.qk_norm[rows] = tensor.to(self.dtype).view(1, self.head_dim)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the packed weights; fails on missing or unknown names."""
        if self.blocks:
            raise RuntimeError("weights are already loaded")
        expected = self._expected_names()
        loaded: set[str] = set()
        for name, tensor in weights:
            if _IGNORED.search(name):
                continue
            match = _LAYER_PARAM.match(name)
            if match is not None and match.group(2) in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                if int(match.group(1)) >= len(self.layers):
                    raise ValueError(f"unexpected weight {name!r}")
                self._load_qk_norm(self.layers[int(match.group(1))], match.group(2)[10:16], tensor)
                loaded.add(name)
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                logger.debug("ignoring lm_head.weight: embeddings are tied")
                continue
            destination = self._destination(name)
            if destination is None:
                raise ValueError(f"unexpected weight {name!r} for a {self.config.architecture} model")
            target, first_row = destination
            rows = tensor.shape[0]
            if first_row + rows > target.shape[0] or tuple(tensor.shape[1:]) != tuple(target.shape[1:]):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, which does not fit the config"
                )
            target[first_row : first_row + rows].copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weight(s): {shown}")
        self._build_runtime_layers()

    def _build_runtime_layers(self) -> None:
        """Swap the loading buffers for runnable layers, one layer at a time to bound peak memory."""

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear | Int8Linear:
            return make_linear(weight, bias, quantization=self.quantization, pack=self.pack_weights)

        loading, self.layers = self.layers, []
        self.blocks = []
        while loading:
            layer = loading.pop(0)
            self.blocks.append(
                DecoderLayer(
                    input_norm=layer.input_norm,
                    qkv_proj=linear(layer.qkv, layer.qkv_bias),
                    qk_norm=layer.qk_norm,
                    o_proj=linear(layer.o_proj, layer.o_bias),
                    post_norm=layer.post_norm,
                    gate_up_proj=linear(layer.gate_up, layer.gate_up_bias),
                    down_proj=linear(layer.down, layer.down_bias),
                )
            )
            del layer
        self.lm_head_proj = linear(self.lm_head)
        if not self.config.tie_word_embeddings:
            del self.lm_head  # held by lm_head_proj (or replaced by its packed copy)

    def _expected_names(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            names.add("lm_head.weight")
        per_layer = [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ]
        if self.config.attention_bias:
            per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if self.config.qk_norm:
            per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        for index in range(len(self.layers)):
            names.update(f"model.layers.{index}.{param}" for param in per_layer)
        return names

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        max_position: int,
        kv_cache: PagedKVCache,
        attention: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the last layer (before the final norm)."""
        num_tokens = token_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * head_dim
        cos, sin = self.rotary.cos_sin(positions, max_position)
        hidden = F.embedding(token_ids, self.embed_tokens)
        if not self.blocks:
            raise RuntimeError("load_weights must be called before forward")
        fused = self.fused_elementwise and hidden.device.type == "cpu"
        pending: torch.Tensor | None = None  # the previous layer's MLP output, added at this layer's norm
        for index, layer in enumerate(self.blocks):
            normed = add_rms_norm(hidden, pending, layer.input_norm, self.eps, fused=fused)
            qkv = layer.qkv_proj(normed)
            query_key = qkv[:, :qk_width].view(num_tokens, heads + kv_heads, head_dim)
            if layer.qk_norm is not None:
                query_key = F.rms_norm(query_key, (head_dim,), None, self.eps) * layer.qk_norm
            query_key = self.rotary.apply(query_key, cos, sin)
            value = qkv[:, qk_width:].view(num_tokens, kv_heads, head_dim)
            attended = paged_attention(
                query_key[:, :heads], query_key[:, heads:], value, kv_cache.layer(index), attention
            )
            normed = add_rms_norm(hidden, layer.o_proj(attended), layer.post_norm, self.eps, fused=fused)
            activated = silu_mul(layer.gate_up_proj(normed), fused=fused)
            pending = layer.down_proj(activated)
        if pending is not None:
            hidden.add_(pending)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[rows, vocab]`` for the given rows of last-layer hidden states."""
        assert self.lm_head_proj is not None, "load_weights must be called before compute_logits"
        normed = F.rms_norm(hidden, (self.hidden_size,), self.norm, self.eps)
        return self.lm_head_proj(normed).float()
