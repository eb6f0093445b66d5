"""Checks of LitServer's and run()'s arguments, made before anything starts, with LitServe's errors."""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any

logger = logging.getLogger(__name__)

API_SERVER_WORKER_TYPES = ("process", "thread")


def check_model_metadata(model_metadata: Any) -> None:
    """``/info`` returns the metadata as JSON: it must be serialisable."""
    try:
        json.dumps(model_metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model_metadata must be JSON serializable: {error}") from None


def check_num_api_servers(num_api_servers: int | None) -> int:
    """The number of HTTP front processes: one unless given."""
    if num_api_servers is None:
        return 1
    if isinstance(num_api_servers, bool) or not isinstance(num_api_servers, int) or num_api_servers < 1:
        raise ValueError(f"num_api_servers must be greater than 0, got {num_api_servers!r}")
    return num_api_servers


def check_api_server_worker_type(worker_type: str | None) -> None:
    """LitServe runs extra fronts as processes or threads; servekit always runs them as processes."""
    if worker_type is None or worker_type == "process":
        return
    if worker_type == "thread":
        logger.info("api_server_worker_type='thread': servekit runs its HTTP fronts as processes")
        return
    raise ValueError(
        f"Invalid value for api_server_worker_type: {worker_type!r}. Must be 'process' or 'thread'"
    )


def check_mounts_for_fronts(mounts: list[tuple[str, Any]], num_fronts: int) -> None:
    """Several HTTP fronts run in processes of their own: the apps loggers mount are copied there."""
    if num_fronts == 1 or not mounts:
        return
    for path, app in mounts:
        try:
            pickle.dumps(app)
        except Exception as error:
            raise ValueError(
                f"the app a logger mounted at {path!r} cannot be copied into the {num_fronts} HTTP front "
                f"processes (num_api_servers={num_fronts}): {error}. Serve it with num_api_servers=1, "
                "or mount an app that can be pickled (a module-level ASGI app)"
            ) from None


def check_track_requests(track_requests: bool) -> None:
    """LitServe's ``track_requests`` counts in-flight requests for its callbacks; servekit does not."""
    if track_requests:
        raise ValueError(
            "track_requests=True is not supported: servekit does not count active requests for callbacks "
            "(on_request gets the request only); drop the argument or pass track_requests=False"
        )
