"""The sampling parameters chat and completions share (OpenAI's, plus vLLM's extra ones), their
defaults, and their conversion to the engine's ``SamplingParams``.

Defaults are those of the vLLM serverless worker's tables (runpod-workers/worker-vllm README,
"OpenAI Request Input Parameters"); they are the fields' defaults here and nowhere else. A field
sent as ``null`` takes its default. Checks that need the model (token ids against the vocabulary,
context length) are the engine's input step's (``servekit.llm.inputs``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.errors import invalid
from servekit.openai.types import ResponseFormat, StreamOptions

# Token ids are marked in /openapi.json, so that the server can bound them by its model's vocabulary
# (servekit.specs.llm.schemas); as JSON object keys they are strings.
TOKEN_ID = "x-token-id"
TOKEN_ID_KEY = "x-token-id-key"
TokenId = Annotated[int, Field(ge=0, json_schema_extra={TOKEN_ID: True})]
TokenIdText = Annotated[str, Field(pattern=r"^[0-9]+$", json_schema_extra={TOKEN_ID_KEY: True})]
Bias = Annotated[float, Field(ge=-100, le=100)]
StopText = Annotated[str, Field(min_length=1)]
# A JSON object written as text: "format" says so in /openapi.json, which types alone cannot.
JSON_OBJECT_FORMAT = "json-object"
JsonObjectText = Annotated[str, WithJsonSchema({"type": "string", "format": JSON_OBJECT_FORMAT})]

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]

# Fields passed to SamplingParams under the same name.
_DIRECT_FIELDS = (
    "n",
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "use_beam_search",
    "length_penalty",
    "early_stopping",
)


class SamplingFields(BaseModel):
    """Fields this model does not name are kept as extras (clients send vendor fields)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    prompt_param: ClassVar[str] = "prompt"  # the request's name for the engine's "prompt"

    model: str | None = ""
    n: int | None = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=0, le=1)
    top_k: int | None = Field(-1, ge=-1)
    min_p: float | None = Field(0.0, ge=0, le=1)
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    repetition_penalty: float | None = Field(1.0, gt=0, le=2)
    logit_bias: dict[TokenIdText, Bias] | None = None
    seed: int | None = None
    stop: StopText | list[StopText] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | JsonObjectText | None = None
    echo: bool = False
    request_id: str | None = Field(None, min_length=1)  # for /abort_request; default: generated

    @field_validator("guided_json")
    @classmethod
    def _parse_guided_json(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        """A schema given as text is parsed here, once: text that is not a JSON object is a 400."""
        if not isinstance(value, str):
            return value
        try:
            schema = orjson.loads(value)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise ValueError("must be a JSON schema object")
        return dict(schema)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def param_name(self, engine_param: str) -> str:
        """The request's name for an input the engine refused (for the error's ``param``)."""
        return self.prompt_param if engine_param == "prompt" else engine_param

    def _value(self, name: str) -> Any:
        value = getattr(self, name)
        return type(self).model_fields[name].default if value is None else value

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        values: dict[str, Any] = {name: self._value(name) for name in _DIRECT_FIELDS}
        stop = self.stop
        values["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
        values["stop_token_ids"] = list(self.stop_token_ids or [])
        if self.logit_bias:
            values["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        values.update(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        if self.use_beam_search:
            if "temperature" not in self.model_fields_set:
                values["temperature"] = 0.0
            if self.stream:
                raise invalid("use_beam_search does not support streaming", "stream")
        if self.best_of is not None and self.best_of > values["n"] and self.stream:
            raise invalid("best_of greater than n does not support streaming", "best_of")
        return SamplingParams(**values)
