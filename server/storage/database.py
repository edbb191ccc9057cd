"""One small database interface over two engines, chosen by URL.

- `sqlite:///absolute/path.sqlite3`: the zero-setup default, an embedded file. One connection is
  shared by the process's threads under a lock; each statement commits on its own (WAL journal,
  full sync), so a crash loses at most the statement in flight. Several processes may open the
  same file: a writer waits up to `BUSY_SECONDS` for another's lock.
- `postgresql://...` (or `postgres://...`, any URI libpq takes): a server that several replicas
  share, through a pool of autocommit connections (psycopg 3).

Both take SQL with `?` placeholders (a `?` inside a quoted literal stays a `?`) and give rows as
dicts. `transaction()` groups statements: on SQLite it is `BEGIN IMMEDIATE`, which takes the write
lock at once, so what a transaction read cannot change before it writes; on PostgreSQL it is one
pooled connection's transaction (READ COMMITTED: lock what you read with `FOR UPDATE`). Outside a
transaction every statement commits on its own.

Write SQL both engines read: standard types (`TEXT`, `INTEGER`/`BIGINT`, `DOUBLE PRECISION`),
`COALESCE`, `LIMIT`; where they differ, branch on `dialect`.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

BUSY_SECONDS = 30.0  # SQLite: how long a write waits for another process's lock
CONNECT_SECONDS = 10.0  # PostgreSQL: how long opening, or waiting for a pooled connection, may take
POOL_SIZE = 8  # PostgreSQL: connections one process holds at most


class DatabaseUnavailable(RuntimeError):
    """The database named by a well-formed URL cannot be opened or reached."""


@dataclass
class Result:
    rows: list[dict[str, Any]] = field(default_factory=list)  # empty for statements that return none
    rowcount: int = -1  # rows changed by INSERT, UPDATE or DELETE


def safe_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    url = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1@", url)
    return re.sub(r"([?&])password=[^&#]*&?", r"\1", url).rstrip("?&")


class Transaction:
    """Statements of one transaction: `execute` as on `Database`."""

    def __init__(self, run):
        self._run = run

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return self._run(sql, params)


class Database(ABC):
    """Open with `Database.open(url)`; `dialect` is "sqlite" or "postgresql"; `safe_url` names it
    without a password. Safe to share between threads."""

    dialect: str
    safe_url: str

    @staticmethod
    def open(url: str) -> Database:
        """The database at `url`. ValueError for a URL that is not `sqlite:///absolute/path` or a
        PostgreSQL URI; DatabaseUnavailable when it cannot be opened or reached."""
        scheme, separator, rest = url.partition("://")
        if not separator:
            raise ValueError(f"Malformed database URL {safe_url(url)!r}: expected sqlite:///path or postgresql://...")
        scheme = scheme.lower()
        if scheme == "sqlite":
            return _SQLite(url, rest)
        if scheme in ("postgresql", "postgres"):
            return _Postgres(url)
        raise ValueError(f"Unknown database URL scheme {scheme!r} in {safe_url(url)!r}: use sqlite:// or postgresql://")

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        """Run one statement, committed on its own."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """A context manager: statements run through the object it gives commit together when the
        block ends, or roll back if it raises. Not nestable; inside it, use the transaction's
        `execute`, not the database's."""

    @abstractmethod
    def close(self) -> None:
        """Close the connections; the object is not used afterwards."""


class _SQLite(Database):
    dialect = "sqlite"

    def __init__(self, url: str, rest: str):
        # `sqlite:///` and then the path; `sqlite:////abs` (an absolute path pasted after
        # `sqlite:///`) names the same file. Taken literally: file names need no escaping.
        if not rest.startswith("/") or not rest.strip("/"):
            raise ValueError(f"Malformed SQLite URL {safe_url(url)!r}: expected sqlite:///absolute/path.sqlite3")
        self.path = "/" + rest.lstrip("/")
        self.safe_url = safe_url(url)
        self._lock = threading.RLock()  # reentrant: a thread inside its transaction may still call execute
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
            self._db.row_factory = _dict_row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"Cannot open the database {self.safe_url}: {exc}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        with self._lock:
            return self._run(sql, params)

    def _run(self, sql: str, params: Sequence[Any]) -> Result:
        cursor = self._db.execute(sql, tuple(params))
        rows = cursor.fetchall()
        return Result(rows, cursor.rowcount)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._run)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Postgres(Database):
    dialect = "postgresql"

    def __init__(self, url: str):
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self.safe_url = safe_url(url)
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(f"Malformed PostgreSQL URL {self.safe_url!r}: {_first_line(exc)}") from None
        # One plain connection first: when the server cannot be reached it fails at once with
        # libpq's reason, where the pool would only time out.
        try:
            psycopg.connect(url, connect_timeout=max(1, int(CONNECT_SECONDS))).close()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"Cannot reach the database {self.safe_url}: {_first_line(exc)}") from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True, "row_factory": dict_row},
            check=ConnectionPool.check_connection,  # a server restarted since leaves broken connections behind
            timeout=CONNECT_SECONDS,
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_SECONDS)
        except Exception as exc:
            self._pool.close()
            raise DatabaseUnavailable(f"Cannot reach the database {self.safe_url}: {_first_line(exc)}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        with self._connection() as conn:
            return _run_psycopg(conn, sql, params)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._connection() as conn, conn.transaction():
            yield Transaction(functools.partial(_run_psycopg, conn))

    @contextmanager
    def _connection(self):
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:  # only the pool raises it: no connection came back in time
            raise DatabaseUnavailable(f"Cannot reach the database {self.safe_url}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._pool.close()


def _run_psycopg(conn, sql: str, params: Sequence[Any]) -> Result:
    cursor = conn.execute(_psycopg_sql(sql), tuple(params))
    rows = cursor.fetchall() if cursor.description is not None else []
    return Result(rows, cursor.rowcount)


@functools.lru_cache(maxsize=512)
def _psycopg_sql(sql: str) -> str:
    """`?` placeholders as psycopg's `%s`. Params are always passed, so psycopg reads every `%` in
    the text as its own, even inside literals: each literal `%` is doubled."""
    out, quote = [], None
    for char in sql:
        if char == "%":
            out.append("%%")
        elif quote is not None:
            out.append(char)
            if char == quote:  # a doubled quote closes and reopens at once
                quote = None
        elif char in "'\"":
            quote = char
            out.append(char)
        else:
            out.append("%s" if char == "?" else char)
    return "".join(out)


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
