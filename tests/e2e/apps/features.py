# APIs exercising timeouts, crashes, auth, validation, context, callbacks and middlewares.
import os
import sys
import time

from fastapi import HTTPException
from pydantic import BaseModel
from starlette.middleware.base import BaseHTTPMiddleware

import servekit as ls


class SlowAPI(ls.LitAPI):
    """Sleeps for the requested time: the work itself takes that long (it is what a timeout bounds)."""

    def setup(self, device):
        self.calls = 0

    def decode_request(self, request):
        return request

    def predict(self, request):
        self.calls += 1
        if request.get("crash"):
            os._exit(3)
        if request.get("http_error"):
            raise HTTPException(status_code=418, detail="teapot")
        if request.get("fail"):
            raise ValueError("predict failed on purpose")
        if request.get("started_marker"):
            with open(request["started_marker"], "w") as f:
                f.write("started")
        time.sleep(float(request.get("seconds", 0)))
        return {"calls": self.calls, "pid": os.getpid(), "tag": request.get("tag")}

    def encode_response(self, output):
        return output


class Input(BaseModel):
    name: str
    age: int


class Output(BaseModel):
    greeting: str


class TypedAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request: Input) -> Input:
        return request

    def predict(self, x):
        return f"Hello {x.name}, {x.age}"

    def encode_response(self, output) -> Output:
        return Output(greeting=output)


class ContextAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request, context):
        context["seen"] = ["decode"]
        context["input"] = request["input"]
        return request["input"]

    def predict(self, x, context):
        context["seen"].append("predict")
        return x * 2

    def encode_response(self, output, context):
        context["seen"].append("encode")
        return {"output": output, "seen": context["seen"], "input": context["input"]}


class AuthorizedAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request

    def predict(self, x):
        return {"ok": True}

    def encode_response(self, output):
        return output

    def authorize(self, request: ls.Request):
        if request.headers.get("x-team") != "blue":
            raise HTTPException(status_code=403, detail="team blue only")


class FailingSetupAPI(ls.LitAPI):
    def setup(self, device):
        raise RuntimeError("the model file is missing (on purpose)")

    def predict(self, x):
        return x


class MarkerCallback(ls.Callback):
    def __init__(self, path):
        self.path = path

    def on_after_setup(self, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write("after_setup\n")

    def on_before_predict(self, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write("before_predict\n")

    def on_after_predict(self, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write("after_predict\n")

    def on_server_start(self, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write("server_start\n")


class HeaderMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, value="1"):
        super().__init__(app)
        self.value = value

    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers["X-Servekit-Test"] = self.value
        return response


if __name__ == "__main__":
    which = sys.argv[1]
    port = int(os.environ["PORT"])
    timeout = float(os.environ.get("TIMEOUT", "30"))
    if which == "slow":
        server = ls.LitServer(
            SlowAPI(),
            accelerator="cpu",
            timeout=timeout,
            workers_per_device=int(os.environ.get("WORKERS", "1")),
        )
    elif which == "typed":
        server = ls.LitServer(TypedAPI(), accelerator="cpu")
    elif which == "context":
        server = ls.LitServer(ContextAPI(), accelerator="cpu")
    elif which == "authorize":
        server = ls.LitServer(AuthorizedAPI(), accelerator="cpu")
    elif which == "setup_fails":
        server = ls.LitServer(FailingSetupAPI(), accelerator="cpu")
    elif which == "callbacks":
        server = ls.LitServer(
            SlowAPI(),
            accelerator="cpu",
            callbacks=[MarkerCallback(os.environ["MARKER"])],
            middlewares=[(HeaderMiddleware, {"value": "yes"})],
        )
    elif which == "multi":
        server = ls.LitServer([SlowAPI(api_path="/slow"), ContextAPI(api_path="/context")], accelerator="cpu")
    else:
        raise SystemExit(f"unknown app {which}")
    server.run(port=port, host="127.0.0.1", generate_client_file=False)
