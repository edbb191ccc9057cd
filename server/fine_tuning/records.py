"""Fine-tuning records: files, jobs, job events and checkpoints, in one database the replicas share.

Where they live: by default in an embedded SQLite file, `<data dir>/fine_tuning.sqlite3` beside
the adapter store, for one server; or in a PostgreSQL database that several replicas share
(`Records.open(url)`; the engines are `plait.server.storage.database`). Both hold the same tables
with the same columns: integers are 64-bit (`BIGINT` on PostgreSQL), JSON columns are text, and
`seq` is SQLite's `AUTOINCREMENT` or PostgreSQL's identity. File contents are not here but in the
file store (`plait.server.fine_tuning.files`). Rows hold what the API shows and come back as the
dataclasses below. Every table has an `id` (what clients see) and an increasing `seq` that orders
it, which is also the cursor behind `after` in the list routes. Each statement commits on its own
(on SQLite with a WAL journal and full sync, so a crash loses at most the statement in flight);
migrations and the queue methods are transactions.

Schema versions: the table `schema_version` holds one row, the version the tables are at.
Opening a database applies, in one transaction, each step of `_MIGRATIONS` above its version (on
PostgreSQL under an advisory lock, so replicas starting together migrate once); one newer than
`SCHEMA_VERSION` is refused with `SchemaTooNew` and left untouched. Databases written before
`schema_version` existed (SQLite only) are version 1 or 2, told apart by their columns. A change
to the tables is a new step at the end; a released step never changes.

Leases: any replica may run any job. `claim_job` takes the oldest job that is queued, or running
under a lease that has lapsed, and marks it running under the claiming replica (`owner`) until
`lease_expires`. The owner renews the lease while the job runs (`renew_lease`, which fails once
the job was cancelled, finished or taken over) and hands the job back if it shuts down first
(`release_job`). A replica that dies stops renewing, so another takes its job once the lease
lapses. Lease times are unix times from each replica's own clock: replicas' clocks must agree to
well within a lease.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from plait.server.errors import ClientError
from plait.server.storage.database import Database, Transaction

DATABASE_FILE = "fine_tuning.sqlite3"
SCHEMA_VERSION = 3  # the number of steps in `_MIGRATIONS`
_ALPHABET = string.ascii_letters + string.digits


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer plait than this one."""


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
    owner: str | None = None  # the replica running it, while it runs
    lease_expires: float | None = None  # unix time: past it, another replica may take the job over


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

