"""Fine-tuning records: files, jobs, job events and checkpoints in one embedded SQLite database.

The database is `<data dir>/fine_tuning.sqlite3`, beside the adapter store. Rows hold what the
API shows; file contents live on disk (`plait.server.fine_tuning.files`). Every table has an
`id` (what clients see) and an increasing `seq` that orders it, which is also the cursor behind
`after` in the list routes. One connection is shared by the server's threads under a lock; each
statement commits on its own (WAL journal, full sync), so a crash loses at most the statement
in flight.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
import threading
import time
from pathlib import Path

DATABASE_FILE = "fine_tuning.sqlite3"
_ALPHABET = string.ascii_letters + string.digits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    examples INTEGER
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
    pid INTEGER
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

# Columns stored as JSON text.
_JSON = frozenset({"hyperparameters", "metadata", "error", "result_files", "data", "metrics"})
_TABLES = frozenset({"files", "jobs", "events", "checkpoints"})


class UnknownCursor(ValueError):
    """`after` names no row of the list being paged."""


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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- generic --------------------------------------------------------------------------------

    def insert(self, table: str, row: dict) -> dict:
        assert table in _TABLES
        columns = list(row)
        values = [_encode(c, row[c]) for c in columns]
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._lock:
            self._db.execute(sql, values)
        return row

    def get(self, table: str, row_id: str) -> dict | None:
        assert table in _TABLES
        with self._lock:
            found = self._db.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,)).fetchone()
        return _decode(found) if found else None

    def update(self, table: str, row_id: str, **fields) -> None:
        assert table in _TABLES and fields
        assignments = ", ".join(f"{c} = ?" for c in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE {table} SET {assignments} WHERE id = ?", [*(_encode(c, v) for c, v in fields.items()), row_id]
            )

    def delete(self, table: str, row_id: str) -> bool:
        assert table in _TABLES
        with self._lock:
            return self._db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,)).rowcount > 0

    def page(
        self,
        table: str,
        *,
        where: dict | None = None,
        after: str | None = None,
        limit: int = 20,
        newest_first: bool = True,
    ) -> tuple[list[dict], bool]:
        """Up to `limit` rows matching `where` (column = value) past the row `after`, and whether more follow."""
        assert table in _TABLES
        where = dict(where or {})
        clauses = [f"{column} = ?" for column in where]
        params = list(where.values())
        with self._lock:
            if after is not None:
                cursor = self._db.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    raise UnknownCursor(after)
                clauses.append("seq < ?" if newest_first else "seq > ?")
                params.append(cursor["seq"])
            sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
            rows = self._db.execute(sql, [*params, limit + 1]).fetchall()
        return [_decode(r) for r in rows[:limit]], len(rows) > limit

    def all(self, table: str, **where) -> list[dict]:
        """Every row matching `where`, oldest first."""
        rows, _ = self.page(table, where=where, limit=1 << 62, newest_first=False)
        return rows

    # --- events ---------------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        self.insert(
            "events",
            {
                "id": new_id("ftevent"),
                "job_id": job_id,
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "type": "metrics" if data else "message",
                "data": data,
            },
        )


def _encode(column: str, value: object) -> object:
    return json.dumps(value) if column in _JSON and value is not None else value


def _decode(row: sqlite3.Row) -> dict:
    return {k: (json.loads(v) if k in _JSON and v is not None else v) for k, v in dict(row).items()}
