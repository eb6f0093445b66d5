"""A LitServer app with OpenAISpec whose replies echo the last message, for the contract fuzzer."""

import os

import servekit as ls


class EchoAPI(ls.LitAPI):
    def setup(self, device):
        self.ready = True

    def predict(self, request, context):
        content = request.messages[-1].content if request.messages else ""
        if isinstance(content, list):
            content = " ".join(getattr(part, "text", "") or "" for part in content)
        yield str(content or "")


if __name__ == "__main__":
    api_key = os.environ.get("ECHO_API_KEY") or None
    server = ls.LitServer(
        EchoAPI(), spec=ls.OpenAISpec(model_name="echo"), accelerator="cpu", api_key=api_key, timeout=30
    )
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
