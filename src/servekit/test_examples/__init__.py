"""LitServe's ready-made test APIs under LitServe's name: ``ls.test_examples.SimpleLitAPI`` and friends.

The simple APIs are ``servekit.examples``'; the OpenAI ones are in ``openai_spec_example`` and the
embedding ones in ``openai_embedding_spec_example`` (imported on use: they need NumPy).
"""

from servekit.test_examples.openai_spec_example import (
    OpenAIBatchContext,
    TestAPI,
    TestAPIWithCustomEncode,
    TestAPIWithStructuredOutput,
    TestAPIWithToolCalls,
)
from servekit.test_examples.simple_example import (
    SimpleBatchedAPI,
    SimpleLitAPI,
    SimpleStreamAPI,
    SimpleTorchAPI,
)

__all__ = [
    "OpenAIBatchContext",
    "SimpleBatchedAPI",
    "SimpleLitAPI",
    "SimpleStreamAPI",
    "SimpleTorchAPI",
    "TestAPI",
    "TestAPIWithCustomEncode",
    "TestAPIWithStructuredOutput",
    "TestAPIWithToolCalls",
]
