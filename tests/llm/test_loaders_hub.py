"""Hub ids resolve offline through a cache directory laid out as huggingface_hub lays it out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from servekit.llm.loaders import load_model_source
from servekit.llm.loaders.hub import HubModelNotFoundError
from tests.llm.tiny_models import build_tiny_checkpoint

torch.set_num_threads(1)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """``models--org--name/{refs/main, snapshots/<commit>/...}`` (the hub stores blobs and links
    them; plain files in the snapshot are read the same way)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_load_by_hub_id_from_offline_cache(tmp_path: Path, offline_cache: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "qwen2")
    snapshot = make_hub_cache(offline_cache, "tiny-org/tiny-qwen2", checkpoint)
    source = load_model_source("tiny-org/tiny-qwen2")
    assert source.name == "tiny-org/tiny-qwen2"
    assert Path(source.path) == snapshot
    assert source.config.architecture == "qwen2"
    direct = load_model_source(str(checkpoint))
    ours = dict(source.iter_weights())
    for name, tensor in direct.iter_weights():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)
    assert source.tokenizer.encode("Hello 😀") == direct.tokenizer.encode("Hello 😀")


def test_revision_and_tokenizer_by_hub_id(tmp_path: Path, offline_cache: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "llama")
    make_hub_cache(offline_cache, "tiny-org/tiny-llama", checkpoint)
    source = load_model_source("tiny-org/tiny-llama", revision=COMMIT, tokenizer="tiny-org/tiny-llama")
    assert source.config.architecture == "llama"
    assert source.chat_template is not None


def test_missing_hub_id_is_a_clear_error(offline_cache: Path) -> None:
    with pytest.raises(HubModelNotFoundError, match="nobody/nothing") as caught:
        load_model_source("nobody/nothing")
    assert "offline" in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