# Version 1: the first release's tables. `IF NOT EXISTS` because that release created them one
# statement at a time, so a crash may have left only some behind.
_V1_TABLES = """
CREATE TABLE IF NOT EXISTS files (
    seq {seq},
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes {int} NOT NULL,
    created_at {int} NOT NULL,
    examples {int}
);
CREATE TABLE IF NOT EXISTS jobs (
    seq {seq},
    id TEXT NOT NULL UNIQUE,
    created_at {int} NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    hyperparameters TEXT NOT NULL,
    suffix TEXT,
    seed {int} NOT NULL,
    metadata TEXT,
    train_examples {int} NOT NULL,
    fine_tuned_model TEXT,
    started_at {int},
    finished_at {int},
    trained_tokens {int},
    error TEXT,
    result_files TEXT NOT NULL DEFAULT '[]',
    pid {int}
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    seq {seq},
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at {int} NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq {seq},
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at {int} NOT NULL,
    step_number {int} NOT NULL,
    fine_tuned_model_checkpoint TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""
# SQLite's INTEGER is 64-bit already, and only `INTEGER PRIMARY KEY` makes a rowid alias.
_TYPES = {
    "sqlite": {"seq": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER"},
    "postgresql": {"seq": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "int": "BIGINT"},
}
# Any number that no other advisory lock of this database uses: "plait" in ASCII.
_MIGRATION_LOCK = 0x706C616974
# Columns stored as JSON text.
_JSON = frozenset({"hyperparameters", "metadata", "error", "result_files", "data", "metrics"})


def _create_tables(tx: Transaction, dialect: str) -> None:
    for statement in _V1_TABLES.format(**_TYPES[dialect]).split(";"):
        if statement.strip():
            tx.execute(statement)


def _add_format_and_method(tx: Transaction, dialect: str) -> None:
    # The release before `schema_version` added these one at a time, so either may be there already.
    for table, column, declaration in (
        ("files", "format", "TEXT"),
        ("jobs", "method", "TEXT NOT NULL DEFAULT 'supervised'"),
    ):
        if column not in _columns(tx, dialect, table):
            tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _add_leases(tx: Transaction, dialect: str) -> None:
    tx.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    tx.execute("ALTER TABLE jobs ADD COLUMN lease_expires DOUBLE PRECISION")


# Step i takes a database from version i to version i + 1.
_MIGRATIONS: tuple[Callable[[Transaction, str], None], ...] = (_create_tables, _add_format_and_method, _add_leases)


def new_id(prefix: str) -> str:
    """`<prefix>-` and 24 random letters and digits, like OpenAI's ids (and valid in an adapter id)."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class Records:
    def __init__(self, database: Database):
        """Records in `database`, migrated to `SCHEMA_VERSION` first; `close()` closes the database."""
        self.database = database
        _migrate(database)

    @classmethod
    def open(cls, url: str) -> Records:
        """Records in the database at `url` (`sqlite:///absolute/path` or `postgresql://...`)."""
        database = Database.open(url)
        try:
            return cls(database)
        except BaseException:
            database.close()
            raise

    def close(self) -> None:
        self.database.close()

    def insert(self, record: Record) -> None:
        row = dataclasses.asdict(record)
        columns = list(row)
        values = [_encode(c, row[c]) for c in columns]
        sql = f"INSERT INTO {record.table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        self.database.execute(sql, values)

    def get(self, kind: type[R], row_id: str) -> R | None:
        found = self.database.execute(f"SELECT * FROM {kind.table} WHERE id = ?", (row_id,)).rows
        return _decode(kind, found[0]) if found else None

    def update(self, kind: type[Record], row_id: str, **fields) -> None:
        names = {f.name for f in dataclasses.fields(kind)}
        assert fields and set(fields) <= names, sorted(set(fields) - names)
        assignments = ", ".join(f"{c} = ?" for c in fields)
        self.database.execute(
            f"UPDATE {kind.table} SET {assignments} WHERE id = ?",
            [*(_encode(c, v) for c, v in fields.items()), row_id],
        )

    def delete(self, kind: type[Record], row_id: str) -> bool:
        return self.database.execute(f"DELETE FROM {kind.table} WHERE id = ?", (row_id,)).rowcount > 0

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
        if after is not None:
            cursor = self.database.execute(f"SELECT seq FROM {kind.table} WHERE id = ?", (after,)).rows
            if not cursor:
                raise ClientError(f"Invalid 'after': no '{after}' in this list.", "after", "invalid_value")
            clauses.append("seq < ?" if newest_first else "seq > ?")
            params.append(cursor[0]["seq"])
        sql = f"SELECT * FROM {kind.table}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self.database.execute(sql, [*params, limit + 1]).rows
        return [_decode(kind, r) for r in rows[:limit]], len(rows) > limit

    def all(self, kind: type[R], **where) -> list[R]:
        """Every row matching `where`, oldest first."""
        rows, _ = self.page(kind, where=where, limit=1 << 62, newest_first=False)
        return rows

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        event_type = "metrics" if data else "message"
        self.insert(EventRecord(new_id("ftevent"), job_id, int(time.time()), level, message, event_type, data))

    # --- the job queue ----------------------------------------------------------------------------

    def claim_job(self, owner: str, lease_seconds: float) -> JobRecord | None:
        """Take the oldest job that is queued, or running under a lapsed lease (or none, as the
        release before leases left them), and run it under `owner` for `lease_seconds`: the job as
        it now is, or None when there is nothing to take."""
        now = time.time()
        # Replicas claiming together each skip the row another has locked and take the next one.
        lock = " FOR UPDATE SKIP LOCKED" if self.database.dialect == "postgresql" else ""
        with self.database.transaction() as tx:
            found = tx.execute(
                "SELECT id FROM jobs WHERE status = 'queued' OR (status = 'running' AND COALESCE(lease_expires, 0) < ?)"
                f" ORDER BY seq LIMIT 1{lock}",
                (now,),
            ).rows
            if not found:
                return None
            job_id = found[0]["id"]
            tx.execute(
                "UPDATE jobs SET status = 'running', owner = ?, lease_expires = ?, started_at = COALESCE(started_at, ?)"
                " WHERE id = ?",
                (owner, now + lease_seconds, int(now), job_id),
            )
            row = tx.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).rows[0]
        return _decode(JobRecord, row)

    def renew_lease(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease on a running job; False when the job is no longer running under
        `owner` (cancelled, finished, or taken over by another replica), which should then stop it."""
        changed = self.database.execute(
            "UPDATE jobs SET lease_expires = ? WHERE id = ? AND status = 'running' AND owner = ?",
            (time.time() + lease_seconds, job_id, owner),
        )
        return changed.rowcount > 0

    def release_job(self, job_id: str, owner: str) -> bool:
        """Queue again a job running under `owner` (a replica shutting down hands it back); False when
        it no longer runs under `owner`."""
        changed = self.database.execute(
            "UPDATE jobs SET status = 'queued', owner = NULL, lease_expires = NULL"
            " WHERE id = ? AND status = 'running' AND owner = ?",
            (job_id, owner),
        )
        return changed.rowcount > 0


def _migrate(database: Database) -> None:
    dialect = database.dialect
    with database.transaction() as tx:
        if dialect == "postgresql":
            tx.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        version = _version(tx, dialect)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"The fine-tuning records in {database.safe_url} are at schema version {version}, newer than "
                f"version {SCHEMA_VERSION}, the newest this server knows: upgrade plait."
            )
        if version == SCHEMA_VERSION:
            return
        for step in _MIGRATIONS[version:SCHEMA_VERSION]:
            step(tx, dialect)
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        tx.execute("DELETE FROM schema_version")
        tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


def _version(tx: Transaction, dialect: str) -> int:
    if _columns(tx, dialect, "schema_version"):
        rows = tx.execute("SELECT MAX(version) AS version FROM schema_version").rows
        if rows and rows[0]["version"] is not None:
            return rows[0]["version"]
    jobs = _columns(tx, dialect, "jobs")  # written before `schema_version` existed, or new
    if not jobs:
        return 0
    return 2 if "method" in jobs else 1


def _columns(tx: Transaction, dialect: str, table: str) -> set[str]:
    """The columns of `table`; none when there is no such table."""
    if dialect == "sqlite":
        rows = tx.execute("SELECT name FROM pragma_table_info(?)", (table,)).rows
    else:
        rows = tx.execute(
            "SELECT column_name AS name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        ).rows
    return {row["name"] for row in rows}


def _encode(column: str, value: object) -> object:
    return json.dumps(value) if column in _JSON and value is not None else value


def _decode(kind: type[R], row: dict[str, Any]) -> R:
    fields = {k: (json.loads(v) if k in _JSON and v is not None else v) for k, v in row.items() if k != "seq"}
    return kind(**fields)
