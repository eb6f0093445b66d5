"""`servekit serve` as a test app: the model and flags come from argv and env (PORT, SERVEKIT_*)."""

import os
import sys

from servekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:], "--host", "127.0.0.1", "--port", os.environ["PORT"]]))
