"""The front's side of the transport: sends requests to workers and routes their replies back."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq

from servekit.errors import ServerError
from servekit.transport import CREDIT_BATCH, Endpoints, Kind, pack, unpack

logger = logging.getLogger(__name__)

_STARTING, _READY, _DEAD = 0, 1, 2
_MAX_MESSAGES_PER_WAKEUP = 256


@dataclass
class _Worker:
    index: int
    socket: zmq.Socket[Any]
    state: int = _STARTING
    generation: int = 0
    in_flight: set[int] = field(default_factory=set)


@dataclass
class _Pending:
    worker: _Worker
    future: asyncio.Future[tuple[int, int, bytes]] | None = None  # (kind, status, body)
    chunks: asyncio.Queue[tuple[int, int, bytes]] | None = None


class WorkerUnavailable(ServerError):
    def __init__(self, detail: str) -> None:
        super().__init__(503, detail, headers={"Retry-After": "1"})


class Dispatcher:
    """One per HTTP front process. Not thread-safe: used from the event loop only."""

    def __init__(self, front_index: int, endpoints: Endpoints, workers_by_api: list[list[int]]) -> None:
        self.front_index = front_index
        self._endpoints = endpoints
        self._workers_by_api_index = workers_by_api
        self._context: zmq.Context[Any] | None = None
        self._inbox: zmq.Socket[Any] | None = None
        self._workers: dict[int, _Worker] = {}
        self._by_api: list[list[_Worker]] = []
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = zmq.Context()
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(self._endpoints.front_inbox(self.front_index))
        for indices in self._workers_by_api_index:
            group = []
            for index in indices:
                worker = _Worker(index, self._connect(index))
                self._workers[index] = worker
                group.append(worker)
            self._by_api.append(group)
        self._loop.add_reader(self._inbox.fileno(), self._on_readable)
        # ZMQ's FD is edge-triggered: messages that arrived before add_reader need a first drain.
        self._loop.call_soon(self._on_readable)

    def close(self) -> None:
        if self._loop is not None and self._inbox is not None:
            self._loop.remove_reader(self._inbox.fileno())
        for pending in list(self._pending.values()):
            self._fail(pending, 503, "the server is shutting down")
        self._pending.clear()
        for worker in self._workers.values():
            worker.socket.close(0)
        if self._inbox is not None:
            self._inbox.close(0)
        if self._context is not None:
            self._context.term()

    def _connect(self, worker_index: int) -> zmq.Socket[Any]:
        assert self._context is not None
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.connect(self._endpoints.worker_inbox(worker_index))
        return socket

    # ---------------------------------------------------------------- state
    def ready(self) -> bool:
        return all(w.state == _READY for w in self._workers.values())

    def worker_states(self) -> dict[int, str]:
        names = {_STARTING: "starting", _READY: "ready", _DEAD: "dead"}
        return {index: names[w.state] for index, w in self._workers.items()}

    def in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------- requests
    def _choose(self, api_index: int) -> _Worker:
        group = self._by_api[api_index]
        ready = [w for w in group if w.state == _READY]
        if not ready:
            # Requests made while the workers still start wait in the transport; a restart does not.
            ready = [w for w in group if w.state == _STARTING]
        if not ready:
            raise WorkerUnavailable(
                "no inference worker is available (restarting after a crash); retry shortly"
            )
        return min(ready, key=lambda w: len(w.in_flight))

    def submit(self, api_index: int, payload_kind: int, payload: bytes, stream: bool) -> int:
        worker = self._choose(api_index)
        rid = next(self._ids)
        pending = _Pending(worker)
        if stream:
            pending.chunks = asyncio.Queue()
        else:
            assert self._loop is not None
            pending.future = self._loop.create_future()
        self._pending[rid] = pending
        worker.in_flight.add(rid)
        worker.socket.send(pack(Kind.REQUEST, self.front_index, rid, payload_kind, payload))
        return rid

    async def result(self, rid: int, timeout: float | None) -> bytes:
        """Wait for a whole response; raise ServerError for a failed request or a timeout."""
        pending = self._pending[rid]
        future = pending.future
        assert future is not None and self._loop is not None
        # A timer handle is much cheaper than asyncio.wait_for on this hot path.
        timer = (
            None
            if timeout is None
            else self._loop.call_later(timeout, self.abandon, rid, 504, "Request timed out")
        )
        try:
            kind, status, body = await future
        except asyncio.CancelledError:
            self.cancel(rid)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if kind == Kind.ERROR:
            raise ServerError(status, _detail(body))
        return body

    async def stream(self, rid: int, deadline: float | None) -> AsyncIterator[bytes]:
        """Yield the chunks of a stream; a failure before the first chunk raises ServerError."""
        pending = self._pending[rid]
        assert pending.chunks is not None and self._loop is not None
        chunks = pending.chunks
        consumed = 0
        try:
            while True:
                if chunks.empty():
                    timeout = None if deadline is None else deadline - self._loop.time()
                    try:
                        kind, status, body = await asyncio.wait_for(chunks.get(), timeout)
                    except TimeoutError:
                        raise ServerError(504, "Request timed out") from None
                else:
                    # A backlog is drained without suspending; yield to the loop so that a client's
                    # disconnect (and the cancellation it triggers) is noticed even then.
                    await asyncio.sleep(0)
                    kind, status, body = chunks.get_nowait()
                    if deadline is not None and self._loop.time() > deadline:
                        raise ServerError(504, "Request timed out")
                if kind == Kind.CHUNK:
                    consumed += 1
                    if consumed == CREDIT_BATCH:
                        consumed = 0
                        self._credit(pending.worker, rid, CREDIT_BATCH)
                    yield body
                elif kind == Kind.END:
                    return
                else:
                    raise ServerError(status, _detail(body))
        finally:
            self.cancel(rid)

    def abandon(self, rid: int, status: int, detail: str) -> None:
        """Give up on a request (timeout, client gone): cancel it in the worker, fail its waiter."""
        pending = self._pending.get(rid)
        if pending is None:
            return
        self.cancel(rid)
        self._fail(pending, status, detail)

    def _credit(self, worker: _Worker, rid: int, count: int) -> None:
        if worker.state != _DEAD and rid in worker.in_flight:
            worker.socket.send(pack(Kind.CREDIT, self.front_index, rid, count, b""))

    def cancel(self, rid: int) -> None:
        """Forget a request; if it had not finished, tell its worker to drop or stop it."""
        pending = self._pending.pop(rid, None)
        if pending is None:
            return
        worker = pending.worker
        if rid in worker.in_flight:
            worker.in_flight.discard(rid)
            if worker.state != _DEAD:
                worker.socket.send(pack(Kind.CANCEL, self.front_index, rid, 0, b""))

    # -------------------------------------------------------------- replies
    def _on_readable(self) -> None:
        assert self._inbox is not None and self._loop is not None
        inbox = self._inbox
        for _ in range(_MAX_MESSAGES_PER_WAKEUP):
            try:
                message = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._dispatch(*unpack(message))
        else:
            # A fast producer must not starve the event loop (clients, disconnects): yield, then go on.
            self._loop.call_soon(self._on_readable)
            return
        # ZMQ's FD is edge-triggered: check once more so no message is left behind unnoticed.
        if int(inbox.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._loop.call_soon(self._on_readable)

    def _dispatch(self, kind: int, rid: int, status: int, body: bytes) -> None:
        if kind == Kind.READY:
            self._worker_ready(rid, generation=status)
            return
        if kind == Kind.WORKER_DIED:
            self._worker_died(rid, generation=status)
            return
        pending = self._pending.get(rid)
        if pending is None:
            return  # cancelled or timed out meanwhile
        if pending.future is not None:
            pending.worker.in_flight.discard(rid)
            if not pending.future.done():
                pending.future.set_result((kind, status, body))
        else:
            assert pending.chunks is not None
            if kind != Kind.CHUNK:
                pending.worker.in_flight.discard(rid)
            pending.chunks.put_nowait((kind, status, body))

    def _worker_ready(self, index: int, generation: int) -> None:
        worker = self._workers.get(index)
        if worker is None or generation < worker.generation:
            return
        worker.generation = generation
        worker.state = _READY

    def _worker_died(self, index: int, generation: int) -> None:
        worker = self._workers.get(index)
        if worker is None or generation < worker.generation:
            return
        worker.generation = generation
        worker.state = _DEAD
        for rid in list(worker.in_flight):
            pending = self._pending.get(rid)
            if pending is not None:
                self._fail(
                    pending, 503, "the inference worker handling this request crashed; it is being restarted"
                )
        worker.in_flight.clear()
        # Drop whatever was queued for the dead process; its successor starts clean.
        worker.socket.close(0)
        worker.socket = self._connect(index)

    @staticmethod
    def _fail(pending: _Pending, status: int, detail: str) -> None:
        body = pack_detail(detail)
        if pending.future is not None:
            if not pending.future.done():
                pending.future.set_result((Kind.ERROR, status, body))
        elif pending.chunks is not None:
            pending.chunks.put_nowait((Kind.ERROR, status, body))


def pack_detail(detail: Any) -> bytes:
    return orjson.dumps(detail)


def _detail(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")
