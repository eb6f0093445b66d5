"""Which device the engine runs on, what it computes in there, and how much KV cache fits.

``EngineConfig.device`` is ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``; ``resolve_device`` turns it into a ``torch.device`` once, at start, and fails
with a clear message when that device is not there. Torch is imported lazily (the config is read in
processes that never load a model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from servekit.settings import SettingError

if TYPE_CHECKING:
    import torch

    from servekit.llm.config import EngineConfig

DEVICE_SYNTAX = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(SettingError):
    """The configured device is malformed or absent on this machine."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "device")


def check_device_syntax(name: str) -> str:
    """``name`` lowercased, when it is one of ``DEVICE_CHOICES``."""
    lowered = name.strip().lower()
    if not DEVICE_SYNTAX.match(lowered):
        raise DeviceError(f"device must be {DEVICE_CHOICES}, got {name!r}")
    return lowered


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for a device setting; raises ``DeviceError`` when it is not available."""
    import torch

    lowered = check_device_syntax(name)
    if lowered == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if lowered == "cpu":
        return torch.device("cpu")
    if lowered == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(
                "device=mps but MPS is not available here (Apple silicon only): use cpu or auto"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device={lowered} but no CUDA GPU is available to this process (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}): use --device cpu or auto"
        )
    index = int(lowered.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device={lowered} but only {count} CUDA device(s) are visible (cuda:0..{count - 1})"
        )
    return torch.device("cuda", index)


def auto_dtype(device: torch.device) -> torch.dtype:
    """``dtype=auto``: float32 on CPUs (exact, and fast there), bfloat16 on GPUs that have it, else
    float16."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def device_count(device: torch.device) -> int:
    """How many devices of ``device``'s kind this process sees (CPUs count as one)."""
    import torch

    return int(torch.cuda.device_count()) if device.type == "cuda" else 1


def kv_budget_from_memory(total: int, used_after_profile: int, utilization: float) -> int:
    """Bytes for the KV cache under ``--gpu-memory-utilization``: the share of the device's ``total``
    memory the engine may use, minus what is in use at the profiled peak (weights, activations of the
    largest step, other processes). Raises ``DeviceError`` when nothing is left."""
    budget = int(total * utilization) - used_after_profile
    if budget <= 0:
        raise DeviceError(
            f"gpu_memory_utilization={utilization} leaves no room for the KV cache: "
            f"{used_after_profile / 2**30:.2f} GiB of {total / 2**30:.2f} GiB are in use after loading the "
            "weights and profiling a step; raise it, lower max_num_batched_tokens, or use a smaller model"
        )
    return budget


DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def check_device_settings(config: EngineConfig, device: torch.device) -> None:
    """Refuse settings that cannot apply on ``device`` (rather than ignore them)."""
    if config.gpu_memory_utilization is not None and device.type != "cuda":
        raise DeviceError(
            f"gpu_memory_utilization={config.gpu_memory_utilization} applies to CUDA GPUs only, and the "
            f"engine runs on {device}: size the KV cache with kv_cache_memory (e.g. 2GiB) instead"
        )
    if config.gpu_memory_utilization is not None and (
        config.num_kv_blocks is not None or config.kv_cache_memory_bytes() is not None
    ):
        raise DeviceError(
            "gpu_memory_utilization and kv_cache_memory / num_kv_blocks each size the KV cache: give one"
        )
    if config.cuda_graphs and device.type != "cuda":
        raise DeviceError(f"cuda_graphs needs a CUDA device; the engine runs on {device}")
    if config.cuda_graphs and config.tp > 1:
        raise DeviceError("cuda_graphs with tp > 1 is not supported: leave one of them unset")
    if config.tp > 1 and device.type not in ("cpu", "cuda"):
        raise DeviceError(f"tp={config.tp} runs on CPUs (gloo) or CUDA GPUs (NCCL), not on {device}")
    if config.tp > 1 and device.type == "cuda":
        index = device.index or 0
        count = device_count(device)
        if index + config.tp > count:
            raise DeviceError(
                f"tp={config.tp} from {device} needs GPUs cuda:{index}..cuda:{index + config.tp - 1}, "
                f"but only {count} are visible"
            )


def gpu_memory_utilization(config: EngineConfig, device: torch.device) -> float | None:
    """The share of GPU memory the KV cache is sized from: the setting, or 0.9 on CUDA when nothing
    else sizes the cache; None off CUDA."""
    if device.type != "cuda":
        return None
    if config.gpu_memory_utilization is not None:
        return config.gpu_memory_utilization
    if config.num_kv_blocks is None and config.kv_cache_memory_bytes() is None:
        return DEFAULT_GPU_MEMORY_UTILIZATION
    return None


def rank_threads(num_threads: int | None, tp: int) -> int | None:
    """Torch threads of each tensor-parallel rank: the configured (or torch's) count split evenly."""
    if tp == 1:
        return num_threads
    import torch

    total = num_threads if num_threads is not None else torch.get_num_threads()
    return max(total // tp, 1)


@dataclass(frozen=True)
class RunnerSettings:
    """What every rank's ``ModelRunner`` is built with, beyond the model and the device (picklable:
    rank 0 hands it to the other ranks)."""

    dtype: torch.dtype
    block_size: int
    num_blocks: int | None
    kv_cache_memory_bytes: int | None
    max_model_len: int
    quantization: str | None
    kv_cache_dtype: torch.dtype
    gpu_memory_utilization: float | None = None
    profile_tokens: int = 2048
    cuda_graphs: bool = False
    max_num_seqs: int = 256

    def runner_kwargs(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}
