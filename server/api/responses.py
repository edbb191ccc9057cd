"""How the two generation endpoints word their answers: whole (one JSON body) or streamed (SSE
chunks), one choice per engine request.

A `Choice` gathers one engine request's outputs; the formats turn choices into OpenAI's
shapes. Chat answers may carry tool calls, read out of the text by `ToolCallParser` as it
streams (finish reason `tool_calls`); completion answers may echo their prompt, with its
logprobs (the first token's is null), and their `top_logprobs` always hold the token that was
chosen, as OpenAI's and vLLM's do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from plait.server.api.chat_format import ToolCallParser
from plait.server.api.served import Served
from plait.server.engine import FinishReason, RequestOutput, TokenLogprob


@dataclass(frozen=True)
class Echo:
    """A completion's prompt, repeated before its answer."""

    text: str
    token_ids: list[int]


@dataclass
class Choice:
    index: int
    echo: Echo | None = None
    parser: ToolCallParser | None = None  # when the answer may hold tool calls
    outputs: list[RequestOutput] = field(default_factory=list)
    offset: int = 0  # where the next token's text starts (completions' text_offset, streamed)
    started: bool = False
    first_of_prompt: bool = True  # the first of its prompt's n choices

    @property
    def final(self) -> RequestOutput:
        return self.outputs[-1]


class AnswerFormat:
    """What both endpoints share: ids, the envelope, usage and Plait's fusion report."""

    id_prefix: str
    object_full: str
    object_chunk: str

    def __init__(self, token_text: Callable[[int], str], served: Served, tokens_as_ids: bool = False):
        self.token_text: Callable[[int], str] = (lambda i: f"token_id:{i}") if tokens_as_ids else token_text
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.served = served
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model, "choices": choices}

    def fusion(self, final: RequestOutput) -> dict:
        """Extension on a fusion's last answer: the weight each member got, averaged over the
        layers and the tokens whose logits chose the answer (a fixed-weights fusion: its weights)."""
        fusion = self.served.fusion
        if fusion is None:
            return {}
        weights = fusion.weights if fusion.weights is not None else final.routing
        members = [{"id": m, "weight": w} for m, w in zip(fusion.members, weights or (), strict=False)]
        return {"fusion": {"id": fusion.id, "router": fusion.router, "top_k": fusion.top_k, "members": members}}

    @staticmethod
    def usage(choices: list[Choice], prompt_tokens: int) -> dict:
        """OpenAI's usage; `cached_tokens` counts prompt tokens found in the prefix cache (for each
        prompt, its first choice's)."""
        ended = [c for c in choices if c.outputs]
        completion = sum(c.final.completion_tokens for c in ended)
        cached = sum(c.final.cached_tokens for c in ended if c.first_of_prompt)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> dict:
        return {**self.envelope(self.object_chunk, []), "usage": self.usage(choices, prompt_tokens)}

    def full(self, choices: list[Choice], prompt_tokens: int) -> dict:
        body = self.envelope(self.object_full, [self.whole(c) for c in choices])
        return {**body, "usage": self.usage(choices, prompt_tokens), **self.fusion(choices[0].final)}

    def whole(self, choice: Choice) -> dict: ...
    def start(self, choice: Choice) -> dict | None: ...
    def chunk(self, choice: Choice, out: RequestOutput) -> dict | None: ...


