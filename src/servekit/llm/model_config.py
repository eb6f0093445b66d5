"""The architecture description every loader produces and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MoEConfig:
    """A sparse mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` per token."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    normalize_top_k: bool  # renormalise the chosen experts' probabilities to sum to one
    shared_intermediate_size: int = 0  # an always-on shared expert (Qwen2-MoE); 0: none
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(x @ gate)
    dense_layers: list[int] = field(default_factory=list)  # layers that keep a dense MLP
    scoring: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    num_groups: int = 1  # experts come in groups; only the best `top_groups` groups are eligible
    top_groups: int = 1
    group_score: str = "max"  # a group's score: its best expert ("max") or its best two ("top2")
    score_bias: bool = False  # a learnt bias added to scores for choosing experts only (DeepSeek-V3)
    routed_scaling: float = 1.0  # the routed experts' weights are multiplied by it


@dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (HF naming); the defaults describe Llama.

    The layout fields say how a family differs from Llama; ``servekit.llm.models.decoder`` reads them.
    """

    architecture: str  # "llama", "mistral", "qwen2", "qwen3", "gpt2", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6  # the epsilon of every norm, RMSNorm or LayerNorm
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k (Qwen3: per head; OLMo 2: over all heads)
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    # ---- layout (see servekit.llm.models.decoder)
    norm: str = "rms"  # "rms" or "layer" (LayerNorm)
    norm_bias: bool = False  # LayerNorms carry a bias
    residual: str = "pre"  # "pre" | "parallel" (two norms) | "parallel_shared" (one norm) | "post"
    sandwich_norms: bool = False  # also a norm after attention and around the MLP (Gemma 2/3)
    mlp: str = "gated"  # "gated" (act(gate) * up) or "plain" (act(up))
    mlp_bias: bool = False
    o_bias: bool = False  # the attention output projection carries a bias
    qk_norm_per_head: bool = True
    positions: str = "rope"  # "rope", "learned" (an embedding table) or "alibi"
    position_offset: int = 0  # learned positions start at this row (OPT: 2)
    rotary_dim: int | None = None  # rotate only the first rotary_dim dims of each head (None: all)
    embedding_norm: bool = False  # a norm right after the embeddings (BLOOM)
    embedding_scale: float | None = None  # embeddings are multiplied by it (Gemma: sqrt(hidden))
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    layer_sliding_windows: list[int | None] | None = None  # per layer (Gemma 2/3); None: sliding_window
    local_rope_theta: float | None = None  # rope base of the sliding-window layers (Gemma 3)
    lm_head_bias: bool = False
    moe: MoEConfig | None = None
    family_options: dict[str, Any] = field(default_factory=dict)  # knobs only one family reads

    @property
    def eager_attention(self) -> bool:
        """Attention the C decode kernel cannot do (soft-capping, ALiBi)."""
        return self.attn_softcap is not None or self.positions == "alibi"

    def window_of(self, layer: int) -> int | None:
        if self.layer_sliding_windows is not None:
            return self.layer_sliding_windows[layer]
        return self.sliding_window
