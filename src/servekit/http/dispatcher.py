"""The front's side of the transport: routes requests to workers and their replies back.

Routing is by meaning: a generation request goes to the least-loaded ready worker of its API, or to
the worker its affinity key is pinned to (an interactive session, so its KV cache is reused); a
request tagged with ids (engine request ids) can later be reached at the worker that runs it
(``owner``); ``workers`` lists the ready workers of an API, for messages every worker must get.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq

from servekit.errors import ServerError
from servekit.prometheus import BATCH_BOUNDS, Histogram
from servekit.request_id import current_request_id
from servekit.transport import (
    CREDIT_BATCH,
    Cancel,
    Credit,
    Endpoints,
    Kind,
    Reply,
    Request,
    WorkerDown,
    WorkerReady,
    decode_to_front,
    encode,
    has_message,
)

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
    future: asyncio.Future[Reply] | None = None
    chunks: asyncio.Queue[Reply] | None = None
    tags: Sequence[str] = ()


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
        self._owners: dict[str, int] = {}  # tag -> rid of the pending request it names
        self._affinity: dict[str, int] = {}  # affinity key -> worker index
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.restarts = 0  # workers seen dying (each is replaced by the supervisor)
        self.batch_sizes = Histogram(BATCH_BOUNDS)  # of the batches this front's requests ran in

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A dispatcher can be started again after close (an in-process app's second lifespan).
        self._workers, self._by_api = {}, []
        self._affinity.clear()
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
        self._owners.clear()
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

    def pending_by_worker(self) -> dict[int, int]:
        return {index: len(w.in_flight) for index, w in self._workers.items()}

    def workers(self, api_index: int) -> list[int]:
        """The workers of an API that can take a request now (ready; or starting, if none is)."""
        return [w.index for w in self._candidates(api_index)]

    def owner(self, tag: str) -> int | None:
        """The worker running the pending request tagged ``tag`` (see ``submit``), if any."""
        rid = self._owners.get(tag)
        return None if rid is None else self._pending[rid].worker.index

    def release_affinity(self, key: str) -> None:
        self._affinity.pop(key, None)

    # ------------------------------------------------------------- requests
    def _candidates(self, api_index: int) -> list[_Worker]:
        group = self._by_api[api_index]
        ready = [w for w in group if w.state == _READY]
        # Requests made while the workers still start wait in the transport; a restart does not.
        return ready or [w for w in group if w.state == _STARTING]

    def _choose(self, api_index: int, worker_index: int | None, affinity: str | None) -> _Worker:
        candidates = self._candidates(api_index)
        if worker_index is not None:
            chosen = self._workers.get(worker_index)
            if chosen is None or chosen not in candidates:
                raise WorkerUnavailable(f"inference worker {worker_index} is not available; retry shortly")
            return chosen
        if not candidates:
            raise WorkerUnavailable(
                "no inference worker is available (restarting after a crash); retry shortly"
            )
        if affinity is not None:
            pinned = self._workers.get(self._affinity.get(affinity, -1))
            if pinned is not None and pinned in candidates:
                return pinned
        chosen = min(candidates, key=lambda w: len(w.in_flight))
        if affinity is not None:
            self._affinity[affinity] = chosen.index
        return chosen

    def submit(
        self,
        api_index: int,
        encoding: int,
        payload: bytes,
        stream: bool,
        *,
        worker: int | None = None,
        affinity: str | None = None,
        tags: Sequence[str] = (),
    ) -> int:
        """Send a request to ``worker``, or to the worker ``affinity`` is pinned to (pinning it to the
        least-loaded one the first time, and again when that one is gone), or to the least-loaded
        one. ``tags`` name the request for ``owner`` while it is pending."""
        chosen = self._choose(api_index, worker, affinity)
        rid = next(self._ids)
        pending = _Pending(chosen, tags=tags)
        if stream:
            pending.chunks = asyncio.Queue()
        else:
            assert self._loop is not None
            pending.future = self._loop.create_future()
        self._pending[rid] = pending
        for tag in tags:
            self._owners[tag] = rid
        chosen.in_flight.add(rid)
        chosen.socket.send(
            encode(Request(self.front_index, rid, encoding, payload, current_request_id.get() or ""))
        )
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
            reply = await future
        finally:
            if timer is not None:
                timer.cancel()
            self.cancel(rid)  # forgets it; tells the worker only if it has not answered
        if reply.kind == Kind.ERROR:
            raise ServerError(reply.status, _detail(reply.body))
        return reply.body

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
                        reply = await asyncio.wait_for(chunks.get(), timeout)
                    except TimeoutError:
                        raise ServerError(504, "Request timed out") from None
                else:
                    # A backlog is drained without suspending; yield to the loop so that a client's
                    # disconnect (and the cancellation it triggers) is noticed even then.
                    await asyncio.sleep(0)
                    reply = chunks.get_nowait()
                    if deadline is not None and self._loop.time() > deadline:
                        raise ServerError(504, "Request timed out")
                if reply.kind == Kind.CHUNK:
                    consumed += 1
                    if consumed == CREDIT_BATCH:
                        consumed = 0
                        self._credit(pending.worker, rid, CREDIT_BATCH)
                    yield reply.body
                elif reply.kind == Kind.END:
                    return
                else:
                    raise ServerError(reply.status, _detail(reply.body))
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
            worker.socket.send(encode(Credit(self.front_index, rid, count)))

    def cancel(self, rid: int) -> None:
        """Forget a request; if it had not finished, tell its worker to drop or stop it."""
        pending = self._pending.pop(rid, None)
        if pending is None:
            return
        for tag in pending.tags:
            if self._owners.get(tag) == rid:
                del self._owners[tag]
        worker = pending.worker
        if rid in worker.in_flight:
            worker.in_flight.discard(rid)
            if worker.state != _DEAD:
                worker.socket.send(encode(Cancel(self.front_index, rid)))

    # -------------------------------------------------------------- replies
    def _on_readable(self) -> None:
        assert self._inbox is not None and self._loop is not None
        inbox = self._inbox
        for _ in range(_MAX_MESSAGES_PER_WAKEUP):
            if not has_message(inbox):
                return
            self._dispatch(decode_to_front(inbox.recv(zmq.NOBLOCK)))
        # A fast producer must not starve the event loop (clients, disconnects): yield, then go on.
        self._loop.call_soon(self._on_readable)

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, Reply):
            self._on_reply(message)
        elif isinstance(message, WorkerReady):
            self._worker_ready(message)
        elif isinstance(message, WorkerDown):
            self._worker_down(message)

    def _on_reply(self, reply: Reply) -> None:
        pending = self._pending.get(reply.rid)
        if pending is None:
            return  # cancelled or timed out meanwhile
        if reply.kind != Kind.CHUNK:
            pending.worker.in_flight.discard(reply.rid)
            if reply.batch_size:
                self.batch_sizes.observe(reply.batch_size)
        if pending.future is not None:
            if not pending.future.done():
                pending.future.set_result(reply)
        else:
            assert pending.chunks is not None
            pending.chunks.put_nowait(reply)

    def _current(self, index: int, generation: int) -> _Worker | None:
        worker = self._workers.get(index)
        if worker is None or generation < worker.generation:
            return None  # news of a process that was already replaced
        worker.generation = generation
        return worker

    def _worker_ready(self, message: WorkerReady) -> None:
        worker = self._current(message.worker, message.generation)
        if worker is not None:
            worker.state = _READY

    def _worker_down(self, message: WorkerDown) -> None:
        worker = self._current(message.worker, message.generation)
        if worker is None or worker.state == _DEAD:
            return
        worker.state = _DEAD
        self.restarts += 1
        detail = f"the inference worker handling this request {message.reason}; it is being restarted"
        for rid in list(worker.in_flight):
            pending = self._pending.get(rid)
            if pending is not None:
                self._fail(pending, 503, detail)
        worker.in_flight.clear()
        # Drop whatever was queued for the dead process; its successor starts clean.
        worker.socket.close(0)
        worker.socket = self._connect(worker.index)

    @staticmethod
    def _fail(pending: _Pending, status: int, detail: str) -> None:
        reply = Reply(Kind.ERROR, 0, status, orjson.dumps(detail))
        if pending.future is not None:
            if not pending.future.done():
                pending.future.set_result(reply)
        elif pending.chunks is not None:
            pending.chunks.put_nowait(reply)


def _detail(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")
