# Form uploads, loggers, several HTTP front processes, the ready-made examples, client.py generation.
import os
import sys

import servekit as ls
from servekit.examples import SimpleBatchedAPI, SimpleLitAPI, SimpleStreamAPI, SimpleTorchAPI


class UploadAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        upload = request["file"]
        return {"name": upload.filename, "size": len(upload.file.read()), "label": request.get("label")}

    def predict(self, x):
        self.log("upload_size", x["size"])
        return x

    def encode_response(self, output):
        return output


class FileLogger(ls.Logger):
    def __init__(self, path):
        self.path = path

    def process(self, key, value):
        with open(self.path, "a") as f:
            f.write(f"{key}={value}\n")


if __name__ == "__main__":
    which, port = sys.argv[1], int(os.environ["PORT"])
    run = {"port": port, "host": "127.0.0.1", "generate_client_file": False}
    if which == "upload":
        server = ls.LitServer(UploadAPI(), accelerator="cpu", loggers=[FileLogger(os.environ["LOG_FILE"])])
    elif which == "fronts":
        server = ls.LitServer(SimpleLitAPI(), accelerator="cpu", workers_per_device=2)
        run["num_api_servers"] = 2
    elif which == "examples":
        server = ls.LitServer(
            [
                SimpleLitAPI(api_path="/simple"),
                SimpleBatchedAPI(api_path="/batched"),
                SimpleStreamAPI(api_path="/stream"),
                SimpleTorchAPI(api_path="/torch"),
            ],
            accelerator="cpu",
        )
        run["generate_client_file"] = True
    else:
        raise SystemExit(f"unknown app {which}")
    server.run(**run)
