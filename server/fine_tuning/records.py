"""Fine-tuning records: files, jobs, job events and checkpoints in one embedded SQLite database.

The database is `<data dir>/fine_tuning.sqlite3`, beside the adapter store. Rows hold what the
API shows and come back as the dataclasses below; file contents live on disk
(`plait.server.fine_tuning.files`). Every table has an `id` (what clients see) and an
increasing `seq` that orders it, which is also the cursor behind `after` in the list routes.
One connection is shared by the server's threads under a lock; each statement commits on its
own (WAL journal, full sync), so a crash loses at most the statement in flight.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import string
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from plait.server.errors import ClientError

DATABASE_FILE = "fine_tuning.sqlite3"
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class FileRecord:
    table: ClassVar[str] = "files"
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    examples: int | None  # None for files the server made itself
    format: str | None = None  # "chat" (SFT) or "preference" (DPO) for training files


@dataclass(frozen=True)
class JobRecord:
    table: ClassVar[str] = "jobs"
    id: str
    created_at: int
    status: str  # queued, running, succeeded, failed, cancelled
    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # every one resolved (see `hyperparameters.Hyperparameters`)
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    train_examples: int
    fine_tuned_model: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None  # {"code", "message", "param"}
    result_files: list[str] = field(default_factory=list)
    pid: int | None = None  # the trainer's, while it runs
    method: str = "supervised"  # or "dpo"


@dataclass(frozen=True)
class EventRecord:
    table: ClassVar[str] = "events"
    id: str
    job_id: str
    created_at: int
    level: str  # info, warn, error
    message: str
    type: str  # message, or metrics when `data` holds a step's numbers
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    table: ClassVar[str] = "checkpoints"
    id: str
    job_id: str
    created_at: int
    step_number: int
    fine_tuned_model_checkpoint: str
    metrics: dict[str, float]


Record = FileRecord | JobRecord | EventRecord | CheckpointRecord
R = TypeVar("R", FileRecord, JobRecord, EventRecord, CheckpointRecord)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    examples INTEGER,
    format TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    hyperparameters TEXT NOT NULL,
    suffix TEXT,
    seed INTEGER NOT NULL,
    metadata TEXT,
    train_examples INTEGER NOT NULL,
    fine_tuned_model TEXT,
    started_at INTEGER,
    finished_at INTEGER,
    trained_tokens INTEGER,
    error TEXT,
    result_files TEXT NOT NULL DEFAULT '[]',
    pid INTEGER,
    method TEXT NOT NULL DEFAULT 'supervised'
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step_number INTEGER NOT NULL,
    fine_tuned_model_checkpoint TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""

# Columns added since the first release: a database made before them gets them on opening.
_ADDED_COLUMNS = (("files", "format", "TEXT"), ("jobs", "method", "TEXT NOT NULL DEFAULT 'supervised'"))
# Columns stored as JSON text.
_JSON = frozenset({"hyperparameters", "metadata", "error", "result_files", "data", "metrics"})


def new_id(prefix: str) -> str:
    """`<prefix>-` and 24 random letters and digits, like OpenAI's ids (and valid in an adapter id)."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class Records:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            for table, column, declaration in _ADDED_COLUMNS:
                present = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, record: Record) -> None:
        row = dataclasses.asdict(record)
        columns = list(row)
        values = [_encode(c, row[c]) for c in columns]
        sql = f"INSERT INTO {record.table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._lock:
            self._db.execute(sql, values)

    def get(self, kind: type[R], row_id: str) -> R | None:
        with self._lock:
            found = self._db.execute(f"SELECT * FROM {kind.table} WHERE id = ?", (row_id,)).fetchone()
        return _decode(kind, found) if found else None

    def update(self, kind: type[Record], row_id: str, **fields) -> None:
        names = {f.name for f in dataclasses.fields(kind)}
        assert fields and set(fields) <= names, sorted(set(fields) - names)
        assignments = ", ".join(f"{c} = ?" for c in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE {kind.table} SET {assignments} WHERE id = ?",
                [*(_encode(c, v) for c, v in fields.items()), row_id],
            )

    def delete(self, kind: type[Record], row_id: str) -> bool:
        with self._lock:
            return self._db.execute(f"DELETE FROM {kind.table} WHERE id = ?", (row_id,)).rowcount > 0

    def page(
        self,
        kind: type[R],
        *,
        where: dict | None = None,
        after: str | None = None,
        limit: int = 20,
        newest_first: bool = True,
    ) -> tuple[list[R], bool]:
        """Up to `limit` rows matching `where` (column = value) past the row `after`, and whether more
        follow. An `after` that names no row of this list is a ClientError."""
        where = dict(where or {})
        clauses = [f"{column} = ?" for column in where]
        params = list(where.values())
        with self._lock:
            if after is not None:
                cursor = self._db.execute(f"SELECT seq FROM {kind.table} WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    raise ClientError(f"Invalid 'after': no '{after}' in this list.", "after", "invalid_value")
                clauses.append("seq < ?" if newest_first else "seq > ?")
                params.append(cursor["seq"])
            sql = f"SELECT * FROM {kind.table}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
            rows = self._db.execute(sql, [*params, limit + 1]).fetchall()
        return [_decode(kind, r) for r in rows[:limit]], len(rows) > limit

    def all(self, kind: type[R], **where) -> list[R]:
        """Every row matching `where`, oldest first."""
        rows, _ = self.page(kind, where=where, limit=1 << 62, newest_first=False)
        return rows

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        event_type = "metrics" if data else "message"
        self.insert(EventRecord(new_id("ftevent"), job_id, int(time.time()), level, message, event_type, data))


def _encode(column: str, value: object) -> object:
    return json.dumps(value) if column in _JSON and value is not None else value


def _decode(kind: type[R], row: sqlite3.Row) -> R:
    fields = {k: (json.loads(v) if k in _JSON and v is not None else v) for k, v in dict(row).items() if k != "seq"}
    return kind(**fields)
