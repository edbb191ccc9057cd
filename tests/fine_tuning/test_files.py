"""Uploaded training files on their own, in a folder and in S3: the check's report, and what a
crash leaves behind."""

from __future__ import annotations

import io
import json
import os
import time

import pytest

from plait.server.errors import ClientError
from plait.server.fine_tuning import files as files_module
from plait.server.fine_tuning.files import PURPOSE, STALE_UPLOAD_SECONDS, FileStore, check_training_file
from plait.server.fine_tuning.records import FileRecord, Records
from plait.server.storage.objects import FolderObjects
from plait.server.storage.s3 import S3Objects

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


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_uploads_are_records_and_objects_and_a_crash_leaves_neither_alone(request, tmp_path, backend):
    if backend == "folder":
        objects = FolderObjects(tmp_path / "store")
    else:
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        objects = S3Objects(bucket, endpoint_url=server.endpoint_url)
    records = Records.open(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    store = FileStore(objects, records, tmp_path / "uploads", max_bytes=1 << 20)
    kept = store.add_upload(io.BytesIO(GOOD), "train.jsonl", PURPOSE)
    assert isinstance(kept, FileRecord) and (kept.examples, kept.bytes, kept.filename) == (1, len(GOOD), "train.jsonl")
    with store.open(kept.id) as stream:
        assert store.get(kept.id) == kept and stream.read() == GOOD
    with pytest.raises(ClientError) as too_big:
        store.add_upload(io.BytesIO(GOOD * 100_000), "big.jsonl", PURPOSE)
    assert too_big.value.status == 413
    with pytest.raises(ClientError, match="Invalid training file"):
        store.add_upload(io.BytesIO(b"{}\n"), "bad.jsonl", PURPOSE)
    assert [info.key for info in objects.list("")] == [f"files/{kept.id}"]  # refused files left nothing

    (tmp_path / "uploads" / ".upload-half").write_bytes(b"{")  # what a crash mid-copy leaves
    objects.write("files/file-orphan", GOOD)  # stored, but its row never written
    records.insert(FileRecord("file-lost", "x.jsonl", PURPOSE, 1, 0, 1))  # a row whose object is gone
    if backend == "folder":
        objects.write("files/file-young", GOOD)  # the same, but maybe another replica's upload in progress
        old = time.time() - STALE_UPLOAD_SECONDS - 60
        os.utime(objects.root / "files" / "file-orphan", (old, old))
        FileStore(objects, records, tmp_path / "uploads")
        assert sorted(info.key for info in objects.list("")) == [f"files/{kept.id}", "files/file-young"]
    else:  # S3 keeps its own times: pretend the clock moved on instead
        files_module.STALE_UPLOAD_SECONDS = -1.0
        try:
            FileStore(objects, records, tmp_path / "uploads")
        finally:
            files_module.STALE_UPLOAD_SECONDS = STALE_UPLOAD_SECONDS
        assert [info.key for info in objects.list("")] == [f"files/{kept.id}"]
    assert list((tmp_path / "uploads").iterdir()) == []
    assert [r.id for r in records.all(FileRecord)] == [kept.id]
