"""Loggers receive the (key, value) pairs an API sends with ``LitAPI.log``."""

from __future__ import annotations

from typing import Any


class Logger:
    """Override ``process``; it runs in the inference worker that logged the value."""

    def process(self, key: str, value: Any) -> None:
        raise NotImplementedError
