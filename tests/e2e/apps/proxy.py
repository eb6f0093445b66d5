"""`servekit proxy` as a test app: flags from argv, the port from PORT."""

import os
import sys

from servekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["proxy", *sys.argv[1:], "--host", "127.0.0.1", "--port", os.environ["PORT"]]))
