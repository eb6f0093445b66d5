# The server's own routes and defaults: gzip for large responses, streams left alone, the shutdown API,
# LitServe's root, pretty logs (PRETTY=1), several HTTP fronts (FRONTS=n); the server's events written
# to EVENTS_FILE when set.
import os
import threading
from pathlib import Path

import servekit as ls


class BigAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request

    def predict(self, request):
        return {"result": "0" * int(request.get("size", 100000))}

    def encode_response(self, output):
        return output


class StepStreamAPI(ls.LitAPI):
    """Yields its second chunk only once the client shows (by a marker file) it got the first."""

    def setup(self, device):
        pass

    def decode_request(self, request):
        return request

    def predict(self, request):
        yield "first"
        marker = Path(request["marker"])
        waiter = threading.Event()
        for _ in range(400):  # bounded: 20 s
            if marker.exists():
                yield "after-marker"
                return
            waiter.wait(0.05)
        yield "marker-never-seen"

    def encode_response(self, outputs):
        for output in outputs:
            yield {"step": output}


class ServerEvents(ls.Callback):
    def __init__(self, path):
        self.path = path

    def _write(self, event):
        if self.path:
            with open(self.path, "a") as events:
                events.write(f"{event}\n")

    def on_server_stop(self, *args, **kwargs):
        self._write("stop")

    def on_server_end(self, *args, **kwargs):
        self._write("end")


if __name__ == "__main__":
    server = ls.LitServer(
        [BigAPI(api_path="/big"), StepStreamAPI(api_path="/stream", stream=True)],
        accelerator="cpu",
        enable_shutdown_api=True,
        callbacks=[ServerEvents(os.environ.get("EVENTS_FILE"))],
    )
    server.run(
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        num_api_servers=int(os.environ.get("FRONTS", "1")),
        pretty_logs=os.environ.get("PRETTY") == "1",
        generate_client_file=False,
    )
