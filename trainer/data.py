"""Reading and checking training files: JSONL in OpenAI's chat format, prompt/completion, or Alpaca.

Pure Python on purpose (no torch, no tokenizer): the whole file is checked before a model is
loaded, so every malformed line is reported at once, by line number, in a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # OpenAI's per-message weight: an assistant message with weight 0 stays in the context
    # but is not trained on. Other roles are never trained on.
    trained: bool = False


Conversation = tuple[Message, ...]


@dataclass(frozen=True)
class Example:
    line: int  # where it came from, for messages about it later (truncation, templates)
    messages: Conversation


class DataError(Exception):
    """A training file that cannot be used, with every problem found in it."""

    def __init__(self, path: Path, problems: list[str], total: int | None = None):
        self.path = path
        self.problems = problems
        self.total = len(problems) if total is None else total
        super().__init__(self.summary())

    def summary(self) -> str:
        if self.total == 1:
            return f"{self.path}: {self.problems[0]}"
        return f"{self.path}: {self.total} problems"

    def details(self) -> list[str]:
        """One line per problem (capped), for printing under the summary."""
        if self.total == 1:
            return []
        lines = list(self.problems)
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more")
        return lines


def read_examples(path: str | Path) -> list[Example]:
    """Every example in a JSONL file as a conversation, or a DataError listing each bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, [f"cannot be read: {exc.strerror or exc}"]) from None
    examples: list[Example] = []
    problems: list[str] = []
    total_problems = 0
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, a separator) carry no example
        try:
            examples.append(Example(number, parse_example(_decode(line, first=number == 1))))
        except ValueError as exc:
            total_problems += 1
            if len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(f"line {number}: {exc}")
    if total_problems:
        raise DataError(path, problems, total_problems)
    if not examples:
        raise DataError(path, ["has no examples"])
    return examples


def parse_example(line: str) -> Conversation:
    """One JSONL line as a conversation; ValueError says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(record)}")
    if "messages" in record:
        extra = sorted(set(record) - {"messages"})
        if extra:
            if {"tools", "functions"} & set(extra):
                raise ValueError("tool and function definitions are not supported")
            raise ValueError(f"unknown key {', '.join(extra)} next to messages")
        return _chat(record["messages"])
    if "prompt" in record or "completion" in record:
        return _prompt_completion(record)
    if "instruction" in record or "output" in record:
        return _alpaca(record)
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(
        f"unknown format (keys: {keys}); expected messages, prompt + completion, or instruction + input + output"
    )


def _decode(line: bytes, first: bool) -> str:
    # Strictly UTF-8 (json.loads on bytes would also guess UTF-16/32); a byte-order mark that
    # some editors write is allowed at the start of the file.
    try:
        return line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start + 1})") from None


def _chat(messages: object) -> Conversation:
    if not isinstance(messages, list):
        raise ValueError(f'"messages" must be a list, got {_json_type(messages)}')
    if not messages:
        raise ValueError('"messages" is empty')
    parsed = tuple(_message(i, m) for i, m in enumerate(messages, start=1))
    if not any(m.role == "assistant" for m in parsed):
        raise ValueError("no assistant message")
    if not any(m.trained for m in parsed):
        raise ValueError("every assistant message has weight 0: nothing to train on")
    return parsed


def _message(index: int, message: object) -> Message:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object, got {_json_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        if role in ("tool", "function") or "tool_calls" in message or "function_call" in message:
            raise ValueError(f"{where}: tool and function calls are not supported")
        raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"{where} ({role}): unknown key {', '.join(unknown)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where} ({role}): content must be a string, got {_json_type(content)}")
    if role == "assistant" and not content.strip():
        raise ValueError(f"{where} (assistant): content is empty")
    weight = message.get("weight", 1)
    if "weight" in message and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
        raise ValueError(f"{where} ({role}): weight must be 0 or 1, and only on assistant messages")
    return Message(role, content, trained=role == "assistant" and weight == 1)


def _prompt_completion(record: dict) -> Conversation:
    prompt, completion = _strings(record, required=("prompt", "completion"), optional=())
    return (Message("user", prompt), Message("assistant", completion, trained=True))


def _alpaca(record: dict) -> Conversation:
    instruction, output, extra = _strings(record, required=("instruction", "output"), optional=("input",))
    # The usual Alpaca rendering: the input, when there is one, follows the instruction.
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return (Message("user", user), Message("assistant", output, trained=True))


def _strings(record: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    unknown = sorted(set(record) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)} (expected {', '.join(required + optional)})")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    values = []
    for key in required + optional:
        value = record.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f'"{key}" must be a string, got {_json_type(value)}')
        values.append(value)
    if not values[len(required) - 1].strip():
        raise ValueError(f'"{required[-1]}" is empty')
    return values


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
