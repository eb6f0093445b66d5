# Async predict: one worker serves many requests at once (the continuous loop kind).
import asyncio
import os
import sys

import servekit as ls


class AsyncEchoAPI(ls.LitAPI):
    def setup(self, device):
        self.in_progress = 0
        self.peak = 0

    async def decode_request(self, request):
        return request

    async def predict(self, request):
        self.in_progress += 1
        self.peak = max(self.peak, self.in_progress)
        try:
            # Waits for the other requests to arrive: only possible if they run concurrently.
            for _ in range(2000):
                if self.peak >= int(request.get("expect", 1)):
                    break
                await asyncio.sleep(0.005)
            return {"peak": self.peak}
        finally:
            self.in_progress -= 1

    async def encode_response(self, output):
        return output


class AsyncStreamAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request

    async def predict(self, request):
        try:
            for i in range(int(request.get("n", 3))):
                yield {"i": i}
                await asyncio.sleep(0)
        finally:
            marker = request.get("closed_marker")
            if marker:
                with open(marker, "w") as f:
                    f.write("closed")

    async def encode_response(self, outputs):
        async for item in outputs:
            yield {"output": item["i"]}


if __name__ == "__main__":
    api = AsyncStreamAPI(stream=True) if sys.argv[1:] == ["stream"] else AsyncEchoAPI()
    ls.LitServer(api, accelerator="cpu").run(
        port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False
    )
