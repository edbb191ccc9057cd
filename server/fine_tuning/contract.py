"""What the server's fine-tuning jobs and `plait train` agree on, written once for both sides.

The server never imports the trainer; it runs `plait train` as a child process. The two meet
only here, and this module imports nothing else of plait, so the trainer can import it
without pulling in the server:

- **Training data.** The three JSONL formats (OpenAI chat `{"messages": [...]}`, `{"prompt",
  "completion"}`, Alpaca `instruction`/`input`/`output`), the two of preference pairs
  (OpenAI's, TRL's), how a file splits into lines, and the check of each line
  (`parse_lines`, `parse_example`, `parse_preference`). The server refuses an upload by
  exactly the rules the trainer reads it with.
- **The command line.** `TrainerRun` is a job's run of the trainer; `command()` is the
  `python -m plait.cli train ...` line the server starts.
- **A run's files.** The names, in the run's working folder, of what the trainer leaves:
  its log, its event lines, the adapter folder and its report.
- **Events.** One JSON object per line in `--events`, appended by the trainer
  (`EventWriter`) and followed by the server while the trainer runs (`EventReader`).
- **Steps.** How many optimizer steps one epoch takes (`steps_per_epoch`).
- **Chats through a template.** Where a model's chat template refuses a system role (Gemma
  2), system messages are folded into the first user message, in training and in serving
  alike (`for_template`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar, TypeVar

log = logging.getLogger("plait.fine_tuning")

# --- a run's files, in its working folder -----------------------------------------------------

ADAPTER_DIR = "adapter"  # the trainer's --output: a PEFT adapter folder, renamed into place when complete
REPORT_FILE = "training_report.json"  # inside the adapter folder
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"  # the trainer's stdout and stderr
# Set by the server for the trainers of its jobs: a trainer whose server died stops itself, so a
# replica killed outright leaves no training behind to compete with the one that takes the job over.
SERVER_PID_VARIABLE = "PLAIT_SERVER_PID"
ERROR_PREFIX = "plait train: error: "  # the line that says why a run failed; detail lines follow, indented


# --- training data --------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # OpenAI's per-message weight: an assistant message with weight 0 stays in the context
    # but is not trained on. Other roles are never trained on.
    trained: bool = False


Conversation = tuple[Message, ...]
T = TypeVar("T")


def parse_example(line: str) -> Conversation:
    """One JSONL line as a conversation; ValueError says what is wrong with it."""
    record = _record(line)
    if "messages" in record:
        extra = sorted(set(record) - {"messages"})
        if extra:
            if {"tools", "functions"} & set(extra):
                raise ValueError("tool and function definitions are not supported")
            raise ValueError(f"unknown key {', '.join(extra)} next to messages")
        return _chat(record["messages"])
    if "prompt" in record or "completion" in record:
        prompt, completion = _strings(record, required=("prompt", "completion"), optional=())
        return (Message("user", prompt), Message("assistant", completion, trained=True))
    if "instruction" in record or "output" in record:
        instruction, output, extra = _strings(record, required=("instruction", "output"), optional=("input",))
        # The usual Alpaca rendering: the input, when there is one, follows the instruction.
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return (Message("user", user), Message("assistant", output, trained=True))
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(
        f"unknown format (keys: {keys}); expected messages, prompt + completion, or instruction + input + output"
    )


def parse_lines(file: BinaryIO, parse: Callable[[str], T] = parse_example) -> Iterator[tuple[int, T | ValueError]]:
    """Each non-blank line of a JSONL file, numbered from 1, as `parse` reads it (a conversation by
    default, `parse_preference` for DPO) or what is wrong with it.

    Lines end where `bytes.splitlines` ends them ("\\r" too); the file is read a line at a
    time, so its size does not matter.
    """
    number = 0
    for chunk in file:
        for line in chunk.splitlines() or [b""]:
            number += 1
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) carry no example
            try:
                yield number, parse(_decode(line, first=number == 1))
            except ValueError as exc:
                yield number, exc


@dataclass(frozen=True)
class PreferencePair:
    """One example for preference tuning (DPO): a prompt, and an answer preferred to another."""

    prompt: Conversation  # ends with a user message; nothing in it is trained on
    preferred: str
    non_preferred: str

    def conversations(self) -> tuple[Conversation, Conversation]:
        """The prompt followed by the preferred answer, and by the other one."""
        return tuple(
            (*(dataclasses.replace(m, trained=False) for m in self.prompt), Message("assistant", answer, trained=True))
            for answer in (self.preferred, self.non_preferred)
        )


def parse_preference(line: str) -> PreferencePair:
    """One JSONL line of preference data; ValueError says what is wrong with it.

    OpenAI's format, `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
    "content": ...}], "non_preferred_output": [...]}`, or TRL's, `{"prompt", "chosen",
    "rejected"}` each a string or (prompt) a list of messages and (answers) a list of one
    assistant message.
    """
    record = _record(line)
    if {"input", "preferred_output", "non_preferred_output"} & set(record):
        _keys(record, ("input", "preferred_output", "non_preferred_output"))
        given = record["input"]
        if not isinstance(given, dict):
            raise ValueError(f'"input" must be an object, got {_json_type(given)}')
        if "tools" in given or "functions" in given:
            raise ValueError("input: tool and function definitions are not supported")
        _keys(given, ("messages",), where="input")
        prompt = _prompt(given["messages"], "input.messages")
        answers = [_answer(record[k], k) for k in ("preferred_output", "non_preferred_output")]
        names = "preferred_output and non_preferred_output"
    elif {"prompt", "chosen", "rejected"} & set(record):
        _keys(record, ("prompt", "chosen", "rejected"))
        given = record["prompt"]
        prompt = (Message("user", given),) if isinstance(given, str) else _prompt(given, "prompt")
        if not prompt[-1].content.strip():
            raise ValueError('"prompt" is empty')
        answers = [_answer(record[k], k) for k in ("chosen", "rejected")]
        names = "chosen and rejected"
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(
            f"unknown preference format (keys: {keys}); expected input + preferred_output + "
            "non_preferred_output, or prompt + chosen + rejected"
        )
    if answers[0] == answers[1]:
        raise ValueError(f"{names} are identical: the pair prefers nothing")
    return PreferencePair(prompt, *answers)


def _record(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(record)}")
    return record


def _keys(record: dict, required: tuple[str, ...], where: str | None = None) -> None:
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(record) - set(required))
    if unknown:
        raise ValueError(f"{prefix}unknown key {', '.join(unknown)} (expected {', '.join(required)})")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"{prefix}missing {', '.join(missing)}")


def _prompt(messages: object, name: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{name}" must be a non-empty list of messages')
    parsed = tuple(dataclasses.replace(_message(i, m), trained=False) for i, m in enumerate(messages, start=1))
    if parsed[-1].role != "user":
        raise ValueError(f'"{name}" must end with a user message, the one the answers reply to')
    return parsed


def _answer(value: object, name: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and len(value) == 1:
        message = _message(1, value[0])
        if message.role != "assistant":
            raise ValueError(f'"{name}" must hold an assistant message, not {message.role}')
        text = message.content
    else:
        raise ValueError(f'"{name}" must be a list of one assistant message (or, TRL\'s way, a string)')
    if not text.strip():
        raise ValueError(f'"{name}" is empty')
    return text


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


# --- steps and the command line -------------------------------------------------------------


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over `examples`: micro-batches of `batch_size`, `grad_accum`
    of them per step; the last micro-batch and the last step of an epoch may be short."""
    return math.ceil(math.ceil(examples / batch_size) / grad_accum)


@dataclass(frozen=True)
class TrainerRun:
    """One run of `plait train` as a fine-tuning job starts it, in the job's working folder."""

    data: str  # training JSONL, relative to the working folder
    model: str  # the model folder the server loaded
    epochs: int
    batch_size: int  # examples per micro-batch
    grad_accum: int
    lr: float
    lora_r: int | None  # None with init_adapter, which keeps its own
    lora_alpha: float | None
    lora_dropout: float | None
    seed: int
    save_every: int  # optimizer steps between checkpoints
    dtype: str
    eval_file: str | None = None
    device: str | None = None
    threads: int | None = None
    method: str = "sft"  # or "dpo"
    beta: float | None = None
    init_adapter: str | None = None  # an adapter folder to start from, relative to the working folder
    resume: bool = False  # continue from the newest checkpoint under the output's `.partial` folder

    def command(self, python: str) -> list[str]:
        options = {
            "--output": ADAPTER_DIR,
            "--events": EVENTS_FILE,
            "--model": self.model,
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--lr": self.lr,
            "--lora-r": self.lora_r,
            "--lora-alpha": self.lora_alpha,
            "--lora-dropout": self.lora_dropout,
            "--seed": self.seed,
            "--save-every": self.save_every,
            "--dtype": self.dtype,
            "--eval-file": self.eval_file,
            "--device": self.device,
            "--threads": self.threads,
            "--method": self.method,
            "--beta": self.beta,
            "--init-adapter": self.init_adapter,
        }
        cmd = [python, "-m", "plait.cli", "train", self.data]
        for flag, value in options.items():
            if value is not None:
                cmd += [flag, str(value)]
        return cmd + (["--resume"] if self.resume else [])


# --- chats through a template ---------------------------------------------------------------


def accepts_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (Gemma 2's raises)."""
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template refuses with whatever its author raised
        return False
    return True


def for_template(messages: list[dict], system_role: bool) -> list[dict]:
    """The messages as a template takes them: unchanged, or without a system role the leading
    system messages folded into the first user message, as Gemma 3's own template does."""
    if system_role:
        return messages
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    if not lead:
        return messages
    system = "\n\n".join(m["content"] for m in messages[:lead])
    rest = [dict(m) for m in messages[lead:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    else:
        rest.insert(0, {"role": "user", "content": system})
    return rest


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartEvent:
    type: ClassVar[str] = "start"
    total_steps: int
    examples: int
    resumed_from_step: int | None = None


@dataclass(frozen=True)
class StepEvent:
    type: ClassVar[str] = "step"
    step: int
    total_steps: int
    train_loss: float
    learning_rate: float
    tokens: int  # real tokens through the model so far
    epochs: float  # passes over the data so far
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # DPO: TRL's rewards/* means


@dataclass(frozen=True)
class EvalEvent:
    type: ClassVar[str] = "eval"
    step: int
    eval_loss: float
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointEvent:
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str
    train_loss: float


@dataclass(frozen=True)
class DoneEvent:
    """The adapter is complete in its folder (publishing, if asked for, comes after)."""

    type: ClassVar[str] = "done"
    adapter: str
    steps: int
    tokens: int
    final_train_loss: float
    final_eval_loss: float | None = None


Event = StartEvent | StepEvent | EvalEvent | CheckpointEvent | DoneEvent
_EVENT_TYPES: dict[str, type[Event]] = {
    e.type: e for e in (StartEvent, StepEvent, EvalEvent, CheckpointEvent, DoneEvent)
}


class EventWriter:
    """`--events PATH`: each event one JSON line with its `type` and the `time`, written in one call
    and flushed, so a reader that takes only whole lines never sees half of one. Without a path it
    writes nothing."""

    def __init__(self, path: str | Path | None):
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 -- closed by close()

    def write(self, event: Event) -> None:
        if self._file is not None:
            line = {"type": event.type, "time": round(time.time(), 3), **dataclasses.asdict(event)}
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class EventReader:
    """Follows an events file another process appends to, taking only whole lines."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read(self) -> list[Event]:
        """The events written since the last call; lines that are not an event are skipped."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        found = []
        for line in data[:end].splitlines():
            try:
                found.append(_event(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                log.warning("%s: unreadable event line skipped", self.path)
        return found


def _event(line: dict) -> Event:
    kind = _EVENT_TYPES[line["type"]]
    return kind(**{f.name: line[f.name] for f in dataclasses.fields(kind) if f.name in line})
