"""Request models of the LLM server's native routes (SGLang's ``/generate``, LMDeploy's
``/v1/chat/interactive`` and ``/v1/encode``, ``/tokenize``, ...). The OpenAI routes' models are
``servekit.openai``'s; checks that need the model run in the engine's input step.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.errors import invalid
from servekit.openai.sampling import TokenId, TokenIdText
from servekit.openai.types import ChatMessage


class _Lenient(BaseModel):
    """Unknown fields are accepted and ignored, as OpenAI-compatible servers do (clients send extras)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


def _one_of_required(*names: str) -> dict[str, Any]:
    """A body that needs at least one of ``names``, given and not null (JSON Schema's ``anyOf``)."""
    return {
        "anyOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names]
    }


class GenerateSamplingParams(BaseModel):
    """``/generate``'s ``sampling_params``: the engine's ``SamplingParams`` under SGLang's names
    (``max_new_tokens``, ``min_new_tokens``) or vLLM's. A field sent as ``null`` takes its default;
    an unknown one is refused."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logit_bias: dict[TokenIdText, float] | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None


class GenerateRequest(_Lenient):
    """SGLang-style ``/generate``: one prompt (text or ids) or a batch of them."""

    model_config = ConfigDict(json_schema_extra=_one_of_required("text", "input_ids"))

    text: Text | Annotated[list[Text], Field(min_length=1)] | None = None
    input_ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1)] | None = None
    sampling_params: GenerateSamplingParams = Field(
        default_factory=lambda: GenerateSamplingParams.model_validate({})
    )
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)

    def param_name(self, engine_param: str) -> str:
        if engine_param == "prompt":
            return "input_ids" if self.input_ids is not None else "text"
        if engine_param == "request_id":
            return "rid"
        return f"sampling_params.{engine_param}"

    @property
    def batched(self) -> bool:
        return isinstance(self.text, list) or (bool(self.input_ids) and isinstance(self.input_ids[0], list))  # type: ignore[index]

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """(text, None) or (None, token ids) per prompt."""
        if self.input_ids is not None:
            ids = self.input_ids
            batch = [list(ids)] if ids and isinstance(ids[0], int) else [list(x) for x in ids]  # type: ignore[arg-type]
            return [(None, p) for p in batch]
        if self.text is None:
            raise invalid("either text or input_ids is required", "text")
        texts = [self.text] if isinstance(self.text, str) else list(self.text)
        return [(t, None) for t in texts]

    def to_sampling_params(self) -> SamplingParams:
        """``sampling_params`` with SGLang's names (max_new_tokens, min_new_tokens, ...)."""
        values = self.sampling_params.model_dump(exclude_none=True)
        if "max_new_tokens" in values:
            values["max_tokens"] = values.pop("max_new_tokens")
        values.setdefault("max_tokens", 128)
        if "min_new_tokens" in values:
            values["min_tokens"] = values.pop("min_new_tokens")
        if values.get("logit_bias"):
            values["logit_bias"] = {int(k): v for k, v in values["logit_bias"].items()}
        values["logprobs"] = self.top_logprobs_num if self.return_logprob else None
        return SamplingParams(**values)


class InteractiveRequest(_Lenient):
    """LMDeploy-style ``/v1/chat/interactive``: the server keeps the conversation of ``session_id``.
    A turn needs a prompt; ``cancel`` and ``end`` do not."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["cancel"], "properties": {"cancel": {"const": True}}},
                {"required": ["end"], "properties": {"end": {"const": True}}},
                {"required": ["prompt"], "properties": {"prompt": {"minLength": 1, "minItems": 1}}},
            ]
        }
    )

    prompt: str | list[ChatMessage] = ""
    session_id: int = -1
    interactive_mode: bool = False
    cancel: bool = False
    end: bool = False
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    stop: Text | list[Text] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None


class TokenizeRequest(_Lenient):
    model_config = ConfigDict(json_schema_extra=_one_of_required("prompt", "messages"))

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[TokenId]


class AbortRequest(_Lenient):
    rid: str


class EncodeRequest(_Lenient):
    """LMDeploy's ``/v1/encode``. ``do_preprocess`` renders each input as a user message with the
    chat template; ``add_bos`` makes the ids start with the tokenizer's BOS token (when it has one)."""

    input: str | list[str]
    do_preprocess: bool | None = False
    add_bos: bool | None = True
