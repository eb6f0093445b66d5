"""Device assignment: one worker slot per device x workers_per_device, CUDA pinned per worker."""

from __future__ import annotations

import sys

import pytest

from servekit.workers import devices
from servekit.workers.devices import device_slots, resolve_accelerator


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_cpu_slots() -> None:
    assert [s.device for s in device_slots("cpu", "auto", 3)] == ["cpu"] * 3
    assert len(device_slots("cpu", 2, 2)) == 4
    assert all(s.env == {} for s in device_slots("cpu", 1, 1))


def test_auto_without_gpus_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert resolve_accelerator("auto") == "cpu"
    assert resolve_accelerator("cuda") == "cuda"  # kept: the error comes when the server runs
    with pytest.raises(ValueError, match="no CUDA device"):
        device_slots("cuda", "auto", 1)
    with pytest.raises(ValueError, match="MPS is not available"):
        device_slots("mps", "auto", 1)
    with pytest.raises(ValueError, match="accelerator must be one of"):
        resolve_accelerator("tpu")


@pytest.mark.usefixtures("four_gpus")
def test_gpu_slots_pin_each_worker_to_its_device() -> None:
    assert resolve_accelerator("auto") == "cuda"
    slots = device_slots("cuda", [0, 3], 2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "3", "3"]
    assert {s.device for s in slots} == {"cuda:0"}
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in device_slots("cuda", "auto", 1)] == ["0", "1", "2", "3"]
    assert len(device_slots("cuda", 2, 1)) == 2
    with pytest.raises(ValueError, match="only 4 CUDA devices"):
        device_slots("cuda", [5], 1)


def test_visible_devices_are_remapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # counted without torch, as at server start
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert devices.cuda_device_count() == 2
    slots = device_slots("cuda", [1], 1)
    assert slots[0].env == {"CUDA_VISIBLE_DEVICES": "5"}


def test_workers_per_device_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers_per_device"):
        device_slots("cpu", 1, 0)
