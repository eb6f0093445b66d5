"""Rank 0 of a tensor-parallel engine: starts the other ranks, then runs every step on all of them.

The process that builds the ``LLMEngine`` (in ``servekit serve``, the inference worker) is rank 0:
it keeps the scheduler, the block manager and the sampler, and ``TensorParallelRunner`` stands in
for its ``ModelRunner``. Each other rank is a child process (``servekit.llm.tp_rank``) holding its
shard of the weights and of the KV cache; it reads the steps rank 0 writes to its stdin (pickled
``ForwardBatch``es, the block tables included: positions and slots follow from them) and runs the
forward, whose collectives (gloo on CPUs, NCCL on GPUs, each with a timeout) join the ranks.

Lifetimes: a rank exits when its stdin closes (rank 0 stopped, or died: the kernel closes the pipe)
and is also killed by the kernel when rank 0's thread that started it ends (``PR_SET_PDEATHSIG``).
A rank that dies makes rank 0 fail: its watcher thread reports it (``on_failure``), and a step
waiting on a collective with it fails with the collective's error or timeout, never hangs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, TYPE_CHECKING, Any

import torch

from servekit.llm.device import RunnerSettings
from servekit.llm.distributed import DEFAULT_COLLECTIVE_TIMEOUT, TPGroup
from servekit.llm.model_runner import ForwardBatch, ForwardOutput, ModelRunner

if TYPE_CHECKING:
    from servekit.llm.config import EngineConfig
    from servekit.llm.loaders import ModelSource

logger = logging.getLogger(__name__)

RANK_READY_TIMEOUT_S = 600.0  # loading a large model's shard may take minutes
_HEADER = struct.Struct("!Q")


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to build its shard (the first message on its stdin)."""

    rank: int
    world_size: int
    store_port: int
    backend: str
    device: str
    model: str
    settings: RunnerSettings
    num_threads: int | None
    flush_denormal: bool
    collective_timeout_s: float


def write_message(stream: IO[bytes], message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def read_message(stream: IO[bytes]) -> Any:
    """The next message, or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the next GPU after rank 0's on CUDA, the CPU otherwise."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def master_store(world_size: int, timeout: timedelta) -> Any:
    """Rank 0's rendezvous store, listening on a free port of 127.0.0.1 only (``TCPStore`` binds
    every interface when it opens the port itself)."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(world_size * 4)
    port = listener.getsockname()[1]
    return dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here on
        use_libuv=False,
    )


def join_group(backend: str, store: Any, rank: int, world_size: int, timeout: timedelta) -> TPGroup:
    """Initialise the default process group; gloo's own connections stay on 127.0.0.1 too."""
    import torch.distributed as dist

    options = None
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, pg_options=options
    )
    return TPGroup(rank, world_size, dist.group.WORLD)


def init_group(spec: RankSpec) -> TPGroup:
    """Join the ranks' process group through rank 0's TCP store on 127.0.0.1."""
    import torch.distributed as dist

    timeout = timedelta(seconds=spec.collective_timeout_s)
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world_size, False, timeout=timeout)
    return join_group(spec.backend, store, spec.rank, spec.world_size, timeout)


class TensorParallelRunner:
    """Rank 0's runner: the same ``execute`` as ``ModelRunner``, run by every rank together."""

    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        settings: RunnerSettings,
        device: torch.device,
        *,
        collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT,
    ) -> None:
        import torch.distributed as dist

        if not source.path:
            raise ValueError(
                "tp > 1 needs a model read from a local file or directory (each rank loads its shard)"
            )
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine already runs in this process")
        world = config.tp
        self.world_size = world
        self.on_failure: Callable[[str], None] | None = None
        self._closed = False
        self._failure: str | None = None
        self._ranks: list[subprocess.Popen[bytes]] = []
        timeout_s = collective_timeout.total_seconds()
        backend = backend_for(device)
        # Port 0: the store binds a free port of 127.0.0.1, which the ranks are told.
        store = master_store(world, collective_timeout)
        self._store = store
        try:
            for rank in range(1, world):
                spec = RankSpec(
                    rank=rank,
                    world_size=world,
                    store_port=store.port,
                    backend=backend,
                    device=str(rank_device(device, rank)),
                    model=source.path,  # the local file or directory rank 0 read (a hub id resolved)
                    settings=settings,
                    num_threads=torch.get_num_threads(),
                    flush_denormal=config.flush_denormal,
                    collective_timeout_s=timeout_s,
                )
                self._ranks.append(_start_rank(spec))
            self.group = join_group(backend, store, 0, world, collective_timeout)
            self.local = ModelRunner(
                source.config, source.iter_weights(), device=device, tp=self.group, **settings.runner_kwargs()
            )
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.block_size = self.local.block_size
        self.num_blocks = self.local.num_blocks
        self._watchers = [
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"servekit-tp-rank{rank}", daemon=True
            )
            for rank, proc in enumerate(self._ranks, start=1)
        ]
        for watcher in self._watchers:
            watcher.start()
        logger.info("tensor parallelism: %d ranks (%s), rank pids %s", world, backend, self.rank_pids)

    @property
    def rank_pids(self) -> list[int]:
        """The process ids of ranks 1..N-1."""
        return [proc.pid for proc in self._ranks]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + RANK_READY_TIMEOUT_S
        for rank, proc in enumerate(self._ranks, start=1):
            assert proc.stdout is not None
            line = _readline_before(proc, deadline)
            if line != b"ready\n":
                raise RuntimeError(
                    f"tensor-parallel rank {rank} failed to start (exit code {proc.poll()}): see its log above"
                )

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._closed:
            return
        self._failure = f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}"
        logger.error("%s: this engine cannot run any more steps", self._failure)
        callback = self.on_failure
        if callback is not None:
            callback(self._failure)

    def execute(self, batch: ForwardBatch) -> ForwardOutput:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        self.local.check(batch)
        for proc in self._ranks:
            assert proc.stdin is not None
            try:
                write_message(proc.stdin, batch)
            except (BrokenPipeError, OSError) as error:
                raise RuntimeError(f"a tensor-parallel rank is gone ({error})") from None
        return self.local.forward(batch)

    def close(self) -> None:
        """Stop the other ranks (their stdin closes) and leave the process group."""
        import torch.distributed as dist

        self._closed = True
        for proc in self._ranks:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self._ranks:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def _start_rank(spec: RankSpec) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(spec.num_threads or 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "servekit.llm.tp_rank"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        close_fds=True,
    )
    assert proc.stdin is not None
    write_message(proc.stdin, spec)
    return proc


def _readline_before(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """A line of the rank's stdout, or b"" once it exits or the deadline passes."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=min(1.0, max(deadline - time.monotonic(), 0))):
                return proc.stdout.readline()
            if proc.poll() is not None:
                return b""
    return b""
