"""Ready-made LitAPIs, as in LitServe's examples: ``servekit.examples.SimpleLitAPI`` and friends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from servekit.api import LitAPI


class SimpleLitAPI(LitAPI):
    """Squares ``input``: POST {"input": 4.0} -> {"output": 16.0}."""

    def setup(self, device: str) -> None:
        self.model = lambda x: x**2

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        return request["input"]

    def predict(self, x: Any, **kwargs: Any) -> Any:
        return self.model(x)

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return {"output": output}


class SimpleBatchedAPI(LitAPI):
    """Squares a batch of inputs at once with NumPy. Batches by default (``max_batch_size=4``), so
    that a subclass's ``predict(x_batch, context)`` sees a batch even under a plain ``LitServer(api)``."""

    def __init__(self, max_batch_size: int = 4, batch_timeout: float = 0.01, **kwargs: Any) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, **kwargs)

    def setup(self, device: str) -> None:
        self.model = lambda x: x**2

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        import numpy as np

        return np.asarray(request["input"])

    def predict(self, x: Any, **kwargs: Any) -> Any:
        return self.model(x)

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return {"output": output}  # NumPy values are sent as JSON numbers (or lists)


class SimpleStreamAPI(LitAPI):
    """Streams ``input`` back a word at a time: each item is one JSON line."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("stream", True)
        super().__init__(**kwargs)

    def setup(self, device: str) -> None:
        self.model = lambda i, x: f"{i}: {x}"

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        return request["input"]

    def predict(self, x: Any, **kwargs: Any) -> Iterator[str]:
        for i in range(3):
            yield self.model(i, x)

    def encode_response(self, output: Iterator[Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
        for item in output:
            yield {"output": item}


class SimpleTorchAPI(LitAPI):
    """A PyTorch ``Linear(1, 1)`` with weight 2 and bias 1 on the worker's device: 4.0 -> 9.0."""

    def setup(self, device: str) -> None:
        import torch

        model = torch.nn.Linear(1, 1)
        with torch.no_grad():
            model.weight.fill_(2.0)
            model.bias.fill_(1.0)
        self.model = model.to(device).eval()

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor([float(request["input"])], device=self.device)

    def predict(self, x: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(x[None, :])  # the model takes a batch dimension

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return {"output": float(output)}
