"""The fine-tuning records on both engines, SQLite in a temporary folder and a real PostgreSQL:
every record type round trips, old databases migrate with their rows, a newer one is refused,
and the job queue hands each job to one replica at a time across connections."""

from __future__ import annotations

import sqlite3
import threading
import time

import psycopg
import pytest

from plait.server.errors import ClientError
from plait.server.fine_tuning.records import (
    SCHEMA_VERSION,
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    Records,
    SchemaTooNew,
)
from plait.server.storage.database import Database, DatabaseUnavailable, safe_url

# The first release's tables, as it made them on SQLite (version 1: no files.format, no jobs.method).
V1_SQLITE = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, examples INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    hyperparameters TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL, metadata TEXT,
    train_examples INTEGER NOT NULL, fine_tuned_model TEXT, started_at INTEGER, finished_at INTEGER,
    trained_tokens INTEGER, error TEXT, result_files TEXT NOT NULL DEFAULT '[]', pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step_number INTEGER NOT NULL, fine_tuned_model_checkpoint TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""
# What the release before schema versions added to it (version 2).
V2_SQLITE = (
    "ALTER TABLE files ADD COLUMN format TEXT;ALTER TABLE jobs ADD COLUMN method TEXT NOT NULL DEFAULT 'supervised';"
)
OLD_ROWS = (
    "INSERT INTO files (id, filename, purpose, bytes, created_at, examples)"
    " VALUES ('file-old', 'old.jsonl', 'fine-tune', 12, 100, 3);"
    "INSERT INTO jobs (id, created_at, status, model, training_file, validation_file, hyperparameters, suffix,"
    " seed, metadata, train_examples, fine_tuned_model, started_at, finished_at, trained_tokens, error,"
    " result_files, pid) VALUES ('ftjob-old', 100, 'succeeded', 'base', 'file-old', NULL, '{\"n_epochs\": 2}',"
    " 'mine', 7, '{\"team\": \"a\"}', 3, 'ft:base:mine:ftjob-old', 101, 102, 999, NULL, '[\"file-res\"]', NULL);"
    "INSERT INTO events (id, job_id, created_at, level, message, type, data)"
    " VALUES ('ftevent-old', 'ftjob-old', 101, 'info', 'step 1', 'metrics', '{\"loss\": 0.5}');"
    "INSERT INTO checkpoints (id, job_id, created_at, step_number, fine_tuned_model_checkpoint, metrics)"
    " VALUES ('ftckpt-old', 'ftjob-old', 102, 1, 'ft:base:mine:ftjob-old', '{\"train_loss\": 0.5}');"
)
OLD_JOB = JobRecord(
    id="ftjob-old",
    created_at=100,
    status="succeeded",
    model="base",
    training_file="file-old",
    validation_file=None,
    hyperparameters={"n_epochs": 2},
    suffix="mine",
    seed=7,
    metadata={"team": "a"},
    train_examples=3,
    fine_tuned_model="ft:base:mine:ftjob-old",
    started_at=101,
    finished_at=102,
    trained_tokens=999,
    result_files=["file-res"],
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """A fresh, empty database on each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def records(url):
    opened = Records.open(url)
    yield opened
    opened.close()


def _job(job_id: str, **fields) -> JobRecord:
    defaults = dict(
        id=job_id,
        created_at=int(time.time()),
        status="queued",
        model="base",
        training_file="file-x",
        validation_file=None,
        hyperparameters={"n_epochs": 1},
        suffix=None,
        seed=0,
        metadata=None,
        train_examples=10,
    )
    return JobRecord(**{**defaults, **fields})


def _version(url: str) -> int:
    database = Database.open(url)
    try:
        rows = database.execute("SELECT version FROM schema_version").rows
    finally:
        database.close()
    assert len(rows) == 1
    return rows[0]["version"]


def _check_old_rows_kept(records: Records) -> None:
    assert records.get(FileRecord, "file-old") == FileRecord("file-old", "old.jsonl", "fine-tune", 12, 100, 3, None)
    assert records.get(JobRecord, "ftjob-old") == OLD_JOB  # method "supervised", no owner, no lease
    event = records.get(EventRecord, "ftevent-old")
    assert event == EventRecord("ftevent-old", "ftjob-old", 101, "info", "step 1", "metrics", {"loss": 0.5})
    checkpoint = records.get(CheckpointRecord, "ftckpt-old")
    assert checkpoint == CheckpointRecord(
        "ftckpt-old", "ftjob-old", 102, 1, "ft:base:mine:ftjob-old", {"train_loss": 0.5}
    )
    # New rows go after the old ones and take the new columns.
    records.insert(_job("ftjob-new", method="dpo", owner="r1", lease_expires=5.5))
    assert [job.id for job in records.all(JobRecord)] == ["ftjob-old", "ftjob-new"]
    new = records.get(JobRecord, "ftjob-new")
    assert (new.method, new.owner, new.lease_expires) == ("dpo", "r1", 5.5)


# --- records --------------------------------------------------------------------------------------


def test_every_record_type_round_trips(records):
    file = FileRecord("file-a", "train.jsonl", "fine-tune", 5_000_000_000, 1_700_000_000, 12, "preference")
    made = FileRecord("file-b", "results.csv", "fine-tune-results", 10, 1_700_000_001, None)
    job = _job(
        "ftjob-a",
        status="running",
        validation_file="file-a",
        hyperparameters={"n_epochs": 3, "learning_rate": 1e-4, "lora": {"r": 8}},
        suffix="s.1",
        seed=2_147_483_647,
        metadata={"k": "v", "ü": "%?'"},
        fine_tuned_model="ft:base:s.1:ftjob-a",
        started_at=1_700_000_002,
        finished_at=1_700_000_003,
        trained_tokens=123,
        error={"code": "training_failed", "message": "it's 100% broken?", "param": None},
        result_files=["file-b"],
        pid=4321,
        method="dpo",
        owner="replica-1",
        lease_expires=1_700_000_060.25,
    )
    event = EventRecord("ftevent-a", "ftjob-a", 1_700_000_004, "warn", "step 5: loss 0.5", "metrics", {"loss": 0.5})
    plain = EventRecord("ftevent-b", "ftjob-a", 1_700_000_005, "info", "started", "message")
    checkpoint = CheckpointRecord(
        "ftckpt-a", "ftjob-a", 1_700_000_006, 5, "ft:base:s.1:ftjob-a:ckpt-step-5", {"x": 1.5}
    )
    for record in (file, made, job, event, plain, checkpoint):
        records.insert(record)
        assert records.get(type(record), record.id) == record
    assert records.get(JobRecord, "ftjob-missing") is None

    records.update(JobRecord, "ftjob-a", status="cancelled", owner=None, error=None, metadata={"k": "w"})
    changed = records.get(JobRecord, "ftjob-a")
    assert (changed.status, changed.owner, changed.error, changed.metadata) == ("cancelled", None, None, {"k": "w"})
    assert changed.lease_expires == 1_700_000_060.25 and changed.hyperparameters == job.hyperparameters

    assert records.delete(FileRecord, "file-b") and not records.delete(FileRecord, "file-b")
    assert records.get(FileRecord, "file-b") is None and records.all(FileRecord) == [file]


def test_pages_follow_the_order_of_insertion_and_the_after_cursor(records):
    for n in range(5):
        records.add_event("ftjob-a", f"a{n}", data={"step": n} if n % 2 else None)
    records.add_event("ftjob-b", "b0")
    first, more = records.page(EventRecord, where={"job_id": "ftjob-a"}, limit=2)
    assert [e.message for e in first] == ["a4", "a3"] and more
    assert first[1].type == "metrics" and first[1].data == {"step": 3}
    second, more = records.page(EventRecord, where={"job_id": "ftjob-a"}, after=first[-1].id, limit=2)
    assert [e.message for e in second] == ["a2", "a1"] and more
    third, more = records.page(EventRecord, where={"job_id": "ftjob-a"}, after=second[-1].id, limit=2)
    assert [e.message for e in third] == ["a0"] and not more
    oldest, more = records.page(EventRecord, after=second[0].id, limit=10, newest_first=False)
    assert [e.message for e in oldest] == ["a3", "a4", "b0"] and not more
    assert [e.message for e in records.all(EventRecord, job_id="ftjob-b")] == ["b0"]
    with pytest.raises(ClientError) as error:
        records.page(EventRecord, after="ftevent-nothere")
    assert (error.value.param, error.value.code) == ("after", "invalid_value")


# --- schema versions ------------------------------------------------------------------------------


def test_a_fresh_database_gets_the_newest_version(url):
    Records.open(url).close()
    assert SCHEMA_VERSION == 3 and _version(url) == 3
    Records.open(url).close()  # opening again changes nothing
    assert _version(url) == 3


@pytest.mark.parametrize("old_version", [1, 2])
def test_a_sqlite_database_of_an_earlier_release_migrates_with_its_rows(tmp_path, old_version):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SQLITE + (V2_SQLITE if old_version == 2 else "") + OLD_ROWS)
    db.close()
    records = Records.open(f"sqlite:///{path}")
    try:
        _check_old_rows_kept(records)
    finally:
        records.close()
    assert _version(f"sqlite:///{path}") == 3
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    db.close()
    assert {"method", "owner", "lease_expires"} <= columns


def test_a_postgresql_database_at_version_1_migrates_with_its_rows(postgres_url):
    v1 = V1_SQLITE.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for statement in (v1 + OLD_ROWS).split(";"):
            if statement.strip():
                conn.execute(statement.replace("INTEGER", "BIGINT"))
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
    records = Records.open(postgres_url)
    try:
        _check_old_rows_kept(records)
    finally:
        records.close()
    assert _version(postgres_url) == 3


def test_a_database_newer_than_this_server_is_refused_untouched(url):
    Records.open(url).close()
    database = Database.open(url)
    database.execute("UPDATE schema_version SET version = 99")
    database.close()
    with pytest.raises(SchemaTooNew) as error:
        Records.open(url)
    message = str(error.value)
    assert "\n" not in message and "version 99" in message and "3" in message and message.endswith("upgrade plait.")
    assert safe_url(url) in message
    assert _version(url) == 99


def test_urls_that_name_no_database_are_refused_in_one_line(tmp_path):
    for bad in ("mysql://h/db", "records.sqlite3", "sqlite://relative.sqlite3", "postgresql://h/db?nonsense=1"):
        with pytest.raises(ValueError) as error:
            Database.open(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(DatabaseUnavailable) as error:
        Database.open("postgresql://plait:s3cret@127.0.0.1:1/plait")  # nothing listens on port 1
    assert "\n" not in str(error.value) and "s3cret" not in str(error.value)
    assert "postgresql://plait@127.0.0.1:1/plait" in str(error.value)
    with pytest.raises(DatabaseUnavailable):
        Database.open(f"sqlite:///{tmp_path / 'no-such-folder' / 'records.sqlite3'}")


def test_a_failed_transaction_leaves_nothing(url):
    database = Database.open(url)
    try:
        database.execute("CREATE TABLE t (x TEXT)")
        with pytest.raises(RuntimeError), database.transaction() as tx:
            tx.execute("INSERT INTO t (x) VALUES (?)", ("50% off?",))
            raise RuntimeError("changed my mind")
        with database.transaction() as tx:
            tx.execute("INSERT INTO t (x) VALUES (?)", ("100%",))
        assert database.execute("SELECT x, '?%' AS literal FROM t").rows == [{"x": "100%", "literal": "?%"}]
    finally:
        database.close()


# --- the job queue --------------------------------------------------------------------------------


def test_concurrent_replicas_claim_each_job_exactly_once(url):
    first = Records.open(url)
    for n in range(20):
        first.insert(_job(f"ftjob-{n:02d}"))
    first.close()
    claimed: dict[str, list[str]] = {}
    start = threading.Barrier(8)
    failures = []

    def replica(name: str) -> None:
        try:
            records = Records.open(url)
            start.wait()
            try:
                while (job := records.claim_job(name, 60)) is not None:
                    assert job.status == "running" and job.owner == name
                    claimed.setdefault(job.id, []).append(name)
            finally:
                records.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=replica, args=(f"replica-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert sorted(claimed) == [f"ftjob-{n:02d}" for n in range(20)]
    assert all(len(owners) == 1 for owners in claimed.values()), claimed


def test_the_oldest_claimable_job_comes_first_and_a_lapsed_lease_is_taken_over(records):
    now = time.time()
    records.insert(_job("ftjob-live", status="running", owner="a", lease_expires=now + 60, started_at=1))
    records.insert(_job("ftjob-lapsed", status="running", owner="a", lease_expires=now - 1, started_at=2))
    records.insert(_job("ftjob-old-release", status="running", started_at=3))  # running before leases: none
    records.insert(_job("ftjob-queued"))
    records.insert(_job("ftjob-done", status="succeeded"))

    taken = records.claim_job("b", 30)
    assert (taken.id, taken.owner, taken.started_at) == ("ftjob-lapsed", "b", 2)
    assert now + 29 < taken.lease_expires < time.time() + 31
    assert records.claim_job("b", 30).id == "ftjob-old-release"
    queued = records.claim_job("b", 30)
    assert queued.id == "ftjob-queued" and abs(queued.started_at - now) < 5
    assert records.claim_job("b", 30) is None  # the live lease is left to its owner
    live = records.get(JobRecord, "ftjob-live")
    assert (live.owner, live.status) == ("a", "running")


def test_a_lease_is_renewed_only_by_its_owner_while_the_job_runs(records):
    records.insert(_job("ftjob-a"))
    job = records.claim_job("a", 30)
    assert records.renew_lease(job.id, "a", 120)
    assert records.get(JobRecord, job.id).lease_expires > time.time() + 100
    assert not records.renew_lease(job.id, "b", 120)

    records.update(JobRecord, job.id, lease_expires=time.time() - 1)  # replica a stalled past its lease
    assert records.claim_job("b", 30).owner == "b"
    assert not records.renew_lease(job.id, "a", 30)  # taken over: a must stop
    assert records.renew_lease(job.id, "b", 30)

    records.update(JobRecord, job.id, status="cancelled")
    assert not records.renew_lease(job.id, "b", 30)


def test_a_replica_shutting_down_hands_its_job_back(records):
    records.insert(_job("ftjob-a"))
    job = records.claim_job("a", 30)
    assert not records.release_job(job.id, "b")
    assert records.release_job(job.id, "a")
    released = records.get(JobRecord, job.id)
    assert (released.status, released.owner, released.lease_expires) == ("queued", None, None)
    assert not records.release_job(job.id, "a")  # no longer running
    again = records.claim_job("b", 30)
    assert (again.id, again.owner, again.started_at) == (job.id, "b", job.started_at)


def test_replicas_opening_a_fresh_postgresql_database_together_migrate_it_once(postgres_url):
    start = threading.Barrier(4)
    opened, failures = [], []

    def replica() -> None:
        try:
            start.wait()
            opened.append(Records.open(postgres_url))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for records in opened:
        records.close()
    assert not failures, failures
    assert len(opened) == 4 and _version(postgres_url) == 3
