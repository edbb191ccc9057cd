"""Request bodies of the OpenAI API, validated strictly: a wrong type is a 400, never coerced.

Fields the OpenAI API has but Plait does not honour are refused when set to anything but
their neutral value, rather than silently ignored. Unknown fields are ignored, as the
official clients send extension fields that way.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 4


MAX_ADAPTER_WEIGHT = 100.0  # past this a weight no longer blends adapters; far past it, bf16 overflows
INT64 = (-(2**63), 2**63 - 1)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class AdapterWeight(_Body):
    id: str
    weight: Annotated[float, Field(ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT)] = 1.0


class Combination(_Body):
    """How the adapters of `adapters` combine. `linear` and `cat` are one function here: the
    weighted sum of full deltas, exact for any ranks (PEFT's `cat`). The others merge the full
    deltas into one adapter, cut back to `rank` by SVD (PEFT's `ties_svd`, `dare_linear_svd`,
    `dare_ties_svd`)."""

    method: Literal["linear", "cat", "ties", "dare_linear", "dare_ties"] = "linear"
    density: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    majority_sign_method: Literal["total", "frequency"] = "total"
    rank: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] = 0


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    user: str | None = None
    # Extension (as in vLLM): keep generating past end-of-sequence until max_tokens.
    ignore_eos: bool = False
    # Extension (as in vLLM): logprob tokens as "token_id:<id>", for clients that need exact ids.
    return_tokens_as_token_ids: bool = False
    # Extension: several adapters at once, their deltas summed with these weights.
    adapters: Annotated[list[AdapterWeight], Field(min_length=1)] | None = None
    # Extension: how those adapters combine (default: the weighted sum of their deltas).
    combination: Combination | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: Literal[False] = False
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs
