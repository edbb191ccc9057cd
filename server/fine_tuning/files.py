"""Uploaded files for fine-tuning: checked line by line, stored as the object `files/<id>`.

An upload is copied to a local temporary file while its size is counted and checked there; only
a file that passed is stored (`plait.server.storage.objects`, shared by every replica), and its
row (`records.files`) follows, so a refused file leaves nothing behind. A file is never changed
after that, which is why a job may copy it under its own key and keep it however the file is
deleted later. An object without a row (a crash between the two) is removed at start once it is
older than `STALE_UPLOAD_SECONDS`: younger, it may be another replica's upload in progress.

The check is the shape of each line, in the formats `plait train` reads: for supervised
fine-tuning OpenAI chat (`{"messages": [...]}`), `{"prompt", "completion"}` and Alpaca
(`instruction`, `input`, `output`); for DPO, preference pairs in OpenAI's format
(`input`, `preferred_output`, `non_preferred_output`) or TRL's (`prompt`, `chosen`,
`rejected`). The first line says which of the two a file is (its `format`); every line is then
checked by the one set of rules both sides import (`contract.parse_lines`), so what passes
here trains.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from plait.server.errors import ClientError, NotFound, TooLarge
from plait.server.fine_tuning.contract import parse_example, parse_lines, parse_preference
from plait.server.fine_tuning.records import FileRecord, Records, new_id
from plait.server.storage.objects import ObjectStore

log = logging.getLogger("plait.fine_tuning")

PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
DEFAULT_MAX_FILE_BYTES = 512 << 20
MAX_LISTED_PROBLEMS = 5
STALE_UPLOAD_SECONDS = 3600.0
_FILES = "files/"
_UPLOAD = ".upload-"
_CHUNK = 1 << 20


def file_key(file_id: str) -> str:
    return _FILES + file_id


class FileStore:
    def __init__(
        self, objects: ObjectStore, records: Records, staging_dir: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES
    ):
        """`staging_dir` is a local folder for uploads being checked."""
        self.objects = objects
        self.records = records
        self.staging_dir = Path(staging_dir)
        self.max_bytes = max_bytes
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    def add_upload(self, source: BinaryIO, filename: str, purpose: str) -> FileRecord:
        """Copy, check and store an uploaded training file; ClientError refuses it."""
        if purpose != PURPOSE:
            raise ClientError(
                f"purpose must be '{PURPOSE}': this server keeps files only for fine-tuning (got {purpose!r}).",
                "purpose",
                "invalid_purpose",
            )
        fd, temp = tempfile.mkstemp(prefix=_UPLOAD, dir=self.staging_dir)
        temp = Path(temp)
        try:
            with os.fdopen(fd, "wb") as out:
                size = _copy_limited(source, out, self.max_bytes)
            examples, kind = check_training_file(temp)
            file_id = new_id("file")
            self.objects.upload(file_key(file_id), temp)
        finally:
            temp.unlink(missing_ok=True)
        return self._record(file_id, filename, purpose, size, examples, kind)

    def add_bytes(self, data: bytes, filename: str, purpose: str) -> FileRecord:
        """Store a file the server made itself (a job's results), unchecked."""
        file_id = new_id("file")
        self.objects.write(file_key(file_id), data)
        return self._record(file_id, filename, purpose, len(data), None, None)

    def get(self, file_id: str) -> FileRecord:
        record = self.records.get(FileRecord, file_id)
        if record is None:
            raise NotFound(f"No such file: '{file_id}'.", "file_id", "file_not_found")
        return record

    def open(self, file_id: str) -> BinaryIO:
        """The file's content as a stream to read and close."""
        self.get(file_id)
        stream = self.objects.open(file_key(file_id))
        if stream is None:
            raise NotFound(f"No such file: '{file_id}'.", "file_id", "file_not_found")
        return stream

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self.records.delete(FileRecord, file_id)
        self.objects.delete(file_key(file_id))

    def _record(
        self, file_id: str, filename: str, purpose: str, size: int, examples: int | None, kind: str | None
    ) -> FileRecord:
        record = FileRecord(file_id, _clean_name(filename), purpose, size, int(time.time()), examples, kind)
        try:
            self.records.insert(record)
        except BaseException:
            self.objects.delete(file_key(file_id))
            raise
        return record

    def _recover(self) -> None:
        """Drop what a crash left: half-copied uploads, old objects without a row, rows without an object."""
        for entry in self.staging_dir.iterdir():
            if entry.name.startswith(_UPLOAD):
                entry.unlink(missing_ok=True)
        known = {record.id for record in self.records.all(FileRecord)}
        stored = self.objects.list(_FILES)
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        for info in stored:
            if info.key[len(_FILES) :] not in known and info.modified < cutoff:
                log.info("fine-tuning files: removing %s, stored but never recorded", info.key)
                self.objects.delete(info.key)
        present = {info.key[len(_FILES) :] for info in stored}
        for file_id in known - present:
            log.warning("fine-tuning files: %s is missing from the store; dropping its record", file_id)
            self.records.delete(FileRecord, file_id)


def _copy_limited(source: BinaryIO, out: BinaryIO, max_bytes: int) -> int:
    size = 0
    while chunk := source.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"The file is larger than {max_bytes} bytes (--max-file-mb).", "file", "file_too_large")
        out.write(chunk)
    return size


def _clean_name(filename: str) -> str:
    name = "".join(c for c in Path(filename or "").name if c.isprintable()).strip()
    return name[:255] or "upload.jsonl"


# Keys only preference pairs have (OpenAI's and TRL's); a first line with one makes a DPO file.
PREFERENCE_KEYS = frozenset({"preferred_output", "non_preferred_output", "chosen", "rejected"})


def check_training_file(path: Path) -> tuple[int, str]:
    """The number of examples in a JSONL training file and its format ("chat" or "preference");
    ClientError names the first few bad lines."""
    kind = _format(path)
    problems: list[str] = []
    total, examples = 0, 0
    with open(path, "rb") as f:
        for number, parsed in parse_lines(f, parse_preference if kind == "preference" else parse_example):
            if isinstance(parsed, ValueError):
                total += 1
                if len(problems) < MAX_LISTED_PROBLEMS:
                    problems.append(f"line {number}: {parsed}")
            else:
                examples += 1
    what = "preference file" if kind == "preference" else "training file"
    if total:
        more = f"; and {total - len(problems)} more" if total > len(problems) else ""
        noun = "problem" if total == 1 else "problems"
        raise ClientError(f"Invalid {what} ({total} {noun}): {'; '.join(problems)}{more}.", "file", "invalid_file")
    if not examples:
        raise ClientError(f"Invalid {what}: it has no examples (one JSON object per line).", "file", "invalid_file")
    return examples, kind


def _format(path: Path) -> str:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line.decode("utf-8-sig"))
                except (ValueError, RecursionError):
                    return "chat"  # the check reports the line
                return "preference" if isinstance(first, dict) and PREFERENCE_KEYS & set(first) else "chat"
    return "chat"
