"""A tensor-parallel rank other than 0: ``python -m servekit.llm.tp_rank`` (started by
``servekit.llm.tp_runner``, which writes a ``RankSpec`` and then one ``ForwardBatch`` per step to its
stdin). It builds its shard of the model, says ``ready`` on stdout, and runs each step's forward
until its stdin closes."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import torch

from servekit.host_memory import keep_freed_memory
from servekit.llm.tp_runner import RankSpec, init_group, read_message

logger = logging.getLogger("servekit.llm.tp_rank")

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Be killed when the process (thread) that started this one ends (Linux; elsewhere the closing
    stdin ends the rank)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def main() -> int:
    parent = os.getppid()
    die_with_parent(parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s tp-rank %(message)s")
    stdin = sys.stdin.buffer
    spec = read_message(stdin)
    if not isinstance(spec, RankSpec):
        logger.error("expected a RankSpec on stdin, got %r", type(spec))
        return 2
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    if spec.flush_denormal:
        torch.set_flush_denormal(True)
    if torch.device(spec.device).type == "cpu":
        keep_freed_memory()
    group = init_group(spec)

    from servekit.llm.loaders import load_model_source
    from servekit.llm.model_runner import ModelRunner

    source = load_model_source(spec.model)
    runner = ModelRunner(
        source.config, source.iter_weights(), device=spec.device, tp=group, **spec.settings.runner_kwargs()
    )
    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.buffer.flush()
    logger.info("rank %d of %d ready on %s", spec.rank, spec.world_size, spec.device)
    while True:
        batch = read_message(stdin)
        if batch is None:  # rank 0 closed the pipe: stop
            return 0
        runner.forward(batch)


if __name__ == "__main__":
    sys.exit(main())
