"""The inference-worker loops: single requests, dynamic batches, streams."""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException

from servekit.api import LitAPI
from servekit.callbacks import CallbackRunner, EventTypes
from servekit.errors import ServerError, internal_error_detail
from servekit.request_id import serving_requests
from servekit.transport import Encoding, Kind
from servekit.workers.hooks import (
    Hook,
    first_argument_model,
    parse_json_body,
    return_model,
    stream_item_bytes,
    to_json,
    validate_form,
    validate_output,
    validation_error_detail,
)
from servekit.workers.inbox import Inbox, Job

logger = logging.getLogger(__name__)

_BATCHED_STREAM_SHAPE = (
    "with max_batch_size > 1 and stream=True, encode_response receives the batched stream (each step a "
    "list with one output per request) and must yield, at each step, a list with one encoded item per "
    "request of the batch; got {got}"
)


def error_of(exc: BaseException, show_details: bool = False) -> tuple[int, Any]:
    """Status code and JSON-able detail for an exception raised by a user hook: errors raised on
    purpose keep their detail; any other exception is a 500 whose detail hides it (see
    ``internal_error_detail``)."""
    if isinstance(exc, ServerError):
        return exc.status_code, exc.detail
    if isinstance(exc, HTTPException):
        return exc.status_code, exc.detail
    if isinstance(exc, ValidationError):
        return 422, validation_error_detail(exc)
    return 500, internal_error_detail(exc, show_details)


