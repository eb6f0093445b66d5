# Streaming: a generator predict and encode_response; items reach the client as produced.
import os

import servekit as ls


class StreamAPI(ls.LitAPI):
    def setup(self, device):
        self.closed = 0

    def decode_request(self, request):
        return request

    def predict(self, request):
        n = int(request.get("n", 5))
        gate = request.get("gate")  # a FIFO: one byte from the test releases each item
        fifo = open(gate, "rb", buffering=0) if gate else None  # noqa: SIM115 - closed in finally
        try:
            pad = "x" * int(request.get("pad", 0))
            progress = request.get("progress")  # a file that counts the items produced so far
            every = int(request.get("progress_every", 1))
            for i in range(n):
                if fifo is not None:
                    fifo.read(1)
                if progress and i % every == 0:  # written whole, then renamed: never read half-written
                    with open(f"{progress}.tmp", "w") as f:
                        f.write(str(i))
                    os.replace(f"{progress}.tmp", progress)
                yield {"i": i, "pad": pad} if pad else {"i": i}
        finally:
            if fifo is not None:
                fifo.close()
            marker = request.get("closed_marker")
            if marker:
                with open(marker, "w") as f:
                    f.write("closed")

    def encode_response(self, output):
        for item in output:
            yield {"output": item["i"], "pad": item["pad"]} if "pad" in item else {"output": item["i"]}


if __name__ == "__main__":
    ls.LitServer(
        StreamAPI(stream=True), accelerator="cpu", timeout=float(os.environ.get("TIMEOUT", "30"))
    ).run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
