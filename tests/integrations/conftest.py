"""A tiny random checkpoint and a real ``servekit serve`` on it (with an API key), per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.serving import RunningServer, serve_script

MODEL = "tiny-llama"
API_KEY = "sk-servekit-test"
SERVER_ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "512"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.llm.tiny_models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / MODEL, "llama")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {**SERVER_ENV, "SERVEKIT_API_KEY": API_KEY}
    with serve_script(
        "llm_serve.py", tmp_path_factory.mktemp("server"), env=env, args=[str(tiny_model)]
    ) as running:
        yield running
