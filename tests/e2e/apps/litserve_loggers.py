# A logger as LitServe documents them: it holds a lock (it cannot be pickled) and mounts an ASGI app
# that serves what it has counted (as a Prometheus logger mounts /metrics).
import json
import os
import threading

import servekit as ls


class CountingLogger(ls.Logger):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.totals = {}
        self.pids = set()
        self.mount("/metrics", self.metrics_app)

    def process(self, key, value):
        with self.lock:
            self.totals[key] = self.totals.get(key, 0) + value["amount"]
            self.pids.add(value["pid"])

    async def metrics_app(self, scope, receive, send):
        with self.lock:
            body = json.dumps({"totals": self.totals, "worker_pids": len(self.pids), "pid": os.getpid()})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class LoggingAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request["input"]

    def predict(self, x):
        self.log("inputs", {"amount": x, "pid": os.getpid()})
        return x * 2

    def encode_response(self, output):
        return {"output": output}


if __name__ == "__main__":
    server = ls.LitServer(LoggingAPI(), accelerator="cpu", workers_per_device=2, loggers=CountingLogger())
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
