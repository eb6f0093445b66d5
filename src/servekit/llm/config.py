"""EngineConfig: every knob of the LLM engine, each readable from a ``SERVEKIT_<NAME>`` env var."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from servekit.sizes import parse_size

if TYPE_CHECKING:
    import torch

    from servekit.llm.model_config import ModelConfig

ENV_PREFIX = "SERVEKIT_"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION_CHOICES = ("auto", "int8")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


def canonical_dtype(name: str) -> str:
    """A dtype setting in its ``DTYPE_CHOICES`` spelling ("bf16" -> "bfloat16"); unknown names as given."""
    lowered = name.strip().lower()
    return _DTYPE_ALIASES.get(lowered, lowered)


class EngineConfigError(ValueError):
    """An invalid engine setting; ``name`` is the field it concerns."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class EngineConfig:
    """Settings of one ``LLMEngine``. ``None`` means "derive from the model or the machine"."""

    model: str | None = None  # HF directory, *.gguf file, hub id; None: the bundled SmolLM2 GGUF
    tokenizer: str | None = None  # another tokenizer source than the model's
    revision: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    # None / "none" (default): weights as loaded, computed exactly in dtype. "int8": int8 weights (per
    # output channel) and int8 activations (per token) in every projection and the LM head, int32
    # accumulation: several times faster on CPUs, but not the same numbers. "auto": int8 on CPUs for
    # checkpoints whose weights are stored quantised already (a Q4/Q8 GGUF), else none.
    quantization: str | None = None
    # "auto": bfloat16 when int8 quantization is on (and dtype is float32), else the model's dtype.
    # "bfloat16"/"float16" halve the cache of a float32 model and the memory traffic of decode attention.
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # prompt + output tokens; None: the model's context length
    max_num_seqs: int = 256  # sequences decoded together in one step
    max_num_batched_tokens: int | None = (
        None  # tokens computed per step; None: 2048 (chunked) or max_model_len
    )
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory: int | str = "auto"  # bytes (or "2GiB", "512MB") of KV cache, or "auto"
    num_kv_blocks: int | None = None  # exact number of KV blocks (overrides kv_cache_memory)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int | None = None  # seeds the global torch RNG for requests without a seed
    max_queued_requests: int | None = None  # waiting requests beyond this are refused (QueueFullError)
    num_threads: int | None = None  # torch intra-op threads; None: leave torch's setting
    # Flush denormal floats to zero (process-wide). On CPUs, activations that decay into denormals
    # (softmax tails, SiLU of large negatives) otherwise make matmuls several times slower.
    flush_denormal: bool = True
    chat_template: str | None = None  # a file path or an inline jinja2 template overriding the model's
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype)
        self.kv_cache_dtype = canonical_dtype(self.kv_cache_dtype)
        if isinstance(self.quantization, str):
            lowered = self.quantization.strip().lower()
            self.quantization = None if lowered in ("", "none") else lowered
        if isinstance(self.kv_cache_memory, str) and self.kv_cache_memory.strip().lower() != "auto":
            try:
                self.kv_cache_memory = parse_size(self.kv_cache_memory)
            except ValueError as error:
                raise EngineConfigError(f"kv_cache_memory: {error}", "kv_cache_memory") from None
        self.validate()

    def validate(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise EngineConfigError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}", "dtype")
        if self.kv_cache_dtype not in DTYPE_CHOICES:
            raise EngineConfigError(
                f"kv_cache_dtype must be one of {DTYPE_CHOICES}, got {self.kv_cache_dtype!r}",
                "kv_cache_dtype",
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise EngineConfigError(
                f"quantization must be one of {(*QUANTIZATION_CHOICES, 'none')}, got {self.quantization!r}",
                "quantization",
            )
        positive = {
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "num_kv_blocks": self.num_kv_blocks,
            "num_threads": self.num_threads,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise EngineConfigError(f"{name} must be at least 1, got {value}", name)
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise EngineConfigError(
                f"max_queued_requests must be non-negative, got {self.max_queued_requests}",
                "max_queued_requests",
            )
        if isinstance(self.kv_cache_memory, int) and self.kv_cache_memory < 1:
            raise EngineConfigError(
                f"kv_cache_memory must be positive, got {self.kv_cache_memory}", "kv_cache_memory"
            )

    @classmethod
    def env_var(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
        """Fields from ``SERVEKIT_<NAME>`` variables, then ``overrides`` (which win) on top."""
        environ = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = environ.get(cls.env_var(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse_env_value(f.name, raw, hints[f.name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise EngineConfigError(f"unknown engine setting(s): {sorted(unknown)}", sorted(unknown)[0])
        values.update(overrides)
        return cls(**values)

    def kv_cache_memory_bytes(self) -> int | None:
        return None if isinstance(self.kv_cache_memory, str) else self.kv_cache_memory


def _parse_env_value(name: str, raw: str, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    options = tuple(o for o in options if o is not type(None))
    if raw.strip().lower() in ("none", "null") and len(options) < len(typing.get_args(hint) or (hint,)):
        return None
    if bool in options:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise EngineConfigError(f"{ENV_PREFIX}{name.upper()} must be a boolean, got {raw!r}", name)
    if int in options:
        try:
            return int(raw)
        except ValueError:
            if str in options:
                return raw
            raise EngineConfigError(
                f"{ENV_PREFIX}{name.upper()} must be an integer, got {raw!r}", name
            ) from None
    return raw


# -- settings resolved against the model and the machine (torch is imported only here, lazily) ----

_AUTO_KV_CACHE_MAX_BYTES = 2 << 30
_AUTO_KV_CACHE_MEMORY_FRACTION = 0.2


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    """``"auto"`` is float32 on CPU (exact, and fast there) and the checkpoint's dtype on GPUs."""
    import torch

    if name != "auto":
        return torch_dtype(name)
    if torch.cuda.is_available():
        return (
            torch_dtype(model_config.torch_dtype)
            if model_config.torch_dtype in DTYPE_CHOICES[1:]  # not "auto"
            else torch.float32
        )
    return torch.float32


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``DTYPE_CHOICES`` name other than "auto"."""
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def resolve_quantization(name: str | None, checkpoint_quantization: str | None) -> str | None:
    """``"auto"`` is int8 on CPUs when the checkpoint's weights are quantised already (a Q4/Q8 GGUF:
    computing them in int8 instead of dequantised float32 loses less than the file's own rounding
    did, and is several times faster); otherwise the weights are computed as loaded."""
    import torch

    from servekit.llm.models.linear import int8_matmul_available

    if name != "auto":
        return name
    if checkpoint_quantization and not torch.cuda.is_available() and int8_matmul_available():
        return "int8"
    return None


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, quantization: str | None) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if quantization == "int8" and dtype == torch.float32 else dtype
    return torch_dtype(name)


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype) -> int:
    per_element = dtype.itemsize
    return (
        2
        * model_config.num_hidden_layers
        * model_config.num_key_value_heads
        * model_config.head_dim
        * per_element
    )


def auto_num_kv_blocks(
    model_config: ModelConfig, dtype: torch.dtype, block_size: int, max_model_len: int, max_num_seqs: int
) -> int:
    """Enough blocks for every sequence slot at full length, capped by a share of the available
    memory (2 GiB at most), but never fewer than one full-length sequence needs."""
    per_block = kv_bytes_per_token(model_config, dtype) * block_size
    wanted_tokens = max_model_len * max_num_seqs
    budget = min(_AUTO_KV_CACHE_MAX_BYTES, int(available_memory_bytes() * _AUTO_KV_CACHE_MEMORY_FRACTION))
    blocks = min(-(-wanted_tokens // block_size), max(budget // per_block, 1))
    return max(blocks, -(-max_model_len // block_size))


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
