"""EngineConfig: every knob of the LLM engine, each declared once with its help text and env names.

``servekit serve`` derives its engine flags from these fields; ``EngineConfig.from_env`` reads the same
env names with the same parser (``servekit.settings``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from servekit.llm.device import check_device_syntax
from servekit.settings import SettingError, one_of, read_settings, setting
from servekit.sizes import parse_size

if TYPE_CHECKING:
    import torch

    from servekit.llm.model_config import ModelConfig

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION_CHOICES = ("auto", "int8", "awq", "gptq")
CHECKPOINT_METHODS = (
    "awq",
    "gptq",
)  # vLLM's names for a checkpoint quantised so: checked, computed as stored
GGUF_WEIGHTS_CHOICES = ("blocks", "dequantize")
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


class EngineConfigError(SettingError):
    """An invalid engine setting; ``name`` is the field it concerns."""


@dataclass
class EngineConfig:
    """Settings of one ``LLMEngine``. ``None`` means "derive from the model or the machine"."""

    model: str | None = setting(
        None,
        "model to serve: an HF checkpoint directory, a .gguf file or a hub id (org/name); "
        "default: the bundled SmolLM2-135M-Instruct",
        env=("MODEL_NAME",),
    )
    tokenizer: str | None = setting(
        None, "tokenizer directory or hub id, if not the model's", env=("TOKENIZER_NAME",)
    )
    revision: str | None = setting(None, "hub revision of the model", env=("MODEL_REVISION",))
    served_model_name: str | None = setting(
        None,
        "model name clients use in requests (default: the model's name)",
        env=("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "SERVED_MODEL_NAME"),
    )
    device: str = setting(
        "auto",
        "device to run on: auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N, mps",
        env=("DEVICE",),
    )
    tp: int = setting(
        1,
        "tensor-parallel ranks: the model's heads, MLP and vocabulary split over this many processes "
        "(one per GPU on CUDA, gloo over CPU cores otherwise)",
        env=("TENSOR_PARALLEL_SIZE",),
    )
    gpu_memory_utilization: float | None = setting(
        None,
        "CUDA only: the share of the GPU's memory the engine may use (weights, activations, KV cache); "
        "the KV cache gets what is left after the weights and a profiled step (default: kv_cache_memory)",
        env=("GPU_MEMORY_UTILIZATION",),
    )
    cuda_graphs: bool = setting(
        False,
        "CUDA: replay decode steps of up to 64 sequences as captured CUDA graphs (less launch overhead; "
        "dense models, tp 1; other steps run eagerly)",
        env=("CUDA_GRAPHS",),
    )
    dtype: str = setting(
        "auto",
        "weights and activations dtype: auto (float32 on CPU, bfloat16 on GPUs that have it, else "
        "float16), float32, bfloat16, float16",
        env=("DTYPE",),
    )
    # int8 is not the default because its numbers differ from the checkpoint's exact ones.
    quantization: str | None = setting(
        None,
        "none (default: weights computed exactly as stored), int8 (int8 weights per output channel and "
        "int8 activations per token, int32 accumulation: several times faster on CPUs, slightly "
        "different outputs), or auto (int8 on CPUs for an already-quantised checkpoint such as the "
        "default Q4_1 GGUF, none otherwise); awq or gptq (vLLM's names) only check that the checkpoint "
        "is quantised so, which it computes as stored anyway",
        env=("QUANTIZATION",),
    )
    gguf_weights: str = setting(
        "blocks",
        "how a quantised GGUF's (or AWQ/GPTQ checkpoint's) weights are computed: blocks (default: "
        "straight on the file's Q4_0, Q4_1, Q8_0, Q4_K, Q6_K blocks (AWQ/GPTQ: repacked to Q8_0) with "
        "the C kernels, exact float32 arithmetic, 4-8x fewer bytes "
        "than float32 (with int8 quantization kept for its batch-1 steps); other types, "
        "bfloat16/float16 compute or no C kernels fall "
        "back to dequantize) or dequantize (every weight dequantised to float32 at load)",
        env=("GGUF_WEIGHTS",),
    )
    kv_cache_dtype: str = setting(
        "auto",
        "KV cache dtype: auto (bfloat16 with int8 quantization, else the model's), float32, bfloat16, "
        "float16 (the 16-bit ones halve the cache and the memory traffic of decode attention)",
        env=("KV_CACHE_DTYPE",),
    )
    max_model_len: int | None = setting(
        None,
        "context length: prompt + output tokens (default: the model's)",
        env=("MAX_MODEL_LEN", "MAX_MODEL_LENGTH"),
    )
    max_num_seqs: int = setting(256, "sequences decoded together in one engine step", env=("MAX_NUM_SEQS",))
    max_num_batched_tokens: int | None = setting(
        None,
        "tokens computed per engine step (default: 2048 with chunked prefill, else max_model_len)",
        env=("MAX_NUM_BATCHED_TOKENS",),
    )
    prefill_tokens_per_step: int = setting(
        256,
        "prompt tokens one step computes while several prompts are pending (they then finish one after "
        "another, which lowers TTFT under bursts; a lone prompt takes max_num_batched_tokens; 0: no cap)",
    )
    block_size: int = setting(16, "tokens per KV-cache block", env=("BLOCK_SIZE",))
    kv_cache_memory: int | str = setting(
        "auto",
        "KV cache size in bytes, or with a unit: 512MB, 2GB (powers of 1000), 512MiB, 2GiB (powers of "
        "1024); auto: enough for max_num_seqs full-length sequences, within a share of free memory",
        env=("KV_CACHE_MEMORY",),
    )
    num_kv_blocks: int | None = setting(None, "exact number of KV-cache blocks (overrides kv_cache_memory)")
    enable_prefix_caching: bool = setting(
        True, "reuse the KV cache of shared prompt prefixes", env=("ENABLE_PREFIX_CACHING",)
    )
    enable_chunked_prefill: bool = setting(True, "split long prompts over several engine steps")
    seed: int | None = setting(None, "seed of the global RNG, for requests without a seed", env=("SEED",))
    max_queued_requests: int | None = setting(
        None,
        "waiting requests beyond this are refused (503 with Retry-After; default: unlimited)",
        env=("MAX_CONCURRENCY",),
    )
    num_threads: int | None = setting(
        None,
        "torch threads (default: torch's choice, at most the CPUs this process may run on)",
        env=("NUM_THREADS",),
    )
    # Process-wide. On CPUs, activations that decay into denormals (softmax tails, SiLU of large
    # negatives) otherwise make matmuls several times slower.
    flush_denormal: bool = setting(True, "flush denormal floats to zero")
    chat_template: str | None = setting(
        None,
        "chat template overriding the model's: a file or an inline jinja2 template",
        env=("CUSTOM_CHAT_TEMPLATE",),
    )

    def __post_init__(self) -> None:
        try:
            self.device = check_device_syntax(self.device)
        except SettingError as error:
            raise EngineConfigError(str(error), "device") from None
        self.dtype = canonical_dtype(self.dtype)
        self.kv_cache_dtype = canonical_dtype(self.kv_cache_dtype)
        self.gguf_weights = self.gguf_weights.strip().lower()
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
            raise EngineConfigError(f"dtype must be {one_of(DTYPE_CHOICES)}, got {self.dtype!r}", "dtype")
        if self.kv_cache_dtype not in DTYPE_CHOICES:
            raise EngineConfigError(
                f"kv_cache_dtype must be {one_of(DTYPE_CHOICES)}, got {self.kv_cache_dtype!r}",
                "kv_cache_dtype",
            )
        if self.gguf_weights not in GGUF_WEIGHTS_CHOICES:
            raise EngineConfigError(
                f"gguf_weights must be {one_of(GGUF_WEIGHTS_CHOICES)}, got {self.gguf_weights!r}",
                "gguf_weights",
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise EngineConfigError(
                f"quantization must be {one_of(('none', *QUANTIZATION_CHOICES))}, got {self.quantization!r}",
                "quantization",
            )
        positive = {
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "num_kv_blocks": self.num_kv_blocks,
            "num_threads": self.num_threads,
            "tp": self.tp,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise EngineConfigError(f"{name} must be at least 1, got {value}", name)
        if self.prefill_tokens_per_step < 0:
            raise EngineConfigError(
                f"prefill_tokens_per_step must be non-negative, got {self.prefill_tokens_per_step}",
                "prefill_tokens_per_step",
            )
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise EngineConfigError(
                f"max_queued_requests must be non-negative, got {self.max_queued_requests}",
                "max_queued_requests",
            )
        utilization = self.gpu_memory_utilization
        if utilization is not None and not 0 < utilization <= 1:
            raise EngineConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {utilization}", "gpu_memory_utilization"
            )
        if isinstance(self.kv_cache_memory, int) and self.kv_cache_memory < 1:
            raise EngineConfigError(
                f"kv_cache_memory must be positive, got {self.kv_cache_memory}", "kv_cache_memory"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
        """Fields from their env names (``SERVEKIT_<NAME>``, then the vLLM worker's), then ``overrides``
        (which win) on top."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise EngineConfigError(f"unknown engine setting(s): {sorted(unknown)}", sorted(unknown)[0])
        try:
            values, _ = read_settings(cls, {}, os.environ if env is None else env)
        except SettingError as error:
            raise EngineConfigError(str(error), error.name) from None
        return cls(**{**values, **overrides})

    def kv_cache_memory_bytes(self) -> int | None:
        return None if isinstance(self.kv_cache_memory, str) else self.kv_cache_memory


# -- settings resolved against the model and the machine (torch is imported only here, lazily) ----

_AUTO_KV_CACHE_MAX_BYTES = 2 << 30
_AUTO_KV_CACHE_MEMORY_FRACTION = 0.2


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float32 on CPU (exact, and fast there), bfloat16 on GPUs that support it."""
    from servekit.llm.device import auto_dtype

    return auto_dtype(device) if name == "auto" else torch_dtype(name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``DTYPE_CHOICES`` name other than "auto"."""
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def resolve_quantization(
    name: str | None, checkpoint_quantization: str | None, device: torch.device | None = None
) -> str | None:
    """``"auto"`` is int8 on CPUs when the checkpoint's weights are quantised already (a Q4/Q8 GGUF:
    computing them in int8 instead of dequantised float32 loses less than the file's own rounding
    did, and is several times faster); otherwise the weights are computed as loaded."""
    from servekit.llm.models.linear import int8_matmul_available

    on_cpu = device is None or device.type == "cpu"
    if name == "int8" and not on_cpu:
        raise EngineConfigError(
            f"quantization=int8 runs on CPUs only (the engine runs on {device}): leave it unset",
            "quantization",
        )
    if name == "int8" and not int8_matmul_available():
        raise EngineConfigError(
            "quantization=int8 needs a CPU with an int8 dot-product unit (AVX-512 VNNI, AVX-VNNI or "
            "AMX; Arm: i8mm or dotprod), which this one lacks: int8 matmuls would run many times slower "
            "than the exact float32 path. Leave quantization unset (exact) on this machine.",
            "quantization",
        )
    if name in CHECKPOINT_METHODS:
        if not (checkpoint_quantization or "").lower().startswith(name):
            raise EngineConfigError(
                f"quantization={name} names how the checkpoint is quantised, and this one is "
                f"{checkpoint_quantization or 'not quantised'}: leave quantization unset",
                "quantization",
            )
        return None
    if name != "auto":
        return name
    if checkpoint_quantization and on_cpu and int8_matmul_available():
        return "int8"
    return None


def resolve_gguf_blocks(
    name: str,
    has_blocks: bool,
    dtype: torch.dtype,
    quantization: str | None,
    device: torch.device,
    tp: int = 1,
) -> bool:
    """Whether the weights are computed on the checkpoint's quantised blocks: asked for (the
    default), a checkpoint that has them, float32 compute on the CPU without tensor parallelism
    (the shards are cut from float weights), C kernels built. With int8 the blocks are kept for the
    batch-1 steps, computed on them with 8-bit activations (faster there than ``Int8Linear``)."""
    import torch

    from servekit.llm.kernels import kernels_available

    return (
        name == "blocks"
        and has_blocks
        and dtype == torch.float32
        and quantization in (None, "int8")
        and device.type == "cpu"
        and tp == 1
        and kernels_available(torch.float32)
    )


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
