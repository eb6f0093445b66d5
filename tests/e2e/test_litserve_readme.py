"""LitServe's README snippets run as written, with only the import changed, each as a real server on
127.0.0.1 that is then called: the README of LitServe 0.2.17 and the full feature README it was
condensed from (the "seed", which documents ``litserve.examples`` and every feature).

Not run: the 0.2.17 "Agent example" and the seed's ``pipeline('text-generation', model='gpt2')``
example, which need the network (the OpenAI API, the Hugging Face hub)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serving import APPS, serve_script

pytestmark = pytest.mark.timeout(180)


def switched(snippet: str) -> str:
    """The one change a LitServe user makes."""
    return snippet.replace("import litserve as ls", "import servekit as ls").replace(
        "from litserve.", "from servekit."
    )


INFERENCE_ENGINE = """
import litserve as ls

# define the api to include any number of models, dbs, etc...
class InferenceEngine(ls.LitAPI):
    def setup(self, device):
        self.text_model = lambda x: x**2
        self.vision_model = lambda x: x**3

    def predict(self, request):
        x = request["input"]
        # perform calculations using both models
        a = self.text_model(x)
        b = self.vision_model(x)
        c = a + b
        return {"output": c}

if __name__ == "__main__":
    # 12+ features like batching, streaming, etc...
    server = ls.LitServer(InferenceEngine(max_batch_size=1), accelerator="auto")
    server.run(port=8000)
"""

HELLO_WORLD = """
# server.py
import litserve as ls

# STEP 1: DEFINE YOUR MODEL API
class SimpleLitAPI(ls.LitAPI):
    def setup(self, device):
        # Setup the model so it can be called in `predict`.
        self.model = lambda x: x**2

    def decode_request(self, request):
        # Convert the request payload to your model input.
        return request["input"]

    def predict(self, x):
        # Run the model on the input and return the output.
        return self.model(x)

    def encode_response(self, output):
        # Convert the model output to a response payload.
        return {"output": output}


# STEP 2: START THE SERVER
if __name__ == "__main__":
    api = SimpleLitAPI()
    server = ls.LitServer(api, accelerator="auto")
    server.run(port=8000)
"""

TORCH = """
import torch, torch.nn as nn
import litserve as ls

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
        # move the model to the correct device
        # keep track of the device for moving data accordingly
        self.model = Linear().to(device)
        self.device = device

    def decode_request(self, request):
        # get the input and create a 1D tensor on the correct device
        content = request["input"]
        return torch.tensor([content], device=self.device)

    def predict(self, x):
        # the model expects a batch dimension, so create it
        return self.model(x[None, :])

    def encode_response(self, output):
        # float will take the output value directly onto CPU memory
        return {"output": float(output)}


if __name__ == "__main__":
    # accelerator="auto" (or "cuda"), devices="auto" (or 4) will lead to 4 workers serving
    # the model from "cuda:0", "cuda:1", "cuda:2", "cuda:3" respectively
    server = ls.LitServer(SimpleTorchAPI(), accelerator="auto", devices="auto")
    server.run(port=8000)
"""

BATCHED = """
import numpy as np
import litserve as ls

class SimpleBatchedAPI(ls.LitAPI):
    def setup(self, device) -> None:
        self.model = lambda x: x ** 2

    def decode_request(self, request):
        return np.asarray(request["input"])

    def predict(self, x):
        result = self.model(x)
        return result

    def encode_response(self, output):
        return {"output": output}

if __name__ == "__main__":
    api = SimpleBatchedAPI()
    server = ls.LitServer(api, max_batch_size=4, batch_timeout=0.05)
    server.run(port=8000)
"""

CUSTOM_BATCHED = """
import litserve as ls
from litserve.examples import SimpleBatchedAPI
import numpy as np

class CustomBatchedAPI(SimpleBatchedAPI):
    def batch(self, inputs):
        return np.stack(inputs)

    def unbatch(self, output):
        return list(output)

if __name__ == "__main__":
    api = CustomBatchedAPI()
    server = ls.LitServer(api, max_batch_size=4, batch_timeout=0.05)
    server.run(port=8000)
"""

STREAM = """
import litserve as ls

class SimpleStreamAPI(ls.LitAPI):
    def setup(self, device) -> None:
        self.model = lambda x, y: x * y

    def decode_request(self, request):
        return request["input"]

    def predict(self, x):
        for i in range(10):
            yield self.model(x, i)

    def encode_response(self, output):
        for out in output:
            yield {"output": out}

