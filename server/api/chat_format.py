"""How chat messages become a prompt, and how an answer becomes a message: text and tool calls.

Tool calls use Hermes' format (Qwen2.5's and Qwen3's): the model writes each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and reads each result as `<tool_response>...</tool_response>`. A model whose own chat template
renders tools in that format (the Qwen2 and Qwen3 families) gets the tools and the history
through its template. Every other model (the embedded SmolLM2 among them) gets them in a system
prompt that describes the format (`TOOLS_PROMPT`, Qwen2.5's own words), and its history's calls
and results written out in the same format, since its template knows no tools.

Calls are constrained with an xgrammar structural tag: every call is valid JSON matching its
function's parameters once the model opens `<tool_call>` (whether or not the function says
`strict`); with tool_choice "required" the answer is calls only, at least one, with a named
function calls of that one, and with parallel_tool_calls false at most one. `ToolCallParser`
reads calls out of the text as it streams, so a streamed answer and a whole one come out the
same.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import xgrammar as xgr
from xgrammar.structural_tag import (
    JSONSchemaFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from plait.server.api.protocol import ChatCompletionRequest, ChatMessage
from plait.server.errors import ClientError
from plait.server.fine_tuning.contract import accepts_system_role, for_template

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Model types whose chat template renders tools, calls and results in Hermes' format.
HERMES_TEMPLATES = frozenset({"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ChatFormat:
    def __init__(self, tokenizer, model_type: str | None):
        self.tokenizer = tokenizer
        self.native_tools = model_type in HERMES_TEMPLATES and "tools" in (tokenizer.chat_template or "")
        self.system_role = accepts_system_role(tokenizer)

    def prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        """The request's messages (and tools) through the chat template. Blocking: tokenizes."""
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] or None
        if self.native_tools:
            messages, kwargs = [self._native(m) for m in body.messages], {"tools": tools}
        else:
            messages, kwargs = self._written_out(body.messages, tools), {}
        try:
            return self.tokenizer.apply_chat_template(
                for_template(messages, self.system_role),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                **kwargs,
                **(body.chat_template_kwargs or {}),
            )
        except Exception as exc:  # the template itself refuses some orders of roles
            message = f"The messages cannot be formatted with the model's chat template: {exc}"
            raise ClientError(message, "messages") from None

    def tool_grammar(self, body: ChatCompletionRequest, grammars) -> xgr.CompiledGrammar | None:
        """The grammar that keeps tool calls well formed, when the request may make them.

        "auto": any text, and each `<tool_call>` the model opens holds one valid call. "required"
        and a named function: nothing but calls (of that function), at least one. Without
        parallel_tool_calls, the answer ends after its first call.
        """
        if not body.calls_tools:
            return None
        choice = body.tool_choice or "auto"
        tools = body.tools
        if not isinstance(choice, str):
            tools = [t for t in tools if t.function.name == choice.function.name]
        tags = [
            TagFormat(
                begin=f'{OPEN}\n{{"name": {json.dumps(t.function.name)}, "arguments": ',
                content=JSONSchemaFormat(json_schema=t.function.parameters or {"type": "object"}, max_whitespace_cnt=1),
                end=f"}}\n{CLOSE}",
            )
            for t in tools
        ]
        stop_after_first = not body.parallel_tool_calls
        if choice == "auto":
            calls = TriggeredTagsFormat(triggers=[OPEN], tags=tags, stop_after_first=stop_after_first)
        else:
            calls = TagsWithSeparatorFormat(
                tags=tags, separator="\n", at_least_one=True, stop_after_first=stop_after_first
            )
        return grammars.structural_tag(StructuralTag(format=calls), "tools")

    @staticmethod
    def _native(message: ChatMessage) -> dict:
        rendered = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.tool_calls:
            rendered["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                }
                for c in message.tool_calls
            ]
        return rendered

    @staticmethod
    def _written_out(messages: list[ChatMessage], tools: list[dict] | None) -> list[dict]:
        rendered: list[dict] = []
        for message in messages:
            role, text = ("system" if message.role == "developer" else message.role), message.text()
            if message.tool_calls:
                calls = [
                    f'{OPEN}\n{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}\n{CLOSE}'
                    for c in message.tool_calls
                ]
                text = "\n".join(([text] if text else []) + calls)
            if role == "tool":  # results answer as the user, consecutive ones in one message
                role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
                if rendered and rendered[-1]["role"] == "user" and rendered[-1].get("tool_response"):
                    rendered[-1]["content"] += "\n" + text
                    continue
                rendered.append({"role": role, "content": text, "tool_response": True})
                continue
            rendered.append({"role": role, "content": text})
        if tools:
            prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
            if rendered and rendered[0]["role"] == "system":
                rendered[0]["content"] = f"{rendered[0]['content']}\n\n{prompt}"
            else:
                rendered.insert(0, {"role": "system", "content": prompt})
        return [{"role": m["role"], "content": m["content"]} for m in rendered]


def _arguments(text: str) -> dict | str:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolCallParser:
    """Splits an answer, as it streams, into its text and its tool calls.

    `push` takes the next piece of text and returns (text to show, calls completed); `finish`
    returns what was held back. The finish reason is `tool_calls` when calls were made, unless
    the answer was cut off (`length`). Text is held back while it may be the start of `<tool_call>`,
    and whitespace while nothing but whitespace may follow, so the text shown equals the whole
    answer's text with the calls taken out and the ends stripped.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.shown_any = False
        self.held_space = ""
        self.calls: list[ParsedCall] = []

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        self.buffer += text
        shown, completed = "", []
        while True:
            if self.in_call:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    break
                call = _parse_call(self.buffer[:end])
                self.buffer = self.buffer[end + len(CLOSE) :]
                self.in_call = False
                if call is not None:
                    completed.append(call)
                    self.calls.append(call)
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                shown += self._show(self.buffer[:start])
                self.buffer = self.buffer[start + len(OPEN) :]
                self.in_call = True
                continue
            keep = _partial_suffix(self.buffer, OPEN)
            shown += self._show(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return shown, completed

    def finish(self) -> str:
        """What is left at the end: held text. A call still open (cut off by max_tokens) is dropped:
        under the grammar, `<tool_call>` never starts anything else."""
        rest = "" if self.in_call else self.buffer
        self.buffer, self.in_call = "", False
        return self._show(rest)

    def _show(self, text: str) -> str:
        if not text:
            return ""
        if not self.shown_any:
            text = text.lstrip()
            if not text:
                return ""
        stripped = text.rstrip()
        if not stripped:
            self.held_space += text
            return ""
        out = self.held_space + stripped
        self.held_space = text[len(stripped) :]
        self.shown_any = True
        return out


def parse_answer(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole answer's text (None when only calls were made) and its tool calls."""
    parser = ToolCallParser()
    shown, calls = parser.push(text)
    shown += parser.finish()
    return (shown or None) if calls else shown, calls


def _parse_call(block: str) -> ParsedCall | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return ParsedCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
