"""`servekit serve` (argv and env as in llm_serve.py) whose environment changes once the command has
resolved its configuration: the workers it then starts must build their engine from that config."""

import os
import sys
from typing import Any

from servekit.cli import main
from servekit.specs.llm import command

CHANGED_ENV = {"SERVEKIT_MAX_MODEL_LEN": "64", "SERVEKIT_SERVED_MODEL_NAME": "from-env"}
resolved_serve = command.serve


def serve_after_env_change(config: Any, **kwargs: Any) -> None:
    os.environ.update(CHANGED_ENV)
    resolved_serve(config, **kwargs)


if __name__ == "__main__":
    command.serve = serve_after_env_change
    sys.exit(main(["serve", *sys.argv[1:], "--host", "127.0.0.1", "--port", os.environ["PORT"]]))
