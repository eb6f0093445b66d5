# Runs a README snippet file as __main__, unchanged, with LitServer.run bound to 127.0.0.1:$PORT
# (a snippet says run(port=8000) on every interface; a test must not).
import os
import runpy
import sys

import servekit

_run = servekit.LitServer.run


def run_here(self, *args, **kwargs):
    kwargs.update(host="127.0.0.1", port=int(os.environ["PORT"]))
    return _run(self, **kwargs)


servekit.LitServer.run = run_here
runpy.run_path(sys.argv[1], run_name="__main__")
