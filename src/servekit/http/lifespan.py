"""The life of one HTTP front's app: its dispatcher, and the workers when the app owns them.

Under ``LitServer.run()`` the workers are already running when the front starts; the app of
``LitServer.app`` used in-process (a test client's lifespan) finds them stopped, so it starts them,
waits until every one is ready (a failed ``setup`` fails the startup), and stops them at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from servekit.http.dispatcher import Dispatcher
from servekit.log_setup import LogSettings
from servekit.workers.pool import WorkerPool


@contextlib.asynccontextmanager
async def serving(
    dispatcher: Dispatcher, workers: WorkerPool | None, log_settings: LogSettings
) -> AsyncIterator[None]:
    if workers is None or workers.running:
        dispatcher.start()
        try:
            yield
        finally:
            dispatcher.close()
        return
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()

    def fail(error: BaseException) -> None:
        if not failed.done():
            failed.set_exception(error)

    def on_fatal(error: BaseException) -> None:  # called from the supervisor's thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(fail, error)

    await asyncio.to_thread(workers.start, 1, log_settings, on_fatal)
    try:
        dispatcher.start()
        try:
            await _first_of(dispatcher.wait_ready(), failed)
            yield
        finally:
            dispatcher.close()
    finally:
        await asyncio.to_thread(workers.stop)
        if failed.done() and not failed.cancelled():
            failed.exception()  # retrieved: a late failure is not "never retrieved"


async def _first_of(ready: Coroutine[Any, Any, None], failed: asyncio.Future[None]) -> None:
    """Wait for ``ready``; raise the error ``failed`` is set to if that comes first."""
    waiter = asyncio.ensure_future(ready)
    try:
        done, _ = await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            failed.result()  # raises the worker's setup error
    finally:
        waiter.cancel()
