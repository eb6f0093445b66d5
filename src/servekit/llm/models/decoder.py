"""The decoder every family runs: embeddings, a stack of attention + MLP layers, final norm, head.

A family is this class plus a ``NameMap`` (its checkpoint names) and, when its checkpoints store
tensors fused, transposed or permuted, a ``map_weight`` override; how layers are wired (norm kind,
pre/parallel/post residuals, sandwich norms, gated or plain MLP, MoE, positions, soft-capping,
per-layer sliding windows) is read from ``ModelConfig``.

Loading fuses q/k/v into one projection and gate/up into another, then hands them to oneDNN
pre-packed (``servekit.llm.models.linear``); weights that come as GGUF blocks (``QuantizedTensor``)
become ``QuantizedLinear`` projections (and a quantised embedding) computed on the blocks. The model
works on a flattened batch (``[num_tokens]`` ids and positions) and reads/writes the paged KV cache
through ``servekit.llm.attention``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from servekit.llm.attention import AttentionMetadata, AttentionOptions
from servekit.llm.distributed import (
    SINGLE,
    AllReduced,
    TPGroup,
    VocabParallelEmbedding,
    VocabParallelHead,
    head_split,
    shard_weight,
)
from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.kv_cache import PagedKVCache
from servekit.llm.model_config import ModelConfig, MoEConfig
from servekit.llm.models.alibi import alibi_slopes
from servekit.llm.models.layers import DenseMLP, Norm, Projection, activation, make_linear
from servekit.llm.models.moe import SparseMoE, StackedExperts
from servekit.llm.models.quantized_linear import QuantizedLinear
from servekit.llm.models.rotary import RotaryEmbedding
from servekit.llm.models.self_attention import CosSin, SelfAttention
from servekit.llm.models.weights import NameMap, Tensors, expected_names, split_fused_qkv, split_rows

logger = logging.getLogger(__name__)


class Attention(Protocol):
    """A layer's attention over the paged cache (``SelfAttention``, or ``mla.LatentAttention``)."""

    def __call__(
        self,
        normed: torch.Tensor,
        rotary: CosSin | None,
        layer_cache: torch.Tensor,
        metadata: AttentionMetadata,
        options: AttentionOptions,
    ) -> torch.Tensor: ...


@dataclass
class Block:
    """One layer ready to run."""

    attn_norm: Norm | None
    attention: Attention | AllReduced
    mlp_norm: Norm | None
    mlp: DenseMLP | SparseMoE | AllReduced
    post_attn_norm: Norm | None
    post_mlp_norm: Norm | None
    window: int | None
    rotary: int  # index into DecoderLM.rotaries (-1: no rotary)
    # q/k/v and the MLP's input rows in one projection (a parallel block off one norm; then the
    # attention's ``qkv`` and the MLP's ``up`` are None)
    shared_input: Projection | None = None


