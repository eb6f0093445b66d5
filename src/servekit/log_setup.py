"""How every process of a server logs: the level, text / json / pretty (rich) output, and the id of
the request being served on every line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from servekit.request_id import RequestIdFilter

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


@dataclass(frozen=True)
class LogSettings:
    """Picklable: the main process, the HTTP front processes and the workers apply the same settings."""

    level: str = "info"
    pretty: bool = False
    format: str = "text"  # text or json (one JSON object a line)

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {self.format!r}")
        if self.pretty and self.format == "json":
            raise ValueError("pretty logs and json logs exclude each other: choose one")
        if self.pretty:
            check_pretty_logs_available()

    def apply(self, fmt: str = TEXT_FORMAT) -> None:
        if self.pretty:
            from rich.logging import RichHandler

            # rich shows the time and level itself, and renders tracebacks readably.
            handler: logging.Handler = RichHandler(rich_tracebacks=True, show_time=True, show_path=True)
            handler.setFormatter(logging.Formatter("%(processName)s %(name)s [%(request_id)s]: %(message)s"))
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(JSONFormatter() if self.format == "json" else logging.Formatter(fmt))
        handler.addFilter(RequestIdFilter())
        root = logging.getLogger()
        if any(getattr(h, "_servekit", False) for h in root.handlers):
            root.setLevel(self.level.upper())
            return  # applied already in this process
        handler._servekit = True  # type: ignore[attr-defined]
        logging.basicConfig(level=self.level.upper(), handlers=[handler])


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def check_pretty_logs_available() -> None:
    try:
        import rich.logging  # noqa: F401
    except ImportError as error:
        raise RuntimeError("pretty_logs=True needs the rich package: pip install rich") from error
