"""The servers the core benchmark compares: servekit, plain FastAPI, LitServe (same work each)."""

import os
import sys

KIND, FLAVOUR, PORT = sys.argv[1], sys.argv[2], int(os.environ["PORT"])
CHUNKS = 10


if KIND == "litserve":
    import litserve as ls
else:
    import servekit as ls  # type: ignore[no-redef]


class HelloAPI(ls.LitAPI):
    def setup(self, device):  # type: ignore[no-untyped-def]
        self.model = lambda x: x**2

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return request["input"]

    def predict(self, x):  # type: ignore[no-untyped-def]
        return self.model(x)

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return {"output": output}


class StreamAPI(ls.LitAPI):
    def setup(self, device):  # type: ignore[no-untyped-def]
        self.model = lambda x: x**2

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return request["input"]

    def predict(self, x):  # type: ignore[no-untyped-def]
        for i in range(CHUNKS):
            yield self.model(x) + i

    def encode_response(self, outputs):  # type: ignore[no-untyped-def]
        for output in outputs:
            yield {"output": output}


if __name__ == "__main__":
    if KIND == "fastapi":
        import uvicorn
        from fastapi import FastAPI, Request
        from fastapi.responses import StreamingResponse

        app = FastAPI()
        model = lambda x: x**2  # noqa: E731

        @app.post("/predict")
        async def predict(request: Request):  # type: ignore[no-untyped-def]
            body = await request.json()
            if FLAVOUR != "stream":
                return {"output": model(body["input"])}

            async def chunks():  # type: ignore[no-untyped-def]
                import json

                for i in range(CHUNKS):
                    yield json.dumps({"output": model(body["input"]) + i}) + "\n"

            return StreamingResponse(chunks(), media_type="application/x-ndjson")

        uvicorn.run(
            app,
            host="127.0.0.1",
            port=PORT,
            log_level="warning",
            access_log=False,
            loop="uvloop",
            http="httptools",
        )
    else:
        api = StreamAPI(stream=True) if FLAVOUR == "stream" else HelloAPI()
        server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
        server.run(port=PORT, host="127.0.0.1", log_level="warning", generate_client_file=False)
