"""AsyncEngine: the engine's step loop in a background thread, with an asyncio streaming API.

The loop thread owns the ``LLMEngine``: it builds it (loads the weights) and steps it, and every add
and abort reaches it as a command, so the engine is only ever touched by one thread. Building it on
that thread matters on CPUs: PyTorch's OpenMP thread pool belongs to the thread that first runs a
parallel operator; with a second pool (one for the loading thread, one for the stepping thread)
every parallel operator paid ~75 us more (most likely libgomp, counting more threads than CPUs,
stops spinning between regions): 2-2.5x slower steps on a 2-core machine. When there is no work the thread blocks on a condition variable
(no polling). Outputs go back to each caller's event loop with ``loop.call_soon_threadsafe``, one
call per step and loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from servekit.llm.config import EngineConfig
from servekit.llm.errors import EngineClosedError, EngineInputError
from servekit.llm.inputs import EngineInput
from servekit.llm.outputs import RequestOutput
from servekit.llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from servekit.llm.engine import EngineStats, LLMEngine

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False


@dataclass
class _Add:
    stream: _Stream
    item: EngineInput


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        engine: LLMEngine | None = None,
        thread_name: str = "servekit-engine",
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Start the step loop thread, which builds an ``LLMEngine`` from ``config`` (this call
        returns once it is built, and raises what building raised) or adopts ``engine``.
        ``on_failure`` is called on the loop thread if the loop dies, after every stream failed."""
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._streams: dict[str, _Stream] = {}  # guarded by _cond
        self._stopping = False
        self._dead: BaseException | None = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._adopted = engine
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, args=(config,), name=thread_name, daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error
        self.engine: LLMEngine = self._engine

    # -- public API ----------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def generate(
        self,
        prompt: str | EngineInput | None = None,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, one per step that advanced it; the last has ``finished``.

        ``prompt`` is text, or an ``EngineInput`` from ``engine.inputs`` (taken as it is, with its
        own params). Invalid requests raise (ValueError subclasses, QueueFullError) on the first
        iteration, before anything is queued. Closing or cancelling the iteration aborts the request.
        """
        if isinstance(prompt, EngineInput):
            prepared = prompt
        else:
            prepared = self.engine.inputs.prepare(prompt, sampling_params, prompt_token_ids)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        self.engine.scheduler.check_capacity()
        stream = _Stream(request_id, asyncio.get_running_loop())
        with self._cond:
            if self._stopping or self._dead is not None:
                raise EngineClosedError("the engine is shut down") from self._dead
            if request_id in self._streams:
                raise EngineInputError(f"request id {request_id!r} is already in use", "request_id")
            self._streams[request_id] = stream
            self._commands.append(_Add(stream, prepared))
            self._cond.notify()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            if not stream.finished:
                self.request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.request_abort(request_id)

    def request_abort(self, request_id: str) -> None:
        """Abort from any thread; its stream (if still read) ends without a final output."""
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            self._commands.append(_Abort(request_id))
            self._cond.notify()

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop thread; unfinished streams end with EngineClosedError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._fail_all(EngineClosedError("the engine was shut down"))

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)

    # -- the loop thread -----------------------------------------------------------------------------

    def _build(self, config: EngineConfig | None) -> LLMEngine | None:
        """The engine, built on this (the loop) thread; None when building failed."""
        try:
            if self._adopted is not None:
                self._engine = self._adopted
            else:
                from servekit.llm.engine import LLMEngine

                self._engine = LLMEngine(config)
            return self._engine
        except BaseException as exc:
            self._build_error = exc
            return None
        finally:
            self._built.set()

    def _run(self, config: EngineConfig | None) -> None:
        engine = self._build(config)
        if engine is None:
            return
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                        self._cond.wait()
                    if self._stopping:
                        return
                    commands, self._commands = self._commands, []
                self._apply(commands)
                if engine.has_unfinished_requests():
                    self._deliver(engine.step())
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop failed")
            self._dead = exc
            self._fail_all(EngineClosedError(f"the engine loop failed: {exc!r}"))
            if self._on_failure is not None:
                self._on_failure(exc)

    def _apply(self, commands: list[_Add | _Abort]) -> None:
        for command in commands:
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                continue
            stream = command.stream
            with self._cond:
                if self._streams.get(stream.request_id) is not stream:
                    continue  # aborted before it was added
            try:
                self.engine.add_request(stream.request_id, command.item)
            except Exception as exc:
                with self._cond:
                    self._streams.pop(stream.request_id, None)
                _post(stream.loop, functools.partial(stream.queue.put_nowait, exc))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._cond:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            _post(loop, functools.partial(_put_all, items))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams = list(self._streams.values())
            self._streams.clear()
            self._commands.clear()
        for stream in streams:
            _post(stream.loop, functools.partial(stream.queue.put_nowait, error))


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.queue.put_nowait(output)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    # A closed loop raises RuntimeError: nobody is listening any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)
