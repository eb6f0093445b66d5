"""How every process of a server logs: the level, and plain or pretty (rich) output."""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass(frozen=True)
class LogSettings:
    """Picklable: the main process, the HTTP front processes and the workers apply the same settings."""

    level: str = "info"
    pretty: bool = False

    def __post_init__(self) -> None:
        if self.pretty:
            check_pretty_logs_available()

    def apply(self, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
        if not self.pretty:
            logging.basicConfig(level=self.level.upper(), format=fmt)
            return
        from rich.logging import RichHandler

        # rich shows the time and level itself, and renders tracebacks readably.
        handler = RichHandler(rich_tracebacks=True, show_time=True, show_path=True)
        logging.basicConfig(
            level=self.level.upper(), format="%(processName)s %(name)s: %(message)s", handlers=[handler]
        )


def check_pretty_logs_available() -> None:
    try:
        import rich.logging  # noqa: F401
    except ImportError as error:
        raise RuntimeError("pretty_logs=True needs the rich package: pip install rich") from error