if __name__ == "__main__":
    api = SimpleStreamAPI()
    server = ls.LitServer(api, stream=True)
    server.run(port=8000)
"""

PYDANTIC = """
from pydantic import BaseModel
import litserve as ls


class PredictRequest(BaseModel):
    input: float


class PredictResponse(BaseModel):
    output: float


class SimpleLitAPI(ls.LitAPI):
    def setup(self, device):
        self.model = lambda x: x**2

    def decode_request(self, request: PredictRequest) -> float:
        return request.input

    def predict(self, x):
        return self.model(x)

    def encode_response(self, output: float) -> PredictResponse:
        return PredictResponse(output=output)


if __name__ == "__main__":
    api = SimpleLitAPI()
    server = ls.LitServer(api, accelerator="auto")
    server.run(port=8000)
"""

OPENAI_CUSTOM_ENCODE = """
import litserve as ls
from litserve.specs.openai import ChatMessage

class GPT2LitAPI(ls.LitAPI):
    def setup(self, device):
        self.model = None

    def predict(self, x):
        yield {"role": "assistant", "content": "This is a generated output"}

    def encode_response(self, output: dict) -> ChatMessage:
        yield ChatMessage(role="assistant", content="This is a custom encoded output")

if __name__ == "__main__":
    server = ls.LitServer(GPT2LitAPI(), spec=ls.OpenAISpec())
    server.run(port=8000)
"""

# The two usage snippets define the API only; the server lines after them are the README's usual ones.
USAGE_IN_ENCODE = """
import litserve as ls

class OpenAIUsageAPI(ls.LitAPI):
    def setup(self, device):
        self.model = None

    def predict(self, x):
        yield "10 + 6 is equal to 16."

    def encode_response(self, output):
        for out in output:
            yield {"role": "assistant", "content": out}
        # Get the usage info and yield it as the last output
        yield {"role": "assistant", "content": "", "prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}
"""

USAGE_IN_PREDICT = """
import litserve as ls

class OpenAIUsageAPI(ls.LitAPI):
    def setup(self, device):
        self.model = None

    def predict(self, x):
        yield {"role": "assistant", "content": "10 + 6 is equal to 16.", "prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}
"""

SERVE_USAGE_API = """
if __name__ == "__main__":
    server = ls.LitServer(OpenAIUsageAPI(), spec=ls.OpenAISpec())
    server.run(port=8000)
"""

OPENAI_IMAGES = """
import litserve as ls
from litserve.specs.openai import ChatMessage

class OpenAISpecLitAPI(ls.LitAPI):
    def setup(self, device):
        self.model = None

    def predict(self, x):
        if isinstance(x[1]["content"], list):
            # handle mixed text and image input
            image_url = x[1]["content"][1]["image_url"]
            yield {"role": "assistant", "content": "\\n\\nThis image shows a wooden boardwalk extending through a lush green marshland."}
        else:
            yield {"role": "assistant", "content": "This is a generated output"}

    def encode_response(self, output: dict) -> ChatMessage:
        yield ChatMessage(role="assistant", content="This is a custom encoded output")

if __name__ == "__main__":
    server = ls.LitServer(OpenAISpecLitAPI(), spec=ls.OpenAISpec())
    server.run(port=8000)
"""

OPENAI_TOOLS = """
import litserve as ls
from litserve.specs.openai import ChatMessage, ChatCompletionRequest

class OpenAISpecLitAPI(ls.LitAPI):
    def setup(self, device):
        self.model = None

    def decode_request(self, request: ChatCompletionRequest):
        tools = request.tools
        messages = request.messages
        # do something with tools and messages, to get the prompt
        prompt = "parsed prompt"
        return prompt

    def predict(self, x):
         # do something with x, to get the output
        out = "generated output"
        yield out

    def encode_response(self, output_generator) -> ChatMessage:
        for output in output_generator:
            # parse tool calls from output
            tool_calls=[
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "function_1", "arguments": '{"arg_1": "arg_1_value"}'},
                }
            ]
            yield ChatMessage(role="assistant", content="", tool_calls=tool_calls)

if __name__ == "__main__":
    server = ls.LitServer(OpenAISpecLitAPI(), spec=ls.OpenAISpec())
    server.run(port=8000)
"""

TRACK_CONTEXT = """
import litserve as ls

class TrackLitAPI(ls.examples.SimpleLitAPI):
    def predict(self, x, context):
        context["input_value"] = x
        return self.model(x)

    def encode_response(self, output, context):
        # Retrieve the context from LitPI.predict inside encode_response
        input_value = context["input_value"]
        return {"output": input_value * output}

