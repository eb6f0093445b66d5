"""The continuous worker loop: every request is an asyncio task, so one worker serves many at once.

Chosen when ``predict`` is a coroutine or an async generator (LitServe's ``enable_async`` style, and
the LLM server, whose ``predict`` streams tokens from the continuous-batching engine). A cancellation
from the front cancels the request's task, which closes its generators: for the LLM engine that
aborts the sequence and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import zmq

from servekit.api import LitAPI
from servekit.callbacks import CallbackRunner, EventTypes
from servekit.request_id import current_request_id
from servekit.transport import STREAM_WINDOW, Cancel, Credit, Kind, Request, decode_to_worker, has_message
from servekit.workers.inbox import Inbox, Job, JobKey
from servekit.workers.loops import RequestProcessor

logger = logging.getLogger(__name__)


def wants_async_loop(api: LitAPI) -> bool:
    predict = type(api).predict
    return inspect.iscoroutinefunction(predict) or inspect.isasyncgenfunction(predict)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _Credit:
    """How many more chunks a stream may send before the front has consumed some."""

    def __init__(self, initial: int) -> None:
        self.available = initial
        self._refilled = asyncio.Event()

    def add(self, count: int) -> None:
        self.available += count
        self._refilled.set()

    async def refill(self) -> None:
        """Wait until there is credit (callers check ``available`` first: no coroutine per chunk)."""
        while self.available <= 0:
            self._refilled.clear()
            await self._refilled.wait()


class AsyncRequestProcessor(RequestProcessor):
    """Runs each job as a task on one event loop; replies go out as soon as they are produced."""

    def __init__(self, api: LitAPI, inbox: Inbox, callbacks: CallbackRunner) -> None:
        super().__init__(api, inbox, callbacks)
        if api.max_batch_size > 1:
            raise ValueError("an async predict runs requests concurrently: use max_batch_size=1 with it")
        self._tasks: dict[JobKey, asyncio.Task[None]] = {}
        self._credits: dict[JobKey, _Credit] = {}
        self._encode_is_async_gen = inspect.isasyncgenfunction(type(api).encode_response)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        socket = self.inbox.pull_socket
        stopped = loop.create_future()
        loop.add_reader(socket.fileno(), self._on_readable)
        loop.call_soon(self._on_readable)  # messages that arrived before add_reader
        await stopped  # runs until the process is terminated

    def _on_readable(self) -> None:
        socket = self.inbox.pull_socket
        while has_message(socket):
            message = decode_to_worker(socket.recv(zmq.NOBLOCK))
            key = (message.front, message.rid)
            if isinstance(message, Request):
                job = Job(*message)
                task = asyncio.get_running_loop().create_task(self._run_job(job))
                self._tasks[key] = task
                task.add_done_callback(functools.partial(self._forget, key))
            elif isinstance(message, Credit):
                credit = self._credits.get(key)
                if credit is not None:
                    credit.add(message.chunks)
            elif isinstance(message, Cancel):
                running = self._tasks.get(key)
                if running is not None:
                    running.cancel()

    def _forget(self, key: JobKey, task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)

    async def _run_job(self, job: Job) -> None:
        current_request_id.set(job.request_id or None)  # this task's own context
        context: dict[str, Any] = {}
        try:
            x = await _maybe_await(self._decode(job, context))
            self._event(EventTypes.BEFORE_PREDICT)
            if self.api.stream:
                await self._stream(job, x, context)
            else:
                y = await _maybe_await(self.predict(x, context))
                self._event(EventTypes.AFTER_PREDICT)
                self._event(EventTypes.BEFORE_ENCODE_RESPONSE)
                output = await _maybe_await(self.encode(y, context))
                self._event(EventTypes.AFTER_ENCODE_RESPONSE)
                self._reply_encoded(job, output)
        except asyncio.CancelledError:
            logger.debug("request %s cancelled by the front", job.key)
        except BaseException as exc:
            self._reply_error(job, exc)

    async def _stream(self, job: Job, x: Any, context: dict[str, Any]) -> None:
        predictions = self.predict(x, context)
        self._event(EventTypes.BEFORE_ENCODE_RESPONSE)
        items: Any = self.encode(predictions, context) if self._encode_is_async_gen else predictions
        credit = self._credits[job.key] = _Credit(STREAM_WINDOW)
        try:
            if hasattr(items, "__aiter__"):
                async for item in items:
                    if credit.available <= 0:
                        await credit.refill()
                    credit.available -= 1
                    self.inbox.reply(job.front, Kind.CHUNK, job.rid, 200, self._stream_bytes(job, item))
            else:
                for item in items:
                    if credit.available <= 0:
                        await credit.refill()
                    credit.available -= 1
                    self.inbox.reply(job.front, Kind.CHUNK, job.rid, 200, self._stream_bytes(job, item))
                    await asyncio.sleep(0)  # let other requests and cancellations in between items
            self._event(EventTypes.AFTER_PREDICT)
            self._event(EventTypes.AFTER_ENCODE_RESPONSE)
            self.inbox.reply(job.front, Kind.END, job.rid, 200, b"")
        finally:
            self._credits.pop(job.key, None)
            for generator in (items, predictions):
                if isinstance(generator, AsyncIterator) and hasattr(generator, "aclose"):
                    await generator.aclose()
                elif hasattr(generator, "close"):
                    generator.close()
