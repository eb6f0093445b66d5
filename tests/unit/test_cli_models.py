"""`servekit models` lists every architecture the engine implements."""

from __future__ import annotations

import subprocess
import sys

import pytest

from servekit.llm.models.registry import supported_architectures


def test_models_command_lists_the_supported_architectures() -> None:
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-m", "servekit.cli", "models"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["model_type", "HF"]
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == set(supported_architectures())
    assert {"gpt2", "mixtral", "gemma2", "llama", "qwen2_moe", "bloom"} <= listed
