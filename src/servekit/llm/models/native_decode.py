"""Decode steps in one native call each (``kernels/decode_step.c``): of one sequence, and of a batch
from the rows where the projections become GEMMs, for the decoders they can run exactly: pre-norm
RMSNorm decoders (the Llama layout: Llama, Mistral, Qwen2, SmolLM2, ...) whose projections are all
on GGUF blocks (``QuantizedLinear``), gated SiLU MLPs, rotary (or no) positions, plain scaled
attention (sliding windows included), float32 activations on a CPU. The numbers are those of the
model's own forward.

``native_decode_step(model, kv_cache)`` gathers the weights' pointers, block types and shapes once
(at load) and returns a ``NativeDecode``, or None with the reason logged when the model has a part
the call cannot honour (then the model's own forward runs, as for every other step).
Set ``SERVEKIT_NATIVE_DECODE=0`` to turn it off (e.g. to compare against the PyTorch path).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servekit.llm.distributed import VocabParallelEmbedding
from servekit.llm.kernels import DTYPE_CODES, kernels_available
from servekit.llm.kernels.decode_step import DecodeStepKernel, Layer, Model, Projection, projection
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.kv_cache import PagedKVCache
from servekit.llm.models.decoder import DecoderLM
from servekit.llm.models.layers import DenseMLP, Norm
from servekit.llm.models.quantized_linear import GEMM_FROM_ROWS, QuantizedLinear
from servekit.llm.models.rotary import RotaryEmbedding
from servekit.llm.models.self_attention import SelfAttention

logger = logging.getLogger(__name__)


def native_decode_enabled() -> bool:
    return os.environ.get("SERVEKIT_NATIVE_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


class Unsupported(Exception):
    """What of a model the native decode step cannot run."""


@dataclass
class NativeDecode:
    """A decode step of one sequence, ``(token, position, block table) -> logits [1, vocab]``, and of
    a batch of sequences (``batch``) where ``runs_batch`` says so."""

    kernel: DecodeStepKernel
    rotary: RotaryEmbedding | None
    batched: bool  # the batch step computes what the model's forward does (not with 8-bit activations)

    def __call__(self, token: int, position: int, block_table: list[int]) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.int32)
        cos, sin = self.rotary.row(position) if self.rotary is not None else (None, None)
        return self.kernel(token, position, table, cos, sin, torch.get_num_threads())

    def runs_batch(self, num_seqs: int) -> bool:
        """Whether ``batch`` runs a decode step of ``num_seqs`` sequences: from the rows where the
        projections become GEMMs (below, the row kernels of the one-sequence step's numbers)."""
        return self.batched and num_seqs >= GEMM_FROM_ROWS

    def batch(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits ``[len(tokens), vocab]`` of one decode token per sequence."""
        width = max(len(table) for table in block_tables)
        tables = torch.tensor(
            [table + [0] * (width - len(table)) for table in block_tables], dtype=torch.int32
        )
        cos, sin = self.rotary.tables(max(positions)) if self.rotary is not None else (None, None)
        return self.kernel.batch(
            torch.tensor(tokens, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            tables,
            cos,
            sin,
            torch.get_num_threads(),
        )


def native_decode_step(model: object, kv_cache: PagedKVCache) -> NativeDecode | None:
    """The native step for ``model`` over ``kv_cache``, or None (the reason is logged)."""
    if not isinstance(model, DecoderLM):
        logger.info("native decode step off: %s is not a DecoderLM", type(model).__name__)
        return None
    try:
        return _build(model, kv_cache)
    except Unsupported as reason:
        logger.info("native decode step off: %s", reason)
        return None


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unsupported(reason)


def _norm(norm: Norm | None, eps: float) -> torch.Tensor:
    _require(norm is not None and norm.rms and norm.bias is None, "a norm that is not RMSNorm")
    assert norm is not None
    _require(norm.eps == eps, "norms of different eps")
    weight = norm.weight
    _require(weight.dtype == torch.float32 and weight.is_contiguous(), "a norm weight not float32")
    return weight


def _projection(linear: object, keep: list[object]) -> tuple[Projection, int]:
    _require(
        isinstance(linear, QuantizedLinear) and linear.on_gguf_blocks(), "a projection not on GGUF blocks"
    )
    assert isinstance(linear, QuantizedLinear)
    biases = linear.part_biases()
    keep.append((linear, biases))
    return projection(linear.parts, biases), linear.out_features


def _build(model: DecoderLM, kv_cache: PagedKVCache) -> NativeDecode:
    config = model.config
    _require(kernels_available(torch.float32), "no C kernels")
    _require(model.device.type == "cpu" and model.dtype == torch.float32, "not float32 on a CPU")
    _require(not model.tp.enabled, "tensor parallelism")
    for method in ("forward", "compute_logits", "_attend", "_add_norm"):
        _require(
            getattr(type(model), method) is getattr(DecoderLM, method), f"{type(model).__name__}.{method}"
        )
    _require(config.residual == "pre", f"residual {config.residual!r}")
    _require(config.positions == "rope" and model.pos_embed is None, f"{config.positions} positions")
    _require(model.embed_norm is None and config.embedding_scale is None, "a scaled or normed embedding")
    _require(config.final_softcap is None and not model.options.eager, "soft-capping or ALiBi")
    _require(len(model.rotaries) <= 1, "several rotary tables")
    _require(kv_cache.dtype in DTYPE_CODES, f"KV cache of {kv_cache.dtype}")
    eps = config.rms_norm_eps
    heads, kv_heads, head_dim = model.heads.num_heads, model.heads.num_kv_heads, config.head_dim
    hidden = config.hidden_size
    keep: list[object] = []
    layers = (Layer * len(model.blocks))()
    inter = -1
    for index, block in enumerate(model.blocks):
        attention, mlp = block.attention, block.mlp
        _require(isinstance(attention, SelfAttention), "attention other than SelfAttention")
        assert isinstance(attention, SelfAttention)
        _require(attention.q_norm is None and attention.k_norm is None, "q/k norms")
        _require(
            isinstance(mlp, DenseMLP) and mlp.gated and mlp.act is F.silu, "an MLP other than gated SiLU"
        )
        assert isinstance(mlp, DenseMLP)
        _require(attention.qkv is not None and mlp.up is not None, "a q/k/v projection shared with the MLP")
        assert attention.qkv is not None and mlp.up is not None
        _require(block.post_attn_norm is None and block.post_mlp_norm is None, "post-norms")
        _require(block.rotary <= 0, "a second rotary table")
        layer = layers[index]
        layer.attn_norm = _norm(block.attn_norm, eps).data_ptr()
        layer.mlp_norm = _norm(block.mlp_norm, eps).data_ptr()
        layer.qkv, qkv_rows = _projection(attention.qkv, keep)
        layer.o, o_rows = _projection(attention.o, keep)
        layer.gate_up, gate_up_rows = _projection(mlp.up, keep)
        layer.down, down_rows = _projection(mlp.down, keep)
        _require(qkv_rows == (heads + 2 * kv_heads) * head_dim and o_rows == hidden, "attention shapes")
        _require(down_rows == hidden and gate_up_rows % 2 == 0, "MLP shapes")
        _require(inter in (-1, gate_up_rows // 2), "MLPs of different widths")
        inter = gate_up_rows // 2
        layer.cache = kv_cache.layer(index).data_ptr()
        layer.window = block.window or 0
    _require(
        model.lm_head is not None and model.final_norm is not None and model.embed is not None, "no weights"
    )
    assert model.lm_head is not None and model.embed is not None
    lm_head, vocab = _projection(model.lm_head.head, keep)
    final_norm = _norm(model.final_norm, eps)
    struct = Model()
    struct.layers, struct.hidden, struct.heads, struct.kv_heads = len(model.blocks), hidden, heads, kv_heads
    struct.head_dim, struct.inter, struct.vocab = head_dim, inter, vocab
    rotary = model.rotaries[0] if model.rotaries else None
    _require(rotary is None or rotary.dtype == torch.float32, "rotary tables not float32")
    struct.rotary_dim = 0 if rotary is None else rotary.rotary_dim
    struct.block_size, struct.cache_dtype = kv_cache.block_size, DTYPE_CODES[kv_cache.dtype]
    struct.eps = eps
    scale = model.options.scale
    struct.scale = head_dim**-0.5 if scale is None else scale
    embed = model.embed
    if isinstance(embed, QuantizedTensor):
        struct.embed, struct.embed_type, struct.embed_row_bytes = (
            embed.blocks.data_ptr(),
            embed.ggml_type,
            embed.blocks.shape[1],
        )
    else:
        assert isinstance(embed, VocabParallelEmbedding)
        weight = embed.weight
        _require(weight.dtype == torch.float32 and weight.is_contiguous(), "an embedding not float32")
        struct.embed, struct.embed_type, struct.embed_row_bytes = weight.data_ptr(), -1, 4 * hidden
    _require(vocab == config.vocab_size, "an LM head not of the vocabulary")
    struct.final_norm = final_norm.data_ptr()
    struct.lm_head = lm_head
    struct.layer = ctypes.addressof(layers)
    scratch = torch.empty(2 * hidden + (2 * heads + 2 * kv_heads) * head_dim + 2 * inter, dtype=torch.float32)
    offsets = [hidden, (heads + 2 * kv_heads) * head_dim, heads * head_dim, hidden]
    pointer = scratch.data_ptr()
    for name, width in zip(("residual", "qkv", "attn", "delta"), offsets, strict=True):
        setattr(struct, name, pointer)
        pointer += 4 * width
    struct.gate_up = pointer
    struct.q8 = int(model.quantization == "int8")  # as QuantizedLinear's one-row calls then compute
    keep += [scratch, embed, final_norm, kv_cache, model]
    return NativeDecode(DecodeStepKernel(struct, layers, keep), rotary, batched=not struct.q8)
