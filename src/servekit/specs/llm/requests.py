"""The requests running in one worker of the LLM server: started on the engine, aborted by id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from servekit.llm.async_engine import AsyncEngine
from servekit.llm.inputs import EngineInput
from servekit.llm.outputs import RequestOutput


class RunningRequests:
    """Each running request's task, by engine request id, so that ``/abort_request`` can end it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.running: dict[str, asyncio.Task[Any]] = {}  # engine request id -> the task streaming it
        self.aborted: set[str] = set()

    async def start(
        self, request_id: str, prepared: EngineInput
    ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Submit a request and wait for its first output, so that engine errors are raised here,
        before the caller has streamed anything."""
        stream: AsyncGenerator[RequestOutput, None] = self.engine.generate(  # type: ignore[assignment]
            prepared, request_id=request_id
        )
        task = asyncio.current_task()
        if task is not None:
            self.running[request_id] = task
        try:
            first = await anext(stream)
        except BaseException:
            self.running.pop(request_id, None)
            await stream.aclose()
            raise
        return first, stream

    def done(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.aborted.discard(request_id)

    def abort(self, request_id: str) -> bool:
        """Abort a running request by id: its stream ends with finish_reason "abort"."""
        task = self.running.get(request_id)
        if task is None:
            return False
        self.aborted.add(request_id)
        task.cancel()
        return True

    def was_aborted(self, request_id: str) -> bool:
        """Called on CancelledError: True (and the cancellation is absorbed) for an abort by id."""
        if request_id not in self.aborted:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


async def drain(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The last output of a request's stream, starting from its first."""
    last = first
    while not last.finished:
        following = await anext(stream, None)
        if following is None:
            break
        last = following
    return last


async def interleave(
    pairs: Sequence[tuple[RequestOutput, AsyncIterator[RequestOutput]]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """The outputs of several requests as they come, each tagged with its request's position."""
    if len(pairs) == 1:
        # One request (the usual case) needs no pump task and queue: one event-loop hop less per token.
        first, stream = pairs[0]
        yield 0, first
        if not first.finished:
            async for following in stream:
                yield 0, following
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(position: int, first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> None:
        await queue.put((position, first))
        if not first.finished:
            async for output in stream:
                await queue.put((position, output))
        await queue.put((position, None))

    pumps = [asyncio.ensure_future(pump(i, first, stream)) for i, (first, stream) in enumerate(pairs)]
    remaining = len(pumps)
    try:
        while remaining:
            position, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield position, output
    finally:
        for task in pumps:
            task.cancel()
        # Let the pumps leave their engine streams before those are closed.
        await asyncio.gather(*pumps, return_exceptions=True)
