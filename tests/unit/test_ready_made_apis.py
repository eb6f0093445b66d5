"""``ls.examples`` and ``ls.test_examples``: there after ``import servekit as ls``, without importing
the model libraries; the ready-made APIs behave as LitServe's do."""

from __future__ import annotations

import subprocess
import sys

import pytest

import servekit as ls


def test_examples_are_attributes_of_the_package_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "import servekit as ls\n"
        "names = (ls.examples.SimpleLitAPI, ls.test_examples.SimpleTorchAPI, ls.test_examples.TestAPI)\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
        "print(' '.join(n.__name__ for n in names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SimpleLitAPI", "SimpleTorchAPI", "TestAPI"]


def test_test_examples_has_litserves_names() -> None:
    expected = {
        "SimpleLitAPI",
        "SimpleBatchedAPI",
        "SimpleTorchAPI",
        "SimpleStreamAPI",
        "TestAPI",
        "TestAPIWithCustomEncode",
        "TestAPIWithStructuredOutput",
        "TestAPIWithToolCalls",
        "OpenAIBatchContext",
    }
    assert set(ls.test_examples.__all__) == expected
    assert ls.test_examples.SimpleLitAPI is ls.examples.SimpleLitAPI
    with pytest.raises(AttributeError, match="no attribute 'exampels'"):
        ls.exampels  # noqa: B018


def test_simple_torch_api_is_the_seeds_linear_model() -> None:
    torch = pytest.importorskip("torch")
    api = ls.test_examples.SimpleTorchAPI()
    api.setup("cpu")
    assert isinstance(api.model, torch.nn.Module)
    assert float(api.predict(torch.tensor([4.0]))) == 9.0
    x = api.decode_request({"input": 4})
    assert x.tolist() == [4.0]
    assert api.encode_response(api.predict(x)) == {"output": 9.0}


def test_simple_apis_without_a_server() -> None:
    simple = ls.test_examples.SimpleLitAPI()
    simple.setup("cpu")
    assert simple.predict(4) == 16
    stream = ls.test_examples.SimpleStreamAPI()
    stream.setup("cpu")
    assert stream.decode_request({"input": 4}) == 4
    assert list(stream.predict(stream.decode_request({"input": 4}))) == ["0: 4", "1: 4", "2: 4"]
    assert list(stream.encode_response(["0: 4"])) == [{"output": "0: 4"}]
    batched = ls.test_examples.SimpleBatchedAPI(max_batch_size=2)
    batched.setup("cpu")
    batch = batched.batch([batched.decode_request({"input": 3}), batched.decode_request({"input": 4})])
    assert [batched.encode_response(y) for y in batched.unbatch(batched.predict(batch))] == [
        {"output": 9},
        {"output": 16},
    ]


def test_openai_test_apis_yield_messages() -> None:
    from servekit.test_examples.openai_spec_example import OpenAIBatchContext, OpenAIWithUsageEncodeResponse

    tools = ls.test_examples.TestAPIWithToolCalls()
    (message,) = tools.encode_response(tools.predict([]))
    assert message.tool_calls[0].function.name == "function_1"
    usage = OpenAIWithUsageEncodeResponse()
    items = list(usage.encode_response(usage.predict([])))
    assert "".join(item["content"] for item in items) == "10 + 6 is equal to 16."
    assert items[-1]["total_tokens"] == 35
    batched = OpenAIBatchContext(max_batch_size=2)
    contexts: list[dict[str, float]] = [{}, {}]
    steps = list(batched.encode_response(batched.predict([[], []], contexts), contexts))
    assert len(steps[0]) == 2 and steps[0][0] == {"role": "assistant", "content": "Hi! "}
    assert contexts == [{"temperature": 1.0}, {"temperature": 1.0}]
