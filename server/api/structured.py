"""Constrained answers: a request's `response_format`, `structured_outputs` (or vLLM's `guided_*`)
or tool calls, compiled into a grammar the engine enforces token by token.

xgrammar (the engine vLLM, SGLang and TensorRT-LLM use; it runs on the CPU) compiles JSON
schemas, regular expressions, EBNF grammars and structural tags against the tokenizer once;
compiled grammars are cached by xgrammar itself, so a schema that comes again costs nothing.
JSON is compiled without free whitespace between tokens: a small model left to choose its own
spacing can loop on it forever. Whatever a client sent that cannot be compiled is a 400
naming the field it came in.
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr

from plait.server.api.protocol import ChatCompletionRequest, GenerationRequest, ResponseFormat
from plait.server.errors import ClientError

_ANY_OBJECT = {"type": "object"}
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+: ")  # "[17:51:43] /project/cpp/...cc:94: " in xgrammar's errors


class Grammars:
    def __init__(self, tokenizer, vocab_size: int):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info)

    def for_request(self, body: GenerationRequest) -> xgr.CompiledGrammar | None:
        """The grammar `response_format` or `structured_outputs` / `guided_*` ask for, if any.
        Tool calls have their own (`tools.ToolCalling.grammar`). Blocking: call it off the event loop."""
        if isinstance(body, ChatCompletionRequest) and body.response_format is not None:
            return self._response_format(body.response_format)
        constraint = body.constraint()
        if constraint is None:
            return None
        kind, value = constraint
        param = "structured_outputs"
        if kind == "json":
            return self.json_schema(value, param)
        if kind == "regex":
            return self._compile(lambda: self.compiler.compile_regex(value), param)
        if kind == "choice":
            grammar = "root ::= " + " | ".join(json.dumps(option) for option in value)
            return self._compile(lambda: self.compiler.compile_grammar(grammar), param)
        return self._compile(lambda: self.compiler.compile_grammar(value), param)

    def json_schema(self, schema: dict[str, Any] | str, param: str) -> xgr.CompiledGrammar:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return self._compile(lambda: self.compiler.compile_json_schema(text, any_whitespace=False), param)

    def structural_tag(self, tag: Any, param: str) -> xgr.CompiledGrammar:
        return self._compile(lambda: self.compiler.compile_structural_tag(tag), param)

    def _response_format(self, response_format: ResponseFormat) -> xgr.CompiledGrammar | None:
        if response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return self.json_schema(_ANY_OBJECT, "response_format")
        return self.json_schema(response_format.json_schema.json_schema or _ANY_OBJECT, "response_format")

    @staticmethod
    def _compile(compile_it, param: str) -> xgr.CompiledGrammar:
        try:
            return compile_it()
        except (ValueError, RuntimeError, TypeError) as exc:  # the client's schema, regex or grammar
            reason = _LOG_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise ClientError(f"Invalid {param}: it cannot be compiled into a grammar: {reason}", param) from None
