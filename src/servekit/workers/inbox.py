"""A worker's view of its transport: pending jobs, cancellations, and replies to the fronts."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import zmq

from servekit.transport import (
    STREAM_WINDOW,
    Cancel,
    Credit,
    Kind,
    Request,
    WorkerReady,
    decode_to_worker,
    encode,
    has_message,
    reply,
)

JobKey = tuple[int, int]  # (front index, request id)
_MAX_REMEMBERED_CANCELLATIONS = 4096
_CREDIT_POLL_MS = 1000


@dataclass
class Job:
    front: int
    rid: int
    encoding: int
    payload: bytes
    request_id: str = ""

    @property
    def key(self) -> JobKey:
        return (self.front, self.rid)


class Inbox:
    """Receives requests and cancellations; a cancelled queued job is dropped without running."""

    def __init__(self, context: zmq.Context[Any], inbox_address: str, front_addresses: list[str]) -> None:
        self._pull = context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(inbox_address)
        self._replies: list[zmq.Socket[Any]] = []
        for address in front_addresses:
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.setsockopt(zmq.SNDHWM, 0)
            push.connect(address)
            self._replies.append(push)
        self._pending: OrderedDict[JobKey, Job] = OrderedDict()
        # Cancellations of jobs already running (or already finished: those keys never match again,
        # so the oldest are trimmed).
        self._cancelled: OrderedDict[JobKey, None] = OrderedDict()
        self._credits: dict[JobKey, int] = {}  # per open stream: chunks it may still send

    @property
    def pull_socket(self) -> zmq.Socket[Any]:
        """The inbox socket, for loops that read it from an event loop instead of ``wait``/``pop``."""
        return self._pull

    def __len__(self) -> int:
        return len(self._pending)

    def wait(self, timeout_ms: int | None) -> bool:
        """Block until a job is pending or the timeout passes (None: forever); True if one is."""
        while not self._pending:
            if not self._pull.poll(timeout_ms):
                return False
            self._drain()
        return True

    def pop(self) -> Job | None:
        self._drain()
        if not self._pending:
            return None
        return self._pending.popitem(last=False)[1]

    def is_cancelled(self, key: JobKey) -> bool:
        """Whether the front cancelled this running job (client gone or timed out)."""
        self._drain()
        return self._cancelled.pop(key, False) is None

    def finished(self, key: JobKey) -> None:
        self._cancelled.pop(key, None)
        self._credits.pop(key, None)

    def open_stream(self, key: JobKey) -> None:
        self._credits[key] = STREAM_WINDOW

    def send_chunk(self, job: Job, body: bytes) -> bool:
        """Send one stream chunk, first waiting for credit; False if the front cancelled the stream."""
        key = job.key
        while self._credits.get(key, 0) <= 0:
            if self.is_cancelled(key):
                return False
            self._pull.poll(_CREDIT_POLL_MS)
            self._drain()
        self._credits[key] -= 1
        self.reply(job.front, Kind.CHUNK, job.rid, 200, body)
        return True

    def _drain(self) -> None:
        while has_message(self._pull):
            message = decode_to_worker(self._pull.recv(zmq.NOBLOCK))
            key = (message.front, message.rid)
            if isinstance(message, Request):
                self._pending[key] = Job(*message)
            elif isinstance(message, Credit):
                if key in self._credits:
                    self._credits[key] += message.chunks
            elif isinstance(message, Cancel) and self._pending.pop(key, None) is None:
                self._cancelled[key] = None
                if len(self._cancelled) > _MAX_REMEMBERED_CANCELLATIONS:
                    self._cancelled.popitem(last=False)

    def reply(self, front: int, kind: Kind, rid: int, status: int, body: bytes, batch_size: int = 0) -> None:
        self._replies[front].send(reply(kind, rid, status, body, batch_size))

    def announce_ready(self, worker_index: int, generation: int) -> None:
        message = encode(WorkerReady(worker_index, generation))
        for push in self._replies:
            push.send(message)

    def close(self) -> None:
        self._pull.close(0)
        for push in self._replies:
            push.close()
