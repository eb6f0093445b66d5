"""The batched streaming loop in one process, against a recording inbox: LitServe's hook contract,
credit-based sending per request, a cancelled request leaving its batch mates running."""

from __future__ import annotations

from typing import Any

import orjson

import servekit as ls
from servekit.callbacks import CallbackRunner
from servekit.transport import Encoding, Kind
from servekit.workers.inbox import Job, JobKey
from servekit.workers.loops import RequestProcessor


class RecordingInbox:
    """The part of ``Inbox`` the loops use. ``send_chunk`` is where a real inbox waits for credit;
    ``refuse_after`` makes it report a cancelled stream after that many chunks of a request."""

    def __init__(self, jobs: list[Job], refuse_after: dict[JobKey, int] | None = None) -> None:
        self.jobs = list(jobs)
        self.refuse_after = refuse_after or {}
        self.sent: dict[JobKey, list[bytes]] = {}
        self.replies: list[tuple[Kind, int, int, bytes]] = []
        self.opened: list[JobKey] = []
        self.finished_keys: list[JobKey] = []

    def pop(self) -> Job | None:
        return self.jobs.pop(0) if self.jobs else None

    def wait(self, timeout_ms: int | None) -> bool:
        return bool(self.jobs)

    def open_stream(self, key: JobKey) -> None:
        self.opened.append(key)

    def is_cancelled(self, key: JobKey) -> bool:
        return False

    def send_chunk(self, job: Job, body: bytes) -> bool:
        chunks = self.sent.setdefault(job.key, [])
        if len(chunks) >= self.refuse_after.get(job.key, 1 << 30):
            return False
        chunks.append(body)
        return True

    def reply(self, front: int, kind: Kind, rid: int, status: int, body: bytes, batch_size: int = 0) -> None:
        self.replies.append((kind, rid, status, body))

    def finished(self, key: JobKey) -> None:
        self.finished_keys.append(key)


def _job(rid: int, text: str) -> Job:
    return Job(0, rid, Encoding.JSON, orjson.dumps({"text": text}))


class LitServeStyleBatchedStream(ls.LitAPI):
    """predict yields a list per step; encode_response gets the unbatched stream and the contexts."""

    def setup(self, device: str) -> None:
        self.seen_contexts: list[Any] = []

    def decode_request(self, request, context):
        context["text"] = request["text"]
        return request["text"]

    def predict(self, texts, context):
        for step in range(4):
            yield [f"{text}{step}" for text in texts]

    def encode_response(self, output_stream, context):
        self.seen_contexts.append(context)
        for outputs in output_stream:
            yield [
                {"output": output, "of": ctx["text"]} for output, ctx in zip(outputs, context, strict=True)
            ]


def _run(api: ls.LitAPI, inbox: RecordingInbox) -> None:
    api.setup("cpu")
    RequestProcessor(api, inbox, CallbackRunner()).run_stream_batch()  # type: ignore[arg-type]


def test_encode_response_gets_the_batched_stream_and_each_request_its_items() -> None:
    api = LitServeStyleBatchedStream(max_batch_size=2, stream=True)
    inbox = RecordingInbox([_job(1, "a"), _job(2, "b")])
    _run(api, inbox)
    assert api.seen_contexts == [[{"text": "a"}, {"text": "b"}]]  # called once, for the whole batch
    assert [orjson.loads(c) for c in inbox.sent[(0, 1)]] == [{"output": f"a{i}", "of": "a"} for i in range(4)]
    assert [orjson.loads(c) for c in inbox.sent[(0, 2)]] == [{"output": f"b{i}", "of": "b"} for i in range(4)]
    # Every chunk went through send_chunk (the credit window); each stream opened, ended, finished.
    assert [kind for kind, *_ in inbox.replies] == [Kind.END, Kind.END]
    assert inbox.opened == inbox.finished_keys == [(0, 1), (0, 2)]


def test_a_cancelled_stream_stops_alone() -> None:
    api = LitServeStyleBatchedStream(max_batch_size=2, stream=True)
    inbox = RecordingInbox([_job(1, "a"), _job(2, "b")], refuse_after={(0, 1): 1})
    _run(api, inbox)
    assert len(inbox.sent[(0, 1)]) == 1
    assert len(inbox.sent[(0, 2)]) == 4
    assert [(kind, rid) for kind, rid, *_ in inbox.replies] == [(Kind.END, 2)]


class WrongShapeEncode(LitServeStyleBatchedStream):
    def encode_response(self, output_stream, context):
        for outputs in output_stream:
            yield {"output": outputs}  # one dict per step instead of one item per request


def test_an_encode_response_of_the_wrong_shape_fails_clearly() -> None:
    inbox = RecordingInbox([_job(1, "a"), _job(2, "b")])
    _run(WrongShapeEncode(max_batch_size=2, stream=True), inbox)
    assert [(kind, status) for kind, _, status, _ in inbox.replies] == [(Kind.ERROR, 500), (Kind.ERROR, 500)]
    assert b"must yield, at each step, a list with one encoded item per request" in inbox.replies[0][3]


class DefaultEncode(ls.LitAPI):
    def decode_request(self, request):
        return request["text"]

    def predict(self, texts):
        yield [text.upper() for text in texts]


def test_without_encode_response_each_value_is_sent_as_it_is() -> None:
    inbox = RecordingInbox([_job(1, "a"), _job(2, "b")])
    _run(DefaultEncode(max_batch_size=2, stream=True), inbox)
    assert inbox.sent == {(0, 1): [b"A"], (0, 2): [b"B"]}
