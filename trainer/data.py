"""Reading training files: JSONL in OpenAI's chat format, prompt/completion, or Alpaca; for DPO,
preference pairs in OpenAI's or TRL's format.

Pure Python on purpose (no torch, no tokenizer): the whole file is checked before a model is
loaded, so every malformed line is reported at once, by line number, in a second. What a
line must look like is the contract the server checks uploads by too
(`plait.server.fine_tuning.contract`), so a file the server accepted trains here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plait.server.fine_tuning.contract import (
    Conversation,
    PreferencePair,
    parse_example,
    parse_lines,
    parse_preference,
)

MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    line: int  # where it came from, for messages about it later (truncation, templates)
    messages: Conversation


@dataclass(frozen=True)
class PairExample:
    line: int
    pair: PreferencePair


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
    return [Example(number, messages) for number, messages in _read(Path(path), parse_example)]


def read_pairs(path: str | Path) -> list[PairExample]:
    """Every preference pair in a JSONL file, or a DataError listing each bad line."""
    return [PairExample(number, pair) for number, pair in _read(Path(path), parse_preference)]


def _read(path: Path, parse) -> list[tuple[int, object]]:
    parsed_lines: list[tuple[int, object]] = []
    problems: list[str] = []
    total_problems = 0
    try:
        with open(path, "rb") as file:
            for number, parsed in parse_lines(file, parse):
                if isinstance(parsed, ValueError):
                    total_problems += 1
                    if len(problems) < MAX_LISTED_PROBLEMS:
                        problems.append(f"line {number}: {parsed}")
                else:
                    parsed_lines.append((number, parsed))
    except OSError as exc:
        raise DataError(path, [f"cannot be read: {exc.strerror or exc}"]) from None
    if total_problems:
        raise DataError(path, problems, total_problems)
    if not parsed_lines:
        raise DataError(path, ["has no examples"])
    return parsed_lines
