"""Resolve a hub id ("org/name") to a local checkpoint directory through huggingface_hub.

The hub's local cache is used as is, so this works offline (``HF_HUB_OFFLINE=1``) for models that
were downloaded before. Only the files the engine reads are fetched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
TRUTHY = {"1", "true", "yes", "on"}


class HubModelNotFoundError(FileNotFoundError):
    """The hub id could not be resolved: not in the local cache and the hub is unreachable or
    does not have it."""


def hub_offline() -> bool:
    """Read at call time (huggingface_hub reads its own flag once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUTHY or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def resolve_hub_model(repo_id: str, *, revision: str | None = None, tokenizer_only: bool = False) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (default: main)."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS,
            cache_dir=hub_cache_dir(),
            local_files_only=offline,
        )
    except Exception as error:  # huggingface_hub raises many types (HTTP, offline, cache errors)
        where = "the local hub cache (offline mode)" if offline else "the hub or the local hub cache"
        raise HubModelNotFoundError(
            f"cannot find model {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" in {where}: {type(error).__name__}: {error}. Download it first (e.g. `hf download "
            f"{repo_id}`) or pass a local directory or .gguf file."
        ) from error
    logger.info("resolved %s to %s", repo_id, local)
    return Path(local)