if __name__=="__main__":
    api = TrackLitAPI()
    server = ls.LitServer(api)
    server.run(port=8000)
"""

CUSTOM_SPEC_CONTEXT = """
import litserve as ls

class CustomSpec(ls.specs.OpenAISpec):
    def populate_context(self, context, request):
        context["CUSTOM_VALUE_X"] = "This a random value"

class TestAPI(ls.LitAPI):
    def setup(self, device):
        self.model = None

    def predict(self, x, context):
        yield context["CUSTOM_VALUE_X"]

if __name__ == "__main__":
    api = TestAPI()
    server = ls.LitServer(api, spec=CustomSpec())
    server.run(port=8000)
"""

BATCHED_CONTEXT = """
import litserve as ls

class SimpleBatchedAPI(ls.examples.SimpleBatchedAPI):
    def predict(self, x_batch, context):
        # context contains a list of dictionary
        for c, x in zip(context, x_batch):
            c["input"] = x
        return self.model(x_batch)

    def encode_response(self, output, context):
        input = context["input"]
        return {"output": input}

if __name__=="__main__":
    api = SimpleBatchedAPI()
    server = ls.LitServer(api)
    server.run(port=8000)
"""

BATCHED_STREAMING_CONTEXT = """
import litserve as ls

class BatchedStreamingAPI(ls.examples.SimpleBatchedAPI):
    def predict(self, x_batch, context):
        # context contains a list of dictionary
        for c, x in zip(context, x_batch):
            c["input"] = x
        yield self.model(x_batch)

    def encode_response(self, output_stream, context):
        for _ in output_stream:
            # context contains a list of dictionary
            yield [{"output": ctx["input"]} for ctx in context]

if __name__=="__main__":
    api = BatchedStreamingAPI()
    server = ls.LitServer(api, max_batch_size=2, batch_timeout=0.01, stream=True)
    server.run(port=8000)
"""

API_PATH = """
import litserve as ls
from litserve.examples import SimpleLitAPI

if __name__ == '__main__':
    api = SimpleLitAPI()
    server = ls.LitServer(api, api_path="/my_api/classify")
    server.run(port=8000)
