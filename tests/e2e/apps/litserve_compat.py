# LitServe code as written for LitServe: batched streaming behind OpenAISpec, async OpenAI hooks.
import os

import servekit as ls
from servekit.test_examples.openai_spec_example import OpenAIBatchContext, OpenAIBatchingWithUsage


class PerRequestBatchedChat(ls.LitAPI):
    """Batched streaming behind OpenAISpec with the spec's own encode_response: each step of predict
    holds one text per request."""

    def setup(self, device):
        pass

    def predict(self, batch):
        for word in ("echo", ":"):
            yield [word] * len(batch)
        yield [f" {request.messages[-1].content}" for request in batch]


class AsyncChat(ls.LitAPI):
    """LitServe's async OpenAI form: an async generator predict and an async generator encode_response."""

    def setup(self, device):
        pass

    async def decode_request(self, request):
        return request.messages[-1].content

    async def predict(self, prompt):
        for word in ("async", " ", prompt):
            yield word

    async def encode_response(self, output):
        async for text in output:
            yield {"role": "assistant", "content": text}


def build(name, batch_timeout):
    if name == "batch_context":
        return OpenAIBatchContext(max_batch_size=2, batch_timeout=batch_timeout, spec=ls.OpenAISpec())
    if name == "batch_usage":
        return OpenAIBatchingWithUsage(max_batch_size=2, batch_timeout=batch_timeout, spec=ls.OpenAISpec())
    if name == "batch_default_encode":
        return PerRequestBatchedChat(max_batch_size=2, batch_timeout=batch_timeout, spec=ls.OpenAISpec())
    if name == "async":
        return AsyncChat(spec=ls.OpenAISpec(), enable_async=True)
    raise SystemExit(f"unknown app {name}")


if __name__ == "__main__":
    api = build(os.environ["APP"], float(os.environ.get("BATCH_TIMEOUT", "2")))
    server = ls.LitServer(api, accelerator="cpu", fast_queue=True)
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
