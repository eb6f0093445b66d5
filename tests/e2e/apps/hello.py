# The hello-world example of LitServe's documentation, with only the import changed.
import os

import servekit as ls


class SimpleLitAPI(ls.LitAPI):
    def setup(self, device):
        self.model1 = lambda x: x**2
        self.model2 = lambda x: x**3

    def decode_request(self, request):
        return request["input"]

    def predict(self, x):
        squared = self.model1(x)
        cubed = self.model2(x)
        output = squared + cubed
        return {"output": output}

    def encode_response(self, output):
        return {"output": output}


class SquareAPI(ls.LitAPI):
    def setup(self, device):
        self.model = lambda x: x**2

    def decode_request(self, request):
        return request["input"]

    def predict(self, x):
        return self.model(x)

    def encode_response(self, output):
        return {"output": output}


if __name__ == "__main__":
    api = SquareAPI()
    server = ls.LitServer(
        api, accelerator="auto", max_payload_size=int(os.environ.get("MAX_PAYLOAD", "1000000"))
    )
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
