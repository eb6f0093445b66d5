"""The front's routing, against fake workers: real ZeroMQ sockets in a temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from servekit.errors import ServerError
from servekit.http.dispatcher import Dispatcher, WorkerUnavailable
from servekit.transport import (
    Cancel,
    Credit,
    Encoding,
    Endpoints,
    Kind,
    Reply,
    Request,
    WorkerDown,
    WorkerReady,
    decode_to_front,
    decode_to_worker,
    encode,
    reply,
)

pytestmark = pytest.mark.timeout(30)


def test_messages_round_trip() -> None:
    to_workers = [Request(1, 7, Encoding.PICKLE, b"\x00body"), Cancel(0, 3), Credit(2, 9, 32)]
    for message in to_workers:
        assert decode_to_worker(encode(message)) == message
    to_fronts = [Reply(Kind.CHUNK, 5, 200, b"{}"), WorkerReady(3, 2), WorkerDown(1, 4, "crashed")]
    for message in to_fronts:
        assert decode_to_front(encode(message)) == message
    assert decode_to_front(reply(Kind.ERROR, 5, 503, b'"x"')) == Reply(Kind.ERROR, 5, 503, b'"x"')


class FakeWorkers:
    """Binds the workers' inboxes and speaks for them to the front."""

    def __init__(self, endpoints: Endpoints, count: int) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.inboxes = []
        for index in range(count):
            pull = self.context.socket(zmq.PULL)
            pull.bind(endpoints.worker_inbox(index))
            self.inboxes.append(pull)
        self.to_front = self.context.socket(zmq.PUSH)
        self.to_front.connect(endpoints.front_inbox(0))

    def send(self, message: Any) -> None:
        self.to_front.send(encode(message))

    async def receive(self, worker: int) -> Any:
        # The front sends synchronously, so whatever it sent is on its way: wait for it, bounded.
        assert self.inboxes[worker].poll(2000), f"worker {worker} received nothing"
        return decode_to_worker(self.inboxes[worker].recv())

    def close(self) -> None:
        for sock in [*self.inboxes, self.to_front]:
            sock.close(0)
        self.context.term()


async def _started(tmp_path: Path, count: int) -> tuple[Dispatcher, FakeWorkers]:
    endpoints = Endpoints(str(tmp_path))
    dispatcher = Dispatcher(0, endpoints, [list(range(count))])
    dispatcher.start()
    workers = FakeWorkers(endpoints, count)
    for index in range(count):
        workers.send(WorkerReady(index, 1))
    for _ in range(2000):  # bounded: the front reads its inbox when its event loop gets the turn
        if dispatcher.ready():
            break
        await asyncio.sleep(0.001)
    assert dispatcher.ready()
    return dispatcher, workers


def test_routing_by_load_affinity_and_tag(tmp_path: Path) -> None:
    async def scenario() -> None:
        dispatcher, workers = await _started(tmp_path, 2)
        try:
            first = dispatcher.submit(0, Encoding.JSON, b"{}", stream=True, tags=["req-a"])
            assert (await workers.receive(0)).rid == first
            # The least-loaded worker gets the next request...
            second = dispatcher.submit(0, Encoding.JSON, b"{}", stream=True, affinity="session-1")
            assert (await workers.receive(1)).rid == second
            assert dispatcher.owner("req-a") == 0 and dispatcher.owner("unknown") is None
            # ...but a pinned key stays with its worker even when that one is busier.
            third = dispatcher.submit(0, Encoding.JSON, b"{}", stream=True, affinity="session-1")
            assert (await workers.receive(1)).rid == third
            explicit = dispatcher.submit(0, Encoding.JSON, b"{}", stream=False, worker=0)
            assert (await workers.receive(0)).rid == explicit
            assert dispatcher.workers(0) == [0, 1]

            # A finished request no longer names an owner, and its worker is not told to cancel it.
            workers.send(Reply(Kind.END, first, 200, b""))
            chunks: AsyncIterator[bytes] = dispatcher.stream(first, None)
            assert [chunk async for chunk in chunks] == []
            assert dispatcher.owner("req-a") is None

            # A worker that goes down fails its in-flight requests with 503 and loses its pin.
            workers.send(WorkerDown(1, 1, "crashed"))
            with pytest.raises(ServerError) as failed:
                async for _ in dispatcher.stream(second, None):
                    pass
            assert failed.value.status_code == 503 and "crashed" in str(failed.value.detail)
            assert dispatcher.workers(0) == [0]
            repinned = dispatcher.submit(0, Encoding.JSON, b"{}", stream=True, affinity="session-1")
            assert (await workers.receive(0)).rid == repinned
            with pytest.raises(WorkerUnavailable):
                dispatcher.submit(0, Encoding.JSON, b"{}", stream=False, worker=1)
        finally:
            dispatcher.close()
            workers.close()

    asyncio.run(scenario())


def test_answered_requests_are_forgotten_and_cancelled_ones_announced(tmp_path: Path) -> None:
    async def scenario() -> None:
        dispatcher, workers = await _started(tmp_path, 1)
        try:
            rid = dispatcher.submit(0, Encoding.JSON, b"{}", stream=False)
            await workers.receive(0)
            workers.send(Reply(Kind.RESPONSE, rid, 200, b'{"ok":true}'))
            assert await dispatcher.result(rid, timeout=5) == b'{"ok":true}'
            assert dispatcher._pending == {}

            slow = dispatcher.submit(0, Encoding.JSON, b"{}", stream=False)
            await workers.receive(0)
            with pytest.raises(ServerError) as timed_out:
                await dispatcher.result(slow, timeout=0.01)
            assert timed_out.value.status_code == 504
            assert await workers.receive(0) == Cancel(0, slow)
            assert dispatcher._pending == {}
        finally:
            dispatcher.close()
            workers.close()

    asyncio.run(scenario())
