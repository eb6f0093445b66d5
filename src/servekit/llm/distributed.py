"""Tensor parallelism: which slice of each weight a rank holds, and the layers that join the slices.

Megatron's split, applied to checkpoint tensors as they load (before they become layers, so
``Linear`` and its quantised kin stay unaware of it):

* column-parallel (output rows split): q, k, v (by heads), gate and up (by intermediate rows), and
  so every MoE expert on its intermediate dim, the shared expert too;
* row-parallel (input columns split): o and down; their outputs are partial sums, all-reduced by
  ``AllReduced`` (a bias is added by rank 0 only);
* vocab-parallel: the embedding rows and the LM head rows (padded to a multiple of the ranks);
  a rank embeds only the ids it holds (``VocabParallelEmbedding``, all-reduced) and computes its
  slice of the logits (``VocabParallelHead``, all-gathered);
* replicated: norms, the MoE router, positions. KV heads are split when there are at least as many
  as ranks, otherwise each rank keeps the one KV head its query heads read (replicated).

Each rank's KV cache holds only its own KV heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from servekit.settings import SettingError

if TYPE_CHECKING:
    from servekit.llm.model_config import ModelConfig

# Every collective of a step waits at most this long: a rank that died must not hang the others.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(seconds=60)


class TensorParallelError(SettingError):
    """A model or machine that cannot run with the requested ``tp``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "tp")


@dataclass(frozen=True)
class TPGroup:
    """This process's place among the tensor-parallel ranks; ``group`` is None for ``world_size`` 1."""

    rank: int
    world_size: int
    group: Any = None  # torch.distributed ProcessGroup

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = TPGroup(0, 1)


def check_tensor_parallel(config: ModelConfig, world_size: int, *, quantization: str | None = None) -> None:
    """Raise ``TensorParallelError`` when ``config`` cannot be split over ``world_size`` ranks."""
    if world_size == 1:
        return
    problems: list[str] = []
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world_size:
        problems.append(f"its {heads} attention heads do not divide into {world_size} ranks")
    if kv_heads >= world_size and kv_heads % world_size:
        problems.append(f"its {kv_heads} KV heads do not divide into {world_size} ranks")
    if kv_heads < world_size and world_size % kv_heads:
        problems.append(f"{world_size} ranks cannot share its {kv_heads} KV heads evenly")
    widths = {"intermediate_size": config.intermediate_size}
    if config.moe is not None:
        widths["moe intermediate_size"] = config.moe.intermediate_size
        if config.moe.shared_intermediate_size:
            widths["shared expert intermediate_size"] = config.moe.shared_intermediate_size
    for what, width in widths.items():
        if width % world_size:
            problems.append(f"its {what} {width} does not divide into {world_size} ranks")
    if config.qk_norm and not config.qk_norm_per_head:
        problems.append("it normalises queries and keys over all heads at once (OLMo 2)")
    if config.architecture.startswith("deepseek"):
        problems.append("its latent attention (MLA) has no tensor-parallel split here")
    if quantization is not None:
        problems.append(f"quantization={quantization} is not split across ranks: leave it unset with tp > 1")
    if problems:
        raise TensorParallelError(
            f"tp={world_size} does not fit {config.architecture}: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank computes."""

    num_heads: int  # query heads of this rank
    num_kv_heads: int  # KV heads of this rank (1 when replicated)
    first_head: int
    first_kv_head: int


def head_split(config: ModelConfig, tp: TPGroup) -> HeadSplit:
    heads = config.num_attention_heads // tp.world_size
    kv_heads = config.num_key_value_heads
    if kv_heads >= tp.world_size:
        local_kv = kv_heads // tp.world_size
        return HeadSplit(heads, local_kv, tp.rank * heads, tp.rank * local_kv)
    return HeadSplit(heads, 1, tp.rank * heads, tp.rank // (tp.world_size // kv_heads))


def _rows(tensor: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return tensor.narrow(0, start, count).contiguous()


def _cols(tensor: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return tensor.narrow(1, start, count).contiguous()


def padded_vocab(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size


def shard_weight(name: str, tensor: torch.Tensor, config: ModelConfig, tp: TPGroup) -> torch.Tensor | None:
    """This rank's part of canonical weight ``name`` (see ``weights``); None: this rank has none of it
    (the bias of a row-parallel projection lives on rank 0)."""
    if not tp.enabled:
        return tensor
    rank, world = tp.rank, tp.world_size
    module, _, kind = name.rpartition(".")
    part = module.rpartition(".")[2]
    head_dim = config.head_dim
    if module in ("embed", "lm_head"):
        vocab = padded_vocab(config.vocab_size, world)
        if tensor.shape[0] < vocab:
            pad = torch.zeros((vocab - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
            tensor = torch.cat((tensor, pad))
        share = vocab // world
        return _rows(tensor, rank * share, share)
    if not module.startswith("layers."):
        return tensor
    split = head_split(config, tp)
    if part == "q":
        return _rows(tensor, split.first_head * head_dim, split.num_heads * head_dim)
    if part in ("k", "v"):
        return _rows(tensor, split.first_kv_head * head_dim, split.num_kv_heads * head_dim)
    if part in ("gate", "up"):
        share = tensor.shape[0] // world
        return _rows(tensor, rank * share, share)
    if part in ("o", "down"):
        if kind == "bias":
            return tensor if rank == 0 else None
        share = tensor.shape[1] // world
        return _cols(tensor, rank * share, share)
    return tensor  # norms, router, shared-expert gate: replicated


def all_reduce(tensor: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place."""
    if tp.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, group=tp.group)
    return tensor


class AllReduced:
    """A row-parallel block (attention ending in ``o``, an MLP ending in ``down``) whose per-rank
    partial outputs are summed over the ranks."""

    __slots__ = ("inner", "tp")

    def __init__(self, inner: Callable[..., torch.Tensor], tp: TPGroup) -> None:
        self.inner = inner
        self.tp = tp

    def __call__(self, *args: Any) -> torch.Tensor:
        return all_reduce(self.inner(*args), self.tp)


class VocabParallelEmbedding:
    """Embedding rows ``[rank * share, (rank + 1) * share)``; other ids embed to zero, then all-reduce."""

    def __init__(self, weight: torch.Tensor, tp: TPGroup) -> None:
        self.weight = weight
        self.tp = tp
        self.start = tp.rank * weight.shape[0]

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        hidden.masked_fill_(outside.unsqueeze(1), 0.0)
        return all_reduce(hidden, self.tp)


class VocabParallelHead:
    """This rank's slice of the logits, all-gathered into ``[rows, vocab_size]``."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, tp: TPGroup) -> None:
        self.head = head
        self.vocab_size = vocab_size
        self.tp = tp

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.head(hidden)
        if not self.tp.enabled:
            return local
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.tp.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.tp.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]