class ChatAnswer(AnswerFormat):
    id_prefix = "chatcmpl"
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def whole(self, choice: Choice) -> dict:
        text = "".join(o.text for o in choice.outputs)
        content, calls = text, []
        if choice.parser is not None:
            shown, calls = choice.parser.push(text)
            shown += choice.parser.finish()
            content = (shown or None) if calls else shown
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [call.as_openai() for call in calls]
        logprobs = [lp for o in choice.outputs for lp in o.logprobs]
        return {
            "index": choice.index,
            "message": message,
            "logprobs": self._logprobs(logprobs),
            "finish_reason": _finish_reason(choice.final, bool(calls)),
        }

    def start(self, choice: Choice) -> dict:
        delta = {"role": "assistant", "content": ""}
        return self.envelope(
            self.object_chunk, [{"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": None}]
        )

    def chunk(self, choice: Choice, out: RequestOutput) -> dict | None:
        text, calls = out.text, []
        if choice.parser is not None:
            text, calls = choice.parser.push(out.text)
            if out.finish_reason:
                text += choice.parser.finish()
        delta: dict = {"content": text} if text else {}
        if calls:
            first = len(choice.parser.calls) - len(calls)
            delta["tool_calls"] = [{"index": first + i, **call.as_openai()} for i, call in enumerate(calls)]
        if not (delta or out.logprobs or out.finish_reason):
            return None
        finish = None
        if out.finish_reason:
            finish = _finish_reason(out, choice.parser is not None and bool(choice.parser.calls))
        entry = {
            "index": choice.index,
            "delta": delta,
            "logprobs": self._logprobs(out.logprobs),
            "finish_reason": finish,
        }
        return {**self.envelope(self.object_chunk, [entry]), **(self.fusion(out) if out.finish_reason else {})}

    def _logprobs(self, logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict | None:
        if not logprobs:
            return None
        return {"content": [self._entry(lp) for lp in logprobs], "refusal": None}

    def _entry(self, lp: TokenLogprob) -> dict:
        token = self.token_text(lp.token_id)
        return {
            "token": token,
            "logprob": lp.logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode())} for i, v in lp.top
            ],
        }


def _finish_reason(final: RequestOutput, called: bool) -> str:
    """OpenAI's: `tool_calls` when the answer made calls and ended by itself; `length` wins."""
    if called and final.finish_reason is FinishReason.STOP:
        return "tool_calls"
    return final.finish_reason.value


class CompletionAnswer(AnswerFormat):
    id_prefix = "cmpl"
    object_full = "text_completion"
    object_chunk = "text_completion"

    def __init__(self, token_text: Callable[[int], str], served: Served, tokens_as_ids: bool, logprobs: bool):
        super().__init__(token_text, served, tokens_as_ids)
        self.wants_logprobs = logprobs

    def whole(self, choice: Choice) -> dict:
        prompt = self._echoed(choice, next((o.prompt_logprobs for o in choice.outputs if o.prompt_logprobs), ()))
        text = "".join(o.text for o in choice.outputs)
        generated = [lp for o in choice.outputs for lp in o.logprobs]
        logprobs = self._logprobs(prompt + generated, 0) if self.wants_logprobs else None
        echoed = choice.echo.text if choice.echo else ""
        return {
            "index": choice.index,
            "text": echoed + text,
            "logprobs": logprobs,
            "finish_reason": choice.final.finish_reason.value,
        }

    def start(self, choice: Choice) -> dict | None:
        return None  # the first chunk carries text already (the echo, or the first token's)

    def chunk(self, choice: Choice, out: RequestOutput) -> dict | None:
        text, entries = out.text, list(out.logprobs)
        if not choice.started:
            choice.started = True
            if choice.echo:
                text = choice.echo.text + text
                entries = self._echoed(choice, out.prompt_logprobs or ()) + entries
        if not (text or entries or out.finish_reason):
            return None
        logprobs = None
        if self.wants_logprobs and entries:
            logprobs = self._logprobs(entries, choice.offset)
            choice.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        entry = {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason.value if out.finish_reason else None,
        }
        return {**self.envelope(self.object_chunk, [entry]), **(self.fusion(out) if out.finish_reason else {})}

    @staticmethod
    def _echoed(choice: Choice, prompt_logprobs) -> list[TokenLogprob | int]:
        """The prompt's entries: its first token (which has no logprob) by id, then its logprobs."""
        if choice.echo is None:
            return []
        return [choice.echo.token_ids[0], *prompt_logprobs]

    def _logprobs(self, entries: list[TokenLogprob | int], offset: int) -> dict | None:
        """OpenAI's completion logprobs; `text_offset` counts from `offset`, by each token's text."""
        if not entries:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for entry in entries:
            if isinstance(entry, int):  # a prompt's first token
                tokens.append(self.token_text(entry))
                token_logprobs.append(None)
                top.append(None)
            else:
                tokens.append(self.token_text(entry.token_id))
                token_logprobs.append(entry.logprob)
                # The chosen token is always listed, as OpenAI and vLLM list it.
                top.append({tokens[-1]: entry.logprob, **{self.token_text(i): v for i, v in entry.top}})
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
