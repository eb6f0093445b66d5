"""The one channel between the HTTP front and the inference workers.

ZeroMQ PUSH/PULL over ``ipc://`` sockets; every message is one of the typed tuples below, sent as a
msgpack array whose first element is its ``Kind``.

* A worker binds one PULL socket (its inbox) and receives ``Request``, ``Cancel`` and ``Credit``
  there, in the order each front sent them, so a cancellation never overtakes its request.
* Each front binds one PULL socket (its inbox) and receives everything addressed to it: ``Reply``
  (responses, stream chunks, stream ends, errors), ``WorkerReady`` from the workers, and
  ``WorkerDown`` from the supervisor.

Which worker a request goes to (least loaded, the owner of a request id, every worker, the worker a
session is pinned to) is the front's routing decision (``servekit.http.dispatcher``); the messages
carry only what the receiver needs.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import msgpack
import zmq


class Encoding(enum.IntEnum):
    """How a request's payload is encoded."""

    JSON = 0  # raw JSON bytes of the HTTP body, parsed in the worker
    PICKLE = 1  # a pickled Python object (specs send parsed request models)


class Kind(enum.IntEnum):
    # front -> worker
    REQUEST = 1
    CANCEL = 2
    CREDIT = 3
    # worker -> front
    RESPONSE = 10  # a whole response
    CHUNK = 11  # one streamed item
    END = 12  # end of a stream
    ERROR = 13  # the request failed: status + detail
    WORKER_READY = 14
    # supervisor -> front
    WORKER_DOWN = 20


class Request(NamedTuple):
    """Front -> worker: run this request and reply to ``front`` under ``rid``."""

    front: int
    rid: int
    encoding: int
    payload: bytes
    request_id: str = ""  # the HTTP request's X-Request-ID, for the worker's log lines


class Cancel(NamedTuple):
    """Front -> worker: drop the request if it is queued, stop it if it runs."""

    front: int
    rid: int


class Credit(NamedTuple):
    """Front -> worker: the client consumed ``chunks`` chunks of this stream; that many more may come."""

    front: int
    rid: int
    chunks: int


class Reply(NamedTuple):
    """Worker -> front: ``kind`` is RESPONSE, CHUNK, END or ERROR (then ``status`` and a JSON detail)."""

    kind: int
    rid: int
    status: int
    body: bytes
    batch_size: int = 0  # RESPONSE / END: the size of the batch the request ran in (0: not told)


class WorkerReady(NamedTuple):
    """Worker -> front: this generation of worker ``worker`` finished setup."""

    worker: int
    generation: int


class WorkerDown(NamedTuple):
    """Supervisor -> front: this generation of worker ``worker`` died or stopped being healthy."""

    worker: int
    generation: int
    reason: str


ToWorker = Request | Cancel | Credit
ToFront = Reply | WorkerReady | WorkerDown
Message = ToWorker | ToFront

_KIND_OF: dict[type, Kind] = {
    Request: Kind.REQUEST,
    Cancel: Kind.CANCEL,
    Credit: Kind.CREDIT,
    WorkerReady: Kind.WORKER_READY,
    WorkerDown: Kind.WORKER_DOWN,
}
_TYPE_OF: dict[int, Any] = {kind: message_type for message_type, kind in _KIND_OF.items()}

# Flow control of streams: a worker has at most this many chunks of one stream in flight to the
# front; the front returns credit as its client consumes them, so a slow client holds the producer
# back instead of filling the front's memory.
STREAM_WINDOW = 64
CREDIT_BATCH = STREAM_WINDOW // 2


@dataclass(frozen=True)
class Endpoints:
    """Where every socket of one server lives."""

    directory: str

    def worker_inbox(self, worker_index: int) -> str:
        return f"ipc://{os.path.join(self.directory, f'w{worker_index}')}"

    def front_inbox(self, front_index: int) -> str:
        return f"ipc://{os.path.join(self.directory, f'f{front_index}')}"

    def logger_inbox(self) -> str:
        """Where the main process receives the workers' ``LitAPI.log`` pairs."""
        return f"ipc://{os.path.join(self.directory, 'log')}"


def encode(message: Message) -> bytes:
    if isinstance(message, Reply):
        fields: tuple[Any, ...] = tuple(message)  # a Reply's first field is its kind
    else:
        fields = (_KIND_OF[type(message)], *message)
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def reply(kind: Kind, rid: int, status: int, body: bytes, batch_size: int = 0) -> bytes:
    """An encoded ``Reply``, without building the tuple first (the workers' hot path)."""
    fields = (kind, rid, status, body, batch_size) if batch_size else (kind, rid, status, body)
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def has_message(socket: zmq.Socket[bytes]) -> bool:
    """Whether a message waits on ``socket``: read before each ``recv(zmq.NOBLOCK)`` instead of
    catching ``zmq.Again`` (raising it costs more than receiving a message). Reading EVENTS also
    re-arms ZMQ's edge-triggered FD, so a reader that stops when this is False misses nothing."""
    events = cast(int, socket.getsockopt(_EVENTS))
    return bool(events & _POLLIN)


def decode_to_worker(data: bytes) -> ToWorker:
    fields = msgpack.unpackb(data, raw=False, use_list=False)
    message: ToWorker = _TYPE_OF[fields[0]](*fields[1:])
    return message


def decode_to_front(data: bytes) -> ToFront:
    fields = msgpack.unpackb(data, raw=False, use_list=False)
    kind = fields[0]
    if Kind.RESPONSE <= kind <= Kind.ERROR:
        return Reply(*fields)
    message: ToFront = _TYPE_OF[kind](*fields[1:])
    return message
