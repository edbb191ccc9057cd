"""Uploaded training files on their own: the check's report, and what a crash leaves behind."""

from __future__ import annotations

import io
import json

import pytest

from plait.server.errors import ClientError
from plait.server.fine_tuning.files import PURPOSE, FileStore, check_training_file
from plait.server.fine_tuning.records import FileRecord, Records

GOOD = (json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n").encode()


def test_many_bad_lines_are_counted_and_the_first_listed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"{}\n" * 12)
    with pytest.raises(ClientError) as error:
        check_training_file(path)
    assert (error.value.status, error.value.param, error.value.code) == (400, "file", "invalid_file")
    message = error.value.message
    assert message.startswith("Invalid training file (12 problems): line 1: unknown format")
    assert "line 5:" in message and "line 6:" not in message and message.endswith("and 7 more.")


def test_uploads_are_records_and_files_and_a_crash_leaves_neither_alone(tmp_path):
    records = Records.open(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    store = FileStore(tmp_path / "files", records, max_bytes=1 << 20)
    kept = store.add_upload(io.BytesIO(GOOD), "train.jsonl", PURPOSE)
    assert isinstance(kept, FileRecord) and (kept.examples, kept.bytes, kept.filename) == (1, len(GOOD), "train.jsonl")
    assert store.get(kept.id) == kept and store.path(kept.id).read_bytes() == GOOD
    with pytest.raises(ClientError) as too_big:
        store.add_upload(io.BytesIO(GOOD * 100_000), "big.jsonl", PURPOSE)
    assert too_big.value.status == 413
    (tmp_path / "files" / ".upload-half").write_bytes(b"{")  # what a crash mid-copy leaves
    (tmp_path / "files" / "file-orphan").write_bytes(GOOD)  # stored, but its row never written
    records.insert(FileRecord("file-lost", "x.jsonl", PURPOSE, 1, 0, 1))  # a row whose file is gone
    FileStore(tmp_path / "files", records)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [kept.id]
    assert [r.id for r in records.all(FileRecord)] == [kept.id]
