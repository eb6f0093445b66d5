# Dynamic batching: numpy inputs stacked by the default batch(), and a custom batch/unbatch API.
import os

import numpy as np

import servekit as ls


class BatchedAPI(ls.LitAPI):
    def setup(self, device):
        self.batch_sizes = []

    def decode_request(self, request):
        return np.asarray([request["input"]], dtype=np.float64)

    def predict(self, x):
        # x is stacked by the default batch(): shape (batch, 1)
        return [{"square": float(v[0] ** 2), "batch_size": len(x)} for v in x]

    def encode_response(self, output):
        return output


class CustomBatchAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request["text"]

    def batch(self, inputs):
        return {"texts": list(inputs)}

    def predict(self, batch):
        return [t.upper() for t in batch["texts"]]

    def unbatch(self, output):
        return [{"upper": o, "n": len(output)} for o in output]

    def encode_response(self, output):
        return output


class StreamBatchAPI(ls.LitAPI):
    """Batched streaming: predict gets the batch and yields one list per step (an item per request);
    encode_response gets that stream and yields one list of encoded items per step (LitServe's contract)."""

    def setup(self, device):
        pass

    def decode_request(self, request):
        return request["text"]

    def predict(self, texts):
        for i in range(3):
            yield [f"{t}{i}/{len(texts)}" for t in texts]

    def encode_response(self, output_stream):
        for outputs in output_stream:
            yield [{"output": output} for output in outputs]


if __name__ == "__main__":
    size = int(os.environ.get("BATCH", "4"))
    timeout = float(os.environ.get("BATCH_TIMEOUT", "0.5"))
    apis = [
        BatchedAPI(max_batch_size=size, batch_timeout=timeout, api_path="/predict"),
        CustomBatchAPI(max_batch_size=size, batch_timeout=timeout, api_path="/upper"),
        StreamBatchAPI(max_batch_size=2, batch_timeout=timeout, api_path="/stream", stream=True),
    ]
    ls.LitServer(apis, accelerator="cpu").run(
        port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False
    )