"""


def _post(url: str, path: str, body: Any) -> Any:
    reply = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply


def _chat(url: str, **extra: Any) -> dict[str, Any]:
    messages = extra.pop("messages", [{"role": "user", "content": "Hello!"}])
    return dict(_post(url, "/v1/chat/completions", {"model": "lit", "messages": messages, **extra}).json())


def _content(url: str, **extra: Any) -> str:
    return str(_chat(url, **extra)["choices"][0]["message"]["content"])


IMAGE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What's in this image?"},
            {"type": "image_url", "image_url": "https://example.com/boardwalk.jpg"},
        ],
    },
]


def _check_batched_context(url: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda x: _post(url, "/predict", {"input": x}).json(), [1.0, 2.0, 3.0]))
    assert replies == [{"output": 1.0}, {"output": 2.0}, {"output": 3.0}]


def _check_batched_stream(url: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda x: _post(url, "/predict", {"input": x}).text, [5.0, 6.0]))
    assert replies == ['{"output": 5.0}\n', '{"output": 6.0}\n']


def _check_usage(url: str) -> None:
    reply = _chat(url)
    assert reply["choices"][0]["message"]["content"] == "10 + 6 is equal to 16."
    assert reply["usage"] == {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}


SERVERS: dict[str, tuple[str, Callable[[str], None]]] = {
    "inference_engine": (
        INFERENCE_ENGINE,
        lambda url: _expect(_post(url, "/predict", {"input": 4.0}).json(), {"output": 80.0}),
    ),
    "hello_world": (
        HELLO_WORLD,
        lambda url: _expect(_post(url, "/predict", {"input": 4.0}).json(), {"output": 16.0}),
    ),
    "torch": (TORCH, lambda url: _expect(_post(url, "/predict", {"input": 4.0}).json(), {"output": 9.0})),
    "batched": (BATCHED, lambda url: _expect(_post(url, "/predict", {"input": 3.0}).json(), {"output": 9.0})),
    "custom_batched": (
        CUSTOM_BATCHED,
        lambda url: _expect(_post(url, "/predict", {"input": 5.0}).json(), {"output": 25.0}),
    ),
    "stream": (
        STREAM,
        lambda url: _expect(
            _post(url, "/predict", {"input": 1.0}).text.splitlines(),
            [f'{{"output": {float(i)}}}' for i in range(10)],
        ),
    ),
    "pydantic": (
        PYDANTIC,
        lambda url: _expect(_post(url, "/predict", {"input": 3.0}).json(), {"output": 9.0}),
    ),
    "openai_custom_encode": (
        OPENAI_CUSTOM_ENCODE,
        lambda url: _expect(_content(url, stream=False), "This is a custom encoded output"),
    ),
    "usage_in_encode": (USAGE_IN_ENCODE + SERVE_USAGE_API, _check_usage),
    "usage_in_predict": (USAGE_IN_PREDICT + SERVE_USAGE_API, _check_usage),
    "openai_images": (
        OPENAI_IMAGES,
        lambda url: _expect(_content(url, messages=IMAGE_MESSAGES), "This is a custom encoded output"),
    ),
    "openai_tools": (
        OPENAI_TOOLS,
        lambda url: _expect(
            _chat(
                url,
                tools=[{"type": "function", "function": {"name": "get_current_weather", "parameters": {}}}],
            )["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "function_1",
        ),
    ),
    "track_context": (
        TRACK_CONTEXT,
        lambda url: _expect(_post(url, "/predict", {"input": 4.0}).json(), {"output": 64.0}),
    ),
    "custom_spec_context": (CUSTOM_SPEC_CONTEXT, lambda url: _expect(_content(url), "This a random value")),
    "batched_context": (BATCHED_CONTEXT, _check_batched_context),
    "batched_streaming_context": (BATCHED_STREAMING_CONTEXT, _check_batched_stream),
    "api_path": (
        API_PATH,
        lambda url: _expect(_post(url, "/my_api/classify", {"input": 4.0}).json(), {"output": 16.0}),
    ),
}


def _expect(actual: Any, expected: Any) -> None:
    assert actual == expected


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_readme_server_snippet(name: str, tmp_path: Path) -> None:
    snippet, check = SERVERS[name]
    script = tmp_path / "server.py"
    script.write_text(switched(snippet))
    with serve_script(APPS / "readme_snippet.py", tmp_path, args=[str(script)]) as server:
        check(server.url)


# Snippets that only build servers (some for GPUs this machine does not have: that fails when the
# server runs, not here).
CONSTRUCTIONS = [
    """
import litserve as ls
from litserve.examples import SimpleLitAPI

# Automatically selects the available accelerator
api = SimpleLitAPI() # defined by you with ls.LitAPI

# when running on GPUs these are equivalent. It's best to let Lightning decide by not specifying it!
server = ls.LitServer(api)
server = ls.LitServer(api, accelerator="cuda")
server = ls.LitServer(api, accelerator="auto")
""",
    """
import litserve as ls
from litserve.examples import SimpleLitAPI

# Run on CUDA-supported GPUs
server = ls.LitServer(SimpleLitAPI(), accelerator="cuda")

# Run on Apple's Metal-powered GPUs
server = ls.LitServer(SimpleLitAPI(), accelerator="mps")
""",
    """
import litserve as ls
from litserve.examples import SimpleLitAPI

# Automatically selects the available accelerators
api = SimpleLitAPI() # defined by you with ls.LitAPI

# when running on a 4-GPUs machine these are equivalent.
# It's best to let Lightning decide by not specifying accelerator and devices!
server = ls.LitServer(api)
server = ls.LitServer(api, accelerator="cuda", devices=4)
server = ls.LitServer(api, accelerator="auto", devices="auto")
""",
    """
import litserve as ls
from litserve.examples import SimpleTorchAPI

server = ls.LitServer(SimpleTorchAPI(), accelerator="cuda", devices=[0, 3])
""",
    """
import litserve as ls
from litserve.examples import SimpleTorchAPI

server = ls.LitServer(SimpleTorchAPI(), accelerator="cuda", devices=4, workers_per_device=2)
""",
    """
import litserve as ls
from litserve.examples import SimpleLitAPI

server = ls.LitServer(SimpleLitAPI(), timeout=30)
""",
    """
import litserve as ls
from litserve.examples import SimpleLitAPI

server = ls.LitServer(SimpleLitAPI(), timeout=False)
""",
]


@pytest.mark.parametrize("snippet", CONSTRUCTIONS)
def test_readme_construction_snippet(snippet: str) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(switched(snippet), "<README snippet>", "exec"), namespace)
    assert type(namespace["server"]).__module__ == "servekit.server"
