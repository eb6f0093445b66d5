"""Request models of the LLM server's native routes (SGLang's ``/generate``, LMDeploy's
``/v1/chat/interactive`` and ``/v1/encode``, ``/tokenize``, ...). The OpenAI routes' models are
``servekit.openai``'s; checks that need the model run in the engine's input step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.errors import invalid
from servekit.openai.types import ChatMessage


class _Lenient(BaseModel):
    """Unknown fields are accepted and ignored, as OpenAI-compatible servers do (clients send extras)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class GenerateRequest(_Lenient):
    """SGLang-style ``/generate``: one prompt (text or ids) or a batch of them."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
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
        values = dict(self.sampling_params)
        if "max_new_tokens" in values:
            values["max_tokens"] = values.pop("max_new_tokens")
        values.setdefault("max_tokens", 128)
        if "min_new_tokens" in values:
            values["min_tokens"] = values.pop("min_new_tokens")
        if values.get("stop") is None:
            values.pop("stop", None)
        allowed = set(SamplingParams.__dataclass_fields__) - {
            "logits_processors",
            "logprobs",
            "prompt_logprobs",
        }
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise invalid(f"unknown sampling parameter {unknown[0]!r}", f"sampling_params.{unknown[0]}")
        if values.get("logit_bias"):
            try:
                values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"].items()}
            except (TypeError, ValueError, AttributeError):
                raise invalid(
                    "logit_bias must map token ids to numbers", "sampling_params.logit_bias"
                ) from None
        values["logprobs"] = self.top_logprobs_num if self.return_logprob else None
        try:
            return SamplingParams(**values)
        except TypeError as error:
            raise invalid(f"invalid sampling_params: {error}", "sampling_params") from None


class InteractiveRequest(_Lenient):
    """LMDeploy-style ``/v1/chat/interactive``: the server keeps the conversation of ``session_id``."""

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
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class AbortRequest(_Lenient):
    rid: str


class EncodeRequest(_Lenient):
    """LMDeploy's ``/v1/encode``. ``do_preprocess`` renders each input as a user message with the
    chat template; ``add_bos`` makes the ids start with the tokenizer's BOS token (when it has one)."""

    input: str | list[str]
    do_preprocess: bool | None = False
    add_bos: bool | None = True
