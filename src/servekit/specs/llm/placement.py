"""Where ``servekit serve`` puts its inference workers: the serving core's device assignment
(``LitServer(accelerator=..., devices=..., workers_per_device=...)``) from ``--device``,
``--workers`` and ``--tp``. Decided in the front process, without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from servekit.settings import SettingError


class PlacementError(SettingError):
    def __init__(self, message: str, name: str = "device") -> None:
        super().__init__(message, name)


@dataclass(frozen=True)
class Placement:
    accelerator: Literal["cpu", "cuda", "mps"]
    devices: int | Literal["auto"] | list[int]
    workers_per_device: int
    # Each worker's engine runs on the device the core assigns it (CUDA: "cuda:0" of its own
    # CUDA_VISIBLE_DEVICES); otherwise on the configured one.
    engine_on_slot_device: bool


def place_workers(device: str, workers: int, tp: int, gpu_count: int) -> Placement:
    """One worker per GPU on a multi-GPU machine (``--workers N`` over N GPUs, or N / GPUs per GPU);
    the CPU or MPS otherwise. ``gpu_count``: the CUDA GPUs visible here."""
    if device == "auto":
        device = "cuda" if gpu_count else "cpu"
    if device == "cpu":
        return Placement("cpu", 1, workers, False)
    if device == "mps":
        return Placement("mps", 1, workers, False)
    if gpu_count == 0:
        raise PlacementError(f"--device {device} but no CUDA GPU is visible here: use --device cpu or auto")
    if tp > 1:
        if workers > 1:
            raise PlacementError(
                f"--tp {tp} with --workers {workers}: on CUDA one worker drives the tensor-parallel GPUs "
                "(give --workers 1, or run --replicas behind the proxy)",
                "workers",
            )
        # The worker sees every GPU; its ranks take consecutive ones from the configured device.
        return Placement("cpu", 1, 1, False)
    if ":" in device:
        index = int(device.partition(":")[2])
        if index >= gpu_count:
            raise PlacementError(f"--device {device} but only {gpu_count} CUDA GPU(s) are visible")
        return Placement("cuda", [index], workers, True)
    if workers <= gpu_count:
        return Placement("cuda", list(range(workers)), 1, True)
    if workers % gpu_count:
        raise PlacementError(
            f"--workers {workers} does not spread evenly over {gpu_count} GPUs: give a multiple of {gpu_count}",
            "workers",
        )
    return Placement("cuda", "auto", workers // gpu_count, True)
