"""uvicorn's server, without re-raising the signal that stopped it."""

from __future__ import annotations

from types import FrameType

import uvicorn


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would kill the process
    before what it started (workers, replicas) is stopped; a signal here means "shut down cleanly",
    and that is all."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
