"""An API exposed as an MCP tool, as LitServe's docs show it (plus a second API that is not one)."""

import os

from pydantic import BaseModel

import servekit as ls


class PowerRequest(BaseModel):
    input: float


class PowerAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = lambda x: x**2

    def decode_request(self, request: PowerRequest) -> float:
        return request.input

    def predict(self, x: float) -> float:
        return self.model(x)

    def encode_response(self, output: float) -> dict[str, float]:
        return {"output": output}


class EchoAPI(ls.LitAPI):
    """Echoes its request."""

    def predict(self, x: object) -> object:
        return x


if __name__ == "__main__":
    apis = [
        PowerAPI(mcp=ls.mcp.MCP(description="Returns the square of a number.")),
        EchoAPI(api_path="/echo", mcp=ls.mcp.MCP(name="echo-tool", input_schema={"type": "object"})),
        EchoAPI(api_path="/plain"),
    ]
    server = ls.LitServer(apis, accelerator="cpu", api_key=os.environ.get("API_KEY") or None)
    server.run(host="127.0.0.1", port=int(os.environ["PORT"]), generate_client_file=False)
