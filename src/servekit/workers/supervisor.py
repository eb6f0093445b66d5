"""Spawns the inference workers, watches them, restarts the dead and tells the fronts."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from servekit.api import LitAPI
from servekit.callbacks import CallbackRunner
from servekit.errors import WorkerSetupError
from servekit.log_setup import LogSettings
from servekit.transport import Endpoints, WorkerDown, encode
from servekit.workers.devices import DeviceSlot
from servekit.workers.process import (
    STATUS_READY,
    STATUS_SETUP_FAILED,
    STATUS_UNHEALTHY,
    WorkerAssignment,
    worker_main,
)

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = 0.5


@dataclass
class WorkerPlan:
    """One worker slot: which API it serves and on which device."""

    index: int
    api: LitAPI
    slot: DeviceSlot


@dataclass
class _WorkerState:
    plan: WorkerPlan
    generation: int = 0
    process: BaseProcess | None = None
    status: Connection | None = None
    ready: bool = False
    ever_ready: bool = False
    restarts: int = 0


class Supervisor:
    """Runs in the main process. ``on_fatal`` is called (from a thread) if a worker's first ``setup`` fails."""

    def __init__(
        self,
        plans: list[WorkerPlan],
        endpoints: Endpoints,
        num_fronts: int,
        callbacks: CallbackRunner,
        log_settings: LogSettings,
        on_fatal: Callable[[BaseException], None],
        restart_workers: bool = True,
        has_loggers: bool = False,
    ) -> None:
        self._states = [_WorkerState(plan) for plan in plans]
        self._endpoints = endpoints
        self._num_fronts = num_fronts
        self._callbacks = callbacks
        self._log_settings = log_settings
        self._on_fatal = on_fatal
        self._restart_workers = restart_workers
        self._has_loggers = has_loggers
        self._mp = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._wake_reader, self._wake_writer = self._mp.Pipe(duplex=False)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._zmq: zmq.Context[Any] | None = None
        self._notify: list[zmq.Socket[Any]] = []
        self.fatal_error: BaseException | None = None

    # --------------------------------------------------------------- public
    def start(self) -> None:
        self._zmq = zmq.Context()
        for front in range(self._num_fronts):
            push = self._zmq.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._endpoints.front_inbox(front))
            self._notify.append(push)
        for state in self._states:
            self._spawn(state)
        self._thread = threading.Thread(target=self._watch, name="servekit-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker: SIGTERM, then SIGKILL for any still alive after ``timeout``."""
        self._stopping.set()
        self._wake_writer.send(None)
        watcher_alive = False
        if self._thread is not None:
            self._thread.join(timeout)
            watcher_alive = self._thread.is_alive()
        with self._lock:
            processes = [s.process for s in self._states if s.process is not None]
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout)
            if process.is_alive():
                logger.warning("worker pid %s did not stop in %.0fs; killing it", process.pid, timeout)
                process.kill()
                process.join(5)
        for state in self._states:
            if state.status is not None:
                state.status.close()
        if watcher_alive:
            # zmq sockets are not thread-safe: closing them (or terminating their context) under the
            # watcher's send aborts the process. Leave them to the daemon thread's end instead.
            logger.warning("the worker supervisor did not stop in %.0fs; leaving its sockets open", timeout)
            return
        for push in self._notify:
            push.close(0)
        if self._zmq is not None:
            self._zmq.term()

    # -------------------------------------------------------------- private
    def _spawn(self, state: _WorkerState) -> None:
        reader, writer = self._mp.Pipe(duplex=False)
        state.generation += 1
        plan = state.plan
        assignment = WorkerAssignment(
            index=plan.index,
            generation=state.generation,
            api=plan.api,
            device=plan.slot.device,
            endpoints=self._endpoints,
            num_fronts=self._num_fronts,
            callbacks=self._callbacks,
            status=writer,
            log_settings=self._log_settings,
            has_loggers=self._has_loggers,
        )
        process = self._mp.Process(
            target=worker_main, args=(assignment,), name=f"servekit-worker-{plan.index}"
        )
        # A spawned child inherits os.environ as it is at start(): that is how each worker gets its device.
        saved = {key: os.environ.get(key) for key in plan.slot.env}
        os.environ.update(plan.slot.env)
        try:
            process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        writer.close()
        with self._lock:
            if state.status is not None:
                state.status.close()
            state.process = process
            state.status = reader
            state.ready = False

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                by_handle: dict[Any, tuple[str, _WorkerState, int]] = {}
                for state in self._states:
                    if state.status is not None and not state.status.closed:
                        by_handle[state.status] = ("status", state, state.generation)
                    if state.process is not None:
                        by_handle[state.process.sentinel] = ("died", state, state.generation)
            handles: list[Any] = [self._wake_reader, *by_handle]
            ready = wait(handles)
            if self._wake_reader in ready:
                self._wake_reader.recv()
            # Status messages first: a setup failure's traceback arrives just before the death.
            events = sorted((by_handle[h] for h in ready if h in by_handle), key=lambda e: e[0] != "status")
            for what, state, generation in events:
                if self._stopping.is_set():
                    return
                if generation != state.generation:
                    continue  # that process was already replaced
                if what == "status":
                    self._on_status(state)
                else:
                    self._on_death(state)

    def _on_status(self, state: _WorkerState) -> None:
        assert state.status is not None
        try:
            kind, detail = state.status.recv()
        except (EOFError, OSError):
            state.status.close()
            return
        if kind == STATUS_READY:
            state.ready = state.ever_ready = True
            logger.info("worker %d ready (pid %s)", state.plan.index, state.process and state.process.pid)
        elif kind == STATUS_UNHEALTHY:
            # Fail its requests now and replace it; the death that follows restarts it as usual.
            logger.error("worker %d reported itself unhealthy (%s): restarting it", state.plan.index, detail)
            state.ready = False
            self._tell_fronts(WorkerDown(state.plan.index, state.generation, f"became unhealthy ({detail})"))
            if state.process is not None:
                state.process.terminate()
        elif kind == STATUS_SETUP_FAILED:
            error = WorkerSetupError(f"setup() failed in worker {state.plan.index}:\n{detail}")
            logger.error("%s", error)
            if not state.ever_ready:
                self._fail(error)

    def _on_death(self, state: _WorkerState) -> None:
        assert state.process is not None
        state.process.join(1)
        exitcode = state.process.exitcode
        state.ready = False
        self._tell_fronts(WorkerDown(state.plan.index, state.generation, "crashed"))
        if not state.ever_ready:
            if self.fatal_error is None:
                self._fail(
                    WorkerSetupError(f"worker {state.plan.index} exited with code {exitcode} during setup")
                )
            return
        logger.error(
            "worker %d (pid %s) died with exit code %s", state.plan.index, state.process.pid, exitcode
        )
        if not self._restart_workers:
            return
        state.restarts += 1
        # Back off only for a worker that keeps dying, so a crash loop does not eat the CPU.
        if state.restarts > 1 and self._stopping.wait(min(RESTART_BACKOFF_S * state.restarts, 10.0)):
            return
        logger.info("restarting worker %d", state.plan.index)
        self._spawn(state)

    def _tell_fronts(self, message: WorkerDown) -> None:
        """Each front, without blocking: a front that takes no messages (gone, or its queue full) must
        not stall the watcher, which ``stop`` waits for; it misses this notice."""
        encoded = encode(message)
        for front, push in enumerate(self._notify):
            try:
                push.send(encoded, zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("front %d takes no messages: it misses %s", front, message)

    def _fail(self, error: BaseException) -> None:
        if self.fatal_error is None:
            self.fatal_error = error
            self._on_fatal(error)
