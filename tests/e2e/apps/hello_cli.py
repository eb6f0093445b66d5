"""`servekit hello` as a test app, on the port in PORT."""

import os
import sys

from servekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["hello", "--host", "127.0.0.1", "--port", os.environ["PORT"]]))
