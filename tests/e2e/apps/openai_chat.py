# Chat APIs behind OpenAISpec: every output shape predict may produce, tools, images, usage, errors.
import os

import servekit as ls
from servekit.specs.openai import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall


def last_text(request):
    content = request.messages[-1].content
    if isinstance(content, str):
        return content
    return " ".join(part.text for part in content if part.type == "text")


def image_urls(request):
    urls = []
    for message in request.messages:
        if isinstance(message.content, list):
            urls += [part.image_url.url for part in message.content if part.type == "image_url"]
    return urls


class EchoChatAPI(ls.LitAPI):
    """The last user message picks the behaviour; the reply tells what predict saw."""

    def setup(self, device):
        self.ready = True

    def predict(self, request, context):
        text = last_text(request)
        if text == "capital":
            yield "Canberra"
        elif text == "dict":
            yield {"content": "from a dict"}
        elif text == "list":
            yield [{"content": "from a list"}]
        elif text == "role":
            yield {"role": "assistant", "content": "with a role"}
        elif text == "history":
            yield [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the reply"}]
        elif text == "words":
            yield from ["one ", "two ", "three"]
            yield {"content": "", "prompt_tokens": 7, "completion_tokens": 3}
        elif text == "context":
            yield f"temperature={context['temperature']} max_tokens={context['max_tokens']} n={context['n']}"
        elif text == "images":
            yield "images: " + " ".join(image_urls(request))
        elif text == "roles":
            yield ",".join(m.role for m in request.messages)
        elif text == "fail":
            raise ValueError("predict failed on purpose")
        elif text == "fail-later":
            yield "partial "
            raise RuntimeError("failed mid-stream")
        elif text.startswith("endless:"):
            marker = text.split(":", 1)[1]
            with open(f"{marker}.started", "w") as f:
                f.write("started")
            try:
                while True:
                    yield "x"
            finally:
                with open(text.split(":", 1)[1], "w") as f:
                    f.write("closed")
        elif text == "length":
            yield {"content": "cut", "finish_reason": "length"}
        else:
            yield f"echo: {text}"


class PlainReturnAPI(ls.LitAPI):
    """predict returns instead of yielding."""

    def setup(self, device):
        pass

    def predict(self, request):
        return {
            "role": "assistant",
            "content": f"returned: {last_text(request)}",
            "prompt_tokens": 5,
            "completion_tokens": 2,
        }


class ToolsAPI(ls.LitAPI):
    """A custom decode_request that sees the tools; encode_response yields ChatMessages with tool calls."""

    def setup(self, device):
        pass

    def decode_request(self, request: ChatCompletionRequest, context):
        context["tool_names"] = [tool.function.name for tool in request.tools or []]
        return request.messages[-1].content

    def predict(self, prompt, context):
        if context["tool_names"]:
            yield {"tool": context["tool_names"][0], "prompt": prompt}
        else:
            yield {"text": f"no tools for {prompt}"}

    def encode_response(self, outputs):
        for output in outputs:
            if "tool" in output:
                call = ToolCall(
                    id="call_1", function=FunctionCall(name=output["tool"], arguments='{"city": "Paris"}')
                )
                yield ChatMessage(role="assistant", content=None, tool_calls=[call])
            else:
                yield ChatMessage(role="assistant", content=output["text"])


class ContextSpec(ls.specs.OpenAISpec):
    """A custom spec that overrides populate_context."""

    def populate_context(self, context, request):
        super().populate_context(context, request)
        context["custom"] = f"user={request.user}"


class CustomContextAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def predict(self, messages, context):
        yield context["custom"]


APIS = {
    "echo": lambda: EchoChatAPI(spec=ls.OpenAISpec()),
    "tools": lambda: ToolsAPI(spec=ls.OpenAISpec()),
    "custom_spec": lambda: CustomContextAPI(spec=ContextSpec()),
}

if __name__ == "__main__":
    name = os.environ.get("CHAT_API", "echo")
    timeout = float(os.environ.get("TIMEOUT", "30"))
    if name == "plain":
        # The older form: the spec given to LitServer rather than to the LitAPI.
        server = ls.LitServer(
            PlainReturnAPI(), spec=ls.OpenAISpec(model_name="plain-model"), accelerator="cpu", timeout=timeout
        )
    else:
        server = ls.LitServer(APIS[name](), accelerator="cpu", timeout=timeout, max_payload_size="64KB")
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
