"""Request bodies of the OpenAI API and vLLM's extensions, validated strictly: a wrong type is a
400, never coerced, and no field is silently ignored.

Every field is one of three kinds (the README's API section lists them all):

- implemented;
- accepted and ignored, because it cannot change the answer (`IGNORED`: `user`, `store`, ...);
- refused with a 400 naming it when set to anything but its neutral value (`audio`,
  `prediction`, a completion `suffix`, ...): `_refuse_unless_neutral`.

A field the server does not know at all is a 400 naming it, as OpenAI answers one. Checks that
involve several fields are in each body's `check`, which names the field to fix.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from plait.server.errors import ClientError

MAX_STOP_SEQUENCES = 4
MAX_ADAPTER_WEIGHT = 100.0  # past this a weight no longer blends adapters; far past it, bf16 overflows
MAX_PROMPTS = 64  # prompts in one completion request
INT64 = (-(2**63), 2**63 - 1)
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Fields clients send that cannot change the answer: accepted, and ignored.
IGNORED = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "prompt_cache_retention",
)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)


def _refuse_unless_neutral(*fields: str, why: str):
    """A validator refusing `fields` when set to anything but null (or false, or empty)."""

    def check(value: Any) -> Any:
        if value not in (None, False, [], {}):
            raise ValueError(why)
        return value

    return field_validator(*fields, mode="before")(check)


# --- messages and tools ---------------------------------------------------------------------


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Body):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted; chat templates have no place for it, so the model does not see it
    tool_calls: list[ToolCall] | None = None  # on assistant messages
    tool_call_id: str | None = None  # on tool messages: the call this answers
    refusal: str | None = None  # on assistant messages: accepted, not shown to the model

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and self.role != "assistant":
            raise ValueError("content is required (it may be null only on an assistant message)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not FUNCTION_NAME.fullmatch(name):
            raise ValueError("a function name is 1 to 64 letters, digits, '_' and '-'")
        return name


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# --- structured outputs ---------------------------------------------------------------------


class JSONSchemaFormat(_Body):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only with it")
        return self


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of these constrains the answer."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None  # EBNF (GBNF), as xgrammar reads it


# --- the sampling fields both endpoints share -----------------------------------------------


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


class GenerationRequest(_Body):
    """The fields chat and completion requests share."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1  # the server's --max-n bounds it
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # vLLM's extensions.
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False  # keep generating past end-of-sequence until max_tokens
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:<id>"
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    # Plait's extensions: several adapters at once, and how they combine.
    adapters: Annotated[list[AdapterWeight], Field(min_length=1)] | None = None
    combination: Combination | None = None
    # Accepted and ignored (see IGNORED).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prompt_cache_retention: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit():
                raise ValueError(f"keys are token ids (integers as strings), got {key!r}")
        return bias

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self, max_n: int) -> None:
        """What no single field's type says; ClientError names the field to fix."""
        if self.n > max_n:
            raise ClientError(f"n is at most {max_n} on this server (--max-n).", "n")
        self.constraint()

    def constraint(self) -> tuple[str, Any] | None:
        """The vLLM-style constraint on the answer, as (kind, value), if one is given."""
        s = self.structured_outputs
        given = [
            ("json", s and s.json_),
            ("regex", s and s.regex),
            ("choice", s and s.choice),
            ("grammar", s and s.grammar),
            ("json", self.guided_json),
            ("regex", self.guided_regex),
            ("choice", self.guided_choice),
            ("grammar", self.guided_grammar),
        ]
        present = [(kind, value) for kind, value in given if value is not None]
        if len(present) > 1:
            raise ClientError(
                "Give one of structured_outputs' json, regex, choice and grammar (or of the guided_* fields).",
                "structured_outputs",
            )
        return present[0] if present else None


# apply_chat_template's own arguments, which chat_template_kwargs may not replace.
RENDERING_ARGUMENTS = frozenset(
    {"conversation", "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize"}
    | {"return_dict", "return_tensors", "chat_template", "tokenizer_kwargs", "padding", "truncation", "max_length"}
)


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Refused: what Plait cannot do with a text model.
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    _not_text = _refuse_unless_neutral(
        "audio", "prediction", "web_search_options", why="not supported: this server answers with text only"
    )
    _deprecated = _refuse_unless_neutral("functions", "function_call", why="not supported: use tools and tool_choice")
    _no_reasoning = _refuse_unless_neutral(
        "reasoning_effort",
        "verbosity",
        why="not supported: where the model's chat template has a switch, use chat_template_kwargs "
        '(Qwen3: {"enable_thinking": false})',
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(kwargs or ()) & RENDERING_ARGUMENTS)
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here: the server renders the messages itself")
        return kwargs

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, modalities: list[str] | None) -> list[str] | None:
        if modalities not in (None, ["text"]):
            raise ValueError("only ['text'] is supported")
        return modalities

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.top_logprobs is not None and not self.logprobs:
            raise ClientError("top_logprobs requires logprobs to be true.", "top_logprobs")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ClientError("Each tool's function name must be unique.", "tools")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ClientError("tool_choice 'required' or a named function needs tools.", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ClientError(f"tool_choice names '{self.tool_choice.function.name}', not among tools.", "tool_choice")
        structured = self.response_format is not None and self.response_format.type != "text"
        if structured and self.constraint():
            raise ClientError("Give response_format or structured_outputs (guided_*), not both.", "response_format")
        if structured and self.calls_tools:
            raise ClientError(
                "response_format together with tools is not supported; send tool_choice 'none' or no tools.",
                "response_format",
            )

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def calls_tools(self) -> bool:
        """Whether tool calls are looked for in the answer (tools given, and tool_choice not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    # One prompt, or several (each gets n choices, in order): text, or token ids.
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default for completions; 0 with echo
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    _no_suffix = _refuse_unless_neutral("suffix", why="not supported: this server does not fill in the middle")

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.max_tokens == 0 and not self.echo:
            raise ClientError("max_tokens may be 0 only with echo (to score the prompt).", "max_tokens")
        if self.best_of not in (None, self.n):
            raise ClientError("best_of is not supported, other than equal to n.", "best_of")
        if self.constraint() and self.max_tokens == 0:
            raise ClientError("A constrained answer needs max_tokens of at least 1.", "max_tokens")

    @property
    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs
