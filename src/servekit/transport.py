"""The one channel between the HTTP front and the inference workers.

ZeroMQ PUSH/PULL over ``ipc://`` sockets, every message one msgpack-encoded tuple.

* A worker binds one PULL socket (its inbox) and receives requests and cancellations there, in the
  order each front sent them, so a cancellation never overtakes its request.
* Each front binds one PULL socket (its inbox) and receives everything addressed to it: responses,
  stream chunks, worker readiness and worker deaths (the latter from the supervisor).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

import msgpack

# Request payload encodings.
PAYLOAD_JSON = 0  # raw JSON bytes of the HTTP body, parsed in the worker
PAYLOAD_PICKLE = 1  # a pickled Python object (specs send parsed request models)


class Kind(enum.IntEnum):
    # front -> worker
    REQUEST = 1
    CANCEL = 2
    CREDIT = 3  # the front consumed stream chunks: the worker may send that many more
    # worker -> front
    RESPONSE = 10  # a whole response
    CHUNK = 11  # one streamed item
    END = 12  # end of a stream
    ERROR = 13  # the request failed: status + detail
    READY = 14  # a worker finished setup
    # supervisor -> front
    WORKER_DIED = 20


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


def pack(*fields: Any) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def unpack(message: bytes) -> list[Any]:
    fields: list[Any] = msgpack.unpackb(message, raw=False, use_list=True)
    return fields
