# The PyTorch example of LitServe's documentation (nn.Linear), with only the import changed.
import os

import torch
import torch.nn as nn

import servekit as ls

torch.set_num_threads(1)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.linear.weight.data.fill_(2.0)
        self.linear.bias.data.fill_(1.0)

    def forward(self, x):
        return self.linear(x)


class SimpleTorchAPI(ls.LitAPI):
    def setup(self, device):
        self.model = Linear().to(device)
        self.device = device

    def decode_request(self, request):
        return torch.tensor([[request["input"]]], dtype=torch.float32, device=self.device)

    def predict(self, x):
        return self.model(x)

    def encode_response(self, output):
        return {
            "output": float(output.item()),
            "device": str(self.device),
            "worker": os.environ.get("SERVEKIT_WORKER_ID"),
        }


if __name__ == "__main__":
    server = ls.LitServer(
        SimpleTorchAPI(), accelerator="cpu", devices=1, workers_per_device=int(os.environ.get("WORKERS", "1"))
    )
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