class DecoderLM:
    """Decoder-only transformer, inference only; subclasses name their checkpoint layout."""

    names: NameMap
    norm_offset = 0.0  # added to every norm weight on load (Gemma stores w for a (1 + w) scale)
    # How a fused ``qkv`` tensor is laid out (``weights.split_fused_qkv``); a fused ``gate_up`` is
    # always the gate rows, then the up rows.
    qkv_layout = "rows"

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        max_model_len: int,
        pack_weights: bool = True,
        quantization: str | None = None,
        device: torch.device | str = "cpu",
        tp: TPGroup = SINGLE,
    ) -> None:
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.tp = tp
        # This rank's heads (all of them without tensor parallelism); its KV cache holds these.
        self.heads = head_split(config, tp)
        self.act = activation(config.hidden_act)
        self.pack_weights = pack_weights
        self.quantization = quantization
        self.fused_elementwise = kernels_available(dtype)
        self.blocks: list[Block] = []
        self.rotaries: list[RotaryEmbedding] = []
        if config.positions == "rope":
            self.rotaries.append(
                RotaryEmbedding(config, max_model_len=max_model_len, dtype=dtype, device=self.device)
            )
            if config.local_rope_theta is not None:
                local = dataclasses.replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
                self.rotaries.append(
                    RotaryEmbedding(local, max_model_len=max_model_len, dtype=dtype, device=self.device)
                )
        slopes = None
        if config.positions == "alibi":
            first = self.heads.first_head
            slopes = self.alibi_slopes()[first : first + self.heads.num_heads].to(self.device)
        self.options = AttentionOptions(config.attention_scale, config.attn_softcap, slopes)
        self.embed: VocabParallelEmbedding | QuantizedTensor | None = None
        self.pos_embed: torch.Tensor | None = None
        self.final_norm: Norm | None = None
        self.embed_norm: Norm | None = None
        self.lm_head: VocabParallelHead | None = None
        self._blocks: dict[str, QuantizedTensor] = {}  # weights kept as GGUF blocks, while loading

    def attention_weights(self) -> dict[str, bool]:
        """Each layer's attention projections and norms (``.weight`` names) -> whether biased."""
        biased = self.config.attention_bias
        names = {"q": biased, "k": biased, "v": biased, "o": self.config.o_bias}
        if self.config.qk_norm:
            names.update(q_norm=self.config.norm_bias, k_norm=self.config.norm_bias)
        return names

    def alibi_slopes(self) -> torch.Tensor:
        return alibi_slopes(self.config.num_attention_heads)

    # ------------------------------------------------------------------ loading

    def map_weight(self, name: str, tensor: torch.Tensor) -> Tensors:
        """Canonical ``(name, tensor)`` pairs for one checkpoint tensor (see ``weights``)."""
        canonical = self.names.canonical(name)
        if canonical is None:
            raise ValueError(f"unexpected weight {name!r} for a {self.config.architecture} model")
        config = self.config
        if ".qkv." in canonical:
            heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
            yield from split_fused_qkv(canonical, tensor, self.qkv_layout, heads, kv_heads, config.head_dim)
        elif ".gate_up." in canonical:
            half = tensor.shape[0] // 2
            yield from split_rows(canonical, tensor, {"gate": half, "up": half})
        else:
            yield canonical, tensor

    def _keeps_blocks(self, canonical: str | None) -> bool:
        """Whether a weight that comes as quantised blocks is computed on them: float32 models, the
        plain renames of the default ``map_weight`` (nothing to split, transpose or permute)."""
        plain = type(self).map_weight is DecoderLM.map_weight and canonical is not None
        return (
            plain
            and self.dtype == torch.float32
            and self.quantization in (None, "int8")
            and ".qkv." not in str(canonical)
            and ".gate_up." not in str(canonical)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Read checkpoint-named tensors, check them against the config and build the layers."""
        if self.blocks:
            raise RuntimeError("weights are already loaded")
        config = self.config
        required, optional = expected_names(config, self.attention_weights())
        store: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            if self.names.ignored.search(name):
                continue
            canonical_name = self.names.canonical(name)
            if config.tie_word_embeddings and canonical_name == "lm_head.weight":
                logger.debug("ignoring %s: embeddings are tied", name)
                continue
            if isinstance(tensor, QuantizedTensor):
                if self._keeps_blocks(canonical_name) and canonical_name in required:
                    self._blocks[str(canonical_name)] = tensor
                    continue
                tensor = tensor.dequantize()
            for canonical, part in self.map_weight(name, tensor):
                if canonical not in required and canonical not in optional:
                    raise ValueError(f"unexpected weight {name!r} for a {config.architecture} model")
                store[canonical] = part
        missing = sorted(self.names.checkpoint_name(n) for n in required - store.keys() - self._blocks.keys())
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weight(s): {shown}")
        self._check_shapes(store)
        # Each rank slices its part off the whole tensor before converting and moving it.
        placed: dict[str, torch.Tensor] = {}
        for name in list(store):
            shard = shard_weight(name, store.pop(name), config, self.tp)
            if shard is not None:
                placed[name] = shard.to(device=self.device, dtype=self.dtype)
        self._build(placed)

    def _check_shapes(self, store: dict[str, torch.Tensor]) -> None:
        config = self.config
        expected = {"embed.weight": (config.vocab_size, config.hidden_size)}
        if "layers.0.k.weight" in store or "layers.0.k.weight" in self._blocks:
            expected["layers.0.q.weight"] = (config.num_attention_heads * config.head_dim, config.hidden_size)
            expected["layers.0.k.weight"] = (config.num_key_value_heads * config.head_dim, config.hidden_size)
        for name, shape in expected.items():
            found = store.get(name, self._blocks.get(name))
            if found is not None and tuple(found.shape) != shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(found.shape)}, which does not fit the config"
                )

    def _linear(self, store: dict[str, torch.Tensor], *names: str, pack: bool = True) -> Projection:
        """One projection over the rows of ``names`` (fused when several), biases zero-filled."""
        biases = [store.pop(f"{n}.bias", None) for n in names]
        parts = [self._blocks.pop(f"{n}.weight", None) for n in names]
        if all(part is not None for part in parts):
            blocks = [part for part in parts if part is not None]
            bias = self._fused_bias([p.shape[0] for p in blocks], biases)
            return QuantizedLinear(blocks, bias, int8=self.quantization == "int8")
        weights = [
            store.pop(f"{n}.weight") if part is None else part.dequantize()
            for n, part in zip(names, parts, strict=True)
        ]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        bias = self._fused_bias([w.shape[0] for w in weights], biases)
        return make_linear(weight, bias, quantization=self.quantization, pack=self.pack_weights and pack)

    def _fused_bias(self, rows: list[int], biases: list[torch.Tensor | None]) -> torch.Tensor | None:
        if all(b is None for b in biases):
            return None
        return torch.cat(
            [
                torch.zeros(n, dtype=self.dtype, device=self.device) if b is None else b
                for n, b in zip(rows, biases, strict=True)
            ]
        )

    def _norm(self, store: dict[str, torch.Tensor], name: str) -> Norm | None:
        weight = store.pop(f"{name}.weight", None)
        if weight is None:
            return None
        if self.norm_offset:
            weight = weight + self.norm_offset
        bias = store.pop(f"{name}.bias", None)
        rms = self.config.norm == "rms" or name.endswith(("q_norm", "k_norm"))
        return Norm(
            weight, bias, self.config.rms_norm_eps, rms=rms and bias is None, fused=self.fused_elementwise
        )

    def _has(self, store: dict[str, torch.Tensor], name: str) -> bool:
        return f"{name}.weight" in store or f"{name}.weight" in self._blocks

    def _mlp_input_names(self, store: dict[str, torch.Tensor], prefix: str) -> list[str]:
        """The projections an MLP's input goes through: gate and up when gated, else up."""
        gated = self._has(store, f"{prefix}gate")
        return [f"{prefix}gate", f"{prefix}up"] if gated else [f"{prefix}up"]

    def _shared_input(
        self, store: dict[str, torch.Tensor], prefix: str, dense: bool
    ) -> tuple[Projection, bool] | None:
        """For a parallel block off one norm: q/k/v and the dense MLP's input rows in one projection,
        one matmul (and one OpenMP region) instead of two over the same normed rows; with whether
        the MLP is gated."""
        if self.config.residual != "parallel_shared" or not dense or self.tp.enabled:
            return None
        if not self._has(store, f"{prefix}q"):  # a family whose attention does not read q/k/v rows
            return None
        names = self._mlp_input_names(store, prefix)
        return self._linear(store, f"{prefix}q", f"{prefix}k", f"{prefix}v", *names), len(names) == 2

    def _attention(self, store: dict[str, torch.Tensor], prefix: str) -> Attention:
        config = self.config
        # q/k/v are gone from the store when the block's shared projection took them.
        shared = not self._has(store, f"{prefix}q")
        return SelfAttention(
            qkv=None if shared else self._linear(store, f"{prefix}q", f"{prefix}k", f"{prefix}v"),
            o=self._linear(store, f"{prefix}o"),
            q_norm=self._norm(store, f"{prefix}q_norm"),
            k_norm=self._norm(store, f"{prefix}k_norm"),
            num_heads=self.heads.num_heads,
            num_kv_heads=self.heads.num_kv_heads,
            head_dim=config.head_dim,
            norm_per_head=config.qk_norm_per_head,
            fused=self.fused_elementwise and self.dtype == torch.float32,
        )

    def _moe(self, store: dict[str, torch.Tensor], prefix: str, moe: MoEConfig) -> SparseMoE:
        score_bias = store.pop(f"{prefix}router.e_score_correction_bias", None)
        experts = [self._mlp(store, f"{prefix}experts.{e}.", pack=False) for e in range(moe.num_experts)]
        # The router and the shared expert's gate have a few output columns: oneDNN's packed call
        # costs ~25 us there where F.linear takes 4-12 us (up to 32 rows, 1 thread, AMD EPYC).
        return SparseMoE(
            router=self._linear(store, f"{prefix}router", pack=False),
            experts=StackedExperts.of(experts) or experts,
            config=moe,
            shared=self._mlp(store, f"{prefix}shared.") if moe.shared_intermediate_size else None,
            shared_gate=self._linear(store, f"{prefix}shared_gate", pack=False)
            if moe.shared_expert_gate
            else None,
            score_bias=None if score_bias is None else score_bias.float(),
        )

    def _mlp(
        self, store: dict[str, torch.Tensor], prefix: str, pack: bool = True, shared_gated: bool | None = None
    ) -> DenseMLP:
        """``pack=False`` keeps the plain weights (the experts stack them); ``shared_gated`` (not
        None) says the block's shared projection took the input rows, and whether they are gated."""
        up: Projection | None = None
        gated = shared_gated
        if gated is None:
            names = self._mlp_input_names(store, prefix)
            up, gated = self._linear(store, *names, pack=pack), len(names) == 2
        down = self._linear(store, f"{prefix}down", pack=pack)
        return DenseMLP(up, down, self.act, gated, fused=self.fused_elementwise)

    def _build(self, store: dict[str, torch.Tensor]) -> None:
        config = self.config
        for index in range(config.num_hidden_layers):
            prefix = f"layers.{index}."
            moe = config.moe
            mlp: DenseMLP | SparseMoE | AllReduced
            dense = moe is None or index in moe.dense_layers
            shared = self._shared_input(store, prefix, dense)
            if dense:
                mlp = self._mlp(store, prefix, shared_gated=None if shared is None else shared[1])
            else:
                assert moe is not None
                mlp = self._moe(store, prefix, moe)
            attention: Attention | AllReduced = self._attention(store, prefix)
            if self.tp.enabled:
                attention, mlp = AllReduced(attention, self.tp), AllReduced(mlp, self.tp)
            window = config.window_of(index)
            rotary = -1
            if self.rotaries:
                local = len(self.rotaries) > 1 and window is not None
                rotary = 1 if local else 0
            self.blocks.append(
                Block(
                    attn_norm=self._norm(store, f"{prefix}attn_norm"),
                    attention=attention,
                    mlp_norm=self._norm(store, f"{prefix}mlp_norm"),
                    mlp=mlp,
                    post_attn_norm=self._norm(store, f"{prefix}post_attn_norm"),
                    post_mlp_norm=self._norm(store, f"{prefix}post_mlp_norm"),
                    window=window,
                    rotary=rotary,
                    shared_input=None if shared is None else shared[0],
                )
            )
        embed = self._blocks.pop("embed.weight", None) or store.pop("embed.weight")
        # GGUF blocks are only kept without tensor parallelism (resolve_gguf_blocks).
        self.embed = embed if isinstance(embed, QuantizedTensor) else VocabParallelEmbedding(embed, self.tp)
        self.pos_embed = store.pop("pos_embed.weight", None)
        self.final_norm = self._norm(store, "final_norm")
        self.embed_norm = self._norm(store, "embed_norm")
        head: Projection
        if not config.tie_word_embeddings:
            head = self._linear(store, "lm_head")
        elif isinstance(embed, QuantizedTensor):
            head = QuantizedLinear([embed], int8=self.quantization == "int8")
        else:
            head = make_linear(embed, None, quantization=self.quantization, pack=self.pack_weights)
        self.lm_head = VocabParallelHead(head, config.vocab_size, self.tp)

    # ------------------------------------------------------------------ forward

    def _add_norm(
        self,
        hidden: torch.Tensor,
        pending: torch.Tensor | None,
        norm: Norm | None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden += pending + extra`` then ``norm(hidden)``, in one C pass when possible."""
        assert norm is not None
        return norm.add(hidden, pending, extra)

    def _attend(
        self,
        block: Block,
        index: int,
        normed: torch.Tensor,
        rotary: list[CosSin],
        kv_cache: PagedKVCache,
        attention: AttentionMetadata,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's attention of ``normed``, or of its q/k/v rows ``qkv`` when already projected."""
        cos_sin = rotary[block.rotary] if block.rotary >= 0 else None
        metadata = attention.for_window(block.window)
        if qkv is not None:
            assert isinstance(block.attention, SelfAttention)
            return block.attention.attend(qkv, cos_sin, kv_cache.layer(index), metadata, self.options)
        return block.attention(normed, cos_sin, kv_cache.layer(index), metadata, self.options)

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        max_position: int,
        kv_cache: PagedKVCache,
        attention: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the last layer (before the final norm)."""
        if not self.blocks or self.embed is None:
            raise RuntimeError("load_weights must be called before forward")
        config = self.config
        if isinstance(self.embed, QuantizedTensor):
            hidden = self.embed.embedding(token_ids)
        else:
            hidden = self.embed(token_ids)
        if config.embedding_scale is not None:
            hidden = hidden * torch.tensor(config.embedding_scale, dtype=hidden.dtype)
        if self.pos_embed is not None:
            hidden = hidden + F.embedding(positions + config.position_offset, self.pos_embed)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        rotary = [r.cos_sin(positions, max_position) for r in self.rotaries]
        pending: torch.Tensor | None = None  # the previous layer's output, added at this layer's norm
        extra: torch.Tensor | None = None  # a parallel block's MLP output, added with ``pending``
        for index, block in enumerate(self.blocks):
            if config.residual == "pre":
                normed = self._add_norm(hidden, pending, block.attn_norm)
                attended = self._attend(block, index, normed, rotary, kv_cache, attention)
                if block.post_attn_norm is not None:
                    attended = block.post_attn_norm(attended)
                normed = self._add_norm(hidden, attended, block.mlp_norm)
                pending = block.mlp(normed)
                if block.post_mlp_norm is not None:
                    pending = block.post_mlp_norm(pending)
            elif config.residual == "post":
                if pending is not None:
                    hidden.add_(pending)
                assert block.post_attn_norm is not None and block.post_mlp_norm is not None
                attended = self._attend(block, index, hidden, rotary, kv_cache, attention)
                hidden.add_(block.post_attn_norm(attended))
                pending = block.post_mlp_norm(block.mlp(hidden))
            else:  # parallel: attention and MLP both read the layer's input
                normed = self._add_norm(hidden, pending, block.attn_norm, extra)
                if block.shared_input is not None:
                    assert isinstance(block.attention, SelfAttention) and isinstance(block.mlp, DenseMLP)
                    both = block.shared_input(normed)
                    width = block.attention.qkv_width
                    pending = self._attend(block, index, normed, rotary, kv_cache, attention, both[:, :width])
                    extra = block.mlp.finish(both[:, width:])
                    continue
                mlp_in = normed if block.mlp_norm is None else block.mlp_norm(hidden)
                pending = self._attend(block, index, normed, rotary, kv_cache, attention)
                extra = block.mlp(mlp_in)
        if pending is not None:
            hidden.add_(pending if extra is None else pending + extra)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[rows, vocab]`` for the given rows of last-layer hidden states."""
        assert self.lm_head is not None and self.final_norm is not None, "load_weights must be called first"
        logits = self.lm_head(self.final_norm(hidden)).float()
        cap = self.config.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
