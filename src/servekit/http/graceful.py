"""uvicorn's server, without re-raising the signal that stopped it."""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType

import uvicorn


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would kill the process
    before what it started (workers, replicas) is stopped; a signal here means "shut down cleanly",
    and that is all. ``on_exit`` is told when shutting down begins."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        if self.on_exit is not None:
            self.on_exit()
