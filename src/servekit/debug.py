"""``ls.set_trace()``: a pdb breakpoint that works inside an inference worker process.

Workers are spawned processes whose standard input is ``/dev/null`` (multiprocessing closes it), so
``breakpoint()`` there reads end-of-file and quits at once. ``set_trace`` instead talks to the
terminal the server was started from (``/dev/tty``, which every process of that terminal session
shares), or to the terminal device named by ``SERVEKIT_DEBUG_TTY`` (say, another terminal window:
``tty`` prints its name). Without a terminal it logs a warning and carries on.

While a worker sits at a breakpoint its requests wait: start the server with ``timeout=False`` to
debug at leisure.
"""

from __future__ import annotations

import logging
import os
import pdb
import sys
from types import FrameType
from typing import IO

logger = logging.getLogger(__name__)

TTY_ENV = "SERVEKIT_DEBUG_TTY"


def _open_terminal() -> tuple[IO[str], IO[str]] | None:
    """The terminal to read commands from and write to (pdb keeps them for its session)."""
    path = os.environ.get(TTY_ENV) or "/dev/tty"
    try:
        reader = open(path)  # noqa: SIM115
        writer = open(path, "w", buffering=1)  # noqa: SIM115
    except OSError as error:
        logger.warning("set_trace: no terminal to debug on (%s: %s); continuing", path, error)
        return None
    return reader, writer


def set_trace(frame: FrameType | None = None) -> None:
    """Stop here in pdb, on the terminal (see the module's docstring); ``c`` carries on."""
    terminal = _open_terminal()
    if terminal is None:
        return
    debugger = pdb.Pdb(stdin=terminal[0], stdout=terminal[1])
    debugger.set_trace(frame or sys._getframe().f_back)


def set_trace_if_debug(debug_env_var: str = "LITSERVE_DEBUG", debug_env_var_value: str = "1") -> None:
    """``set_trace()`` when the env var is set to the value (``LITSERVE_DEBUG=1``, as in LitServe)."""
    if os.environ.get(debug_env_var) == debug_env_var_value:
        set_trace(sys._getframe().f_back)