class RequestProcessor:
    """Runs one API's hooks for jobs taken from the inbox and replies to the fronts."""

    def __init__(self, api: LitAPI, inbox: Inbox, callbacks: CallbackRunner) -> None:
        self.api = api
        self.inbox = inbox
        self.callbacks = callbacks
        self.decode = Hook(api.decode_request)
        self.predict = Hook(api.predict)
        self.encode = Hook(api.encode_response)
        spec = api.spec
        if spec is not None:
            # Hooks the user did not override are the spec's, and they get the request's context.
            if type(api).decode_request is LitAPI.decode_request:
                self.decode = Hook(
                    lambda request, context: spec.decode_request(request, context_kwargs=context)
                )
            if type(api).encode_response is LitAPI.encode_response:
                self.encode = Hook(
                    lambda output, context: spec.encode_response(output, context_kwargs=context)
                )
        self.encode_overridden = type(api).encode_response is not LitAPI.encode_response
        self.batch_hook = Hook(api.batch)
        self.unbatch_hook = Hook(api.unbatch)
        self.request_model = first_argument_model(api.decode_request)
        self.response_model = return_model(api.encode_response)

    # ------------------------------------------------------------ loop kinds
    def run_forever(self) -> None:
        api = self.api
        if api.max_batch_size > 1:
            step = self.run_stream_batch if api.stream else self.run_batch
        else:
            step = self.run_stream if api.stream else self.run_single
        while True:
            self.inbox.wait(None)
            step()

    def run_single(self) -> None:
        job = self.inbox.pop()
        if job is None:
            return
        with serving_requests([job.request_id]):
            context: dict[str, Any] = {}
            try:
                x = self._decode(job, context)
                self._event(EventTypes.BEFORE_PREDICT)
                y = self.predict(x, context)
                self._event(EventTypes.AFTER_PREDICT)
                self._reply_output(job, y, context, batch_size=1)
            except BaseException as exc:
                self._reply_error(job, exc)

    def run_batch(self) -> None:
        decoded = self._decode_batch()
        if not decoded:
            return
        with serving_requests([job.request_id for job, _, _ in decoded]):
            contexts = [context for _, _, context in decoded]
            try:
                batch = self.batch_hook([x for _, x, _ in decoded], contexts)
                self._event(EventTypes.BEFORE_PREDICT)
                outputs = self.predict(batch, contexts)
                self._event(EventTypes.AFTER_PREDICT)
                per_request = list(self.unbatch_hook(outputs, contexts))
                if len(per_request) != len(decoded):
                    raise ServerError(
                        500,
                        f"unbatch returned {len(per_request)} outputs for a batch of {len(decoded)} requests",
                    )
            except BaseException as exc:
                for job, _, _ in decoded:
                    self._reply_error(job, exc)
                return
            for (job, _, context), y in zip(decoded, per_request, strict=True):
                try:
                    self._reply_output(job, y, context, batch_size=len(decoded))
                except BaseException as exc:
                    self._reply_error(job, exc)

    def run_stream(self) -> None:
        job = self.inbox.pop()
        if job is None:
            return
        with serving_requests([job.request_id]):
            context: dict[str, Any] = {}
            predictions: Iterator[Any] | None = None
            encoded: Iterator[Any] | None = None
            self.inbox.open_stream(job.key)
            try:
                x = self._decode(job, context)
                self._event(EventTypes.BEFORE_PREDICT)
                predictions = self.predict(x, context)
                # Streams interleave predicting and encoding: both spans cover the whole stream.
                self._event(EventTypes.BEFORE_ENCODE_RESPONSE)
                encoded = self.encode(predictions, context)
                for item in encoded:
                    if self.inbox.is_cancelled(job.key) or not self.inbox.send_chunk(
                        job, self._stream_bytes(job, item)
                    ):
                        logger.debug("stream %s cancelled by the front", job.key)
                        return
                self._event(EventTypes.AFTER_PREDICT)
                self._event(EventTypes.AFTER_ENCODE_RESPONSE)
                self.inbox.reply(job.front, Kind.END, job.rid, 200, b"", batch_size=1)
            except BaseException as exc:
                self._reply_error(job, exc)
            finally:
                _close(encoded, predictions)
                self.inbox.finished(job.key)

    def run_stream_batch(self) -> None:
        """LitServe's batched-streaming contract: ``predict`` gets the batch and yields one output per
        request at each step; ``unbatch`` turns that stream into a stream of per-request lists; a
        user's ``encode_response`` gets that whole stream (and the list of contexts) and yields, at
        each step, one encoded item per request. Each request's items go to its client with the same
        credit-based flow control as a single stream."""
        decoded = self._decode_batch()
        if not decoded:
            return
        with serving_requests([job.request_id for job, _, _ in decoded]):
            jobs = [job for job, _, _ in decoded]
            contexts = [context for _, _, context in decoded]
            active = [True] * len(jobs)
            predictions: Iterator[Any] | None = None
            steps: Iterator[list[Any]] | None = None
            for job in jobs:
                self.inbox.open_stream(job.key)
            try:
                batch = self.batch_hook([x for _, x, _ in decoded], contexts)
                self._event(EventTypes.BEFORE_PREDICT)
                predictions = self.predict(batch, contexts)
                self._event(EventTypes.BEFORE_ENCODE_RESPONSE)
                steps = self._encoded_steps(self.unbatch_hook(predictions, contexts), contexts)
                for step in steps:
                    if len(step) != len(jobs):
                        raise ServerError(
                            500, _BATCHED_STREAM_SHAPE.format(got=f"{len(step)} items for {len(jobs)}")
                        )
                    for i, (job, items) in enumerate(zip(jobs, step, strict=True)):
                        if active[i]:
                            active[i] = self._send_items(job, items)
                    if not any(active):
                        logger.debug("every stream of the batch was cancelled by the fronts")
                        return
                self._event(EventTypes.AFTER_PREDICT)
                self._event(EventTypes.AFTER_ENCODE_RESPONSE)
                for i, job in enumerate(jobs):
                    if active[i]:
                        self.inbox.reply(job.front, Kind.END, job.rid, 200, b"", batch_size=len(jobs))
            except BaseException as exc:
                for i, job in enumerate(jobs):
                    if active[i]:
                        self._reply_error(job, exc)
            finally:
                _close(steps, predictions)
                for job in jobs:
                    self.inbox.finished(job.key)

    def _encoded_steps(self, unbatched: Any, contexts: list[dict[str, Any]]) -> Iterator[list[Any]]:
        """Each step of a batched stream as one list of items per request.

        A user's ``encode_response`` encodes the whole batched stream (LitServe's contract: each item
        it yields holds one encoded value per request). Without one, each request's value is encoded
        on its own by the default (the spec's, if any), which may yield several items for it."""
        if self.encode_overridden:
            for step in self.encode(unbatched, contexts):
                if not isinstance(step, list | tuple):
                    raise ServerError(500, _BATCHED_STREAM_SHAPE.format(got=type(step).__name__))
                yield [[item] for item in step]
            return
        for step in unbatched:
            yield [list(self.encode(iter([y]), context)) for y, context in zip(step, contexts, strict=False)]

    def _send_items(self, job: Job, items: list[Any]) -> bool:
        """Send a request's items of one step; False once its stream is cancelled."""
        for item in items:
            if self.inbox.is_cancelled(job.key) or not self.inbox.send_chunk(
                job, self._stream_bytes(job, item)
            ):
                logger.debug("stream %s cancelled by the front", job.key)
                return False
        return True

    # --------------------------------------------------------------- helpers
    def _decode_batch(self) -> list[tuple[Job, Any, dict[str, Any]]]:
        """Collect a batch and decode each request; one that fails to decode is answered alone."""
        decoded: list[tuple[Job, Any, dict[str, Any]]] = []
        for job in self._collect_batch():
            context: dict[str, Any] = {}
            try:
                decoded.append((job, self._decode(job, context), context))
            except BaseException as exc:
                self._reply_error(job, exc)
        return decoded

    def _collect_batch(self) -> list[Job]:
        """The window opens with the first job and closes at max_batch_size or batch_timeout."""
        first = self.inbox.pop()
        if first is None:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.api.batch_timeout
        while len(jobs) < self.api.max_batch_size:
            job = self.inbox.pop()
            if job is not None:
                jobs.append(job)
                continue
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.inbox.wait(remaining_ms):
                break
        return jobs

    def _decode(self, job: Job, context: dict[str, Any]) -> Any:
        if job.encoding == Encoding.JSON:
            request = parse_json_body(job.payload, self.request_model)
        else:
            request = validate_form(pickle.loads(job.payload), self.request_model)
        spec = self.api.spec
        if spec is not None:
            spec.populate_context(context, request)
        self._event(EventTypes.BEFORE_DECODE_REQUEST)
        x = self.decode(request, context)
        self._event(EventTypes.AFTER_DECODE_REQUEST)
        return x

    def _reply_output(self, job: Job, y: Any, context: dict[str, Any], batch_size: int = 0) -> None:
        self._event(EventTypes.BEFORE_ENCODE_RESPONSE)
        output = self.encode(y, context)
        self._event(EventTypes.AFTER_ENCODE_RESPONSE)
        self._reply_encoded(job, output, batch_size)

    def _reply_encoded(self, job: Job, output: Any, batch_size: int = 0) -> None:
        output = validate_output(output, self.response_model)
        self.inbox.reply(job.front, Kind.RESPONSE, job.rid, 200, to_json(output), batch_size)

    def _stream_bytes(self, job: Job, item: Any) -> bytes:
        if self.api.spec is None:
            return stream_item_bytes(self.api.format_encoded_response(item))
        # Specs frame the items themselves; bytes are an item a spec encoded already.
        return item if isinstance(item, bytes) else to_json(item)

    def _reply_error(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise exc
        status, detail = error_of(exc, self.api._debug_errors)
        if status >= 500:
            logger.error("request %s failed", job.key, exc_info=exc)
        try:
            body = to_json(detail)
        except TypeError:
            body = to_json(str(detail))
        self.inbox.reply(job.front, Kind.ERROR, job.rid, status, body)

    def _event(self, event: EventTypes) -> None:
        if self.callbacks:
            self.callbacks.trigger_event(event, lit_api=self.api)


def _close(*generators: Any) -> None:
    """Close a stream's generators, outermost first (their ``finally`` blocks run now)."""
    for generator in generators:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
