"""Accelerator detection and the assignment of devices to worker slots."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def cuda_device_count() -> int:
    """GPUs visible to this process, found without importing torch (unless it is already imported)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.cuda.device_count())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    proc_dir = "/proc/driver/nvidia/gpus"
    if os.path.isdir(proc_dir):
        return len(os.listdir(proc_dir))
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def mps_available() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_accelerator(accelerator: str) -> str:
    """The accelerator ``auto``/``gpu`` stand for here. An explicit ``cuda`` or ``mps`` is kept even on
    a machine without one (as LitServe does, so that servers can be built and inspected anywhere):
    ``device_slots`` fails when the server runs."""
    if not isinstance(accelerator, str) or accelerator.lower() not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    accelerator = accelerator.lower()
    if accelerator == "gpu":
        accelerator = "cuda" if cuda_device_count() else ("mps" if mps_available() else "cuda")
    if accelerator == "auto":
        if cuda_device_count():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    return accelerator


def workers_per_api(
    workers_per_device: int | Sequence[int] | Mapping[str, int], api_paths: list[str]
) -> list[int]:
    """Workers per device for each API, in API order: one number for all, a list in API order, or a
    mapping from api_path to number (APIs it leaves out get 1)."""
    if isinstance(workers_per_device, Mapping):
        unknown = sorted(set(workers_per_device) - set(api_paths))
        if unknown:
            raise ValueError(
                f"workers_per_device names unknown api_path values {unknown}; the APIs are {api_paths}"
            )
        counts = [workers_per_device.get(path, 1) for path in api_paths]
    elif isinstance(workers_per_device, list | tuple):
        if len(workers_per_device) != len(api_paths):
            raise ValueError(
                f"workers_per_device list length must match the number of APIs ({len(api_paths)}: "
                f"{api_paths}), got {len(workers_per_device)}"
            )
        counts = list(workers_per_device)
    elif isinstance(workers_per_device, int) and not isinstance(workers_per_device, bool):
        counts = [workers_per_device] * len(api_paths)
    else:
        raise TypeError(
            "workers_per_device must be an int, a list of ints (one per API, in order) or a mapping "
            f"of api_path -> int, got {workers_per_device!r}"
        )
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"workers_per_device values must be integers of at least 1, got {count!r}")
    return counts


@dataclass(frozen=True)
class DeviceSlot:
    """One worker's device: the name ``setup`` receives and the environment it runs with."""

    device: str
    env: dict[str, str]


def device_slots(
    accelerator: str, devices: int | str | list[int], workers_per_device: int
) -> list[DeviceSlot]:
    """One slot per worker process: ``len(devices) x workers_per_device``."""
    if workers_per_device < 1:
        raise ValueError(f"workers_per_device must be at least 1, got {workers_per_device}")
    accelerator = resolve_accelerator(accelerator)
    if accelerator == "cuda" and cuda_device_count() == 0:
        raise ValueError("accelerator='cuda' but no CUDA device is visible: use accelerator='cpu' or 'auto'")
    if accelerator == "mps" and not mps_available():
        raise ValueError(
            "accelerator='mps' but MPS is not available (Apple silicon only): use 'cpu' or 'auto'"
        )
    if accelerator == "cpu":
        count = 1 if devices == "auto" else (len(devices) if isinstance(devices, list) else int(devices))
        if count < 1:
            raise ValueError(f"devices must be at least 1, got {devices!r}")
        return [DeviceSlot("cpu", {}) for _ in range(count * workers_per_device)]
    if accelerator == "mps":
        return [DeviceSlot("mps", {}) for _ in range(workers_per_device)]
    available = cuda_device_count()
    if devices == "auto":
        ids = list(range(available))
    elif isinstance(devices, list):
        ids = [int(d) for d in devices]
    else:
        ids = list(range(int(devices)))
    if not ids:
        raise ValueError("no CUDA devices selected")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(available)]
    slots: list[DeviceSlot] = []
    for device_id in ids:
        if device_id >= len(physical):
            raise ValueError(
                f"device {device_id} requested but only {len(physical)} CUDA devices are visible"
            )
        env = {"CUDA_VISIBLE_DEVICES": physical[device_id]}
        slots.extend(DeviceSlot("cuda:0", env) for _ in range(workers_per_device))
    return slots
