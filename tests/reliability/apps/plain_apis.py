"""Plain LitAPIs (no spec) for the contract fuzzer: one whose decode_request is annotated with a
pydantic model (validated, declared in /openapi.json), one taking free-form JSON."""

import os

from pydantic import BaseModel, ConfigDict, Field

import servekit as ls


class Order(BaseModel):
    # Strict: pydantic's default coercion (0 -> False) accepts more than the JSON schema says.
    model_config = ConfigDict(strict=True)

    item: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=100)
    gift: bool = False


class OrderAPI(ls.LitAPI):
    def setup(self, device):
        self.prices = {"tea": 3}

    def decode_request(self, request: Order):
        return request

    def predict(self, order):
        return {"total": self.prices.get(order.item, 1) * order.quantity, "gift": order.gift}

    def encode_response(self, output):
        return output


class EchoAPI(ls.LitAPI):
    def setup(self, device):
        self.ready = True

    def decode_request(self, request):
        return request

    def predict(self, value):
        return {"echo": value}

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    server = ls.LitServer(
        [OrderAPI(api_path="/order"), EchoAPI(api_path="/echo")], accelerator="cpu", timeout=30
    )
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
