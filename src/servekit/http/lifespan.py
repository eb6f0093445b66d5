"""The life of one HTTP front's app: its dispatcher, and the workers when the app owns them.

Under ``LitServer.run()`` the workers are already running when the front starts; the app of
``LitServer.app`` used in-process (a test client's lifespan) finds them stopped, so it starts them
and stops them at its end. As in LitServe, startup does not wait for ``setup``: ``/health`` says 503
until every worker is ready, and requests made meanwhile wait for a worker. A ``setup`` that raised
fails those requests with 503 and is raised again when the lifespan ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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
    fatal: list[BaseException] = []  # appended to from the supervisor's thread
    await asyncio.to_thread(workers.start, 1, log_settings, fatal.append)
    try:
        dispatcher.start()
        try:
            yield
        finally:
            dispatcher.close()
    finally:
        await asyncio.to_thread(workers.stop)
    if fatal:
        raise fatal[0]
