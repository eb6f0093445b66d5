"""The registry's state file: the nodes (URL, models, speed, key), written atomically, never counters."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from servekit.proxy.config import ProxyConfigError, normalize_url
from servekit.proxy.registry import Node, Registry

logger = logging.getLogger(__name__)


def save_state(path: str | Path, registry: Registry) -> None:
    """Write the nodes to ``path`` atomically (a temporary file beside it, then a rename): a reader or a
    crash never sees half a file. The file may hold node keys, so it is readable by its owner only."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {"nodes": [node.persisted() for node in registry]}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_state(path: str | Path) -> list[Node]:
    """The nodes of a state file (none when it does not exist yet). A malformed file is an error."""
    target = Path(path)
    if not target.exists():
        return []
    try:
        data = json.loads(target.read_text())
        return [_node(item) for item in data["nodes"]]
    except (ValueError, KeyError, TypeError, ProxyConfigError) as error:
        raise ProxyConfigError(
            f"state file {target} is not a servekit proxy state: {error}", "state_file"
        ) from None


def _node(item: dict[str, Any]) -> Node:
    models = item.get("models") or []
    speed = item.get("speed")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise TypeError("models must be a list of strings")
    if speed is not None and not isinstance(speed, int | float):
        raise TypeError("speed must be a number")
    return Node(
        url=normalize_url(str(item["url"])),
        models=models,
        speed=None if speed is None else float(speed),
        api_key=item.get("api_key"),
    )
