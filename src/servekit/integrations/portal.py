"""An event loop on a background thread, for running async code from synchronous callers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    """Started on first use; the thread is a daemon, idle (blocked in its selector) between calls."""

    def __init__(self, name: str = "servekit-portal") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name=self._name, daemon=True).start()
                self._loop = loop
            return self._loop

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the portal's loop and wait for its result (or exception)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._running_loop())
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """A synchronous iterator over ``stream``, each item fetched on the portal's loop; closing
        it early closes ``stream`` there."""
        try:
            while True:
                item = self.call(_next(stream))
                if item is _END:
                    return
                yield item  # type: ignore[misc]
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                self.call(close())


_END = object()


async def _next(stream: AsyncIterator[T]) -> T | object:
    return await anext(stream, _END)
