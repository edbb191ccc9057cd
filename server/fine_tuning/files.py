"""Uploaded files for fine-tuning: checked line by line, stored under `<data dir>/files/<id>`.

An upload is copied to `.upload-*` in that folder while its size is counted, checked there, and
renamed to its id only when it passed, so a refused file leaves nothing behind; the SQLite row
(`records.files`) follows the rename. A file is never changed after that, which is why a job may
hard-link it into its own folder and keep it however the file is deleted later.

The check is the shape of each line, in the three formats `plait train` reads: OpenAI chat
(`{"messages": [...]}`), `{"prompt", "completion"}` and Alpaca (`instruction`, `input`,
`output`). It follows the trainer's own rules (`plait.trainer.data`, which the server does not
import; tests/test_files_api.py holds the two to the same verdicts), so what passes here trains.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from plait.server.fine_tuning.errors import FineTuningError
from plait.server.fine_tuning.records import Records, new_id

log = logging.getLogger("plait.fine_tuning")

PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
DEFAULT_MAX_FILE_BYTES = 512 << 20
MAX_LISTED_PROBLEMS = 5
_UPLOAD = ".upload-"
_CHUNK = 1 << 20
_ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})


class FileStore:
    def __init__(self, root: Path, records: Records, max_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.root = Path(root)
        self.records = records
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    def add_upload(self, source: BinaryIO, filename: str, purpose: str) -> dict:
        """Copy, check and store an uploaded training file; FineTuningError (4xx) refuses it."""
        if purpose != PURPOSE:
            raise FineTuningError(
                400,
                f"purpose must be '{PURPOSE}': this server keeps files only for fine-tuning (got {purpose!r}).",
                "purpose",
                "invalid_purpose",
            )
        fd, temp = tempfile.mkstemp(prefix=_UPLOAD, dir=self.root)
        temp = Path(temp)
        try:
            with os.fdopen(fd, "wb") as out:
                size = _copy_limited(source, out, self.max_bytes)
                out.flush()
                os.fsync(out.fileno())
            examples = check_training_file(temp)
            return self._publish(temp, filename, purpose, size, examples)
        finally:
            temp.unlink(missing_ok=True)  # gone already once stored

    def add_bytes(self, data: bytes, filename: str, purpose: str) -> dict:
        """Store a file the server made itself (a job's results), unchecked."""
        fd, temp = tempfile.mkstemp(prefix=_UPLOAD, dir=self.root)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return self._publish(Path(temp), filename, purpose, len(data), None)

    def get(self, file_id: str) -> dict:
        row = self.records.get("files", file_id)
        if row is None:
            raise FineTuningError(404, f"No such file: '{file_id}'.", "file_id", "file_not_found")
        return row

    def path(self, file_id: str) -> Path:
        return self.root / self.get(file_id)["id"]

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self.records.delete("files", file_id)
        (self.root / file_id).unlink(missing_ok=True)

    def _publish(self, temp: Path, filename: str, purpose: str, size: int, examples: int | None) -> dict:
        file_id = new_id("file")
        os.replace(temp, self.root / file_id)
        row = {
            "id": file_id,
            "filename": _clean_name(filename),
            "purpose": purpose,
            "bytes": size,
            "created_at": int(time.time()),
            "examples": examples,
        }
        try:
            return self.records.insert("files", row)
        except BaseException:
            (self.root / file_id).unlink(missing_ok=True)
            raise

    def _recover(self) -> None:
        """Drop what a crash left: half-copied uploads, files without a row, rows without a file."""
        known = {row["id"] for row in self.records.all("files")}
        for entry in self.root.iterdir():
            if entry.is_file() and (entry.name.startswith(_UPLOAD) or entry.name not in known):
                log.info("fine-tuning files: removing leftover %s", entry.name)
                entry.unlink(missing_ok=True)
        for file_id in known:
            if not (self.root / file_id).is_file():
                log.warning("fine-tuning files: %s is missing on disk; dropping its record", file_id)
                self.records.delete("files", file_id)


def _copy_limited(source: BinaryIO, out: BinaryIO, max_bytes: int) -> int:
    size = 0
    while chunk := source.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise FineTuningError(
                413, f"The file is larger than {max_bytes} bytes (--max-file-mb).", "file", "file_too_large"
            )
        out.write(chunk)
    return size


def _clean_name(filename: str) -> str:
    name = "".join(c for c in Path(filename or "").name if c.isprintable()).strip()
    return name[:255] or "upload.jsonl"


# --- the check -------------------------------------------------------------------------------


def check_training_file(path: Path) -> int:
    """The number of examples in a JSONL training file; FineTuningError names each bad line (the first few)."""
    problems: list[str] = []
    total, examples, number = 0, 0, 0
    with open(path, "rb") as f:
        for chunk in f:
            # Lines as bytes.splitlines() counts them (as the trainer does): "\r" ends a line too.
            for line in chunk.splitlines() or [b""]:
                number += 1
                if not line.strip():
                    continue
                try:
                    check_line(_decode(line, first=number == 1))
                    examples += 1
                except ValueError as exc:
                    total += 1
                    if len(problems) < MAX_LISTED_PROBLEMS:
                        problems.append(f"line {number}: {exc}")
    if total:
        more = f"; and {total - len(problems)} more" if total > len(problems) else ""
        noun = "problem" if total == 1 else "problems"
        raise FineTuningError(
            400, f"Invalid training file ({total} {noun}): {'; '.join(problems)}{more}.", "file", "invalid_file"
        )
    if not examples:
        raise FineTuningError(
            400, "Invalid training file: it has no examples (one JSON object per line).", "file", "invalid_file"
        )
    return examples


def check_line(text: str) -> None:
    """One JSONL line is one example in one of the three formats; ValueError says what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_kind(record)}")
    if "messages" in record:
        extra = sorted(set(record) - {"messages"})
        if extra:
            raise ValueError(f"unknown key {', '.join(extra)} next to messages (tools and functions are not supported)")
        _check_messages(record["messages"])
    elif "prompt" in record or "completion" in record:
        _check_strings(record, ("prompt", "completion"), ())
    elif "instruction" in record or "output" in record:
        _check_strings(record, ("instruction", "output"), ("input",))
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(
            f"unknown format (keys: {keys}); expected messages, prompt + completion, or instruction + input + output"
        )


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"messages" must be a non-empty list, got {_kind(messages)}')
    trained = False
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {_kind(message)}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(
                f"{where}: role must be one of {', '.join(_ROLES)} (tool calls are not supported), "
                f"got {json.dumps(role)}"
            )
        unknown = sorted(set(message) - _MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"{where} ({role}): unknown key {', '.join(unknown)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}): content must be a string, got {_kind(content)}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{where} (assistant): content is empty")
        weight = message.get("weight", 1)
        if "weight" in message and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            raise ValueError(f"{where} ({role}): weight must be 0 or 1, and only on assistant messages")
        trained = trained or (role == "assistant" and weight == 1)
    if not trained:
        raise ValueError("no assistant message to train on (every one is missing or has weight 0)")


def _check_strings(record: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    unknown = sorted(set(record) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)} (expected {', '.join(required + optional)})")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for key in required + optional:
        if not isinstance(record.get(key, ""), str):
            raise ValueError(f'"{key}" must be a string, got {_kind(record[key])}')
    if not record[required[-1]].strip():
        raise ValueError(f'"{required[-1]}" is empty')


def _decode(line: bytes, first: bool) -> str:
    try:
        return line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start + 1})") from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
